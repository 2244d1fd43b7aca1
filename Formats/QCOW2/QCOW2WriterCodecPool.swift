import Compression
import Foundation

extension QCOW2Writer {
  /// Codecs for the worker threads. A codec keeps a library context that costs far more to
  /// make than a cluster costs to compress, and is not thread-safe, so each `prepare` call
  /// borrows one and gives it back; the pool grows to at most the number of threads that
  /// compress at once.
  final class CodecPool: @unchecked Sendable {
    private let type: CompressionType
    private let lock = NSLock()
    private var idle: [Codec] = []

    init(type: CompressionType) { self.type = type }

    /// Runs `body` with a codec no other thread is using.
    func withCodec<T>(_ body: (Codec) throws -> T) throws -> T {
      lock.lock()
      let borrowed = idle.popLast()
      lock.unlock()
      let codec = try borrowed ?? makeCodec(type)
      defer {
        lock.lock()
        idle.append(codec)
        lock.unlock()
      }
      return try body(codec)
    }
  }
}

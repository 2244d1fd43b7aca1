import DiskImage

/// Codecs of one type shared by the threads that compress or decompress at once. A codec
/// keeps a library context that costs far more to make than a cluster costs to compress,
/// and is not thread-safe: each call borrows one and gives it back, so contexts are made
/// once per concurrent thread, not once per cluster.
public final class CodecPool: @unchecked Sendable {
  public let type: CompressionType
  /// The level codecs compress at; nil for the type's default.
  public let level: Int32?
  private let lock = Lock()
  private var idle: [Codec] = []

  public init(type: CompressionType, level: Int32? = nil) {
    self.type = type
    self.level = level
  }

  /// A codec no other thread is using; give it back with `giveBack`.
  public func take() throws -> Codec {
    if let codec = lock.withLock({ idle.popLast() }) { return codec }
    return try makeCodec(type, level: level)
  }

  public func giveBack(_ codec: Codec) { lock.withLock { idle.append(codec) } }

  /// Runs `body` with a codec no other thread is using.
  public func withCodec<T>(_ body: (Codec) throws -> T) throws -> T {
    let codec = try take()
    defer { giveBack(codec) }
    return try body(codec)
  }
}

import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// Bytes read from start to end from a descriptor (a pipe, standard input, or a file read
/// as a stream), with `read(2)`: the byte source of a sequential image, whose size is not
/// known until it ends. Small reads (record headers) come from a buffer; large ones go
/// straight into the caller's memory.
public final class SequentialInput {
  /// The name errors give: the path, or "standard input".
  public let name: String
  private let descriptor: Int32
  private let buffer: UnsafeMutableRawBufferPointer
  private var bufferStart = 0
  private var bufferEnd = 0
  private var atEnd = false
  /// Stream bytes handed out so far: the offset of the next byte.
  public private(set) var offset: Int64 = 0

  /// A random-access source read from start to end instead of the descriptor.
  private let source: ByteSource?

  /// Reads from `descriptor` (a pipe, standard input), which the caller keeps open while
  /// this reads.
  public init(descriptor: Int32, name: String) {
    self.descriptor = descriptor
    self.name = name
    self.source = nil
    buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 4096)
    // A pipe holds 64 KiB by default: every read waits for the sender to refill it. 1 MiB
    // (the unprivileged limit) lets reads take whole records' worth; refusal changes nothing.
    _ = lacuna_grow_pipe(descriptor, 1 << 20)
  }

  /// Reads `source` from its start to its end, as if it came through a pipe.
  public init(source: ByteSource) {
    self.descriptor = -1
    self.name = source.name
    self.source = source
    buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 4096)
  }

  deinit { buffer.deallocate() }

  /// Fills `target` from the stream; returns how many bytes it got, fewer only when the
  /// stream ended. The corresponding C function is `read`.
  public func read(into target: UnsafeMutableRawBufferPointer) throws -> Int {
    var done = 0
    while done < target.count {
      if bufferStart < bufferEnd {
        let n = min(bufferEnd - bufferStart, target.count - done)
        (target.baseAddress! + done).copyMemory(from: buffer.baseAddress! + bufferStart, byteCount: n)
        bufferStart += n
        done += n
        continue
      }
      if atEnd { break }
      let wanted = target.count - done
      if wanted >= buffer.count {
        done += try readSome(into: target.baseAddress! + done, count: wanted, at: offset + Int64(done))
      } else {
        bufferStart = 0
        bufferEnd = try readSome(into: buffer.baseAddress!, count: buffer.count, at: offset + Int64(done))
      }
    }
    offset += Int64(done)
    return done
  }

  /// True when the stream has no byte left (reads ahead if it must).
  public func isAtEnd() throws -> Bool {
    if bufferStart < bufferEnd { return false }
    if atEnd { return true }
    bufferStart = 0
    bufferEnd = try readSome(into: buffer.baseAddress!, count: buffer.count, at: offset)
    return bufferEnd == 0
  }

  private func readSome(into target: UnsafeMutableRawPointer, count: Int, at streamOffset: Int64) throws -> Int {
    if let source {
      let n = try source.read(into: UnsafeMutableRawBufferPointer(start: target, count: count), at: streamOffset)
      if n == 0 { atEnd = true }
      return n
    }
    while true {
      let n = Glibc.read(descriptor, target, count)
      if n < 0 {
        if errno == EINTR { continue }
        throw ImageError.system(path: name, operation: "read at stream offset \(streamOffset)", errno: errno)
      }
      if n == 0 { atEnd = true }
      return n
    }
  }
}

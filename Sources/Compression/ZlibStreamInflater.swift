import CZlib
import DiskImage

/// Inflates zlib-wrapped streams (RFC 1950: a 2-byte header such as `78 9C`, deflate data
/// with windows up to 32 KiB, an Adler-32 trailer), which is what VMDK stores in a
/// compressed grain. `ZlibCodec` reads raw deflate with a 4 KiB window (qcow2's choice) and
/// would refuse these streams.
///
/// A stream must end (its Adler-32 checked) within the input; bytes after it are ignored.
/// How many bytes it inflated to is returned, so the caller decides what length is right.
/// An instance keeps its zlib context between calls and is not thread-safe: take one from a
/// `ZlibStreamInflaterPool` per call.
public final class ZlibStreamInflater {
  /// zlib's stream points back at its own address, so it lives in a fixed allocation.
  private let stream: UnsafeMutablePointer<z_stream>
  /// 15: the largest window, with the zlib header and trailer expected (not raw, not gzip).
  private static let windowBits: Int32 = 15

  public init() throws {
    stream = .allocate(capacity: 1)
    stream.initialize(to: z_stream())
    let status = inflateInit2_(stream, Self.windowBits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
    guard status == Z_OK else {
      stream.deallocate()
      throw CompressionError("zlib: cannot set up decompression (status \(status))")
    }
  }

  deinit {
    inflateEnd(stream)
    stream.deallocate()
  }

  /// Inflates the zlib stream at the start of `input` into `output`.
  ///
  /// - Returns: how many bytes the stream inflated to (at most `output.count`).
  /// - Throws: `CompressionError` when the data is not a valid zlib stream, its checksum
  ///   does not match, it would inflate to more than `output.count` bytes, or the input ends
  ///   before the stream does. Nothing is written past `output`.
  public func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
    guard input.count <= Int(UInt32.max), output.count < Int(UInt32.max) else {
      throw CompressionError("zlib: block too large (\(input.count) bytes in, \(output.count) out)")
    }
    guard inflateReset(stream) == Z_OK else { throw CompressionError("zlib: cannot reset the decompressor") }
    var spare: UInt8 = 0
    return try withUnsafeMutablePointer(to: &spare) { sparePointer in
      stream.pointee.next_in =
        input.baseAddress.map { UnsafeMutablePointer(mutating: $0.assumingMemoryBound(to: Bytef.self)) }
        ?? sparePointer
      stream.pointee.avail_in = UInt32(input.count)
      stream.pointee.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self) ?? sparePointer
      stream.pointee.avail_out = UInt32(output.count)
      var status = CZlib.inflate(stream, Z_FINISH)
      let produced = output.count - Int(stream.pointee.avail_out)
      if status != Z_STREAM_END, status != Z_DATA_ERROR, stream.pointee.avail_out == 0 {
        // The output is full but the stream has not ended: one byte more of room tells a
        // stream that only has its trailer left from one that inflates past the output.
        stream.pointee.next_out = sparePointer
        stream.pointee.avail_out = 1
        status = CZlib.inflate(stream, Z_FINISH)
        if stream.pointee.avail_out == 0 {
          throw CompressionError("zlib: data inflates past the expected \(output.count) bytes")
        }
      }
      switch status {
      case Z_STREAM_END:
        return produced
      case Z_DATA_ERROR, Z_NEED_DICT:
        let reason = stream.pointee.msg.map { String(cString: $0) } ?? "corrupt data"
        throw CompressionError("zlib: invalid zlib stream (\(reason))")
      case Z_MEM_ERROR:
        throw CompressionError("zlib: out of memory")
      case Z_OK, Z_BUF_ERROR:
        throw CompressionError(
          "zlib: the stream is cut short: the input (\(input.count) bytes) ends after \(produced) bytes of output")
      default:
        throw CompressionError("zlib: decompression failed (status \(status))")
      }
    }
  }
}

/// Inflaters shared by the threads that read at once: a zlib context costs far more to make
/// than a grain costs to inflate, so each call borrows one and gives it back.
public final class ZlibStreamInflaterPool: @unchecked Sendable {
  private let lock = Lock()
  private var idle: [ZlibStreamInflater] = []

  public init() {}

  /// Runs `body` with an inflater no other thread is using.
  public func withInflater<T>(_ body: (ZlibStreamInflater) throws -> T) throws -> T {
    let inflater = try lock.withLock({ idle.popLast() }) ?? ZlibStreamInflater()
    defer { lock.withLock { idle.append(inflater) } }
    return try body(inflater)
  }
}

import CZlib
import DiskImage

/// Deflates blocks into zlib-wrapped streams (RFC 1950: the 2-byte header `78 9C`, deflate
/// data with a 32 KiB window, an Adler-32 trailer), which is what a VMDK compressed grain
/// holds and what zlib's `compress()` makes. `ZlibCodec` makes raw deflate with a 4 KiB
/// window (qcow2's choice), which VMware would refuse.
///
/// The settings are `compress()`'s (window 15, memory level 8, default strategy), so the
/// bytes are those of `compress2` at the same level. An instance keeps its zlib context
/// between calls and is not thread-safe: take one from a `ZlibStreamDeflaterPool` per call.
public final class ZlibStreamDeflater {
  /// zlib's stream points back at its own address, so it lives in a fixed allocation.
  private let stream: UnsafeMutablePointer<z_stream>

  /// A deflater at `level` (0 to 9; zlib's default, 6, is what qemu's `compress()` uses).
  public init(level: Int32 = 6) throws {
    stream = .allocate(capacity: 1)
    stream.initialize(to: z_stream())
    let status = deflateInit2_(
      stream, level, Z_DEFLATED, 15, 8, Z_DEFAULT_STRATEGY, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
    guard status == Z_OK else {
      stream.deallocate()
      throw CompressionError("zlib: cannot set up compression (status \(status))")
    }
  }

  deinit {
    deflateEnd(stream)
    stream.deallocate()
  }

  /// The most bytes a stream of `count` input bytes can take.
  public func bound(_ count: Int) -> Int { Int(deflateBound(stream, UInt(count))) }

  /// Deflates all of `input` into one zlib stream written at the start of `output`, which
  /// must hold at least `bound(input.count)` bytes.
  ///
  /// - Returns: the length of the stream.
  public func deflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
    guard input.count < Int(UInt32.max), output.count < Int(UInt32.max), output.count >= bound(input.count) else {
      throw CompressionError("zlib: \(output.count) bytes of room cannot hold \(input.count) bytes deflated")
    }
    guard deflateReset(stream) == Z_OK else { throw CompressionError("zlib: cannot reset the compressor") }
    var spare: UInt8 = 0
    return try withUnsafeMutablePointer(to: &spare) { sparePointer in
      stream.pointee.next_in =
        input.baseAddress.map { UnsafeMutablePointer(mutating: $0.assumingMemoryBound(to: Bytef.self)) }
        ?? sparePointer
      stream.pointee.avail_in = UInt32(input.count)
      stream.pointee.next_out = output.baseAddress!.assumingMemoryBound(to: Bytef.self)
      stream.pointee.avail_out = UInt32(output.count)
      let status = CZlib.deflate(stream, Z_FINISH)
      guard status == Z_STREAM_END else { throw CompressionError("zlib: compression failed (status \(status))") }
      return output.count - Int(stream.pointee.avail_out)
    }
  }
}

/// Deflaters shared by the threads that compress at once: a zlib context costs far more to
/// make than a grain costs to compress, so each call borrows one and gives it back.
public final class ZlibStreamDeflaterPool: @unchecked Sendable {
  private let lock = Lock()
  private var idle: [ZlibStreamDeflater] = []
  private let level: Int32

  public init(level: Int32 = 6) { self.level = level }

  /// Runs `body` with a deflater no other thread is using.
  public func withDeflater<T>(_ body: (ZlibStreamDeflater) throws -> T) throws -> T {
    let deflater = try lock.withLock({ idle.popLast() }) ?? ZlibStreamDeflater(level: level)
    defer { lock.withLock { idle.append(deflater) } }
    return try body(deflater)
  }
}

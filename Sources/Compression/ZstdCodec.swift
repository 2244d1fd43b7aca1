import CZstd

/// zstd, as qcow2 stores it: each compressed cluster is one frame. The stored length is only
/// known to 512-byte sectors, so frames are decompressed as a stream that stops at the end
/// of the frame and ignores what follows.
public final class ZstdCodec: Codec {
  public var type: CompressionType { .zstd }

  private let decompressor: OpaquePointer
  private let compressor: OpaquePointer
  /// Caps the window a frame may ask for (8 MiB), so a hostile frame header cannot make the
  /// decoder allocate more than a few clusters' worth; qcow2 clusters are at most 2 MiB.
  private static let maximumWindowLog: Int32 = 23

  /// zstd's own default level.
  public static let defaultLevel: Int32 = 3

  public init(level: Int32 = ZstdCodec.defaultLevel) throws {
    guard let decompressor = ZSTD_createDCtx() else { throw CompressionError("zstd: cannot create a decompression context") }
    guard let compressor = ZSTD_createCCtx() else {
      ZSTD_freeDCtx(decompressor)
      throw CompressionError("zstd: cannot create a compression context")
    }
    self.decompressor = decompressor
    self.compressor = compressor
    _ = ZSTD_DCtx_setParameter(decompressor, ZSTD_d_windowLogMax, Self.maximumWindowLog)
    _ = ZSTD_CCtx_setParameter(compressor, ZSTD_c_compressionLevel, level)
  }

  deinit {
    ZSTD_freeDCtx(decompressor)
    ZSTD_freeCCtx(compressor)
  }

  private static func errorName(_ code: Int) -> String { String(cString: ZSTD_getErrorName(code)) }

  public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws {
    _ = ZSTD_DCtx_reset(decompressor, ZSTD_reset_session_only)
    var source = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
    var target = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
    var frameEnded = false
    while target.pos < target.size {
      let before = (source.pos, target.pos)
      let status = ZSTD_decompressStream(decompressor, &target, &source)
      if ZSTD_isError(status) != 0 {
        throw CompressionError("zstd: invalid data (\(Self.errorName(status)))")
      }
      if status == 0 {
        frameEnded = true
        break
      }
      if (source.pos, target.pos) == before {
        throw CompressionError(
          "zstd: input runs out after producing \(target.pos) of \(output.count) bytes")
      }
    }
    if target.pos < target.size {
      throw CompressionError("zstd: frame ends after \(target.pos) bytes, expected \(output.count)")
    }
    if frameEnded { return }
    // The output is full but the frame has not ended: with one spare byte of room, a frame
    // that only has its end marks or checksum left finishes, and one that would expand past
    // the block is caught before anything is written past the output.
    var spare: UInt8 = 0
    try withUnsafeMutablePointer(to: &spare) { sparePointer in
      while true {
        var probe = ZSTD_outBuffer(dst: sparePointer, size: 1, pos: 0)
        let before = source.pos
        let status = ZSTD_decompressStream(decompressor, &probe, &source)
        if ZSTD_isError(status) != 0 {
          throw CompressionError("zstd: invalid data (\(Self.errorName(status)))")
        }
        if probe.pos > 0 {
          throw CompressionError("zstd: data expands past the expected \(output.count) bytes")
        }
        // Ended, or cut short after the block was complete (accepted, as qemu does).
        if status == 0 || source.pos == before { return }
      }
    }
  }

  public func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]? {
    guard input.count > 1 else { return nil }
    _ = ZSTD_CCtx_reset(compressor, ZSTD_reset_session_only)
    // Room for the worst case, so the only error left is a real one; a result that is not
    // smaller than the input is not worth storing.
    var result = [UInt8](repeating: 0, count: ZSTD_compressBound(input.count))
    let written = result.withUnsafeMutableBytes { out in
      ZSTD_compress2(compressor, out.baseAddress, out.count, input.baseAddress, input.count)
    }
    if ZSTD_isError(written) != 0 {
      throw CompressionError("zstd: compression failed (\(Self.errorName(written)))")
    }
    guard written < input.count else { return nil }
    result.removeLast(result.count - written)
    return result
  }
}

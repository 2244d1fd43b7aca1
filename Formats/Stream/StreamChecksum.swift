import CZlib

/// The checksum a stream ends with: CRC-32 as zlib, gzip and PNG compute it (reflected
/// polynomial 0xEDB88320, initial value and final XOR 0xFFFFFFFF), over every byte of the
/// virtual disk in order, zeros included. A run of zeros is folded in arithmetically, in
/// time logarithmic in its length, so a 1 TiB hole costs nothing.
///
/// Because it covers the disk's content rather than the stream's bytes, the value is the
/// same for any stream of the same disk, and equals zlib's `crc32` of the received raw file.
public struct DiskChecksum: Equatable {
  public private(set) var value: UInt32 = 0

  public init() {}

  /// Adds `bytes` (the next bytes of the disk).
  public mutating func update(_ bytes: UnsafeRawBufferPointer) {
    guard let base = bytes.baseAddress, bytes.count > 0 else { return }
    value = UInt32(truncatingIfNeeded: crc32_z(uLong(value), base.assumingMemoryBound(to: Bytef.self), bytes.count))
  }

  /// Adds `count` zero bytes without touching memory.
  public mutating func updateZeros(_ count: Int64) {
    guard count > 0 else { return }
    // zlib's crc32 inverts the register on entry and exit; between the two, n zero bytes
    // multiply it by x^(8n) modulo the polynomial, which `crc32_combine_op` does with the
    // operator `crc32_combine_gen(n)` (XORing in its second argument, here 0).
    let register = uLong(value ^ 0xFFFF_FFFF)
    let shifted = crc32_combine_op(register, 0, crc32_combine_gen(Int(count)))
    value = UInt32(truncatingIfNeeded: shifted) ^ 0xFFFF_FFFF
  }
}

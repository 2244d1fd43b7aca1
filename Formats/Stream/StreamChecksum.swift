import CZlib
import DiskImage

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

/// The same CRC-32 gathered from data pieces in any order, from any thread: what the
/// engine's workers fold in while the reading thread only moves bytes. CRC-32 is affine over
/// GF(2): the CRC of a disk is the CRC of as many zero bytes, XOR each data piece's own
/// contribution, which is that piece's CRC without the zeros' part, shifted (multiplied by
/// x^(8n)) past the n bytes of the disk that follow it. Zero runs contribute nothing.
public final class ScatteredDiskChecksum: @unchecked Sendable {
  /// The size of the whole disk: each piece is shifted past what follows it up to here.
  public let diskSize: Int64
  private let lock = Lock()
  private var terms: UInt32 = 0
  private var bytes: Int64 = 0

  public init(diskSize: Int64) {
    self.diskSize = diskSize
  }

  /// Folds in `data`, the disk's bytes at `offset`.
  public func add(_ data: UnsafeRawBufferPointer, at offset: Int64) {
    guard let base = data.baseAddress, data.count > 0 else { return }
    let direct = UInt32(truncatingIfNeeded: crc32_z(0, base.assumingMemoryBound(to: Bytef.self), data.count))
    var zeros = DiskChecksum()
    zeros.updateZeros(Int64(data.count))
    let following = diskSize - offset - Int64(data.count)
    let term =
      following > 0
      ? UInt32(truncatingIfNeeded: crc32_combine_op(uLong(direct ^ zeros.value), 0, crc32_combine_gen(Int(following))))
      : direct ^ zeros.value
    lock.withLock {
      terms ^= term
      bytes += Int64(data.count)
    }
  }

  /// Data bytes folded in so far.
  public var dataBytes: Int64 { lock.withLock { bytes } }

  /// The CRC-32 of the disk whose data pieces were all added: the rest reads as zero.
  public var value: UInt32 {
    var zeros = DiskChecksum()
    zeros.updateZeros(diskSize)
    return lock.withLock { zeros.value ^ terms }
  }
}

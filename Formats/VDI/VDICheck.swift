import DiskImage

/// `qemu-img check` for VDI, read-only, as qemu 7.2 checks it (block/vdi.c): every allocated
/// block-map entry must name a block inside the image that no other entry names, and the
/// allocated entries must number what the header's blocks_allocated says. Each finding is a
/// corruption; there are no leaks and no allocation figures.
public enum VDIChecker {
  /// The counts of a VDI check (qemu's `corruptions`; `checkErrors` stays 0 unless reading fails).
  public struct Result: Equatable, Sendable {
    public var corruptions = 0
  }

  /// Checks the VDI image in `source`, reporting each finding as a line in qemu's words.
  ///
  /// - Throws: `ImageError` when the header does not read or check: the image does not open.
  public static func check(_ source: ByteSource, report: (String) -> Void) throws -> Result {
    let fileSize = try source.size()
    let header = try VDIHeader.read(from: source, fileSize: fileSize)
    let count = Int(header.blockCount)
    var result = Result()
    // One bit per block: taken by an entry already. qemu holds a 32-bit word per block.
    var taken = [UInt64](repeating: 0, count: (count + 63) / 64)
    var allocated: Int64 = 0
    let window = 16384
    var entries = [UInt32](repeating: 0, count: min(window, max(count, 1)))
    for first in stride(from: 0, to: count, by: window) {
      let length = min(window, count - first)
      try entries.withUnsafeMutableBytes { buffer in
        try source.readExactly(
          into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length * 4]),
          at: header.mapOffset + Int64(first) * 4, what: "VDI block map")
      }
      for index in 0..<length {
        let entry = UInt32(littleEndian: entries[index])
        // 0xffffffff is unallocated, 0xfffffffe a discarded (zero) block.
        guard entry < 0xffff_fffe else { continue }
        guard Int(entry) < count else {
          report("ERROR: block index \(first + index) too large, is \(entry)")
          result.corruptions += 1
          continue
        }
        allocated += 1
        let word = Int(entry) / 64
        let bit = UInt64(1) << UInt64(Int(entry) % 64)
        if taken[word] & bit != 0 {
          report("ERROR: block index \(entry) also used by \(entry)")
          result.corruptions += 1
        } else {
          taken[word] |= bit
        }
      }
    }
    if allocated != header.blocksAllocated {
      report("ERROR: allocated blocks mismatch, is \(allocated), should be \(header.blocksAllocated)")
      result.corruptions += 1
    }
    return result
  }
}

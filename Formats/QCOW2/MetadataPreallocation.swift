import DiskImage

extension QCOW2Reader {
  /// Whether the image looks preallocated, by qemu's rule (qcow2's metadata-preallocation
  /// detection): more clusters have a non-zero refcount than the file has storage for,
  /// by more than a ninth (and by more than two). Only then does qemu ask the host file which
  /// data clusters are holes, and report them as zeros; an image written ordinarily, whose
  /// clusters are often partly holes (unwritten tails), maps as plain data. lacuna follows
  /// the same rule so that `map` prints what qemu-img map prints.
  ///
  /// Reads the refcount blocks until the count passes the threshold; false when the file
  /// has no holes at all (nothing to report) or its storage is unknown.
  func looksPreallocated() throws -> Bool {
    let clusterSize = Int64(header.clusterSize)
    let fileLength = try source.size()
    guard let allocated = try source.allocatedSize(), allocated < fileLength else { return false }
    let realClusters = allocated / clusterSize
    let threshold = max(realClusters * 10 / 9, realClusters + 2)
    let endCluster = (fileLength + clusterSize - 1) / clusterSize
    let bits = 1 << header.refcountOrder
    let entriesPerBlock = Int64(header.clusterSize * 8 / bits)
    let tableEntries = Int(header.refcountTableClusters * clusterSize / 8)
    var count: Int64 = 0
    var block = [UInt8](repeating: 0, count: header.clusterSize)
    var index = 0
    while index < tableEntries && Int64(index) * entriesPerBlock < endCluster && count <= threshold {
      // The table in pieces of up to 4096 entries.
      let piece = min(4096, tableEntries - index)
      let table = try source.readBytes(
        count: piece * 8, at: header.refcountTableOffset + Int64(index) * 8, what: "refcount table")
      for i in 0..<piece {
        let first = Int64(index + i) * entriesPerBlock
        guard first < endCluster, count <= threshold else { break }
        var entry: UInt64 = 0
        for k in 0..<8 { entry = entry << 8 | UInt64(table[i * 8 + k]) }
        let offset = Int64(bitPattern: entry & 0xffff_ffff_ffff_fe00)
        guard offset != 0 else { continue }
        guard offset % clusterSize == 0, offset + clusterSize <= fileLength else { return false }
        try block.withUnsafeMutableBytes { try source.readExactly(into: $0, at: offset, what: "refcount block") }
        let limit = Int(min(entriesPerBlock, endCluster - first))
        if bits >= 8 {
          let width = bits / 8
          for e in 0..<limit where block[e * width..<(e + 1) * width].contains(where: { $0 != 0 }) { count += 1 }
        } else {
          let mask = UInt8((1 << bits) - 1)
          for e in 0..<limit {
            let bit = e * bits
            // Refcounts narrower than a byte fill it from the least significant bit.
            if (block[bit / 8] >> UInt8(bit % 8)) & mask != 0 { count += 1 }
          }
        }
      }
      index += piece
    }
    return count > threshold
  }
}

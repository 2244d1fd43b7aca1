import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// What `sparsify` did.
struct SparsifyStatistics {
  /// Bytes of data extents read and checked.
  var bytesScanned: Int64 = 0
  /// Bytes of the file turned into holes.
  var bytesPunched: Int64 = 0
  /// Hole-punching calls made (merged runs of zero blocks).
  var holesPunched = 0
  var allocatedBefore: Int64 = 0
  var allocatedAfter: Int64 = 0
}

/// Digs holes in a raw file in place, like `fallocate --dig-holes`: reads only the file's
/// data extents (SEEK_DATA/SEEK_HOLE, walked once), in large chunks, and punches a hole
/// (fallocate PUNCH_HOLE|KEEP_SIZE) over every run of all-zero blocks of `blockSize`
/// bytes aligned to the file. The content and the size stay the same: a punched range
/// reads as zeros, which is what it held.
///
/// Punches are trimmed to whole file-system blocks: a partial block cannot be freed, and
/// punching it would only write zeros over zeros.
struct Sparsifier {
  let file: ImageFile
  let blockSize: Int
  var chunkSize = 8 << 20

  func run() throws -> SparsifyStatistics {
    var statistics = SparsifyStatistics()
    statistics.allocatedBefore = try file.allocatedSize()
    let size = try file.size()
    let fileSystemBlock = Int64(max(512, Int(try file.status().st_blksize)))
    let extents = try file.dataRanges(in: 0..<size) ?? [0..<size]
    // A chunk is a whole number of zero blocks, so blocks are never judged in two parts
    // inside an extent.
    let chunk = max(chunkSize / blockSize, 1) * blockSize
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { buffer.deallocate() }

    var pending: Range<Int64>?  // zero blocks found and not yet punched
    func punchPending() throws {
      guard let range = pending else { return }
      pending = nil
      let start = (range.lowerBound + fileSystemBlock - 1) / fileSystemBlock * fileSystemBlock
      // The last block of the file is punched whole, past the end of the file: bytes there
      // are not content (KEEP_SIZE keeps the size), and a partial block is never freed.
      let end =
        range.upperBound == size
        ? (size + fileSystemBlock - 1) / fileSystemBlock * fileSystemBlock
        : range.upperBound / fileSystemBlock * fileSystemBlock
      guard start < end else { return }
      guard try file.punchHole(start..<end) else {
        throw ImageError.unsupported(path: file.path, "the file system cannot punch holes (fallocate PUNCH_HOLE)")
      }
      statistics.bytesPunched += min(end, size) - start
      statistics.holesPunched += 1
    }

    for extent in extents {
      var position = extent.lowerBound
      while position < extent.upperBound {
        // Chunks end on block boundaries of the file, whatever the extent's start.
        let blockAligned = (position / Int64(blockSize)) * Int64(blockSize)
        let end = min(extent.upperBound, blockAligned + Int64(chunk))
        let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(end - position)])
        try file.readExactly(into: slice, at: position, what: "data")
        statistics.bytesScanned += Int64(slice.count)
        for run in zeroRuns(UnsafeRawBufferPointer(slice), at: position, blockSize: blockSize) {
          if run.isZero {
            if let open = pending, open.upperBound == run.range.lowerBound {
              pending = open.lowerBound..<run.range.upperBound
            } else {
              try punchPending()
              pending = run.range
            }
          } else {
            try punchPending()
          }
        }
        position = end
      }
      // What lies between extents is a hole already: a zero run may continue across it.
      if let open = pending, open.upperBound == extent.upperBound {
        pending = open.lowerBound..<extent.upperBound
      }
    }
    try punchPending()
    try file.synchronize()
    statistics.allocatedAfter = try file.allocatedSize()
    return statistics
  }
}

import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// What `sparsify` did.
public struct SparsifyStatistics: Equatable {
  /// Bytes of data extents read and checked.
  public var bytesScanned: Int64 = 0
  /// Bytes of the file turned into holes.
  public var bytesPunched: Int64 = 0
  /// Hole-punching calls made (merged runs of zero blocks).
  public var holesPunched = 0
  public var allocatedBefore: Int64 = 0
  public var allocatedAfter: Int64 = 0
}

/// Digs holes in a raw file in place, like `fallocate --dig-holes`: reads only the file's
/// data extents (SEEK_DATA/SEEK_HOLE, walked once), in large chunks, and punches a hole
/// (fallocate PUNCH_HOLE|KEEP_SIZE) over every run of all-zero blocks of `blockSize`
/// bytes aligned to the file. The content and the size stay the same: a punched range
/// reads as zeros, which is what it held.
///
/// Punches are trimmed to whole file-system blocks: a partial block cannot be freed, and
/// punching it would only write zeros over zeros.
public struct Sparsifier {
  public let file: ImageFile
  public let blockSize: Int
  public var chunkSize = 8 << 20

  public init(file: ImageFile, blockSize: Int) {
    self.file = file
    self.blockSize = blockSize
  }

  /// Opens the image at `path` for sparsifying in place, after deciding on a read-only
  /// descriptor that it is a regular file of a format that is the disk byte for byte: an
  /// image of any other format is never opened for writing.
  public static func open(
    _ path: String, format: String?, blockSize: Int, registry: FormatRegistry, forceShare: Bool = false
  ) throws -> Sparsifier {
    let reading = try ImageFile.openForReading(path)
    guard (try reading.status().st_mode & S_IFMT) == S_IFREG else {
      throw ImageError.usage(path: path, "is not a regular file; sparsify punches holes in raw image files")
    }
    let found = try registry.format(of: reading, named: format)
    guard found.capabilities.contains(.sparsifyInPlace) else {
      let inPlace = registry.formats(with: .sparsifyInPlace).map(\.name).joined(separator: ", ")
      // Convert it to its own format where lacuna writes it as a file, else to the plain
      // disk (the registry's fallback, raw).
      let writable = found.create != nil && !found.capabilities.contains(.sequentialOutput)
      let suggestion = writable ? found.name : registry.fallback.name
      throw ImageError.usage(
        path: path,
        "is a \(found.name) image; sparsify works on \(inPlace) images in place. To drop its zero blocks, convert it: "
          + "lacuna convert -O \(suggestion) \(path) NEW, then move NEW over it")
    }
    let descriptor = Glibc.open(path, O_RDWR | O_CLOEXEC)
    guard descriptor >= 0 else {
      throw ImageError.system(path: path, operation: "open for writing", errno: errno)
    }
    let file = ImageFile.adoptWritable(descriptor: descriptor, path: path)
    guard try file.identity() == reading.identity() else {
      throw ImageError.usage(path: path, "the file changed while being opened; try again")
    }
    // What a writer holds: a VM using the image, or a conversion reading it, refuses us.
    if !forceShare { try file.lock(for: .writingInPlace) }
    reading.close()
    return Sparsifier(file: file, blockSize: blockSize)
  }

  /// Punches the holes, fsyncs, and returns what was done.
  public func run() throws -> SparsifyStatistics {
    var statistics = SparsifyStatistics()
    statistics.allocatedBefore = try file.allocatedSize() ?? 0
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
    statistics.allocatedAfter = try file.allocatedSize() ?? 0
    return statistics
  }
}

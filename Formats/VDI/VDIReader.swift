import DiskImage

/// Reads one VDI layer: the header, the block map (checked whole at open, then read in
/// windows), and the data blocks it points at. A differencing image's free blocks are
/// `unallocated`, for the engine to read from the parent found by `ParentSearch`.
public final class VDIReader: ImageReader {
  public let source: ByteSource
  public var formatName: String { "vdi" }
  public var virtualSize: Int64 { header.diskSize }
  public let backing: BackingReference?
  /// qemu-img reports the block size as the VDI's cluster size.
  public var clusterSize: Int? { Int(header.blockSize) }
  public let warnings: [String]

  let header: VDIHeader
  let fileSize: Int64
  private let blockMap: BlockMap

  /// How many blocks one `extents` answer covers at most (one map window); callers loop.
  static let blocksPerAnswer = Int64(BlockMap.entriesPerWindow)

  /// Opens a VDI.
  ///
  /// - Parameters:
  ///   - source: the image's bytes.
  ///   - parentDirectories: where a differencing image's parent is searched, relative to
  ///     the image's directory (or absolute): its own directory, then the one above.
  public convenience init(source: ByteSource) throws {
    try self.init(source: source, parentDirectories: [".", ".."])
  }

  ///   - beforeSearch: called before a differencing image's parent is searched for; throws
  ///     where other files may not be opened (an untrusted image, the fuzz harness).
  public init(source: ByteSource, parentDirectories: [String], beforeSearch: () throws -> Void = {}) throws {
    self.source = source
    fileSize = try source.size()
    header = try VDIHeader.read(from: source, fileSize: fileSize)
    blockMap = try BlockMap(source: source, header: header, fileSize: fileSize)
    if header.imageType == .differencing {
      try beforeSearch()
      let found = try ParentSearch(directories: parentDirectories).find(
        for: source.name, header: header, imageIdentity: try source.identity())
      backing = found.reference
      warnings = found.warnings
    } else {
      backing = nil
      warnings = []
    }
  }

  /// What one block holds for a stretch of the disk.
  private enum Piece {
    case data(host: Int64)
    case zero
    case unallocated
  }

  /// Visits the blocks of `range` in order, at most `blockLimit` of them, each as the
  /// stretch of `range` it covers.
  private func walk(_ range: Range<Int64>, blockLimit: Int64, _ visit: (Range<Int64>, Piece) throws -> Void) throws {
    let blockSize = header.blockSize
    let freeMeans: Piece = header.imageType == .differencing ? .unallocated : .zero
    var position = range.lowerBound
    var visited: Int64 = 0
    while position < range.upperBound && visited < blockLimit {
      let (first, entries) = try blockMap.window(containing: position / blockSize)
      var slot = Int(position / blockSize - first)
      while slot < entries.count && position < range.upperBound && visited < blockLimit {
        let index = first + Int64(slot)
        let value = entries[slot]
        // A run of free (or zero) entries is one piece: empty disks map in few steps.
        var runEnd = slot + 1
        if value >= BlockMap.zeroValue {
          let remaining = blockLimit - visited
          let room = remaining >= Int64(entries.count - slot) ? entries.count : slot + Int(remaining)
          while runEnd < room && entries[runEnd] == value { runEnd += 1 }
        }
        let end = min(range.upperBound, (first + Int64(runEnd)) * blockSize)
        switch BlockMap.decode(value) {
        case .free: try visit(position..<end, freeMeans)
        case .zero: try visit(position..<end, .zero)
        case .block(let block):
          try visit(position..<end, .data(host: blockMap.hostOffset(ofBlock: block) + (position - index * blockSize)))
        }
        position = end
        visited += Int64(runEnd - slot)
        slot = runEnd
      }
    }
  }

  // MARK: - The allocation map

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    var result: [Extent] = []
    try walk(range, blockLimit: Self.blocksPerAnswer) { pieceRange, piece in
      switch piece {
      case .data(let host): result.appendMerging(Extent(pieceRange, .data, hostOffset: host))
      case .zero: result.appendMerging(Extent(pieceRange, .zero))
      case .unallocated: result.appendMerging(Extent(pieceRange, .unallocated))
      }
    }
    return result
  }

  // MARK: - Reading

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    // Neighbouring blocks stored one after the other in the file become one read.
    var reads = GatheredReads(from: source, into: buffer, at: offset)
    try walk(offset..<offset + Int64(buffer.count), blockLimit: .max) { pieceRange, piece in
      let start = Int(pieceRange.lowerBound - offset)
      let count = Int(pieceRange.upperBound - pieceRange.lowerBound)
      switch piece {
      case .data(let host):
        try reads.add(bufferStart: start, host: host, length: count)
      case .zero, .unallocated:
        UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + count]).initializeMemory(
          as: UInt8.self, repeating: 0)
      }
    }
    try reads.flush()
  }
}

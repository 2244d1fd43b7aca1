import Compression
import DiskImage

/// Reads one hosted sparse extent ("KDMV") as a disk of its own capacity: a single-file
/// VMDK's only extent, or one SPARSE extent of a descriptor's disk. The grain directory is
/// read once; grain tables go through a bounded cache; compressed grains are inflated on
/// demand. Unallocated grains answer `unallocated` (a parent's, or zeros). It knows nothing
/// of descriptors: `VMDKReader` puts extents together. See README.md beside this file.
final class SparseExtentReader: ImageReader {
  let source: ByteSource
  var formatName: String { "vmdk" }
  var virtualSize: Int64 { layout.virtualSize }
  var backing: BackingReference? { nil }
  var clusterSize: Int? { layout.grainBytes }

  let layout: SparseLayout
  let fileSize: Int64
  /// The grain directory: the sector of each grain table, 0 for none.
  private let directory: [UInt32]
  private let tables = GrainTableCache()
  private let inflaters = ZlibStreamInflaterPool()
  /// Host ranges no grain table or grain may overlap.
  private let metadataRanges: [(range: Range<Int64>, name: String)]

  /// How many grain tables one `extents` call visits at most; callers loop for the rest.
  static let tablesPerAnswer = 64

  /// Opens the sparse extent in `source`, checking its header (and footer) and reading its
  /// grain directory. `needsDescriptor`: the file is the whole image, so it must embed its
  /// descriptor (an extent of a split disk has none, and is refused by name).
  init(source: ByteSource, needsDescriptor: Bool) throws {
    self.source = source
    let path = source.name
    fileSize = try source.size()
    guard fileSize >= Int64(SparseExtentHeader.size) else {
      throw ImageError.invalid(
        path: path, "the file (\(fileSize) bytes) is too short for a VMDK sparse extent header (512 bytes)")
    }
    let headerBytes = try source.readBytes(count: SparseExtentHeader.size, at: 0, what: "the VMDK header")
    guard let header = SparseExtentHeader(headerBytes) else {
      throw ImageError.invalid(path: path, "the file does not start with the VMDK sparse extent magic KDMV")
    }
    let layout = try SparseLayout.check(header, source: source, fileSize: fileSize, needsDescriptor: needsDescriptor)
    self.layout = layout

    let entries = layout.directoryEntries
    var directory = [UInt32](repeating: 0, count: entries)
    if entries > 0 {
      let directoryOffset = layout.directoryOffset
      try directory.withUnsafeMutableBytes {
        try source.readExactly(into: $0, at: directoryOffset, what: "the grain directory")
      }
      for index in directory.indices { directory[index] = UInt32(littleEndian: directory[index]) }
    }
    self.directory = directory

    var metadata: [(range: Range<Int64>, name: String)] = [(0..<Int64(SparseExtentHeader.size), "the header")]
    if !layout.descriptorRange.isEmpty { metadata.append((layout.descriptorRange, "the embedded descriptor")) }
    if entries > 0 {
      metadata.append((layout.directoryOffset..<layout.directoryOffset + Int64(entries) * 4, "the grain directory"))
    }
    if let footer = layout.footerRange { metadata.append((footer, "the footer")) }
    metadataRanges = metadata
  }

  /// The embedded descriptor's reserved sectors (NUL padded); empty when there is none.
  func embeddedDescriptorBytes() throws -> [UInt8] {
    guard !layout.descriptorRange.isEmpty else { return [] }
    return try source.readBytes(
      count: Int(layout.descriptorRange.count), at: layout.descriptorRange.lowerBound, what: "the embedded descriptor")
  }

  /// Warnings the header calls for.
  var warnings: [String] {
    layout.header.uncleanShutdown
      ? ["the image was not closed cleanly (uncleanShutdown is set); reading it anyway, check the result"] : []
  }

  // MARK: - The allocation map

  func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    var result: [Extent] = []
    try walk(range, tableLimit: Self.tablesPerAnswer) { pieceRange, piece in
      switch piece {
      case .unallocated: result.appendMerging(Extent(pieceRange, .unallocated))
      case .zero: result.appendMerging(Extent(pieceRange, .zero))
      case .data(let host): result.appendMerging(Extent(pieceRange, .data, hostOffset: host))
      case .compressed: result.appendMerging(Extent(pieceRange, .data))
      }
    }
    return result
  }

  /// What one stretch of the virtual disk maps to. A stretch never crosses a grain, except
  /// a stretch of unallocated grain tables, which comes as one piece however long.
  enum Piece {
    case unallocated
    /// A zeroed grain (entry 1 with flag 0x4).
    case zero
    /// Stored plainly at `host` (the host offset of the stretch's first byte).
    case data(host: Int64)
    /// Part of a compressed grain.
    case compressed(CompressedGrain)
  }

  /// A compressed grain: where it starts in the virtual disk and in the file.
  struct CompressedGrain {
    var virtualOffset: Int64
    var hostOffset: Int64
    /// Bytes of the virtual disk the grain holds: one grain, or less for the last one.
    var length: Int
  }

  /// Visits the pieces of `range` in order until it is covered or `tableLimit` grain tables
  /// have been visited (at least one). Unallocated grain-directory entries cost no read.
  private func walk(_ range: Range<Int64>, tableLimit: Int, _ visit: (Range<Int64>, Piece) throws -> Void) throws {
    let grainBytes = Int64(layout.grainBytes)
    let span = layout.tableSpan
    var position = range.lowerBound
    var tablesVisited = 0
    while position < range.upperBound {
      let directoryIndex = Int(position / span)
      let spanEnd = min(range.upperBound, (Int64(directoryIndex) + 1) * span)
      let tableSector = directory[directoryIndex]
      guard tableSector != 0 else {
        // Unallocated up to the next grain table, in one step however many lie between.
        let lastIndex = Int((range.upperBound - 1) / span)
        var next = directoryIndex + 1
        while next <= lastIndex, directory[next] == 0 { next += 1 }
        let end = min(range.upperBound, Int64(next) * span)
        try visit(position..<end, .unallocated)
        position = end
        continue
      }
      if tablesVisited == tableLimit { return }
      tablesVisited += 1
      let table = try grainTable(directoryIndex: directoryIndex, sector: tableSector)
      while position < spanEnd {
        let grainStart = position / grainBytes * grainBytes
        let grainEnd = min(spanEnd, grainStart + grainBytes)
        let tableIndex = Int(position / grainBytes) % layout.entriesPerTable
        let piece = try decode(
          table[tableIndex], grainStart: grainStart, from: position, to: grainEnd, table: (directoryIndex, tableSector))
        try visit(position..<grainEnd, piece)
        position = grainEnd
      }
    }
  }

  /// The grain table a grain-directory entry points at, checked and cached.
  private func grainTable(directoryIndex: Int, sector: UInt32) throws -> [UInt32] {
    let offset = Int64(sector) * 512
    let bytes = Int64(layout.entriesPerTable) * 4
    let what = "grain table at sector \(sector) (grain directory entry \(directoryIndex))"
    guard offset <= fileSize - bytes else {
      throw ImageError.invalid(path: path, "\(what) is past the end of the file (size \(hex(fileSize)))")
    }
    try checkNotMetadata(offset..<offset + bytes, what)
    return try tables.table(at: offset) {
      var entries = [UInt32](repeating: 0, count: layout.entriesPerTable)
      try entries.withUnsafeMutableBytes { try source.readExactly(into: $0, at: offset, what: what) }
      for index in entries.indices { entries[index] = UInt32(littleEndian: entries[index]) }
      return entries
    }
  }

  private func checkNotMetadata(_ range: Range<Int64>, _ what: @autoclosure () -> String) throws {
    for (metadata, name) in metadataRanges where metadata.overlaps(range) {
      throw ImageError.invalid(
        path: path, "\(what()) overlaps \(name) at \(hex(metadata.lowerBound))..\(hex(metadata.upperBound))")
    }
  }

  /// What the grain-table entry of the grain at `grainStart` says about `start..<end`.
  private func decode(
    _ entry: UInt32, grainStart: Int64, from start: Int64, to end: Int64, table: (index: Int, sector: UInt32)
  ) throws -> Piece {
    func what() -> String {
      "grain for virtual offset \(hex(grainStart)) at sector \(entry) (grain table at sector \(table.sector), grain directory entry \(table.index))"
    }
    switch entry {
    case 0:
      return .unallocated
    case 1 where layout.header.honoursZeroedGrains:
      return .zero
    case 1:
      throw ImageError.invalid(
        path: path,
        "the grain table entry for virtual offset \(hex(grainStart)) is 1 (a zeroed grain) but the header lacks the zeroed-grain flag 0x4")
    default:
      break
    }
    let host = Int64(entry) * 512
    let grainLength = min(Int64(layout.grainBytes), virtualSize - grainStart)
    let tableRange = Int64(table.sector) * 512..<Int64(table.sector) * 512 + Int64(layout.entriesPerTable) * 4
    if layout.header.isCompressed {
      // The marker (or bare stream) is checked when it is read; here only that it starts in
      // the file, after the metadata at its start.
      guard host < fileSize else {
        throw ImageError.invalid(path: path, "\(what()) is past the end of the file (size \(hex(fileSize)))")
      }
      try checkNotMetadata(host..<host + 1, what())
      guard !tableRange.contains(host) else { throw ImageError.invalid(path: path, "\(what()) lies in its own grain table") }
      return .compressed(CompressedGrain(virtualOffset: grainStart, hostOffset: host, length: Int(grainLength)))
    }
    guard host <= fileSize - grainLength else {
      throw ImageError.invalid(
        path: path, "\(what()) (\(grainLength) bytes) is past the end of the file (size \(hex(fileSize)))")
    }
    let grainRange = host..<host + grainLength
    try checkNotMetadata(grainRange, what())
    guard !grainRange.overlaps(tableRange) else {
      throw ImageError.invalid(path: path, "\(what()) overlaps its own grain table")
    }
    return .data(host: host + (start - grainStart))
  }

  // MARK: - Reading

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    guard buffer.count > 0 else { return }
    // Host-contiguous grains are gathered into one read.
    var reads = GatheredReads(from: source, into: buffer, at: offset)
    var scratch: UnsafeMutableRawBufferPointer?
    defer { scratch?.deallocate() }

    try walk(offset..<offset + Int64(buffer.count), tableLimit: .max) { range, piece in
      let start = Int(range.lowerBound - offset)
      let target = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + Int(range.count)])
      switch piece {
      case .unallocated, .zero:
        target.initializeMemory(as: UInt8.self, repeating: 0)
      case .data(let host):
        try reads.add(bufferStart: start, host: host, length: target.count)
      case .compressed(let grain):
        if range.lowerBound == grain.virtualOffset, target.count == layout.grainBytes {
          try inflate(grain, into: target)
        } else {
          if scratch == nil { scratch = .allocate(byteCount: layout.grainBytes, alignment: 16) }
          try inflate(grain, into: scratch!)
          let from = Int(range.lowerBound - grain.virtualOffset)
          target.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch![from..<from + target.count]))
        }
      }
    }
    try reads.flush()
  }

  /// Inflates one compressed grain into `output` (one grain long). A grain must inflate to
  /// exactly one grain; the last grain of a disk whose capacity is not a grain multiple may
  /// instead inflate to just the part inside the disk (qemu-img writes it so).
  private func inflate(_ grain: CompressedGrain, into output: UnsafeMutableRawBufferPointer) throws {
    let grainBytes = layout.grainBytes
    let grainSector = UInt64(grain.virtualOffset / 512)
    func what() -> String {
      "compressed grain for virtual offset \(hex(grain.virtualOffset)) at \(hex(grain.hostOffset))"
    }
    // A deflate stream of one grain is never near twice its size.
    let maximumStored = 2 * grainBytes
    var dataStart = grain.hostOffset
    var dataLength = Int(min(Int64(maximumStored), fileSize - grain.hostOffset))
    if layout.header.hasMarkers {
      let marker = try source.readBytes(count: 12, at: grain.hostOffset, what: "the marker of the \(what())")
      let le = LittleEndianReader(marker)
      let lba = le.uint64(at: 0)!
      let size = le.uint32(at: 8)!
      guard lba == grainSector else {
        throw ImageError.invalid(
          path: path, "the \(what()) has a marker for sector \(lba), expected \(grainSector): the grain tables are damaged")
      }
      guard size > 0, Int(size) <= maximumStored else {
        throw ImageError.invalid(
          path: path, "the \(what()) claims \(size) compressed bytes, expected 1 to \(maximumStored)")
      }
      dataStart += 12
      guard Int64(size) <= fileSize - dataStart else {
        throw ImageError.invalid(
          path: path, "the \(what()) (\(size) bytes) runs past the end of the file (size \(hex(fileSize)))")
      }
      dataLength = Int(size)
      try checkNotMetadata(grain.hostOffset..<dataStart + Int64(size), "the \(what())")
    }
    let input = try source.readBytes(count: dataLength, at: dataStart, what: "the \(what())")
    let produced: Int
    do {
      produced = try inflaters.withInflater { inflater in
        try input.withUnsafeBytes { try inflater.inflate($0, into: output) }
      }
    } catch let error as CompressionError {
      throw ImageError.invalid(path: path, "the \(what()) does not inflate: \(error)")
    }
    guard produced == grainBytes || produced == grain.length else {
      throw ImageError.invalid(
        path: path, "the \(what()) inflates to \(produced) bytes, expected \(grain.length)")
    }
  }
}

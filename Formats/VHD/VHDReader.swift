import DiskImage

/// Reads one VHD layer: a fixed disk (the data, then the footer), or a dynamic or
/// differencing disk (footer copy, dynamic header, block allocation table, blocks of a
/// sector bitmap and data). Answers for this layer alone: a differencing disk leaves what
/// it does not hold to its parent, which the engine opens from `backing`.
public final class VHDReader: ImageReader {
  public let source: ByteSource
  public var formatName: String { "vpc" }
  public let virtualSize: Int64
  public let backing: BackingReference?
  public let warnings: [String]
  /// The block size of a dynamic or differencing disk, as qemu-img reports `cluster-size`;
  /// nil for a fixed disk.
  public var clusterSize: Int? { sparse.map { Int($0.blockSize) } }
  /// The disk type the footer names.
  let diskType: VHDFooter.DiskType
  /// The footer's unique id, which a child records as its parent's.
  let uniqueID: [UInt8]
  /// For a differencing disk, the unique id of the parent it was made from.
  let parentUniqueID: [UInt8]?
  let fileSize: Int64
  private let sparse: SparseLayout?
  private let bitmaps: BitmapCache

  /// How many allocated blocks one `extents` call visits at most; callers loop.
  static let allocatedBlocksPerAnswer = 64
  /// The most BAT entries that cover the virtual disk (64 MiB of table): 2040 GiB in
  /// 128 KiB blocks. Every real tool uses 512 KiB blocks or larger.
  static let maximumTableEntries = 1 << 24
  static let unallocatedEntry: UInt32 = 0xFFFF_FFFF

  /// Where the blocks of a dynamic or differencing disk are.
  struct SparseLayout {
    var blockSize: Int64
    /// Bytes of sector bitmap in front of each block's data (a multiple of 512).
    var bitmapSize: Int64
    /// The BAT entries that cover the virtual disk: a block's first sector, or 0xFFFFFFFF.
    var table: [UInt32]
    /// What a sector this layer does not hold is: `unallocated` (the parent's) for a
    /// differencing disk, `zero` for a dynamic one, which has no parent.
    var absentKind: ExtentKind
  }

  public init(source: ByteSource) throws {
    self.source = source
    let path = source.name
    fileSize = try source.size()
    guard fileSize >= Int64(VHDFooter.length) else {
      throw ImageError.invalid(path: path, "file is \(fileSize) bytes, shorter than a VHD footer (512 bytes)")
    }
    let head = try source.readBytes(count: VHDFooter.length, at: 0, what: "VHD footer copy")
    var footer: VHDFooter?
    if VHDFooter.hasCookie(head) {
      let copy = try VHDFooter(head, at: 0, path: path)
      // A fixed disk whose first sector happens to hold a footer is still a fixed disk.
      if copy.diskType != .fixed { footer = copy }
    }
    if footer == nil {
      let trailerOffset = fileSize - Int64(VHDFooter.length)
      let trailer = try VHDFooter(
        try source.readBytes(count: VHDFooter.length, at: trailerOffset, what: "VHD footer"), at: trailerOffset,
        path: path)
      guard trailer.diskType == .fixed else {
        throw ImageError.invalid(
          path: path,
          "VHD footer at \(hex(trailerOffset)) says disk type \(trailer.diskType.rawValue) (\(trailer.diskType)), but the copy at offset 0 is missing")
      }
      footer = trailer
    }
    let found = footer!
    diskType = found.diskType
    uniqueID = found.uniqueID
    var parentUniqueID: [UInt8]?
    virtualSize = try found.virtualSize(path: path)
    var warnings: [String] = []

    if found.diskType == .fixed {
      let dataEnd = fileSize - Int64(VHDFooter.length)
      guard virtualSize <= dataEnd else {
        throw ImageError.invalid(
          path: path,
          "fixed VHD of \(virtualSize) bytes needs \(virtualSize + 512) bytes of file, the file has \(fileSize) (truncated)")
      }
      sparse = nil
      backing = nil
    } else {
      let (layout, header) = try Self.readSparseLayout(
        footer: found, source: source, fileSize: fileSize, virtualSize: virtualSize)
      sparse = layout
      if let warning = header.checksumWarning { warnings.append(warning) }
      if found.diskType == .differencing {
        guard let name = try header.parentReference(from: source, fileSize: fileSize, path: path) else {
          throw ImageError.invalid(path: path, "differencing VHD names no parent (no parent locator and no parent name)")
        }
        // A differencing disk's parent is a VHD by the specification, so its format is
        // recorded as vpc: the parent is never probed, and a parent that is not a VHD is
        // refused when it is opened.
        backing = BackingReference(name: name, format: "vpc")
        parentUniqueID = header.parentUniqueID
      } else {
        backing = nil
      }
    }
    self.warnings = warnings
    self.parentUniqueID = parentUniqueID
    let bitmapBytes = Int(sparse?.bitmapSize ?? 512)
    bitmaps = BitmapCache(capacity: max(16, min(4096, (8 << 20) / bitmapBytes)))
  }

  /// A differencing disk's parent must be the VHD it was made from: its footer's unique id
  /// is the one the dynamic header records (Virtual PC and Hyper-V refuse any other; qemu
  /// does not look).
  public func checkBacking(_ parent: ImageReader) throws {
    guard let expected = parentUniqueID else { return }
    guard let vhd = parent as? VHDReader else {
      throw ImageError.invalid(path: path, "parent \(parent.path) is a \(parent.formatName) image, not a VHD")
    }
    guard vhd.uniqueID == expected else {
      func text(_ id: [UInt8]) -> String { id.map { String($0, radix: 16).leftPadded(to: 2) }.joined() }
      throw ImageError.invalid(
        path: path,
        "parent \(parent.path) has unique id \(text(vhd.uniqueID)), but this differencing VHD was made from \(text(expected)) (a different or changed parent)")
    }
  }

  /// Reads the dynamic header and the BAT, and checks every BAT entry that covers the
  /// virtual disk: its block (the part inside the virtual disk) lies in the file and
  /// overlaps neither the footer copy, the dynamic header nor the BAT.
  private static func readSparseLayout(
    footer: VHDFooter, source: ByteSource, fileSize: Int64, virtualSize: Int64
  ) throws -> (SparseLayout, VHDDynamicHeader) {
    let path = source.name
    let headerLength = UInt64(VHDDynamicHeader.length)
    guard footer.dataOffset >= 512, footer.dataOffset <= UInt64(fileSize), UInt64(fileSize) - footer.dataOffset >= headerLength
    else {
      throw ImageError.invalid(
        path: path,
        "VHD dynamic header at \(hex(footer.dataOffset)) (1024 bytes) is not inside the file (size \(hex(fileSize)))")
    }
    let headerOffset = Int64(footer.dataOffset)
    let header = try VHDDynamicHeader(
      try source.readBytes(count: VHDDynamicHeader.length, at: headerOffset, what: "VHD dynamic header"),
      at: headerOffset, path: path)

    let blockSize = Int64(header.blockSize)
    let needed = (virtualSize + blockSize - 1) / blockSize
    guard Int64(header.maxTableEntries) >= needed else {
      throw ImageError.invalid(
        path: path,
        "VHD block allocation table has \(header.maxTableEntries) entries, the virtual size \(virtualSize) needs \(needed)")
    }
    guard needed <= Int64(maximumTableEntries) else {
      throw ImageError.unsupported(
        path: path, "VHD of \(needed) blocks of \(blockSize) bytes: more than \(maximumTableEntries) blocks")
    }
    let tableBytes = UInt64(header.maxTableEntries) * 4
    let tableEnd = header.tableOffset.addingReportingOverflow(tableBytes)
    guard header.tableOffset >= 512, !tableEnd.overflow, tableEnd.partialValue <= UInt64(fileSize) else {
      throw ImageError.invalid(
        path: path,
        "VHD block allocation table at \(hex(header.tableOffset)) (\(header.maxTableEntries) entries) is past the end of the file (size \(hex(fileSize)))")
    }
    let tableOffset = Int64(header.tableOffset)
    var table = [UInt32](repeating: 0, count: Int(needed))
    let chunkEntries = 1 << 18
    var index = 0
    while index < table.count {
      let count = min(chunkEntries, table.count - index)
      let raw = try source.readBytes(
        count: count * 4, at: tableOffset + Int64(index) * 4, what: "VHD block allocation table")
      for entry in 0..<count {
        let base = entry * 4
        table[index + entry] =
          UInt32(raw[base]) << 24 | UInt32(raw[base + 1]) << 16 | UInt32(raw[base + 2]) << 8 | UInt32(raw[base + 3])
      }
      index += count
    }

    // One bit per sector, rounded up to whole sectors.
    let bitmapSize = ((blockSize / 512 + 7) / 8 + 511) / 512 * 512
    let tableRoundedEnd = (Int64(tableEnd.partialValue) + 511) / 512 * 512
    let metadata: [(range: Range<Int64>, name: String)] = [
      (0..<512, "the footer copy"),
      (headerOffset..<headerOffset + Int64(VHDDynamicHeader.length), "the dynamic header"),
      (tableOffset..<max(tableOffset, tableRoundedEnd), "the block allocation table"),
    ]
    for (block, entry) in table.enumerated() where entry != unallocatedEntry {
      let start = Int64(entry) * 512
      let virtualStart = Int64(block) * blockSize
      let end = start + bitmapSize + min(blockSize, virtualSize - virtualStart)
      guard end <= fileSize else {
        throw ImageError.invalid(
          path: path,
          "VHD block \(block) (virtual offset \(hex(virtualStart))) at \(hex(start)) ends at \(hex(end)), past the end of the file (size \(hex(fileSize)))")
      }
      for (range, name) in metadata where range.overlaps(start..<end) {
        throw ImageError.invalid(
          path: path,
          "VHD block \(block) (virtual offset \(hex(virtualStart))) at \(hex(start)) overlaps \(name) at \(hex(range.lowerBound))..\(hex(range.upperBound))")
      }
    }
    // Two blocks sharing storage would read each other's sectors: damage, never guessed at.
    var allocated = table.filter { $0 != unallocatedEntry }
    allocated.sort()
    for (lower, upper) in zip(allocated, allocated.dropFirst()) where Int64(upper - lower) * 512 < bitmapSize + blockSize {
      let first = table.firstIndex(of: lower)!
      let second = table.indices.first { table[$0] == upper && $0 != first }!
      throw ImageError.invalid(
        path: path,
        "VHD blocks \(min(first, second)) and \(max(first, second)) overlap at \(hex(Int64(upper) * 512)) (each needs \(bitmapSize + blockSize) bytes)")
    }
    let layout = SparseLayout(
      blockSize: blockSize, bitmapSize: bitmapSize, table: table,
      absentKind: footer.diskType == .differencing ? .unallocated : .zero)
    return (layout, header)
  }

  // MARK: - The allocation map

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    guard let sparse else { return try fixedExtents(in: range) }
    var result: [Extent] = []
    try walk(range, sparse, allocatedBlockLimit: Self.allocatedBlocksPerAnswer) { pieceRange, host in
      if let host {
        result.appendMerging(Extent(pieceRange, .data, hostOffset: host))
      } else {
        result.appendMerging(Extent(pieceRange, sparse.absentKind))
      }
    }
    return result
  }

  /// A fixed disk is its file's first bytes: data where the file holds data, zero over
  /// its holes (as the raw reader answers), host offset = virtual offset.
  private func fixedExtents(in range: Range<Int64>) throws -> [Extent] {
    guard let data = try source.dataRanges(in: range) else {
      return [Extent(range, .data, hostOffset: range.lowerBound)]
    }
    var result: [Extent] = []
    var position = range.lowerBound
    for run in data {
      let run = run.clamped(to: range)
      guard !run.isEmpty else { continue }
      if run.lowerBound > position { result.append(Extent(position..<run.lowerBound, .zero, hostOffset: position)) }
      result.append(Extent(run, .data, hostOffset: run.lowerBound))
      position = run.upperBound
    }
    if position < range.upperBound { result.append(Extent(position..<range.upperBound, .zero, hostOffset: position)) }
    return result
  }

  /// Visits the pieces of `range` in order: `host` is where the piece's bytes are in the
  /// file, or nil for sectors this layer does not hold. Stops early, after at least one
  /// piece, once `allocatedBlockLimit` allocated blocks have been visited; a stretch of
  /// unallocated BAT entries is one piece however long.
  private func walk(
    _ range: Range<Int64>, _ layout: SparseLayout, allocatedBlockLimit: Int,
    _ visit: (Range<Int64>, Int64?) throws -> Void
  ) throws {
    let blockSize = layout.blockSize
    var position = range.lowerBound
    var blocksVisited = 0
    while position < range.upperBound {
      var block = Int(position / blockSize)
      let entry = layout.table[block]
      if entry == Self.unallocatedEntry {
        let lastBlock = Int((range.upperBound - 1) / blockSize)
        while block < lastBlock, layout.table[block + 1] == Self.unallocatedEntry { block += 1 }
        let end = min(range.upperBound, Int64(block + 1) * blockSize)
        try visit(position..<end, nil)
        position = end
        continue
      }
      if blocksVisited == allocatedBlockLimit { return }
      blocksVisited += 1
      let blockStart = Int64(block) * blockSize
      let blockEnd = min(range.upperBound, blockStart + blockSize)
      let dataStart = Int64(entry) * 512 + layout.bitmapSize
      let bitmap = try self.bitmap(block: block, entry: entry, layout: layout)
      func isPresent(_ sector: Int) -> Bool { bitmap[sector >> 3] & (0x80 >> UInt8(sector & 7)) != 0 }
      while position < blockEnd {
        var sector = Int((position - blockStart) / 512)
        let present = isPresent(sector)
        let lastSector = Int((blockEnd - blockStart - 1) / 512)
        while sector < lastSector, isPresent(sector + 1) == present { sector += 1 }
        let end = min(blockEnd, blockStart + Int64(sector + 1) * 512)
        try visit(position..<end, present ? dataStart + (position - blockStart) : nil)
        position = end
      }
    }
  }

  /// The sector bitmap of an allocated block, through the cache.
  private func bitmap(block: Int, entry: UInt32, layout: SparseLayout) throws -> [UInt8] {
    try bitmaps.bitmap(block: block) {
      try source.readBytes(
        count: Int(layout.bitmapSize), at: Int64(entry) * 512,
        what: "VHD sector bitmap of block \(block) (virtual offset \(hex(Int64(block) * layout.blockSize)))")
    }
  }

  // MARK: - Reading

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    guard buffer.count > 0 else { return }
    guard let sparse else {
      return try source.readExactly(into: buffer, at: offset, what: "fixed VHD data")
    }
    // Host-contiguous sectors are gathered into one read.
    var reads = GatheredReads(from: source, into: buffer, at: offset, what: "VHD data")
    try walk(offset..<offset + Int64(buffer.count), sparse, allocatedBlockLimit: .max) { range, host in
      let start = Int(range.lowerBound - offset)
      let count = Int(range.count)
      guard let host else {
        UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + count]).initializeMemory(as: UInt8.self, repeating: 0)
        return
      }
      try reads.add(bufferStart: start, host: host, length: count)
    }
    try reads.flush()
  }
}

/// Sector bitmaps by block index: a BoundedCache.
final class BitmapCache: @unchecked Sendable {
  private let cache: BoundedCache<Int, [UInt8]>
  var capacity: Int { cache.capacity }

  init(capacity: Int) { cache = BoundedCache(capacity: capacity) }

  func bitmap(block: Int, load: () throws -> [UInt8]) rethrows -> [UInt8] {
    try cache.value(for: block, load: load)
  }
}

extension String {
  /// The string with `character`s in front up to `length` characters.
  fileprivate func leftPadded(to length: Int, with character: Character = "0") -> String {
    count >= length ? self : String(repeating: character, count: length - count) + self
  }
}

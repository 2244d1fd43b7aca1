import DiskImage

/// Reads one VHDX layer: the current header, the region table, the metadata, the BAT and
/// the payload blocks it points at, after replaying a dirty log in memory. Answers for
/// this layer alone; a differencing image names its parent in `backing`.
public final class VHDXReader: ImageReader {
  public let source: ByteSource
  public var formatName: String { "vhdx" }
  public var virtualSize: Int64 { metadata.virtualSize }
  public let backing: BackingReference?
  /// The payload block size; qemu-img reports it as the cluster size.
  public var clusterSize: Int? { Int(metadata.blockSize) }
  /// True when the log had to be replayed: the file was not closed cleanly.
  public let isDirty: Bool
  public let warnings: [String]
  /// The current header's DataWriteGuid, which a child's `parent_linkage` must name.
  public var dataWriteGuid: String { "{\(header.dataWriteGuid)}" }
  /// The parent linkage GUIDs a differencing image accepts (`parent_linkage`, then
  /// `parent_linkage2`), as the locator spells them.
  public var parentLinkages: [String] {
    guard let locator = metadata.parentLocator else { return [] }
    return ["parent_linkage", "parent_linkage2"].compactMap { locator[$0] }
  }

  /// A differencing image's parent must be the one it was made from: the parent's
  /// DataWriteGuid is one of the linkages the locator records (Hyper-V refuses any other;
  /// qemu does not read differencing VHDX at all).
  public func checkBacking(_ parent: ImageReader) throws {
    let linkages = parentLinkages
    guard !linkages.isEmpty else { return }
    guard let vhdx = parent as? VHDXReader else {
      throw ImageError.invalid(path: path, "parent \(parent.path) is a \(parent.formatName) image, not a VHDX")
    }
    guard linkages.contains(where: { $0.lowercased() == vhdx.dataWriteGuid.lowercased() }) else {
      throw ImageError.invalid(
        path: path,
        "parent \(parent.path) has DataWriteGuid \(vhdx.dataWriteGuid), but this differencing VHDX links to \(linkages.joined(separator: " or ")) (a different or changed parent)")
    }
  }

  let header: VHDXHeader
  let metadata: VHDXMetadata
  /// The file as read: the source itself, or the source with the log's writes laid over it.
  let store: ByteSource
  let fileSize: Int64
  let chunkRatio: Int64
  let payloadBlocks: Int64
  private let bat: BlockAllocationTable
  private let bitmaps = SectorBitmapCache()

  /// How many BAT entries one `extents` call visits at most; callers loop for the rest.
  static let entriesPerAnswer = 1 << 16
  /// How many sector bitmaps one `extents` call reads at most.
  static let bitmapsPerAnswer = 4
  static let mebibyte: Int64 = 1 << 20

  public init(source: ByteSource) throws {
    self.source = source
    func invalid(_ message: String) -> ImageError { .invalid(path: source.name, message) }
    let originalSize = try source.size()
    let identifier = try source.readBytes(count: 8, at: 0, what: "file identifier")
    guard identifier == Array("vhdxfile".utf8) else {
      throw invalid("does not start with the VHDX file identifier 'vhdxfile'")
    }
    header = try VHDXHeader.current(in: source)
    store = try VHDXLog.replay(header, over: source, fileSize: originalSize)
    isDirty = store !== source
    fileSize = try store.size()

    let regions = try RegionTable.read(from: store, fileSize: fileSize)
    for region in regions where region.isRequired && region.guid != .bat && region.guid != .metadata {
      throw ImageError.unsupported(path: source.name, "has required region \(region.guid), which lacuna does not know")
    }
    guard let batRegion = regions.first(where: { $0.guid == .bat }) else { throw invalid("has no BAT region") }
    guard let metadataRegion = regions.first(where: { $0.guid == .metadata }) else {
      throw invalid("has no metadata region")
    }
    var reserved: [(range: Range<Int64>, name: String)] = [(0..<Self.mebibyte, "the headers and region tables")]
    if header.logLength > 0 { reserved.append((header.logOffset..<header.logOffset + header.logLength, "the log")) }
    for region in regions {
      let name = region.guid == .bat ? "the BAT region" : region.guid == .metadata ? "the metadata region" : "region \(region.guid)"
      if let other = reserved.first(where: { $0.range.overlaps(region.range) }) {
        throw invalid(
          "\(name) at \(hex(region.offset)) (\(hex(region.length)) bytes) overlaps \(other.name) at \(hex(other.range.lowerBound))")
      }
      reserved.append((region.range, name))
    }

    metadata = try VHDXMetadata.read(from: store, region: metadataRegion)
    chunkRatio = (Int64(1) << 23) * metadata.logicalSectorSize / metadata.blockSize
    payloadBlocks = (metadata.virtualSize + metadata.blockSize - 1) / metadata.blockSize
    let entryCount: Int64
    if metadata.hasParent {
      entryCount = (payloadBlocks + chunkRatio - 1) / chunkRatio * (chunkRatio + 1)
    } else {
      entryCount = payloadBlocks == 0 ? 0 : payloadBlocks + (payloadBlocks - 1) / chunkRatio
    }
    guard entryCount * 8 <= batRegion.length else {
      throw invalid(
        "BAT region of \(hex(batRegion.length)) bytes is too small for the \(entryCount) entries a disk of \(metadata.virtualSize) bytes in blocks of \(metadata.blockSize) needs")
    }
    guard batRegion.offset + entryCount * 8 <= fileSize else {
      throw invalid(
        "BAT at \(hex(batRegion.offset)) (\(entryCount) entries) runs past the end of the file (size \(hex(fileSize)))")
    }
    bat = BlockAllocationTable(
      source: store, offset: batRegion.offset, count: Int(entryCount), chunkRatio: Int(chunkRatio))

    if let locator = metadata.parentLocator {
      // Windows separators; the engine resolves the name against this image's folder.
      let name =
        locator["relative_path"].map { $0.replacing("\\", with: "/") }
        ?? locator["volume_path"] ?? locator["absolute_win32_path"]
      guard let name, !name.isEmpty else {
        throw invalid("parent locator has none of relative_path, volume_path, absolute_win32_path")
      }
      backing = BackingReference(name: name, format: "vhdx")
    } else {
      backing = nil
    }
    warnings =
      isDirty
      ? ["the image was not closed cleanly: its log was replayed in memory for reading (the file is unchanged)"]
      : []
    try checkEveryEntry(reserved: reserved)
  }

  // MARK: - BAT entries

  /// What a BAT entry says about its payload block.
  enum BlockState: Equatable {
    case notPresent
    case zero
    case present(host: Int64)
    case partiallyPresent(host: Int64)
  }

  private static let offsetMask: UInt64 = ~0xF_FFFF

  /// Checks every entry once at open: states known, present blocks inside the file, clear
  /// of the headers, log and regions, and of each other. Pages that are holes in the file
  /// are not read.
  private func checkEveryEntry(reserved: [(range: Range<Int64>, name: String)]) throws {
    var blocks: [(start: Int64, end: Int64, index: Int)] = []
    let limit = fileSize / Self.mebibyte + 1
    for number in 0..<bat.pageCount {
      let page = try bat.readPage(number)
      // A page whose payload entries all hold no block needs no more checks, unless its
      // sector-bitmap entries count (differencing images).
      if page.uniformEmptyState != nil && !metadata.hasParent { continue }
      for (slot, entry) in page.entries.enumerated() {
        let state = entry & 7
        let index = number * BlockAllocationTable.entriesPerPage + slot
        let extent: Range<Int64>?
        if bat.isBitmapIndex(index) {
          guard metadata.hasParent, state != 0 else { continue }
          extent = try bitmapBlock(entry, index: index)
        } else {
          if state != 6 && state != 7 && state != 4 { continue }
          switch try self.state(entry, index: index) {
          case .present(let host), .partiallyPresent(let host):
            let block = Int64(index) - Int64(index) / (chunkRatio + 1)
            // A differencing file's last chunk has entries past the disk's end: unused.
            extent = block < payloadBlocks ? host..<host + blockLength(block) : nil
          default: extent = nil
          }
        }
        guard let extent else { continue }
        guard extent.upperBound <= fileSize else {
          throw ImageError.invalid(
            path: path,
            "BAT entry \(index) points at \(hex(extent.lowerBound)) (\(hex(Int64(extent.count))) bytes), past the end of the file (size \(hex(fileSize)))")
        }
        if let other = reserved.first(where: { $0.range.overlaps(extent) }) {
          throw ImageError.invalid(
            path: path, "BAT entry \(index) points at \(hex(extent.lowerBound)), inside \(other.name)")
        }
        blocks.append((extent.lowerBound, extent.upperBound, index))
        guard blocks.count <= limit else {
          throw ImageError.invalid(path: path, "BAT has more present blocks than the file holds: some overlap")
        }
      }
    }
    blocks.sort { $0.start < $1.start }
    for (first, second) in zip(blocks, blocks.dropFirst()) where first.end > second.start {
      throw ImageError.invalid(
        path: path,
        "BAT entries \(first.index) and \(second.index) point at overlapping blocks (\(hex(first.start)) and \(hex(second.start)))")
    }
  }

  /// The state of the payload entry `entry` at BAT index `index`.
  private func state(_ entry: UInt64, index: Int) throws -> BlockState {
    let host = try hostOffset(entry, index: index)
    switch entry & 7 {
    case 0: return .notPresent
    // Undefined, zero, unmapped (3 in v1.0, 5 in the v0.95 draft): the guest reads zeros.
    case 1, 2, 3, 5: return .zero
    case 6: return .present(host: host)
    case 7:
      guard metadata.hasParent else {
        throw ImageError.invalid(
          path: path, "BAT entry \(index) is partially present (7), which only differencing images may have")
      }
      return .partiallyPresent(host: host)
    default:
      throw ImageError.invalid(path: path, "BAT entry \(index) has the reserved state \(entry & 7)")
    }
  }

  /// The host range of the sector bitmap entry at `index`, or nil when it holds none.
  /// Files without a parent never use them (and old qemu left junk there): ignored.
  private func bitmapBlock(_ entry: UInt64, index: Int) throws -> Range<Int64>? {
    guard metadata.hasParent else { return nil }
    switch entry & 7 {
    case 0: return nil
    case 6:
      let host = try hostOffset(entry, index: index)
      return host..<host + Self.mebibyte
    default:
      throw ImageError.invalid(
        path: path, "sector bitmap entry \(index) has state \(entry & 7), neither not present (0) nor present (6)")
    }
  }

  /// The file offset of a BAT entry, refused when no file could be that long (so adding a
  /// block length to it cannot overflow).
  private func hostOffset(_ entry: UInt64, index: Int) throws -> Int64 {
    let host = entry & Self.offsetMask
    guard host <= UInt64(Int64.max / 2) else {
      throw ImageError.invalid(
        path: path, "BAT entry \(index) points at \(hex(host)), past the end of the file (size \(hex(fileSize)))")
    }
    return Int64(host)
  }

  /// The bytes of block `block` that lie inside the virtual disk.
  private func blockLength(_ block: Int64) -> Int64 {
    min(metadata.blockSize, metadata.virtualSize - block * metadata.blockSize)
  }

  // MARK: - The allocation map

  /// What one stretch of the virtual disk holds.
  enum Piece: Equatable {
    case unallocated
    case zero
    case data(host: Int64)
  }

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    var result: [Extent] = []
    try walk(range, entryLimit: Self.entriesPerAnswer, bitmapLimit: Self.bitmapsPerAnswer) { stretch, piece in
      switch piece {
      case .unallocated: result.appendMerging(Extent(stretch, .unallocated))
      case .zero: result.appendMerging(Extent(stretch, .zero))
      case .data(let host): result.appendMerging(Extent(stretch, .data, hostOffset: host))
      }
    }
    return result
  }

  /// Visits the pieces of `range` in order until it is covered or the limits are reached
  /// (at least one block is always visited).
  private func walk(
    _ range: Range<Int64>, entryLimit: Int, bitmapLimit: Int, _ visit: (Range<Int64>, Piece) throws -> Void
  ) throws {
    let blockSize = metadata.blockSize
    var position = range.lowerBound
    var entriesVisited = 0
    var bitmapsRead = 0
    // Entries come from one cached page at a time, not one cache lookup each.
    var page: (number: Int, page: BlockAllocationTable.Page)?
    while position < range.upperBound && entriesVisited < entryLimit {
      let block = position / blockSize
      let blockStart = block * blockSize
      let end = min(range.upperBound, blockStart + blockSize)
      let index = Int(block + block / chunkRatio)
      entriesVisited += 1
      let pageNumber = index / BlockAllocationTable.entriesPerPage
      if page?.number != pageNumber { page = (pageNumber, try bat.page(pageNumber)) }
      if let state = page!.page.uniformEmptyState {
        // Every block of the page holds nothing, alike: one step to the page's end.
        let pageEnd = Int64(pageNumber + 1) * Int64(BlockAllocationTable.entriesPerPage)
        var next = pageEnd * chunkRatio / (chunkRatio + 1)
        while next > block && next + next / chunkRatio >= pageEnd { next -= 1 }
        while next + next / chunkRatio < pageEnd { next += 1 }
        let stepEnd = min(range.upperBound, next * blockSize)
        try visit(position..<stepEnd, state == 0 && metadata.hasParent ? .unallocated : .zero)
        position = stepEnd
        continue
      }
      let entry = page!.page.entries[index % BlockAllocationTable.entriesPerPage]
      switch try state(entry, index: index) {
      case .notPresent:
        try visit(position..<end, metadata.hasParent ? .unallocated : .zero)
      case .zero:
        try visit(position..<end, .zero)
      case .present(let host):
        try visit(position..<end, .data(host: host + (position - blockStart)))
      case .partiallyPresent(let host):
        if bitmapsRead == bitmapLimit && entriesVisited > 1 { return }
        bitmapsRead += 1
        try visitSectors(block: block, host: host, from: position, to: end, visit)
      }
      position = end
    }
  }

  /// Visits a partially present block sector run by sector run, from its chunk's bitmap:
  /// set bits are this file's data, clear bits the parent's.
  private func visitSectors(
    block: Int64, host: Int64, from start: Int64, to end: Int64, _ visit: (Range<Int64>, Piece) throws -> Void
  ) throws {
    let chunk = block / chunkRatio
    let index = Int(chunk * (chunkRatio + 1) + chunkRatio)
    let entry = try bat.entry(index)
    guard let bitmapRange = try bitmapBlock(entry, index: index) else {
      throw ImageError.invalid(
        path: path, "block \(block) is partially present but its chunk's sector bitmap (BAT entry \(index)) is not present")
    }
    let bitmap = try bitmaps.bitmap(at: bitmapRange.lowerBound) {
      try store.readBytes(count: Int(Self.mebibyte), at: bitmapRange.lowerBound, what: "sector bitmap (BAT entry \(index))")
    }
    let sectorSize = metadata.logicalSectorSize
    let blockStart = block * metadata.blockSize
    let chunkStart = chunk * chunkRatio * metadata.blockSize
    func isSet(_ offset: Int64) -> Bool {
      let sector = Int((offset - chunkStart) / sectorSize)
      return bitmap[sector >> 3] & (1 << UInt8(sector & 7)) != 0
    }
    var position = start
    while position < end {
      let set = isSet(position)
      var next = (position / sectorSize + 1) * sectorSize
      while next < end && isSet(next) == set { next += sectorSize }
      next = min(next, end)
      try visit(position..<next, set ? .data(host: host + (position - blockStart)) : .unallocated)
      position = next
    }
  }

  // MARK: - Reading

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    guard buffer.count > 0 else { return }
    // Host-contiguous data is gathered into one read.
    var reads = GatheredReads(from: store, into: buffer, at: offset)
    try walk(offset..<offset + Int64(buffer.count), entryLimit: .max, bitmapLimit: .max) { range, piece in
      let start = Int(range.lowerBound - offset)
      let target = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + Int(range.count)])
      switch piece {
      case .unallocated, .zero:
        target.initializeMemory(as: UInt8.self, repeating: 0)
      case .data(let host):
        try reads.add(bufferStart: start, host: host, length: target.count)
      }
    }
    try reads.flush()
  }
}

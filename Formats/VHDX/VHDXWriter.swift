import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// Writes a VHDX image (dynamic, fixed, or differencing on a VHDX parent) in one pass over
/// the virtual disk, as the conversion engine hands it data and zeros in disk order.
///
/// Layout, as qemu-img lays out its own (block/vhdx.c `vhdx_create`):
/// ```
/// 0        file identifier "vhdxfile", creator "lacuna"
/// 64 KiB   header 1 (sequence 1), 128 KiB header 2 (sequence 2): LogGuid zero
/// 192 KiB  region table, 256 KiB its copy
/// 1 MiB    the log, log_size bytes, empty (a hole)
/// then     the BAT (rounded up to 1 MiB), the metadata region (1 MiB)
/// BAT end + 5 MiB: payload blocks
/// ```
/// - dynamic: a block gets its place (the next free one after the last) when the first
///   data of it arrives, so blocks follow disk order and the file is the same bytes for any
///   thread count. Only the data is written: the zero parts of a block stay holes on the
///   host. Blocks without data take no space and are ZERO (`block_state_zero=on`, qemu's
///   default) or NOT_PRESENT.
/// - fixed: block `b` lies at payload start + `b` × block size, every BAT entry
///   FULLY_PRESENT; the file is payload start + disk size long, and sparse where the disk
///   reads zero.
/// - differencing (`-B`, a VHDX parent): what the engine leaves to the parent stays
///   NOT_PRESENT; a block wholly covered by data is FULLY_PRESENT, wholly by zeros ZERO;
///   a block in part this layer's and in part the parent's is PARTIALLY_PRESENT, its
///   sectors marked in its chunk's sector bitmap (written when the engine moves past the
///   chunk, in a 1 MiB block of its own).
///
/// The BAT is written page by page as the engine moves on, so memory holds one page of it,
/// one block's state and, for a differencing image, one chunk's 1 MiB sector bitmap,
/// whatever the size of the disk. Headers, region tables and metadata come in `finish()`.
public final class VHDXWriter: ImageWriter {
  let target: ByteTarget
  let settings: Settings
  let virtualSize: Int64
  /// The size the metadata records: a whole number of logical sectors, as qemu rounds it.
  let recordedSize: Int64
  let isDifferencing: Bool
  let logicalSectorSize: Int64
  let physicalSectorSize: Int64
  let blockSize: Int64
  let chunkRatio: Int64
  let payloadBlocks: Int64
  let batEntries: Int64
  let logOffset: Int64 = 1 << 20
  let batOffset: Int64
  let batLength: Int64
  let metadataOffset: Int64
  let payloadStart: Int64
  let fileWriteGuid = GUID.random()
  let dataWriteGuid = GUID.random()
  let virtualDiskId: GUID
  let parentLocator: [(key: String, value: String)]?

  static let mebibyte: Int64 = 1 << 20
  static let maximumSize: Int64 = 64 << 40
  static let fullyPresent: UInt64 = 6
  static let partiallyPresent: UInt64 = 7
  static let zeroBlock: UInt64 = 2
  static let bitmapPresent: UInt64 = 6

  /// Where the next block or sector bitmap goes (dynamic and differencing images).
  private var nextFree: Int64
  private var bat: BATStream
  /// The block the engine is in (-1: none yet), and what it holds so far.
  private var block: Int64 = -1
  private var blockHost: Int64?
  private var blockHasData = false
  /// Logical sectors of the current block this layer covers (differencing only).
  private var blockOwnSectors: Int64 = 0
  /// The sector bitmap of the current chunk (differencing only), made on first need.
  private var chunkBitmap: [UInt8]?
  private var chunkHasPartialBlock = false

  /// Makes a writer for `target` (the open, empty temporary file). This is `VHDX.format`'s
  /// `create`.
  ///
  /// - Parameters:
  ///   - target: the temporary file; `finish()` commits it, `abandon()` removes it.
  ///   - virtualSize: the size of the virtual disk in bytes.
  ///   - options: `-o subformat=, block_size=, log_size=, block_state_zero=`, and the
  ///     backing file with its opened image (which must be a VHDX of the same size).
  /// - Returns: the writer.
  public static func create(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws -> ImageWriter {
    try VHDXWriter(target: target, virtualSize: virtualSize, options: options)
  }

  init(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    let path = target.name
    func usage(_ message: String) -> ImageError { .usage(path: path, message) }
    if options.compress {
      throw usage("VHDX images cannot be compressed (-c needs -O qcow2)")
    }
    guard virtualSize >= 0, virtualSize <= Self.maximumSize else {
      throw usage("virtual size \(virtualSize) is larger than a VHDX image can hold (64 TiB)")
    }
    settings = try Settings(options, size: virtualSize, path: path)
    self.target = target
    self.virtualSize = virtualSize

    if let backing = options.backing {
      guard let parent = options.backingImage as? VHDXReader else {
        let what = options.backingImage.map { "a \($0.formatName) image" } ?? "not an image lacuna opened"
        throw usage("a VHDX differencing disk needs a VHDX parent, and \(backing.name) is \(what)")
      }
      guard parent.virtualSize == virtualSize else {
        throw usage(
          "a VHDX differencing disk has its parent's virtual size: \(backing.name) is \(parent.virtualSize) bytes, the disk written is \(virtualSize)")
      }
      isDifferencing = true
      logicalSectorSize = parent.metadata.logicalSectorSize
      physicalSectorSize = parent.metadata.physicalSectorSize ?? parent.metadata.logicalSectorSize
      // The child shows the guest the same disk, under the same identity (libvhdi sees the
      // parent's id in Hyper-V's children).
      virtualDiskId = parent.metadata.page83Data ?? GUID.random()
      let relative = try Self.relativePath(of: backing.name, from: path)
      parentLocator = [("parent_linkage", parent.dataWriteGuid.lowercased()), ("relative_path", relative)]
    } else {
      isDifferencing = false
      logicalSectorSize = 512
      physicalSectorSize = 512
      virtualDiskId = GUID.random()
      parentLocator = nil
    }
    if let locator = parentLocator, VHDXLayout.parentLocator(locator).count > 1 << 16 {
      throw usage("backing file name \(options.backing!.name) is too long for a VHDX parent locator")
    }

    recordedSize = (virtualSize + logicalSectorSize - 1) / logicalSectorSize * logicalSectorSize
    blockSize = settings.blockSize
    chunkRatio = (Int64(1) << 23) * logicalSectorSize / blockSize
    payloadBlocks = (recordedSize + blockSize - 1) / blockSize
    if isDifferencing {
      batEntries = (payloadBlocks + chunkRatio - 1) / chunkRatio * (chunkRatio + 1)
    } else {
      batEntries = payloadBlocks == 0 ? 0 : payloadBlocks + (payloadBlocks - 1) / chunkRatio
    }
    batOffset = logOffset + settings.logSize
    batLength = max(1, (batEntries * 8 + Self.mebibyte - 1) / Self.mebibyte) * Self.mebibyte
    metadataOffset = batOffset + batLength
    // qemu leaves 4 MiB after the metadata region "for future expansion".
    payloadStart = batOffset + batLength + 5 * Self.mebibyte
    nextFree = payloadStart

    let defaultPayload: (Int64) -> UInt64
    switch (isDifferencing, settings.subformat) {
    case (true, _):
      defaultPayload = { _ in 0 }
    case (false, .fixed):
      let start = payloadStart
      let size = blockSize
      defaultPayload = { block in UInt64(start + block * size) | Self.fullyPresent }
    case (false, .dynamic):
      let state: UInt64 = settings.blockStateZero ? Self.zeroBlock : 0
      defaultPayload = { _ in state }
    }
    bat = BATStream(
      offset: batOffset, count: batEntries, chunkRatio: chunkRatio, payloadBlocks: payloadBlocks,
      defaultPayload: defaultPayload)
  }

  /// The parent's name as `relative_path` holds it: relative to the child's folder, with
  /// `\` separators, starting `.\` or `..\` as Hyper-V writes it.
  static func relativePath(of name: String, from output: String) throws -> String {
    guard !name.contains("\\") else {
      throw ImageError.usage(
        path: output, "backing file name \(name) holds a '\\', which a VHDX parent locator takes for a separator")
    }
    var components: [String]
    if name.hasPrefix("/") {
      let outputDirectory = absoluteComponents(output).dropLast()
      let parent = absoluteComponents(name)
      var common = 0
      while common < outputDirectory.count, common < parent.count - 1, outputDirectory[common] == parent[common] {
        common += 1
      }
      components = Array(repeating: "..", count: outputDirectory.count - common) + parent[common...]
    } else {
      components = name.split(separator: "/").map(String.init).filter { $0 != "." }
    }
    if components.first != ".." { components.insert(".", at: 0) }
    return components.joined(separator: "\\")
  }

  /// The components of `path` made absolute against the working directory, with `.` and
  /// `..` taken out.
  private static func absoluteComponents(_ path: String) -> [String] {
    var full = path
    if !path.hasPrefix("/") {
      var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
      if getcwd(&buffer, buffer.count) != nil {
        full = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/" + path
      }
    }
    var result: [String] = []
    for part in full.split(separator: "/") {
      if part == "." { continue }
      if part == ".." {
        if !result.isEmpty { result.removeLast() }
        continue
      }
      result.append(String(part))
    }
    return result
  }

  /// Sectors: the parent's logical sector for a differencing image (its sector bitmap
  /// counts them), 512 bytes otherwise.
  public var granularity: Int { Int(logicalSectorSize) }

  // MARK: - The engine's calls

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard !bytes.isEmpty else { return }
    let end = offset + Int64(bytes.count)
    if !isDifferencing && settings.subformat == .fixed {
      try target.write(bytes, at: payloadStart + offset)
      return
    }
    var position = offset
    while position < end {
      let number = position / blockSize
      let blockStart = number * blockSize
      let pieceEnd = min(end, blockStart + blockSize)
      try enter(number)
      if blockHost == nil { blockHost = allocate(blockSize) }
      let start = Int(position - offset)
      try target.write(
        UnsafeRawBufferPointer(rebasing: bytes[start..<start + Int(pieceEnd - position)]),
        at: blockHost! + (position - blockStart))
      blockHasData = true
      if isDifferencing { markOwn(position..<pieceEnd, blockStart: blockStart) }
      position = pieceEnd
    }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // Without a parent, what is not written reads as zero: nothing to do. With one, the
    // zeros must hide the parent.
    guard isDifferencing, !range.isEmpty else { return }
    var position = range.lowerBound
    while position < range.upperBound {
      let number = position / blockSize
      let blockStart = number * blockSize
      let pieceEnd = min(range.upperBound, blockStart + blockSize)
      try enter(number)
      markOwn(position..<pieceEnd, blockStart: blockStart)
      position = pieceEnd
    }
  }

  public func finish() throws {
    do {
      try enter(payloadBlocks)
      try bat.advance(to: batEntries, target: target)
      try writeStructures()
      try target.commit()
    } catch {
      target.abandon()
      throw error
    }
  }

  public func abandon() { target.abandon() }

  // MARK: - Blocks

  /// Takes the next free 1 MiB-aligned place of `length` bytes in the file.
  private func allocate(_ length: Int64) -> Int64 {
    let place = nextFree
    nextFree += length
    return place
  }

  /// Moves to block `number`, settling every block (and chunk) before it.
  private func enter(_ number: Int64) throws {
    guard number != block else { return }
    guard number > block else {
      throw ImageError.invalid(
        path: target.name, "internal: block \(number) written after block \(block); the engine goes in disk order")
    }
    if block >= 0 { try settleBlock() }
    if isDifferencing, block >= 0, number >= payloadBlocks || number / chunkRatio > block / chunkRatio {
      try settleChunk(block / chunkRatio)
    }
    block = number
    blockHost = nil
    blockHasData = false
    blockOwnSectors = 0
  }

  /// Records the current block's BAT entry.
  private func settleBlock() throws {
    let index = block + block / chunkRatio
    guard isDifferencing else {
      if let host = blockHost { try bat.set(index, UInt64(host) | Self.fullyPresent, target: target) }
      return
    }
    let length = min(blockSize, recordedSize - block * blockSize)
    let sectors = (length + logicalSectorSize - 1) / logicalSectorSize
    if blockOwnSectors == 0 {
      return  // the parent's: NOT_PRESENT
    } else if blockOwnSectors >= sectors {
      if let host = blockHost {
        try bat.set(index, UInt64(host) | Self.fullyPresent, target: target)
      } else {
        try bat.set(index, Self.zeroBlock, target: target)
      }
    } else {
      // Zero sectors of this layer read as the block's holes.
      let host = blockHost ?? allocate(blockSize)
      try bat.set(index, UInt64(host) | Self.partiallyPresent, target: target)
      chunkHasPartialBlock = true
    }
  }

  /// Writes chunk `chunk`'s sector bitmap if one of its blocks is partially present.
  private func settleChunk(_ chunk: Int64) throws {
    defer {
      chunkBitmap = nil
      chunkHasPartialBlock = false
    }
    guard chunkHasPartialBlock, let bitmap = chunkBitmap else { return }
    let host = allocate(Self.mebibyte)
    try bitmap.withUnsafeBytes { try target.write($0, at: host) }
    try bat.set(chunk * (chunkRatio + 1) + chunkRatio, UInt64(host) | Self.bitmapPresent, target: target)
  }

  /// Marks `range` (inside the current block) as this layer's in the chunk's bitmap.
  private func markOwn(_ range: Range<Int64>, blockStart: Int64) {
    let sectorSize = logicalSectorSize
    let first = range.lowerBound / sectorSize
    let last = (range.upperBound + sectorSize - 1) / sectorSize
    blockOwnSectors += last - first
    let chunkFirstSector = (block / chunkRatio) * chunkRatio * (blockSize / sectorSize)
    if chunkBitmap == nil { chunkBitmap = [UInt8](repeating: 0, count: Int(Self.mebibyte)) }
    setBits(Int(first - chunkFirstSector)..<Int(last - chunkFirstSector))
  }

  /// Sets bits `bits` of the chunk bitmap (bit 0 of byte 0 first).
  private func setBits(_ bits: Range<Int>) {
    chunkBitmap!.withUnsafeMutableBufferPointer { map in
      var bit = bits.lowerBound
      while bit < bits.upperBound && bit & 7 != 0 {
        map[bit >> 3] |= 1 << UInt8(bit & 7)
        bit += 1
      }
      let wholeEnd = bits.upperBound & ~7
      if bit < wholeEnd {
        map.baseAddress!.advanced(by: bit >> 3).initialize(repeating: 0xFF, count: (wholeEnd - bit) >> 3)
        bit = wholeEnd
      }
      while bit < bits.upperBound {
        map[bit >> 3] |= 1 << UInt8(bit & 7)
        bit += 1
      }
    }
  }

  // MARK: - Structures

  private func writeStructures() throws {
    // Pages of zeros (most of the identifier, the region tables and the metadata table)
    // stay holes: the file reads as zeros there all the same.
    func put(_ bytes: [UInt8], at offset: Int64) throws {
      let page = 4096
      try bytes.withUnsafeBytes { all in
        var start = 0
        while start < all.count {
          let end = min(start + page, all.count)
          let piece = UnsafeRawBufferPointer(rebasing: all[start..<end])
          if piece.contains(where: { $0 != 0 }) { try target.write(piece, at: offset + Int64(start)) }
          start = end
        }
      }
    }
    try put(VHDXLayout.fileIdentifier(), at: 0)
    let metadata = VHDXLayout.Metadata(
      blockSize: blockSize, leaveBlocksAllocated: !isDifferencing && settings.subformat == .fixed,
      virtualSize: recordedSize, virtualDiskId: virtualDiskId, logicalSectorSize: logicalSectorSize,
      physicalSectorSize: physicalSectorSize, parentLocator: parentLocator)
    try put(VHDXLayout.metadataRegion(metadata), at: metadataOffset)
    let regions = VHDXLayout.regionTable(
      bat: batOffset..<batOffset + batLength, metadata: metadataOffset..<metadataOffset + Self.mebibyte)
    for offset in RegionTable.offsets { try put(regions, at: offset) }
    for (index, offset) in VHDXHeader.offsets.enumerated() {
      try put(
        VHDXLayout.header(
          sequenceNumber: UInt64(index + 1), fileWriteGuid: fileWriteGuid, dataWriteGuid: dataWriteGuid,
          logOffset: logOffset, logLength: settings.logSize),
        at: offset)
    }
    let length = !isDifferencing && settings.subformat == .fixed ? payloadStart + recordedSize : nextFree
    try target.truncate(to: length)
  }
}

/// The BAT, written in order one 64 KiB page at a time: entries the writer does not set
/// take their default (a sector-bitmap entry 0, a payload entry what the image type says);
/// pages of nothing but zeros are left as holes.
struct BATStream {
  static let pageEntries = 8192
  let offset: Int64
  let count: Int64
  let chunkRatio: Int64
  let payloadBlocks: Int64
  let defaultPayload: (Int64) -> UInt64
  private var page = [UInt64](repeating: 0, count: BATStream.pageEntries)
  /// The first entry not yet decided.
  private var next: Int64 = 0

  init(offset: Int64, count: Int64, chunkRatio: Int64, payloadBlocks: Int64, defaultPayload: @escaping (Int64) -> UInt64) {
    self.offset = offset
    self.count = count
    self.chunkRatio = chunkRatio
    self.payloadBlocks = payloadBlocks
    self.defaultPayload = defaultPayload
  }

  /// Entry `index` (at or after every entry set so far) is `value`.
  mutating func set(_ index: Int64, _ value: UInt64, target: ByteTarget) throws {
    try advance(to: index, target: target)
    page[Int(index % Int64(Self.pageEntries))] = value
    next = index + 1
    if next % Int64(Self.pageEntries) == 0 || next == count { try flush(endingAt: next, target: target) }
  }

  /// Gives every entry before `end` not yet decided its default.
  mutating func advance(to end: Int64, target: ByteTarget) throws {
    let perPage = Int64(Self.pageEntries)
    while next < end {
      let pageEnd = min((next / perPage + 1) * perPage, count)
      let stop = min(end, pageEnd)
      for index in next..<stop {
        let entry: UInt64
        if index % (chunkRatio + 1) == chunkRatio {
          entry = 0
        } else {
          let block = index - index / (chunkRatio + 1)
          entry = block < payloadBlocks ? defaultPayload(block) : 0
        }
        page[Int(index % perPage)] = entry
      }
      next = stop
      if next == pageEnd { try flush(endingAt: next, target: target) }
    }
  }

  /// Writes the page that ends at entry `end` (unless all zero) and starts a new one.
  private mutating func flush(endingAt end: Int64, target: ByteTarget) throws {
    let perPage = Int64(Self.pageEntries)
    let start = (end - 1) / perPage * perPage
    let used = Int(end - start)
    if page[0..<used].contains(where: { $0 != 0 }) {
      var bytes = [UInt8](repeating: 0, count: used * 8)
      for index in 0..<used { storeLittleEndian(page[index], at: index * 8, in: &bytes) }
      try bytes.withUnsafeBytes { try target.write($0, at: offset + start * 8) }
    }
    for index in 0..<used { page[index] = 0 }
  }
}

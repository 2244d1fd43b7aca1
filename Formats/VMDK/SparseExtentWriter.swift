import DiskImage

/// Writes one hosted sparse extent (monolithicSparse, or one `-sNNN` file of
/// twoGbMaxExtentSparse) in the layout qemu-img gives it (`HostedSparseLayout`): grains are
/// appended from `overHead` on in the order the engine delivers them, which is disk order,
/// so the bytes are the same whatever the thread count. Only the bytes that hold data are
/// written: the zero parts of a grain stay holes in the file.
///
/// A grain table is written, in both copies, once the engine has moved past the part of
/// the disk it maps, so memory holds the directory's worth of nothing but the tables near
/// the current position. Tables that map nothing are never written (their places stay holes,
/// all-zero entries: unallocated). `finish` writes both grain directories, the descriptor
/// (when embedded) and the header.
final class SparseExtentWriter {
  let target: ByteTarget
  let layout: HostedSparseLayout
  /// Virtual bytes of the extent.
  let length: Int64
  /// Grains that must read as zero are marked with entry 1 (flag 0x4) instead of a grain.
  let zeroedGrain: Bool
  /// The image has a parent: unallocated grains would show it, so zeros must be stored.
  let hasParent: Bool
  /// The embedded descriptor, for a single-file image.
  let descriptor: [UInt8]?

  /// The next free sector for a grain.
  private var nextGrainSector: UInt64
  /// Grain tables still being filled, by index.
  private var openTables: [Int: [UInt32]] = [:]
  /// Tables written out already (read back should a write return to one).
  private var writtenTables = Set<Int>()

  init(target: ByteTarget, length: Int64, zeroedGrain: Bool, hasParent: Bool, descriptor: [UInt8]?) throws {
    self.target = target
    self.length = length
    layout = HostedSparseLayout(capacity: UInt64(length / 512))
    self.zeroedGrain = zeroedGrain
    self.hasParent = hasParent
    self.descriptor = descriptor
    nextGrainSector = layout.overHead
    if let descriptor, descriptor.count > Int(VMDKWriterGeometry.descriptorSectors) * 512 {
      throw ImageError.usage(
        path: target.name,
        "the descriptor is \(descriptor.count) bytes, more than the \(VMDKWriterGeometry.descriptorSectors * 512) a sparse VMDK keeps for it (is the backing file name very long?)")
    }
  }

  private var grainBytes: Int64 { Int64(VMDKWriterGeometry.grainBytes) }

  // MARK: - Grains

  /// Writes data at `offset` of the extent, allocating grains as it goes, in as few writes
  /// as the host layout allows (grains allocated one after another are contiguous).
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try writeThroughUnits(bytes, at: offset, unitSize: grainBytes, to: target) { grain in
      try hostGrain(forWriting: grain)
    }
    try flushTables(endingBy: offset)
  }

  /// Makes `range` of the extent read as zero. Without a parent an unallocated grain
  /// already does. With one, a whole grain becomes a zeroed-grain entry (`zeroed_grain=on`)
  /// or a grain allocated and left a hole in the file (reads zero, costs no space); a grain
  /// zeroed in part also holds data, which allocates it.
  func writeZeroes(_ range: Range<Int64>) throws {
    guard hasParent, !range.isEmpty else { return }
    var grain = range.lowerBound / grainBytes
    while grain * grainBytes < range.upperBound {
      let start = grain * grainBytes
      let end = min(start + grainBytes, length)
      let whole = range.lowerBound <= start && range.upperBound >= end
      let entry = try self.entry(grain)
      if whole && zeroedGrain {
        if entry == 0 { try setEntry(grain, 1) }
      } else if entry <= 1 {
        _ = try hostGrain(forWriting: grain)
      }
      grain += 1
      // A zero run over whole tables finishes them: no data can come for them later.
      if grain % Int64(VMDKWriterGeometry.entriesPerTable) == 0 { try flushTables(endingBy: min(grain * grainBytes, range.upperBound)) }
    }
    try flushTables(endingBy: range.lowerBound)
  }

  /// The host offset of a grain to write into, allocating it on first use.
  private func hostGrain(forWriting grain: Int64) throws -> Int64 {
    let entry = try self.entry(grain)
    if entry > 1 { return Int64(entry) * 512 }
    let sector = nextGrainSector
    guard sector + VMDKWriterGeometry.grainSectors <= UInt64(UInt32.max) else {
      throw ImageError.usage(
        path: target.name, "the extent holds more data than grain table entries can point at (2 TiB per sparse file)")
    }
    nextGrainSector += VMDKWriterGeometry.grainSectors
    try setEntry(grain, UInt32(sector))
    return Int64(sector) * 512
  }

  // MARK: - Grain tables

  private func table(_ index: Int) throws -> [UInt32] {
    if let open = openTables[index] { return open }
    var entries = [UInt32](repeating: 0, count: VMDKWriterGeometry.entriesPerTable)
    if writtenTables.contains(index) {
      let bytes = try target.readBytes(
        count: VMDKWriterGeometry.entriesPerTable * 4, at: Int64(layout.tableSector(index)) * 512,
        what: "grain table \(index) (read back)")
      let reader = LittleEndianReader(bytes)
      for slot in entries.indices { entries[slot] = reader.uint32(at: slot * 4)! }
    }
    openTables[index] = entries
    return entries
  }

  private func entry(_ grain: Int64) throws -> UInt32 {
    let perTable = Int64(VMDKWriterGeometry.entriesPerTable)
    return try table(Int(grain / perTable))[Int(grain % perTable)]
  }

  private func setEntry(_ grain: Int64, _ value: UInt32) throws {
    let perTable = Int64(VMDKWriterGeometry.entriesPerTable)
    let index = Int(grain / perTable)
    _ = try table(index)
    openTables[index]![Int(grain % perTable)] = value
  }

  /// Writes out every open table that maps only offsets below `end`, and forgets it.
  private func flushTables(endingBy end: Int64) throws {
    guard !openTables.isEmpty else { return }
    let limit = end == Int64.max ? Int.max : Int(end / VMDKWriterGeometry.tableSpan)
    for index in openTables.keys.filter({ $0 < limit }).sorted() {
      let entries = openTables.removeValue(forKey: index)!
      guard entries.contains(where: { $0 != 0 }) || writtenTables.contains(index) else { continue }
      var bytes = [UInt8](repeating: 0, count: entries.count * 4)
      for (slot, value) in entries.enumerated() where value != 0 { LittleEndianWriter.store(value, at: slot * 4, in: &bytes) }
      try bytes.withUnsafeBytes {
        try target.write($0, at: Int64(layout.redundantTableSector(index)) * 512)
        try target.write($0, at: Int64(layout.tableSector(index)) * 512)
      }
      writtenTables.insert(index)
    }
  }

  // MARK: - The end

  /// Writes the remaining tables, both directories, the descriptor and the header, and
  /// sizes the file to its last grain. Does not commit the target.
  func finish() throws {
    try flushTables(endingBy: Int64.max)
    let redundant = layout.directoryBytes(layout.redundantTableSector)
    try redundant.withUnsafeBytes { try target.write($0, at: Int64(layout.redundantDirectory) * 512) }
    let primary = layout.directoryBytes(layout.tableSector)
    try primary.withUnsafeBytes { try target.write($0, at: Int64(layout.directory) * 512) }
    if let descriptor {
      try descriptor.withUnsafeBytes { try target.write($0, at: Int64(VMDKWriterGeometry.descriptorOffset) * 512) }
    }
    var flags = SparseExtentHeader.Flag.validNewlineCheck | SparseExtentHeader.Flag.redundantGrainTables
    if zeroedGrain { flags |= SparseExtentHeader.Flag.zeroedGrains }
    let header = SparseExtentHeader(
      version: zeroedGrain ? 2 : 1, flags: flags, capacity: layout.capacity,
      descriptorOffset: VMDKWriterGeometry.descriptorOffset, descriptorSize: VMDKWriterGeometry.descriptorSectors,
      rgdOffset: layout.redundantDirectory, gdOffset: layout.directory, overHead: layout.overHead, compressAlgorithm: 0)
    try header.encoded.withUnsafeBytes { try target.write($0, at: 0) }
    try target.truncate(to: Int64(nextGrainSector) * 512)
  }
}

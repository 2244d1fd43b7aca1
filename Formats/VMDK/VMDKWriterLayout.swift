import DiskImage

/// Sizes every VMDK writer shares: 64 KiB grains of 128 sectors, grain tables of 512
/// entries (4 sectors), so one table maps 32 MiB, as qemu-img and VMware write them.
enum VMDKWriterGeometry {
  static let sector: Int64 = 512
  static let grainSectors: UInt64 = 128
  static let grainBytes = 64 << 10
  static let entriesPerTable = 512
  static let tableSectors: UInt64 = 4
  /// Bytes of the virtual disk one grain table maps.
  static let tableSpan = Int64(grainBytes) * Int64(entriesPerTable)
  /// Where the embedded descriptor goes and the sectors kept for it (qemu's and VMware's).
  static let descriptorOffset: UInt64 = 1
  static let descriptorSectors: UInt64 = 20
  /// The largest extent of the split subformats: 2 GiB, as qemu cuts them.
  static let splitExtentBytes: Int64 = 2 << 30

  static func roundUp(_ value: UInt64, _ multiple: UInt64) -> UInt64 { (value + multiple - 1) / multiple * multiple }
}

/// Where qemu-img puts the metadata of a hosted sparse extent it creates: header (sector
/// 0), descriptor (sectors 1-20), the redundant grain directory followed by all its grain
/// tables, the grain directory followed by all its grain tables, then grains from the next
/// grain boundary (`overHead`) on. Every table has its place from the start, so tables
/// that map nothing stay holes in the file.
struct HostedSparseLayout {
  /// Sectors of the extent.
  let capacity: UInt64
  let tableCount: Int
  let directorySectors: UInt64
  let redundantDirectory: UInt64
  let directory: UInt64
  let overHead: UInt64

  init(capacity: UInt64) {
    self.capacity = capacity
    let grains = (capacity + VMDKWriterGeometry.grainSectors - 1) / VMDKWriterGeometry.grainSectors
    let tables = (grains + UInt64(VMDKWriterGeometry.entriesPerTable) - 1) / UInt64(VMDKWriterGeometry.entriesPerTable)
    tableCount = Int(tables)
    directorySectors = (tables * 4 + 511) / 512
    redundantDirectory = VMDKWriterGeometry.descriptorOffset + VMDKWriterGeometry.descriptorSectors
    directory = redundantDirectory + directorySectors + tables * VMDKWriterGeometry.tableSectors
    overHead = VMDKWriterGeometry.roundUp(
      directory + directorySectors + tables * VMDKWriterGeometry.tableSectors, VMDKWriterGeometry.grainSectors)
  }

  func tableSector(_ index: Int) -> UInt64 { directory + directorySectors + UInt64(index) * VMDKWriterGeometry.tableSectors }
  func redundantTableSector(_ index: Int) -> UInt64 {
    redundantDirectory + directorySectors + UInt64(index) * VMDKWriterGeometry.tableSectors
  }

  /// A grain directory's bytes: each entry the sector of its table (`sectorOf`).
  func directoryBytes(_ sectorOf: (Int) -> UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: Int(directorySectors) * 512)
    for index in 0..<tableCount { LittleEndianWriter.store(UInt32(sectorOf(index)), at: index * 4, in: &bytes) }
    return bytes
  }
}

/// Stores little-endian integers into a byte array.
enum LittleEndianWriter {
  static func store<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
    for index in 0..<MemoryLayout<T>.size { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
  }
}

extension SparseExtentHeader {
  /// A header as a writer fills it in (the newline check bytes always valid).
  init(
    version: UInt32, flags: UInt32, capacity: UInt64, descriptorOffset: UInt64, descriptorSize: UInt64,
    rgdOffset: UInt64, gdOffset: UInt64, overHead: UInt64, compressAlgorithm: UInt16
  ) {
    self.version = version
    self.flags = flags
    self.capacity = capacity
    grainSize = VMDKWriterGeometry.grainSectors
    self.descriptorOffset = descriptorOffset
    self.descriptorSize = descriptorSize
    numGTEsPerGT = UInt32(VMDKWriterGeometry.entriesPerTable)
    self.rgdOffset = rgdOffset
    self.gdOffset = gdOffset
    self.overHead = overHead
    uncleanShutdown = false
    newlineBytes = Self.newlineCheck
    self.compressAlgorithm = compressAlgorithm
  }

  /// The 512 bytes of the header, fields at the offsets README.md lists.
  var encoded: [UInt8] {
    var bytes = [UInt8](repeating: 0, count: Self.size)
    bytes.replaceSubrange(0..<4, with: Self.magic)
    LittleEndianWriter.store(version, at: 4, in: &bytes)
    LittleEndianWriter.store(flags, at: 8, in: &bytes)
    LittleEndianWriter.store(capacity, at: 12, in: &bytes)
    LittleEndianWriter.store(grainSize, at: 20, in: &bytes)
    LittleEndianWriter.store(descriptorOffset, at: 28, in: &bytes)
    LittleEndianWriter.store(descriptorSize, at: 36, in: &bytes)
    LittleEndianWriter.store(numGTEsPerGT, at: 44, in: &bytes)
    LittleEndianWriter.store(rgdOffset, at: 48, in: &bytes)
    LittleEndianWriter.store(gdOffset, at: 56, in: &bytes)
    LittleEndianWriter.store(overHead, at: 64, in: &bytes)
    bytes[72] = uncleanShutdown ? 1 : 0
    bytes.replaceSubrange(73..<77, with: newlineBytes)
    LittleEndianWriter.store(compressAlgorithm, at: 77, in: &bytes)
    return bytes
  }
}

/// The text descriptor a writer records, laid out as qemu-img writes it.
struct VMDKDescriptorText {
  var contentID: UInt32
  var parentContentID: UInt32 = VMDKDescriptor.noParent
  var parentFileNameHint: String?
  var createType: String
  /// Extent lines: sectors, type (SPARSE, FLAT) and file name.
  var extents: [(sectors: UInt64, type: String, file: String)]
  var hardwareVersion: String
  var adapterType: VMDKAdapterType
  var toolsVersion: String
  /// The disk's size in bytes, for the geometry.
  var diskBytes: Int64

  /// A CID as qemu picks one: random. `ffffffff` means "no parent" and is never chosen.
  static func randomContentID() -> UInt32 {
    var generator = SystemRandomNumberGenerator()
    while true {
      let value = UInt32.random(in: 0...UInt32.max, using: &generator)
      if value != VMDKDescriptor.noParent { return value }
    }
  }

  var text: String {
    let heads = adapterType.heads
    let cylinders = diskBytes / (63 * heads * 512)
    var lines = [
      VMDKDescriptor.signature, "version=1", "CID=\(VMDKReader.hexCID(contentID))",
      "parentCID=\(VMDKReader.hexCID(parentContentID))", "createType=\"\(createType)\"",
    ]
    if let parentFileNameHint { lines.append("parentFileNameHint=\"\(parentFileNameHint)\"") }
    lines += ["", "# Extent description"]
    for extent in extents {
      lines.append("RW \(extent.sectors) \(extent.type) \"\(extent.file)\"" + (extent.type == "FLAT" ? " 0" : ""))
    }
    lines += [
      "", "# The Disk Data Base", "#DDB", "",
      "ddb.virtualHWVersion = \"\(hardwareVersion)\"",
      "ddb.geometry.cylinders = \"\(cylinders)\"",
      "ddb.geometry.heads = \"\(heads)\"",
      "ddb.geometry.sectors = \"63\"",
      "ddb.adapterType = \"\(adapterType.rawValue)\"",
      "ddb.toolsVersion = \"\(toolsVersion)\"",
    ]
    return lines.joined(separator: "\n") + "\n"
  }
}

import DiskImage

/// The fixed structures a VHDX writer lays down once the data is in: file identifier,
/// headers, region tables, metadata region and parent locator, each built as bytes here.
enum VHDXLayout {
  static let mebibyte: Int64 = 1 << 20
  static let creator = "lacuna"

  /// The 64 KiB file type identifier: `vhdxfile`, then the creator in UTF-16LE.
  static func fileIdentifier() -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 64 << 10)
    bytes.replaceSubrange(0..<8, with: Array("vhdxfile".utf8))
    let creatorBytes = utf16LittleEndian(creator)
    bytes.replaceSubrange(8..<8 + creatorBytes.count, with: creatorBytes)
    return bytes
  }

  /// One 4 KiB header with its CRC-32C; the log is empty (LogGuid zero).
  static func header(
    sequenceNumber: UInt64, fileWriteGuid: GUID, dataWriteGuid: GUID, logOffset: Int64, logLength: Int64
  ) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: VHDXHeader.size)
    bytes.replaceSubrange(0..<4, with: Array("head".utf8))
    storeLittleEndian(sequenceNumber, at: 8, in: &bytes)
    bytes.replaceSubrange(16..<32, with: fileWriteGuid.bytes)
    bytes.replaceSubrange(32..<48, with: dataWriteGuid.bytes)
    // 48..<64: LogGuid, zero: nothing to replay.
    storeLittleEndian(UInt16(0), at: 64, in: &bytes)  // log version
    storeLittleEndian(UInt16(1), at: 66, in: &bytes)  // version
    storeLittleEndian(UInt32(logLength), at: 68, in: &bytes)
    storeLittleEndian(UInt64(logOffset), at: 72, in: &bytes)
    storeLittleEndian(CRC32C.checksum(bytes), at: 4, in: &bytes)
    return bytes
  }

  /// The 64 KiB region table: the BAT and metadata regions, without the Required bit (as
  /// qemu writes them), with its CRC-32C.
  static func regionTable(bat: Range<Int64>, metadata: Range<Int64>) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: RegionTable.size)
    bytes.replaceSubrange(0..<4, with: Array("regi".utf8))
    storeLittleEndian(UInt32(2), at: 8, in: &bytes)
    for (index, (guid, range)) in [(GUID.bat, bat), (GUID.metadata, metadata)].enumerated() {
      let base = 16 + index * 32
      bytes.replaceSubrange(base..<base + 16, with: guid.bytes)
      storeLittleEndian(UInt64(range.lowerBound), at: base + 16, in: &bytes)
      storeLittleEndian(UInt32(range.count), at: base + 24, in: &bytes)
    }
    storeLittleEndian(CRC32C.checksum(bytes), at: 4, in: &bytes)
    return bytes
  }

  /// What the metadata region records.
  struct Metadata {
    var blockSize: Int64
    var leaveBlocksAllocated: Bool
    var virtualSize: Int64
    var virtualDiskId: GUID
    var logicalSectorSize: Int64
    var physicalSectorSize: Int64
    /// The parent locator's keys and values, in order (differencing images only).
    var parentLocator: [(key: String, value: String)]?
  }

  /// The metadata region's used part: the 64 KiB table, then the items from 64 KiB on, in
  /// qemu's order (file parameters, size, page 83, logical and physical sector size), the
  /// parent locator last. Flags as MS-VHDX lists them: every item IsRequired, all but the
  /// file parameters and the parent locator IsVirtualDisk.
  static func metadataRegion(_ metadata: Metadata) -> [UInt8] {
    let isRequired: UInt32 = 4
    let isVirtualDisk: UInt32 = 2
    var items: [(GUID, [UInt8], UInt32)] = []
    var parameters = [UInt8](repeating: 0, count: 8)
    storeLittleEndian(UInt32(metadata.blockSize), at: 0, in: &parameters)
    let flags: UInt32 = (metadata.leaveBlocksAllocated ? 1 : 0) | (metadata.parentLocator != nil ? 2 : 0)
    storeLittleEndian(flags, at: 4, in: &parameters)
    items.append((.fileParameters, parameters, isRequired))
    var size = [UInt8](repeating: 0, count: 8)
    storeLittleEndian(UInt64(metadata.virtualSize), at: 0, in: &size)
    items.append((.virtualDiskSize, size, isRequired | isVirtualDisk))
    items.append((.page83Data, metadata.virtualDiskId.bytes, isRequired | isVirtualDisk))
    var logical = [UInt8](repeating: 0, count: 4)
    storeLittleEndian(UInt32(metadata.logicalSectorSize), at: 0, in: &logical)
    items.append((.logicalSectorSize, logical, isRequired | isVirtualDisk))
    var physical = [UInt8](repeating: 0, count: 4)
    storeLittleEndian(UInt32(metadata.physicalSectorSize), at: 0, in: &physical)
    items.append((.physicalSectorSize, physical, isRequired | isVirtualDisk))
    if let locator = metadata.parentLocator {
      items.append((.parentLocator, parentLocator(locator), isRequired))
    }

    let tableSize = VHDXMetadata.tableSize
    var bytes = [UInt8](repeating: 0, count: tableSize + items.reduce(0) { $0 + ($1.1.count + 7) / 8 * 8 })
    bytes.replaceSubrange(0..<8, with: Array("metadata".utf8))
    storeLittleEndian(UInt16(items.count), at: 10, in: &bytes)
    var offset = tableSize
    for (index, (guid, item, flags)) in items.enumerated() {
      let base = 32 + index * 32
      bytes.replaceSubrange(base..<base + 16, with: guid.bytes)
      storeLittleEndian(UInt32(offset), at: base + 16, in: &bytes)
      storeLittleEndian(UInt32(item.count), at: base + 20, in: &bytes)
      storeLittleEndian(flags, at: base + 24, in: &bytes)
      bytes.replaceSubrange(offset..<offset + item.count, with: item)
      offset += (item.count + 7) / 8 * 8
    }
    return bytes
  }

  /// A VHDX parent locator: type GUID, count, 12-byte entries, then the keys and values
  /// in UTF-16LE without terminators.
  static func parentLocator(_ pairs: [(key: String, value: String)]) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 20 + pairs.count * 12)
    bytes.replaceSubrange(0..<16, with: GUID.vhdxParentLocatorType.bytes)
    storeLittleEndian(UInt16(pairs.count), at: 18, in: &bytes)
    for (index, pair) in pairs.enumerated() {
      let key = utf16LittleEndian(pair.key)
      let value = utf16LittleEndian(pair.value)
      let base = 20 + index * 12
      storeLittleEndian(UInt32(bytes.count), at: base, in: &bytes)
      storeLittleEndian(UInt32(bytes.count + key.count), at: base + 4, in: &bytes)
      storeLittleEndian(UInt16(key.count), at: base + 8, in: &bytes)
      storeLittleEndian(UInt16(value.count), at: base + 10, in: &bytes)
      bytes += key
      bytes += value
    }
    return bytes
  }

  static func utf16LittleEndian(_ text: String) -> [UInt8] {
    text.utf16.flatMap { [UInt8(truncatingIfNeeded: $0), UInt8(truncatingIfNeeded: $0 >> 8)] }
  }
}

extension GUID {
  /// A new random GUID (version 4, RFC 4122 variant), in the file's layout.
  static func random() -> GUID {
    var generator = SystemRandomNumberGenerator()
    var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
    // The third group is stored little-endian: its high byte (the version) is byte 7.
    bytes[7] = bytes[7] & 0x0F | 0x40
    bytes[8] = bytes[8] & 0x3F | 0x80
    return GUID(bytes: bytes)
  }
}

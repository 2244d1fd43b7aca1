import Foundation

@testable import VHDX

/// Builds small VHDX files byte by byte, the way the specification lays them out, so a test
/// can make what qemu-img cannot (differencing images, dirty logs) and change one field at
/// a time. Layout: headers and region tables in the first MiB, the BAT region at 1 MiB, the
/// metadata region at 2 MiB, the log (when asked) at 3 MiB, payload from 4 MiB.
struct VHDXBuilder {
  var virtualSize: Int64 = 4 << 20
  var blockSize: UInt32 = 1 << 20
  var logicalSectorSize: UInt32 = 512
  var physicalSectorSize: UInt32 = 4096
  var leaveBlocksAllocated = false
  /// The parent locator's key-value pairs; non-nil makes a differencing image (HasParent).
  var parentLocator: [(String, String)]?
  /// BAT entries by index (anything not listed is 0, not present).
  var bat: [Int: UInt64] = [:]
  /// Bytes placed at file offsets after the metadata (payload, sector bitmaps).
  var contents: [(offset: Int, bytes: [UInt8])] = []
  var sequenceNumbers: (UInt64, UInt64) = (5, 6)
  var dataWriteGuid = GUID("11111111-2222-3333-4444-555555555555")!
  var logGuid = GUID(bytes: [UInt8](repeating: 0, count: 16))
  /// The log region's content (from 3 MiB), when there is a log.
  var log: [UInt8]?
  var extraRegions: [(GUID, offset: UInt64, length: UInt32, flags: UInt32)] = []
  var extraMetadata: [(GUID, flags: UInt32, bytes: [UInt8])] = []
  var fileSize: Int = 4 << 20

  static let mebibyte = 1 << 20
  static let batOffset = 1 << 20
  static let metadataOffset = 2 << 20
  static let logOffset = 3 << 20
  static let payloadOffset = 4 << 20

  var chunkRatio: Int { (1 << 23) * Int(logicalSectorSize) / Int(blockSize) }

  /// The BAT index of payload block `block`.
  func payloadIndex(_ block: Int) -> Int { block + block / chunkRatio }
  /// The BAT index of chunk `chunk`'s sector bitmap.
  func bitmapIndex(_ chunk: Int) -> Int { chunk * (chunkRatio + 1) + chunkRatio }

  func build() -> [UInt8] {
    var end = max(fileSize, Self.payloadOffset)
    for (offset, bytes) in contents { end = max(end, offset + bytes.count) }
    var file = [UInt8](repeating: 0, count: end)
    file.replaceSubrange(0..<8, with: Array("vhdxfile".utf8))
    for (index, offset) in [64 << 10, 128 << 10].enumerated() {
      var header = [UInt8](repeating: 0, count: 4096)
      header.replaceSubrange(0..<4, with: Array("head".utf8))
      storeLittleEndian(index == 0 ? sequenceNumbers.0 : sequenceNumbers.1, at: 8, in: &header)
      header.replaceSubrange(32..<48, with: dataWriteGuid.bytes)
      header.replaceSubrange(48..<64, with: logGuid.bytes)
      storeLittleEndian(UInt16(1), at: 66, in: &header)
      storeLittleEndian(UInt32(Self.mebibyte), at: 68, in: &header)
      storeLittleEndian(UInt64(Self.logOffset), at: 72, in: &header)
      storeLittleEndian(CRC32C.checksum(header), at: 4, in: &header)
      file.replaceSubrange(offset..<offset + 4096, with: header)
    }
    var regions = [UInt8](repeating: 0, count: 64 << 10)
    regions.replaceSubrange(0..<4, with: Array("regi".utf8))
    let entries: [(GUID, UInt64, UInt32, UInt32)] =
      [(.bat, UInt64(Self.batOffset), UInt32(Self.mebibyte), 1), (.metadata, UInt64(Self.metadataOffset), UInt32(Self.mebibyte), 1)]
      + extraRegions.map { ($0.0, $0.offset, $0.length, $0.flags) }
    storeLittleEndian(UInt32(entries.count), at: 8, in: &regions)
    for (index, entry) in entries.enumerated() {
      let base = 16 + index * 32
      regions.replaceSubrange(base..<base + 16, with: entry.0.bytes)
      storeLittleEndian(entry.1, at: base + 16, in: &regions)
      storeLittleEndian(entry.2, at: base + 24, in: &regions)
      storeLittleEndian(entry.3, at: base + 28, in: &regions)
    }
    storeLittleEndian(CRC32C.checksum(regions), at: 4, in: &regions)
    file.replaceSubrange((192 << 10)..<(256 << 10), with: regions)
    file.replaceSubrange((256 << 10)..<(320 << 10), with: regions)

    // Metadata: table, then items from +64 KiB.
    var items: [(GUID, UInt32, [UInt8])] = []
    var parameters = [UInt8](repeating: 0, count: 8)
    storeLittleEndian(blockSize, at: 0, in: &parameters)
    storeLittleEndian(UInt32((leaveBlocksAllocated ? 1 : 0) | (parentLocator != nil ? 2 : 0)), at: 4, in: &parameters)
    items.append((.fileParameters, 4, parameters))
    var size = [UInt8](repeating: 0, count: 8)
    storeLittleEndian(UInt64(virtualSize), at: 0, in: &size)
    items.append((.virtualDiskSize, 6, size))
    items.append((.page83Data, 6, GUID("AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")!.bytes))
    var logical = [UInt8](repeating: 0, count: 4)
    storeLittleEndian(logicalSectorSize, at: 0, in: &logical)
    items.append((.logicalSectorSize, 6, logical))
    var physical = [UInt8](repeating: 0, count: 4)
    storeLittleEndian(physicalSectorSize, at: 0, in: &physical)
    items.append((.physicalSectorSize, 6, physical))
    if let parentLocator { items.append((.parentLocator, 6, Self.locator(parentLocator))) }
    items += extraMetadata.map { ($0.0, $0.flags, $0.bytes) }
    var table = [UInt8](repeating: 0, count: 64 << 10)
    table.replaceSubrange(0..<8, with: Array("metadata".utf8))
    storeLittleEndian(UInt16(items.count), at: 10, in: &table)
    var itemOffset = 64 << 10
    for (index, item) in items.enumerated() {
      let base = 32 + index * 32
      table.replaceSubrange(base..<base + 16, with: item.0.bytes)
      storeLittleEndian(UInt32(itemOffset), at: base + 16, in: &table)
      storeLittleEndian(UInt32(item.2.count), at: base + 20, in: &table)
      storeLittleEndian(item.1, at: base + 24, in: &table)
      let at = Self.metadataOffset + itemOffset
      file.replaceSubrange(at..<at + item.2.count, with: item.2)
      itemOffset += (item.2.count + 4095) / 4096 * 4096
    }
    file.replaceSubrange(Self.metadataOffset..<Self.metadataOffset + (64 << 10), with: table)

    for (index, entry) in bat { storeLittleEndian(entry, at: Self.batOffset + index * 8, in: &file) }
    if let log { file.replaceSubrange(Self.logOffset..<Self.logOffset + log.count, with: log) }
    for (offset, bytes) in contents { file.replaceSubrange(offset..<offset + bytes.count, with: bytes) }
    return file
  }

  /// A parent locator item: header, 12-byte entries, then UTF-16LE keys and values.
  static func locator(_ pairs: [(String, String)]) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 20 + 12 * pairs.count)
    bytes.replaceSubrange(0..<16, with: GUID.vhdxParentLocatorType.bytes)
    storeLittleEndian(UInt16(pairs.count), at: 18, in: &bytes)
    for (index, (key, value)) in pairs.enumerated() {
      let keyBytes = key.utf16.flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] }
      let valueBytes = value.utf16.flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] }
      let base = 20 + index * 12
      storeLittleEndian(UInt32(bytes.count), at: base, in: &bytes)
      bytes += keyBytes
      storeLittleEndian(UInt32(bytes.count), at: base + 4, in: &bytes)
      bytes += valueBytes
      storeLittleEndian(UInt16(keyBytes.count), at: base + 8, in: &bytes)
      storeLittleEndian(UInt16(valueBytes.count), at: base + 10, in: &bytes)
    }
    return bytes
  }

  /// A BAT entry: state in bits 0-2, file offset (a multiple of 1 MiB) above.
  static func entry(state: UInt64, offset: Int = 0) -> UInt64 { UInt64(offset) | state }
}

/// Recomputes the CRC-32C of the header or region table at `offset` (`length` bytes).
func refreshChecksum(_ file: inout [UInt8], at offset: Int, length: Int) {
  let crc = CRC32C.checksum(Array(file[offset..<offset + length]), zeroing: 4)
  storeLittleEndian(crc, at: offset + 4, in: &file)
}

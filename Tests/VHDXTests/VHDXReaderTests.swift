import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// The reader over images built byte by byte (`VHDXBuilder`): block states, differencing
/// images with sector bitmaps, the log, and the small parts (CRC-32C, GUIDs, probing).
final class VHDXReaderTests: XCTestCase {
  private func open(_ bytes: [UInt8], name: String = "built.vhdx") throws -> VHDXReader {
    try VHDXReader(source: MemorySource(name: name, bytes: bytes))
  }

  private func pattern(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }

  func testCRC32C() {
    XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
    XCTAssertEqual(CRC32C.checksum([]), 0)
    XCTAssertEqual(CRC32C.checksum(Array("12340000".utf8) + [1], zeroing: 4), CRC32C.checksum(Array("1234".utf8) + [0, 0, 0, 0, 1]))
  }

  func testGUIDLayout() {
    XCTAssertEqual(GUID.bat.bytes, [0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08])
    XCTAssertEqual(GUID.bat.description, "2DC27766-F623-4200-9D64-115E9BFD4A08")
    XCTAssertEqual(GUID("{2dc27766-f623-4200-9d64-115e9bfd4a08}"), .bat)
    XCTAssertNil(GUID("2DC27766-F623-4200-9D64"))
  }

  func testProbe() {
    XCTAssertTrue(VHDX.format.probe(Array("vhdxfile".utf8) + [0, 0]))
    XCTAssertFalse(VHDX.format.probe(Array("vhdxfil".utf8)))
    XCTAssertEqual(VHDX.format.name, "vhdx")
    XCTAssertNotNil(VHDX.format.create)
    XCTAssertTrue(VHDX.format.capabilities.contains(.backingFile))
  }

  /// Every payload block state of a file without a parent.
  func testBlockStates() throws {
    var builder = VHDXBuilder()
    builder.virtualSize = 6 << 20
    let payload = VHDXBuilder.payloadOffset
    builder.bat = [
      0: VHDXBuilder.entry(state: 6, offset: payload), 1: VHDXBuilder.entry(state: 2), 2: 0,
      3: VHDXBuilder.entry(state: 3), 4: VHDXBuilder.entry(state: 5), 5: VHDXBuilder.entry(state: 6, offset: payload + (1 << 20)),
    ]
    builder.contents = [(payload, pattern(0x5A, 1 << 20)), (payload + (1 << 20), pattern(0x6B, 1 << 20))]
    let reader = try open(builder.build())
    XCTAssertEqual(reader.virtualSize, 6 << 20)
    XCTAssertEqual(reader.clusterSize, 1 << 20)
    let mebibyte: Int64 = 1 << 20
    XCTAssertEqual(
      try reader.allExtents(in: 0..<reader.virtualSize),
      [
        Extent(0..<mebibyte, .data, hostOffset: Int64(payload)), Extent(mebibyte..<5 * mebibyte, .zero),
        Extent(5 * mebibyte..<6 * mebibyte, .data, hostOffset: Int64(payload) + mebibyte),
      ])
    var expected = pattern(0x5A, 1 << 20) + pattern(0, 4 << 20) + pattern(0x6B, 1 << 20)
    try assertReaderConforms(
      reader, truth: LayerTruth(map: try reader.allExtents(in: 0..<reader.virtualSize), bytes: expected))
    expected = try readBytes(reader, at: mebibyte - 10, count: 20)
    XCTAssertEqual(expected, pattern(0x5A, 10) + pattern(0, 10))
  }

  /// A differencing image: partially present blocks read per sector bitmap, not present
  /// blocks are the parent's, zero blocks hide it; the locator names the parent.
  func testDifferencing() throws {
    var builder = VHDXBuilder()
    builder.parentLocator = [
      ("parent_linkage", "{11111111-2222-3333-4444-555555555555}"), ("relative_path", "..\\base\\parent.vhdx"),
      ("absolute_win32_path", "\\\\?\\D:\\base\\parent.vhdx"),
    ]
    let payload = VHDXBuilder.payloadOffset
    let bitmapOffset = payload + (2 << 20)
    builder.bat = [
      builder.payloadIndex(0): VHDXBuilder.entry(state: 7, offset: payload),
      builder.payloadIndex(1): VHDXBuilder.entry(state: 6, offset: payload + (1 << 20)),
      builder.payloadIndex(3): VHDXBuilder.entry(state: 2),
      builder.bitmapIndex(0): VHDXBuilder.entry(state: 6, offset: bitmapOffset),
    ]
    // Sectors 1 and 8..15 of block 0 are this file's; bit 0 of byte 0 is sector 0.
    var bitmap = pattern(0, 1 << 20)
    bitmap[0] = 0b0000_0010
    bitmap[1] = 0xFF
    builder.contents = [
      (payload, pattern(0x71, 1 << 20)), (payload + (1 << 20), pattern(0x72, 1 << 20)), (bitmapOffset, bitmap),
    ]
    let reader = try open(builder.build())
    XCTAssertEqual(reader.backing, BackingReference(name: "../base/parent.vhdx", format: "vhdx"))
    XCTAssertEqual(reader.parentLinkages, ["{11111111-2222-3333-4444-555555555555}"])
    XCTAssertEqual(reader.dataWriteGuid, "{11111111-2222-3333-4444-555555555555}")
    let mebibyte: Int64 = 1 << 20
    XCTAssertEqual(
      try kinds(reader),
      [
        Extent(0..<512, .unallocated), Extent(512..<1024, .data), Extent(1024..<4096, .unallocated),
        Extent(4096..<8192, .data), Extent(8192..<mebibyte, .unallocated), Extent(mebibyte..<2 * mebibyte, .data),
        Extent(2 * mebibyte..<3 * mebibyte, .unallocated), Extent(3 * mebibyte..<4 * mebibyte, .zero),
      ])
    var expected = pattern(0, 4 << 20)
    expected.replaceSubrange(512..<1024, with: pattern(0x71, 512))
    expected.replaceSubrange(4096..<8192, with: pattern(0x71, 4096))
    expected.replaceSubrange(1 << 20..<2 << 20, with: pattern(0x72, 1 << 20))
    try assertReaderConforms(reader, truth: LayerTruth(map: try kinds(reader), bytes: expected))
  }

  func testPartiallyPresentWithoutBitmapIsRefused() throws {
    var builder = VHDXBuilder()
    builder.parentLocator = [("parent_linkage", "{11111111-2222-3333-4444-555555555555}"), ("relative_path", "p.vhdx")]
    builder.bat = [0: VHDXBuilder.entry(state: 7, offset: VHDXBuilder.payloadOffset)]
    builder.fileSize = 6 << 20
    let reader = try open(builder.build())
    XCTAssertThrowsError(try reader.extents(in: 0..<4096)) { error in
      XCTAssertTrue("\(error)".contains("sector bitmap"), "\(error)")
    }
  }

  /// Of two valid headers the one with the larger sequence number is current; a damaged
  /// header leaves the other one; two damaged headers are an error.
  func testHeaders() throws {
    var builder = VHDXBuilder()
    builder.sequenceNumbers = (9, 3)
    var file = builder.build()
    // Header 2 (older) names a log that is not there; header 1 is current, so it is ignored.
    file[(128 << 10) + 48] = 0x42
    refreshChecksum(&file, at: 128 << 10, length: 4096)
    XCTAssertFalse(try open(file).isDirty)
    file[(64 << 10) + 100] ^= 1
    XCTAssertEqual(try open(file).isDirty, false, "header 2 is current now: its log holds no valid entry")
    file[(128 << 10) + 100] ^= 1
    XCTAssertThrowsError(try open(file)) { error in
      XCTAssertTrue("\(error)".hasPrefix("built.vhdx: no valid header: header at 0x10000 has checksum"), "\(error)")
    }
  }

  /// A log whose one entry writes the first BAT sector: read through, not written.
  func testLogReplay() throws {
    var builder = VHDXBuilder()
    let payload = VHDXBuilder.payloadOffset
    builder.contents = [(payload, pattern(0x7E, 1 << 20))]
    builder.logGuid = GUID("99999999-8888-7777-6666-555555555555")!
    var batSector = pattern(0, 4096)
    storeLittleEndian(VHDXBuilder.entry(state: 6, offset: payload), at: 0, in: &batSector)
    builder.log = Self.logEntry(
      sequence: 7, guid: builder.logGuid, writes: [(VHDXBuilder.batOffset, batSector)], lastFileOffset: 5 << 20)
    let file = builder.build()
    let reader = try open(file)
    XCTAssertTrue(reader.isDirty)
    XCTAssertEqual(reader.warnings.count, 1)
    XCTAssertEqual(try reader.allExtents(in: 0..<reader.virtualSize).first?.kind, .data)
    XCTAssertEqual(try readBytes(reader, at: 0, count: 4), pattern(0x7E, 4))

    // An entry written when the file was longer than it is now: the file was cut short.
    var truncated = builder
    truncated.log = Self.logEntry(
      sequence: 7, guid: builder.logGuid, writes: [(VHDXBuilder.batOffset, batSector)], lastFileOffset: 5 << 20,
      flushedFileOffset: 64 << 20)
    XCTAssertThrowsError(try open(truncated.build())) { error in
      XCTAssertTrue("\(error)".contains("truncated"), "\(error)")
    }

    // Entries that each claim the whole ring cost a bounded amount of checking.
    var hostile = builder
    var ring = [UInt8](repeating: 0, count: 1 << 20)
    for position in stride(from: 0, to: ring.count, by: 4096) {
      ring.replaceSubrange(position..<position + 4, with: Array("loge".utf8))
      storeLittleEndian(UInt32(1 << 20), at: position + 8, in: &ring)
      storeLittleEndian(UInt64(1), at: position + 16, in: &ring)
      ring.replaceSubrange(position + 32..<position + 48, with: builder.logGuid.bytes)
    }
    hostile.log = ring
    XCTAssertFalse(try open(hostile.build()).isDirty)

    // A damaged entry is no entry: nothing to replay.
    var damaged = file
    damaged[VHDXBuilder.logOffset + 4096 + 100] ^= 1
    let unreplayed = try open(damaged)
    XCTAssertFalse(unreplayed.isDirty)
    XCTAssertEqual(try unreplayed.allExtents(in: 0..<unreplayed.virtualSize), [Extent(0..<(4 << 20), .zero)])
  }

  /// Pages of entries that hold no block are stepped over at once: zeros without a
  /// parent, the parent's with one.
  func testEmptyTables() throws {
    var builder = VHDXBuilder()
    builder.virtualSize = 100 << 30
    builder.blockSize = 256 << 20
    XCTAssertEqual(try kinds(try open(builder.build())), [Extent(0..<(100 << 30), .zero)])
    builder.parentLocator = [("parent_linkage", "{11111111-2222-3333-4444-555555555555}"), ("volume_path", #"\\?\Volume{1}\p.vhdx"#)]
    let child = try open(builder.build())
    XCTAssertEqual(child.backing?.name, #"\\?\Volume{1}\p.vhdx"#)
    XCTAssertEqual(try kinds(child), [Extent(0..<(100 << 30), .unallocated)])
    builder.virtualSize = 0
    XCTAssertEqual(try open(builder.build()).allExtents(in: 0..<0), [])
  }

  /// 4096-byte logical sectors: a chunk ratio of 32768 with 1 MiB blocks, one bitmap bit
  /// per 4 KiB.
  func testLogicalSectors4K() throws {
    var builder = VHDXBuilder()
    builder.logicalSectorSize = 4096
    builder.parentLocator = [("parent_linkage", "{11111111-2222-3333-4444-555555555555}"), ("relative_path", "p.vhdx")]
    XCTAssertEqual(builder.chunkRatio, 32768)
    let payload = VHDXBuilder.payloadOffset
    builder.bat = [
      builder.payloadIndex(2): VHDXBuilder.entry(state: 7, offset: payload),
      builder.bitmapIndex(0): VHDXBuilder.entry(state: 6, offset: payload + (1 << 20)),
    ]
    var bitmap = pattern(0, 1 << 20)
    bitmap[64] = 0b1000_0000  // sector 519: the 8th 4 KiB sector of block 2 (256 sectors a block)
    builder.contents = [(payload, pattern(0x44, 1 << 20)), (payload + (1 << 20), bitmap)]
    let reader = try open(builder.build())
    let start: Int64 = (2 << 20) + 7 * 4096
    XCTAssertEqual(
      try kinds(reader),
      [Extent(0..<start, .unallocated), Extent(start..<start + 4096, .data), Extent(start + 4096..<(4 << 20), .unallocated)])
    XCTAssertEqual(try readBytes(reader, at: start - 2, count: 4), [0, 0, 0x44, 0x44])
  }

  func testHeadersWithEqualSequenceNumbers() throws {
    var builder = VHDXBuilder()
    builder.sequenceNumbers = (4, 4)
    XCTAssertNoThrow(try open(builder.build()), "identical copies, as Disk2VHD writes them")
    var file = builder.build()
    file[(128 << 10) + 200] = 1
    refreshChecksum(&file, at: 128 << 10, length: 4096)
    XCTAssertThrowsError(try open(file)) { error in
      XCTAssertTrue("\(error)".contains("both headers have sequence number 4 but differ"), "\(error)")
    }
  }

  /// One log entry: header and descriptors in the first sector, one data sector per write.
  static func logEntry(
    sequence: UInt64, guid: GUID, writes: [(Int, [UInt8])], lastFileOffset: UInt64, flushedFileOffset: UInt64 = 4 << 20
  ) -> [UInt8] {
    let length = 4096 * (1 + writes.count)
    var entry = [UInt8](repeating: 0, count: length)
    entry.replaceSubrange(0..<4, with: Array("loge".utf8))
    storeLittleEndian(UInt32(length), at: 8, in: &entry)
    storeLittleEndian(UInt32(0), at: 12, in: &entry)
    storeLittleEndian(sequence, at: 16, in: &entry)
    storeLittleEndian(UInt32(writes.count), at: 24, in: &entry)
    entry.replaceSubrange(32..<48, with: guid.bytes)
    storeLittleEndian(flushedFileOffset, at: 48, in: &entry)
    storeLittleEndian(lastFileOffset, at: 56, in: &entry)
    for (index, (offset, sector)) in writes.enumerated() {
      let base = 64 + index * 32
      entry.replaceSubrange(base..<base + 4, with: Array("desc".utf8))
      entry.replaceSubrange(base + 4..<base + 8, with: sector[4092..<4096])
      entry.replaceSubrange(base + 8..<base + 16, with: sector[0..<8])
      storeLittleEndian(UInt64(offset), at: base + 16, in: &entry)
      storeLittleEndian(sequence, at: base + 24, in: &entry)
      let data = 4096 * (1 + index)
      entry.replaceSubrange(data..<data + 4, with: Array("data".utf8))
      storeLittleEndian(UInt32(truncatingIfNeeded: sequence >> 32), at: data + 4, in: &entry)
      entry.replaceSubrange(data + 8..<data + 4092, with: sector[8..<4092])
      storeLittleEndian(UInt32(truncatingIfNeeded: sequence), at: data + 4092, in: &entry)
    }
    storeLittleEndian(CRC32C.checksum(entry), at: 4, in: &entry)
    return entry
  }
}

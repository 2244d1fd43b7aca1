import DiskImage
import TestSupport
import VHD
import XCTest

/// Images built field by field in memory: sector bitmaps, differencing disks, the size
/// rule, parent locators, and damage (each case one changed field). No qemu needed.
final class VHDReaderTests: XCTestCase {
  private func open(_ bytes: [UInt8], name: String = "test.vhd") throws -> VHDReader {
    try VHDReader(source: MemorySource(name: name, bytes: bytes))
  }

  /// What the builder's image holds, sector by sector: the map and the bytes.
  private func truth(of builder: VHDBuilder, virtualSize: Int64) -> LayerTruth {
    let absent: ExtentKind = builder.diskType == .differencing ? .unallocated : .zero
    var map: [Extent] = []
    var bytes = [UInt8](repeating: 0, count: Int(virtualSize))
    for sector in 0..<Int(virtualSize / 512) {
      let offset = Int64(sector) * 512
      let blockIndex = Int(offset / Int64(builder.blockSize))
      let inBlock = Int(offset % Int64(builder.blockSize))
      var kind = absent
      if let block = builder.blocks.first(where: { $0.index == blockIndex }) {
        let bit = inBlock / 512
        if (block.bitmap.map { $0[bit / 8] & (0x80 >> UInt8(bit % 8)) != 0 }) ?? true {
          kind = .data
          for i in 0..<512 where inBlock + i < block.data.count { bytes[Int(offset) + i] = block.data[inBlock + i] }
        }
      }
      map.appendMerging(Extent(offset..<offset + 512, kind))
    }
    return LayerTruth(map: map, bytes: bytes)
  }

  private func partialBitmapImage(_ type: VHDBuilder.DiskType) -> VHDBuilder {
    var builder = VHDBuilder()
    builder.diskType = type
    builder.size = 5 << 20
    builder.blockSize = 1 << 20
    var bitmap = [UInt8](repeating: 0, count: builder.bitmapSize)
    bitmap[0] = 0b1010_0000  // sectors 0 and 2
    bitmap[3] = 0xff  // sectors 24-31
    bitmap[255] = 0x01  // sector 2047, the block's last
    builder.blocks = [
      (index: 1, bitmap: bitmap, data: (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 512 + 1) }),
      (index: 4, bitmap: nil, data: [UInt8](repeating: 0x44, count: 3000)),
    ]
    if type == .differencing { builder.locators = [("W2ru", ".\\parent.vhd")] }
    return builder
  }

  func testDynamicWithPartialBitmapsConforms() throws {
    let builder = partialBitmapImage(.dynamic)
    let reader = try open(builder.build())
    XCTAssertEqual(reader.virtualSize, 5 << 20)
    XCTAssertEqual(reader.clusterSize, 1 << 20)
    XCTAssertNil(reader.backing)
    try assertReaderConforms(reader, truth: truth(of: builder, virtualSize: 5 << 20))
    let extents = try reader.allExtents(in: 0..<reader.virtualSize)
    // The bitmap sets host offsets: sector 2 of block 1 sits 1024 bytes after sector 0.
    let dataStart = Int64(VHDBuilder.tableOffset + builder.tableBytes + builder.bitmapSize)
    XCTAssertEqual(extents[1], Extent((1 << 20)..<(1 << 20) + 512, .data, hostOffset: dataStart))
    XCTAssertEqual(extents[3], Extent((1 << 20) + 1024..<(1 << 20) + 1536, .data, hostOffset: dataStart + 1024))
  }

  func testDifferencingLeavesAbsentSectorsToTheParent() throws {
    let builder = partialBitmapImage(.differencing)
    let reader = try open(builder.build())
    XCTAssertEqual(reader.backing, BackingReference(name: "parent.vhd", format: "vpc"))
    try assertReaderConforms(reader, truth: truth(of: builder, virtualSize: 5 << 20))
    XCTAssertEqual(try reader.extents(in: 0..<4096), [Extent(0..<(1 << 20), .unallocated)].map {
      Extent($0.range.clamped(to: 0..<4096), $0.kind)
    })
  }

  func testParentLocatorPreference() throws {
    var builder = VHDBuilder()
    builder.diskType = .differencing
    builder.parentName = "header-name.vhd"
    builder.locators = [("W2ku", "C:\\disks\\abs.vhd"), ("W2ru", ".\\sub\\rel.vhd")]
    XCTAssertEqual(try open(builder.build()).backing?.name, "sub/rel.vhd")
    builder.locators = [("W2ku", "C:\\disks\\abs.vhd"), ("MacX", "file://./mac.vhd")]
    XCTAssertEqual(try open(builder.build()).backing?.name, "mac.vhd")
    builder.locators = [("W2ku", "C:\\disks\\abs.vhd")]
    XCTAssertEqual(try open(builder.build()).backing?.name, "C:/disks/abs.vhd")
    builder.locators = []
    XCTAssertEqual(try open(builder.build()).backing?.name, "header-name.vhd")
    builder.parentName = ""
    assertVHDError("names no parent") { _ = try open(builder.build()) }
  }

  /// Virtual PC, Virtual Server, qemu and unknown creators: CHS; Hyper-V and friends, or
  /// the maximum geometry: current size.
  func testSizeRule() throws {
    var builder = VHDBuilder()
    builder.size = 4 << 20
    builder.cylinders = 120
    builder.heads = 4
    builder.sectorsPerTrack = 17
    for creator in ["win ", "qem2", "d2v ", "CTXS", "tap\0"] {
      builder.creator = creator
      XCTAssertEqual(try open(builder.build()).virtualSize, 4 << 20, creator)
    }
    for creator in ["vpc ", "vs  ", "qemu", "vbox", "abcd"] {
      builder.creator = creator
      XCTAssertEqual(try open(builder.build()).virtualSize, 120 * 4 * 17 * 512, creator)
    }
    builder.creator = "qemu"
    builder.cylinders = 65535
    builder.heads = 16
    builder.sectorsPerTrack = 255
    XCTAssertEqual(try open(builder.build()).virtualSize, 4 << 20)
    builder.creator = "win "
    builder.size = (0xFF00_0000 + 1) * 512
    builder.blockSize = 256 << 20
    assertVHDError("larger than 2040 GiB") { _ = try open(builder.build()) }
  }

  func testFixed() throws {
    var builder = VHDBuilder()
    builder.diskType = .fixed
    builder.size = 64 << 10
    let bytes = builder.build()
    let reader = try open(bytes)
    XCTAssertEqual(reader.virtualSize, 64 << 10)
    XCTAssertNil(reader.clusterSize)
    try assertReaderConforms(
      reader, truth: LayerTruth(map: [Extent(0..<(64 << 10), .data)], bytes: Array(bytes.prefix(64 << 10))))
    XCTAssertTrue(VHD.format.probeTrailer!(Array(bytes.suffix(512))))
    XCTAssertFalse(VHD.format.probe(Array(bytes.prefix(8))))
    assertVHDError("needs 66048 bytes of file") { _ = try open(Array(bytes.dropFirst(512))) }
  }

  // MARK: - Damage: each case changes one field of a valid image

  private func damaged(_ change: (inout [UInt8], VHDBuilder) -> Void) -> [UInt8] {
    let builder = partialBitmapImage(.dynamic)
    var bytes = builder.build()
    change(&bytes, builder)
    return bytes
  }

  /// Both footers, checksums fixed up.
  private func setFooter(_ bytes: inout [UInt8], _ body: (inout [UInt8]) -> Void) {
    for start in [0, bytes.count - 512] {
      var footer = Array(bytes[start..<start + 512])
      body(&footer)
      VHDBuilder.fillChecksum(&footer, at: 64)
      bytes.replaceSubrange(start..<start + 512, with: footer)
    }
  }

  private func setHeader(_ bytes: inout [UInt8], _ body: (inout [UInt8]) -> Void) {
    var header = Array(bytes[512..<1536])
    body(&header)
    VHDBuilder.fillChecksum(&header, at: 36)
    bytes.replaceSubrange(512..<1536, with: header)
  }

  func testDamageIsAnErrorNamingTheFile() {
    let cases: [(String, [UInt8])] = [
      ("checksum is", damaged { bytes, _ in bytes[100] ^= 1 }),
      ("shorter than a VHD footer", [UInt8](repeating: 0, count: 100)),
      ("no 'conectix' cookie", [UInt8](repeating: 0, count: 4096)),
      ("disk type 5", damaged { bytes, _ in setFooter(&bytes) { BigEndianWriter.store(UInt32(5), at: 60, in: &$0) } }),
      ("dynamic header at 0xffffffffffffff00", damaged { bytes, _ in
        setFooter(&bytes) { BigEndianWriter.store(UInt64.max - 255, at: 16, in: &$0) }
      }),
      ("dynamic header at 0x0", damaged { bytes, _ in setFooter(&bytes) { BigEndianWriter.store(UInt64(0), at: 16, in: &$0) } }),
      ("no 'cxsparse' cookie", damaged { bytes, _ in bytes[512] = 0 }),
      ("block size 1000 is not a power of two", damaged { bytes, _ in
        setHeader(&bytes) { BigEndianWriter.store(UInt32(1000), at: 32, in: &$0) }
      }),
      ("block size 1073741824", damaged { bytes, _ in
        setHeader(&bytes) { BigEndianWriter.store(UInt32(1 << 30), at: 32, in: &$0) }
      }),
      ("has 2 entries, the virtual size 5242880 needs 5", damaged { bytes, _ in
        setHeader(&bytes) { BigEndianWriter.store(UInt32(2), at: 28, in: &$0) }
      }),
      ("(4294967295 entries) is past the end of the file", damaged { bytes, _ in
        setHeader(&bytes) { BigEndianWriter.store(UInt32.max, at: 28, in: &$0) }
      }),
      ("table at 0xfffffffffffffe00", damaged { bytes, _ in
        setHeader(&bytes) { BigEndianWriter.store(UInt64.max - 511, at: 16, in: &$0) }
      }),
      ("past the end of the file", damaged { bytes, _ in BigEndianWriter.store(UInt32(0x7fff_0000), at: 1536 + 4, in: &bytes) }),
      ("overlaps the dynamic header", damaged { bytes, _ in BigEndianWriter.store(UInt32(2), at: 1536, in: &bytes) }),
      ("overlaps the block allocation table", damaged { bytes, _ in BigEndianWriter.store(UInt32(3), at: 1536, in: &bytes) }),
      ("overlaps the footer copy", damaged { bytes, _ in BigEndianWriter.store(UInt32(0), at: 1536, in: &bytes) }),
      // Every allocated entry made to point at the first allocated block's storage.
      ("overlap at", damaged { bytes, _ in
        let entries = (0..<5).map { 1536 + 4 * $0 }.filter { bytes[$0..<$0 + 4] != [0xff, 0xff, 0xff, 0xff] }
        for entry in entries.dropFirst() { bytes.replaceSubrange(entry..<entry + 4, with: bytes[entries[0]..<entries[0] + 4]) }
      }),
      ("past the end of the file", damaged { bytes, _ in bytes.removeLast(600_000) }),
    ]
    for (expected, bytes) in cases {
      assertVHDError(expected) { _ = try open(bytes, name: "bad.vhd") }
    }
  }

  func testHostileLocator() {
    var builder = partialBitmapImage(.differencing)
    var bytes = builder.build()
    // Locator 0's data length: absurd, then merely past the end of the file.
    BigEndianWriter.store(UInt32.max, at: 512 + 576 + 8, in: &bytes)
    var header = Array(bytes[512..<1536])
    VHDBuilder.fillChecksum(&header, at: 36)
    bytes.replaceSubrange(512..<1536, with: header)
    assertVHDError("more than 65536") { _ = try open(bytes, name: "bad.vhd") }
    builder.locators = [("W2ru", "x.vhd")]
    bytes = builder.build()
    BigEndianWriter.store(UInt64(bytes.count - 4), at: 512 + 576 + 16, in: &bytes)
    header = Array(bytes[512..<1536])
    VHDBuilder.fillChecksum(&header, at: 36)
    bytes.replaceSubrange(512..<1536, with: header)
    assertVHDError("parent locator W2ru at") { _ = try open(bytes, name: "bad.vhd") }
  }

  /// The dynamic header's checksum is only a warning: qemu never checks it.
  func testBadHeaderChecksumWarns() throws {
    let bytes = damaged { bytes, _ in bytes[512 + 900] ^= 1 }
    XCTAssertEqual(try open(bytes).warnings.count, 1)
  }

  /// One answer visits a bounded number of allocated blocks; a run of unallocated BAT
  /// entries is one extent however long.
  func testBoundedAnswers() throws {
    var builder = VHDBuilder()
    builder.blockSize = 512
    builder.size = 1 << 20
    builder.blocks = (0..<200).map { (index: $0 * 2, bitmap: nil, data: [UInt8](repeating: UInt8($0 % 255 + 1), count: 512)) }
    let reader = try open(builder.build())
    let first = try reader.extents(in: 0..<reader.virtualSize)
    XCTAssertEqual(first.filter { $0.kind == .data }.count, 64)
    XCTAssertLessThan(first.last!.range.upperBound, reader.virtualSize)
    let all = try reader.allExtents(in: 0..<reader.virtualSize)
    XCTAssertEqual(all.filter { $0.kind == .data }.count, 200)
    XCTAssertEqual(all.last, Extent(399 * 512..<(1 << 20), .zero))
  }
}

/// Asserts `body` throws a one-line ImageError naming bad.vhd or test.vhd and containing
/// `expected`.
func assertVHDError(_ expected: String, file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) {
  if let text = assertImageError(expected, file: file, line: line, body) {
    XCTAssertTrue(text.hasPrefix("bad.vhd: ") || text.hasPrefix("test.vhd: "), text, file: file, line: line)
  }
}

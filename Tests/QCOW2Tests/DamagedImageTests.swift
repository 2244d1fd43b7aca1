import Compression
import DiskImage
import Foundation
import QCOW2
import TestSupport
import XCTest

/// A small valid qcow2 v3 image written out byte by byte, with 512-byte clusters:
///
///     0x000  header (104 bytes), then header extensions
///     0x200  refcount table: one entry, the block at 0x400
///     0x400  refcount block: 16-bit counts, clusters 0-5 used once
///     0x600  L1 table: one entry, the L2 table at 0x800
///     0x800  L2 table: entry 0 is the data cluster at 0xa00, the rest unallocated
///     0xa00  data: 512 bytes of 0x5a
///
/// The virtual disk is 32 KiB, exactly the span of one L2 table (64 entries of 512 bytes).
/// Each negative test changes one thing and expects a one-line ImageError naming it.
struct HandMadeImage {
  static let cluster = 512
  var bytes = [UInt8](repeating: 0, count: 6 * cluster)
  private var extensionEnd = 104

  init() {
    set(UInt32(0x5146_49fb), at: 0)  // magic "QFI\xfb"
    set(UInt32(3), at: 4)  // version
    set(UInt64(0), at: 8)  // backing_file_offset: none
    set(UInt32(0), at: 16)  // backing_file_size
    set(UInt32(9), at: 20)  // cluster_bits: 512-byte clusters
    set(UInt64(32768), at: 24)  // size: 32 KiB
    set(UInt32(0), at: 32)  // crypt_method: none
    set(UInt32(1), at: 36)  // l1_size: one entry
    set(UInt64(0x600), at: 40)  // l1_table_offset
    set(UInt64(0x200), at: 48)  // refcount_table_offset
    set(UInt32(1), at: 56)  // refcount_table_clusters
    set(UInt32(0), at: 60)  // nb_snapshots
    set(UInt64(0), at: 64)  // snapshots_offset
    set(UInt64(0), at: 72)  // incompatible_features
    set(UInt64(0), at: 80)  // compatible_features
    set(UInt64(0), at: 88)  // autoclear_features
    set(UInt32(4), at: 96)  // refcount_order: 16-bit refcounts
    set(UInt32(104), at: 100)  // header_length
    // Bytes 104-111 stay zero: the end-of-extensions marker.

    set(UInt64(0x400), at: 0x200)  // refcount table entry 0 -> refcount block
    for cluster in 0..<6 { set(UInt16(1), at: 0x400 + cluster * 2) }
    set(UInt64(0x800) | (1 << 63), at: 0x600)  // L1 entry 0 -> L2 table, copied
    set(UInt64(0xa00) | (1 << 63), at: 0x800)  // L2 entry 0 -> data cluster, copied
    for index in 0xa00..<0xc00 { bytes[index] = 0x5a }
  }

  mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    BigEndianWriter.store(value, at: offset, in: &bytes)
  }

  /// Moves the extension area to after a longer header (header_length `length`).
  mutating func setHeaderLength(_ length: Int) {
    set(UInt32(length), at: 100)
    extensionEnd = length
  }

  /// Appends a header extension (padded to 8 bytes) and a fresh end marker after it.
  mutating func addExtension(_ type: UInt32, _ data: [UInt8]) {
    set(type, at: extensionEnd)
    set(UInt32(data.count), at: extensionEnd + 4)
    bytes.replaceSubrange(extensionEnd + 8..<extensionEnd + 8 + data.count, with: data)
    extensionEnd += 8 + (data.count + 7) / 8 * 8
    set(UInt64(0), at: extensionEnd)
  }

  /// Sets the L2 entry for virtual cluster `index`.
  mutating func setL2Entry(_ index: Int, _ value: UInt64) { set(value, at: 0x800 + index * 8) }

  func write(in directory: URL, name: String = UUID().uuidString + ".qcow2") throws -> String {
    let path = directory.appendingPathComponent(name).path
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    return path
  }
}

final class DamagedImageTests: XCTestCase {
  private var directory: URL!

  override func setUpWithError() throws { directory = try temporaryDirectory(self) }

  private func open(_ image: HandMadeImage) throws -> ImageReader {
    try openQCOW2(image.write(in: directory))
  }

  /// Opens the image and reads and maps all of it, where damage past the header shows up.
  private func openAndReadAll(_ image: HandMadeImage) throws {
    let reader = try open(image)
    _ = try reader.allExtents(in: 0..<reader.virtualSize)
    _ = try readAll(reader)
  }

  private func expectFailure(_ expected: String, line: UInt = #line, _ change: (inout HandMadeImage) -> Void) {
    var image = HandMadeImage()
    change(&image)
    assertImageError(expected, line: line) { try openAndReadAll(image) }
  }

  func testTheHandMadeImageIsValid() throws {
    let image = HandMadeImage()
    let reader = try open(image)
    XCTAssertEqual(reader.virtualSize, 32768)
    XCTAssertEqual(reader.clusterSize, 512)
    XCTAssertEqual(
      try reader.allExtents(in: 0..<32768),
      [Extent(0..<512, .data, hostOffset: 0xa00), Extent(512..<32768, .unallocated)])
    let content = try readAll(reader)
    XCTAssertEqual(content, [UInt8](repeating: 0x5a, count: 512) + [UInt8](repeating: 0, count: 32768 - 512))
    if which("qemu-img") != nil {
      let path = try image.write(in: directory)
      try Qemu.run("qemu-img", ["check", path])
      XCTAssertEqual(try Qemu.rawContent(of: path, in: directory), content)
    }
  }

  // MARK: Header fields

  func testMagic() {
    expectFailure("not a qcow2 image") { $0.set(UInt32(0x5146_49fa), at: 0) }
  }

  func testVersion() {
    expectFailure("version 0 is not supported (expected 2 or 3)") { $0.set(UInt32(0), at: 4) }
    expectFailure("qcow version 1 is not supported") { $0.set(UInt32(1), at: 4) }
    expectFailure("version 4 is not supported") { $0.set(UInt32(4), at: 4) }
  }

  func testClusterBits() {
    expectFailure("cluster_bits is 8, expected 9 to 21") { $0.set(UInt32(8), at: 20) }
    expectFailure("clusters larger than 2 MiB") { $0.set(UInt32(22), at: 20) }
    expectFailure("cluster_bits is 63") { $0.set(UInt32(63), at: 20) }
    expectFailure("cluster_bits is 4294967295") { $0.set(UInt32.max, at: 20) }
  }

  func testHeaderLength() {
    expectFailure("header_length is 100") { $0.set(UInt32(100), at: 100) }
    expectFailure("header_length is 108") { $0.set(UInt32(108), at: 100) }
    expectFailure("header_length is 1024") { $0.set(UInt32(1024), at: 100) }
  }

  func testVirtualSize() {
    expectFailure("is 2^63 or more") { $0.set(UInt64(1) << 63, at: 24) }
    expectFailure("L1 table has 1 entries, the virtual size 32769 needs 2") { $0.set(UInt64(32769), at: 24) }
  }

  func testL1Table() {
    expectFailure("L1 table has 0 entries") { $0.set(UInt32(0), at: 36) }
    expectFailure("larger than the 32 MiB limit") { $0.set(UInt32(0x1000_0000), at: 36) }
    expectFailure("L1 table offset 0x601 is not aligned") { $0.set(UInt64(0x601), at: 40) }
    expectFailure("L1 table offset is 0") { $0.set(UInt64(0), at: 40) }
    expectFailure("L1 table at 0x100000 (1 entries) runs past the end of the file") { $0.set(UInt64(0x10_0000), at: 40) }
    expectFailure("runs past the end of the file") {
      $0.set(UInt32(4096), at: 36)  // 32 KiB of entries from 0x600, in a 3 KiB file
    }
  }

  func testOtherTables() {
    expectFailure("refcount table offset 0x210 is not aligned") { $0.set(UInt64(0x210), at: 48) }
    expectFailure("refcount_order is 7") { $0.set(UInt32(7), at: 96) }
    expectFailure("snapshot table offset 0x208 is not aligned") {
      $0.set(UInt32(1), at: 60)
      $0.set(UInt64(0x208), at: 64)
    }
  }

  func testEncryption() {
    expectFailure("encrypted images are not supported") { $0.set(UInt32(1), at: 32) }
    expectFailure("encrypted images are not supported") { $0.set(UInt32(2), at: 32) }
    expectFailure("encrypted images are not supported") {
      $0.addExtension(0x0537_be77, [UInt8](repeating: 0, count: 16))
    }
  }

  func testBackingName() throws {
    var image = HandMadeImage()
    let name = Array("base image.qcow2".utf8)
    image.bytes.replaceSubrange(0x180..<0x180 + name.count, with: name)
    image.set(UInt64(0x180), at: 8)
    image.set(UInt32(name.count), at: 16)
    image.addExtension(0xe279_2aca, Array("qcow2".utf8))
    XCTAssertEqual(try open(image).backing, BackingReference(name: "base image.qcow2", format: "qcow2"))

    image.set(UInt32(1024), at: 16)
    assertImageError("backing file name is 1024 bytes long, at most 1023") { try openAndReadAll(image) }
    image.set(UInt32(0x81), at: 16)
    assertImageError("is outside the header cluster") { try openAndReadAll(image) }
    image.set(UInt64(0x20), at: 8)
    image.set(UInt32(4), at: 16)
    assertImageError("is outside the header cluster") { try openAndReadAll(image) }
  }

  func testIncompatibleFeatures() {
    expectFailure("unknown incompatible feature bit 5 set") { $0.set(UInt64(1 << 5), at: 72) }
    expectFailure("unknown incompatible feature bits 5, 63") { $0.set(UInt64(1) << 5 | UInt64(1) << 63, at: 72) }
    expectFailure("unknown incompatible feature bit 7 (time travel)") {
      var table = [UInt8](repeating: 0, count: 96)
      table[0] = 0  // incompatible
      table[1] = 0  // bit 0
      table.replaceSubrange(2..<7, with: Array("dirty".utf8))
      table[48] = 0  // incompatible
      table[49] = 7  // bit 7
      table.replaceSubrange(50..<61, with: Array("time travel".utf8))
      $0.addExtension(0x6803_f857, table)
      $0.set(UInt64(1 << 7), at: 72)
    }
    expectFailure("external data file are not supported") { $0.set(UInt64(1 << 2), at: 72) }
    expectFailure("external data file are not supported") { $0.addExtension(0x4441_5441, Array("data.raw".utf8)) }
  }

  func testKnownAndUnknownHarmlessBits() throws {
    var image = HandMadeImage()
    image.set(UInt64(1 << 0 | 1 << 1), at: 72)  // dirty and corrupt
    image.set(UInt64(0xffff), at: 80)  // compatible: all accepted
    image.set(UInt64(1 << 40), at: 88)  // autoclear: unknown, accepted
    image.addExtension(0x1234_5678, [1, 2, 3])  // an unknown extension is skipped
    let reader = try open(image)
    XCTAssertTrue(reader.isDirty)
    XCTAssertEqual(reader.warnings.count, 1)
    XCTAssertTrue(reader.warnings[0].contains("corrupt"))
    XCTAssertTrue(reader.formatSpecific.contains { $0.0 == "corrupt" && $0.1 == .bool(true) })
    XCTAssertTrue(reader.formatSpecific.contains { $0.0 == "lazy-refcounts" && $0.1 == .bool(true) })
    XCTAssertEqual(try readAll(reader).prefix(512), [UInt8](repeating: 0x5a, count: 512)[...])
  }

  func testHeaderExtensionLengths() {
    expectFailure("runs past the header cluster") {
      $0.set(UInt32(0x1234_5678), at: 104)
      $0.set(UInt32(500), at: 108)
    }
  }

  func testCompressionTypeField() {
    expectFailure("compression type bit is set but header_length 104 leaves out compression_type") {
      $0.set(UInt64(1 << 3), at: 72)
    }
    expectFailure("compression type bit is set but compression_type is 0") {
      $0.setHeaderLength(112)
      $0.set(UInt64(1 << 3), at: 72)
    }
    expectFailure("compression_type is 1 but the compression type bit") {
      $0.setHeaderLength(112)
      $0.bytes[104] = 1
    }
    expectFailure("compression_type 2 is not supported") {
      $0.setHeaderLength(112)
      $0.set(UInt64(1 << 3), at: 72)
      $0.bytes[104] = 2
    }
  }

  func testExtendedL2NeedsLargerClusters() {
    expectFailure("extended L2 entries need clusters of at least 16 KiB") { $0.set(UInt64(1 << 4), at: 72) }
  }

  // MARK: L1 and L2 entries

  func testL1Entries() {
    expectFailure("L1 entry 0 has reserved bits set: 0x1") { $0.set(UInt64(0x801), at: 0x600) }
    expectFailure("L2 table at 0x10000 (L1 index 0) is past the end of the file (size 0xc00)") { $0.set(UInt64(0x10000), at: 0x600) }
    expectFailure("L2 table at 0x600 (L1 index 0) overlaps the L1 table") { $0.set(UInt64(0x600), at: 0x600) }
    expectFailure("overlaps the refcount table") { $0.set(UInt64(0x200), at: 0x600) }
  }

  func testL2Entries() {
    expectFailure("has reserved bits set: 0x2") { $0.setL2Entry(0, 0xa02 | 1 << 63) }
    expectFailure("has reserved bits set: 0x100000000000000") { $0.setL2Entry(0, 0xa00 | 1 << 56) }
    // Bit 0 (reads as zero) only exists in version 3.
    expectFailure("has reserved bits set: 0x1") {
      $0.set(UInt32(2), at: 4)
      $0.setL2Entry(0, 0xa01)
    }
    expectFailure("at host 0x10000 (512 bytes) is past the end of the file (size 0xc00)") { $0.setL2Entry(0, 0x10000) }
    // Offset 0 means unallocated, so a data cluster cannot point at the header; with the
    // copied bit it would mean an external data file's cluster 0.
    expectFailure("points at host offset 0 with the copied bit set") { $0.setL2Entry(3, 1 << 63) }
    expectFailure("overlaps the L1 table") { $0.setL2Entry(3, 0x600) }
    expectFailure("overlaps the refcount table") { $0.setL2Entry(3, 0x200) }
    expectFailure("has compressed data at 0x10, inside the header cluster") { $0.setL2Entry(0, 1 << 62 | 0x10) }
    expectFailure("has compressed data at 0x5000, past the end of the file") { $0.setL2Entry(0, 1 << 62 | 0x5000) }
    expectFailure("is compressed but has the copied bit") { $0.setL2Entry(0, 1 << 63 | 1 << 62 | 0xa00) }
  }

  func testV3ZeroClustersWithAndWithoutHost() throws {
    var image = HandMadeImage()
    image.setL2Entry(0, 0xa00 | 1 | 1 << 63)
    image.setL2Entry(1, 1)
    let reader = try open(image)
    XCTAssertEqual(
      try reader.allExtents(in: 0..<32768),
      [Extent(0..<512, .zero, hostOffset: 0xa00), Extent(512..<1024, .zero), Extent(1024..<32768, .unallocated)])
    XCTAssertEqual(try readAll(reader), [UInt8](repeating: 0, count: 32768))
  }

  func testTruncatedFile() {
    expectFailure("too short for a qcow2 header") { $0.bytes.removeLast($0.bytes.count - 50) }
    expectFailure("L1 table at 0x600 (1 entries) runs past the end of the file") { $0.bytes.removeLast($0.bytes.count - 0x600) }
    expectFailure("L2 table at 0x800 (L1 index 0) is past the end of the file (size 0x900)") { $0.bytes.removeLast($0.bytes.count - 0x900) }
    expectFailure("at host 0xa00 (512 bytes) is past the end of the file (size 0xa80)") { $0.bytes.removeLast($0.bytes.count - 0xa80) }
  }

  // MARK: Compressed clusters

  /// The hand-made image with cluster 0 compressed by `type` at an unaligned host offset.
  private func compressedImage(_ type: CompressionType, payload: [UInt8]) -> HandMadeImage {
    var image = HandMadeImage()
    if type == .zstd {
      image.setHeaderLength(112)
      image.set(UInt64(1 << 3), at: 72)
      image.bytes[104] = 1
    }
    let host = 0xa00 + 7
    image.bytes.replaceSubrange(0xa00..<0xc00, with: [UInt8](repeating: 0xcc, count: 512))
    image.bytes.replaceSubrange(host..<host + min(payload.count, 0xc00 - host), with: payload.prefix(0xc00 - host))
    // cluster_bits 9: host offset in bits 0-60, one extra-sector bit (61), unused here.
    image.setL2Entry(0, 1 << 62 | UInt64(host))
    return image
  }

  private func pattern() -> [UInt8] { (0..<512).map { UInt8(truncatingIfNeeded: $0 / 32) } }

  func testCompressedClustersReadLikeQemu() throws {
    for type in CompressionType.allCases {
      let compressed = try XCTUnwrap(try makeCodec(type).compress(pattern()))
      let image = compressedImage(type, payload: compressed)
      let reader = try open(image)
      XCTAssertEqual(try reader.allExtents(in: 0..<32768), [Extent(0..<512, .data), Extent(512..<32768, .unallocated)])
      XCTAssertEqual(Array(try readAll(reader).prefix(512)), pattern(), "\(type)")
      XCTAssertEqual(Array(try readAll(reader, chunk: 100).prefix(512)), pattern(), "\(type)")
      if which("qemu-img") != nil {
        // qemu reads what our codec wrote: the writer can rely on it.
        let path = try image.write(in: directory)
        XCTAssertEqual(Array(try Qemu.rawContent(of: path, in: directory).prefix(512)), pattern(), "\(type)")
      }
    }
  }

  func testGarbledCompressedClusters() throws {
    for type in CompressionType.allCases {
      let garbage = (0..<505).map { UInt8(truncatingIfNeeded: $0 &* 97 &+ 13) }
      assertImageError("compressed cluster for virtual offset 0x0 at host 0xa07 (505 bytes) does not decompress: \(type)") {
        try openAndReadAll(compressedImage(type, payload: garbage))
      }
      // A bomb: two clusters' worth of zeros in a 512-byte cluster.
      let bomb = try XCTUnwrap(try makeCodec(type).compress([UInt8](repeating: 0, count: 1024)))
      assertImageError("expands past the expected 512 bytes") { try openAndReadAll(compressedImage(type, payload: bomb)) }
      // Too little: a quarter cluster.
      let short = try XCTUnwrap(try makeCodec(type).compress([UInt8](repeating: 1, count: 128)))
      assertImageError("does not decompress") { try openAndReadAll(compressedImage(type, payload: short)) }
    }
  }

  /// Alignment below 512 bytes is caught as reserved bits; above it needs larger clusters,
  /// so these start from a 64 KiB-cluster fixture.
  func testUnalignedTablesAndClusters() throws {
    let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fixturePath("v3-64k.qcow2"))))
    let l1Offset = Int(BigEndianReader(original).uint64(at: 40)!)
    let l1Entry = BigEndianReader(original).uint64(at: l1Offset)!
    let l2Offset = Int(l1Entry & 0x00ff_ffff_ffff_fe00)
    let path = directory.appendingPathComponent("unaligned.qcow2").path

    var bytes = original
    BigEndianWriter.store(l1Entry + 0x200, at: l1Offset, in: &bytes)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    assertImageError("L2 table at \(hex(Int64(l2Offset + 0x200))) (L1 index 0) is not aligned to the cluster size 0x10000") {
      _ = try readAll(try openQCOW2(path))
    }

    bytes = original
    let l2Entry = BigEndianReader(original).uint64(at: l2Offset)!
    BigEndianWriter.store(l2Entry + 0x400, at: l2Offset, in: &bytes)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    assertImageError("(L1 index 0, L2 index 0) points at \(hex(Int64(l2Entry & 0x00ff_ffff_ffff_fe00) + 0x400)), not aligned") {
      _ = try readAll(try openQCOW2(path))
    }
  }

  func testDamagedFixtureCopies() throws {
    // Flip the L1 entry of a real image to point past its end.
    let original = try Data(contentsOf: URL(fileURLWithPath: fixturePath("v3-64k.qcow2")))
    var bytes = [UInt8](original)
    let l1Offset = Int(BigEndianReader(bytes).uint64(at: 40)!)
    BigEndianWriter.store(UInt64(0x7000_0000), at: l1Offset, in: &bytes)
    let path = directory.appendingPathComponent("damaged.qcow2").path
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    assertImageError("L2 table at 0x70000000 (L1 index 0) is past the end of the file (size 0x80000)") {
      let reader = try openQCOW2(path)
      _ = try reader.extents(in: 0..<reader.virtualSize)
    }
    // Cut the image in the middle of its data.
    try Data(original.prefix(original.count - 4096)).write(to: URL(fileURLWithPath: path))
    assertImageError("past the end of the file") { _ = try readAll(try openQCOW2(path)) }
  }
}

import DiskImage
import TestSupport
import XCTest

@testable import VMDK

/// The probe, the descriptor parser and the table cache, without qemu.
final class VMDKFormatTests: XCTestCase {
  func testProbeTakesTheSparseMagicAndDescriptorFiles() {
    XCTAssertEqual(VMDK.format.name, "vmdk")
    XCTAssertTrue(VMDK.format.probe(Array("KDMV".utf8) + [1, 0, 0, 0]))
    XCTAssertTrue(VMDK.format.probe(Array("# Disk DescriptorFile".utf8)))
    XCTAssertTrue(VMDK.format.probe(Array("\r\n\n  # Disk DescriptorFile\nversion=1\n".utf8)))
    XCTAssertFalse(VMDK.format.probe(Array("version=1\n# Disk DescriptorFile".utf8)))
    XCTAssertFalse(VMDK.format.probe(Array("# Disk Descriptor".utf8)))
    XCTAssertFalse(VMDK.format.probe(Array("COWD".utf8)))
    XCTAssertFalse(VMDK.format.probe(Array("KDM".utf8)))
  }

  func testDescriptorParsing() throws {
    let text = """
      # Disk DescriptorFile\r
      version=1\r
      CID=fffffffe\r
      parentCID=ffffffff\r
      createType = "streamOptimized"\r
      \r
      # Extent description\r
      RW 20480 SPARSE "my disk.vmdk"\r
      # The Disk Data Base\r
      #DDB\r
      ddb.adapterType = "ide"\r
      """
    let descriptor = try VMDKDescriptor.parse(Array(text.utf8) + [0, 0, 0, 0x41], path: "d.vmdk")
    XCTAssertEqual(descriptor.createType, "streamOptimized")
    XCTAssertEqual(descriptor.contentID, 0xffff_fffe)
    XCTAssertEqual(descriptor.parentContentID, 0xffff_ffff)
    XCTAssertNil(descriptor.parentFileNameHint)
    XCTAssertEqual(
      descriptor.extents, [.init(access: "RW", sectors: 20480, type: "SPARSE", fileName: "my disk.vmdk")])
    let flat = try VMDKDescriptor.parse(Array("RW 8 FLAT \"a b-flat.vmdk\" 16\nRDONLY 4 ZERO\n".utf8), path: "d.vmdk")
    XCTAssertEqual(
      flat.extents,
      [
        .init(access: "RW", sectors: 8, type: "FLAT", fileName: "a b-flat.vmdk", offset: 16),
        .init(access: "RDONLY", sectors: 4, type: "ZERO", fileName: nil),
      ])
  }

  func testDescriptorDamageIsNamed() {
    assertImageError("not a content ID") {
      _ = try VMDKDescriptor.parse(Array("CID=xyz\n".utf8), path: "d.vmdk")
    }
    assertImageError("not a number of sectors") {
      _ = try VMDKDescriptor.parse(Array("RW 12x SPARSE \"a\"\n".utf8), path: "d.vmdk")
    }
    assertImageError("no closing quote") {
      _ = try VMDKDescriptor.parse(Array("RW 12 SPARSE \"a\n".utf8), path: "d.vmdk")
    }
    assertImageError("offset 'x' is not a number") {
      _ = try VMDKDescriptor.parse(Array("RW 12 FLAT \"a\" x\n".utf8), path: "d.vmdk")
    }
    assertImageError("more than 1024 extents") {
      _ = try VMDKDescriptor.parse(Array(String(repeating: "RW 1 ZERO\n", count: 1025).utf8), path: "d.vmdk")
    }
    assertImageError("more than 10000") {
      _ = try VMDKDescriptor.parse(Array(String(repeating: "#\n", count: 10_001).utf8), path: "d.vmdk")
    }
  }

  func testGrainTableCacheIsBounded() throws {
    let cache = GrainTableCache(capacity: 8)
    for offset in 0..<100 { _ = cache.table(at: Int64(offset) * 512) { [UInt32(offset)] } }
    XCTAssertEqual(cache.count, 8)
    XCTAssertEqual(cache.table(at: 99 * 512) { [0] }, [99])
  }

  func testTooShortForAHeader() {
    let source = MemorySource(name: "tiny.vmdk", bytes: Array("KDMV".utf8))
    assertImageError("tiny.vmdk: the file (4 bytes) is too short") { _ = try VMDK.format.open(source) }
  }
}

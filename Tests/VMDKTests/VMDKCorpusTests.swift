import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// Real VMDKs made by VMware and other tools (../shared/corpus, stored .xz): each is
/// unpacked into a temporary folder and judged by qemu-img. Skips where the corpus is absent.
final class VMDKCorpusTests: XCTestCase {
  static let corpus: URL = corpusRoot() ?? URL(fileURLWithPath: "/work/shared/corpus")

  /// Single-file sparse and streamOptimized disks qemu-img reads.
  static let readable = [
    "dfvfs/ext2.vmdk", "dfvfs/image.vmdk", "bwlehrpool/image-default.vmdk", "bwlehrpool/image_t0.vmdk",
    "bwlehrpool/image_t5.vmdk", "go-vmdk-parser/vmdk-monolith.img", "go-vmdk-parser/vmdk-streamoptimized.img",
  ]

  private var directory: URL!

  override func setUpWithError() throws {
    guard FileManager.default.fileExists(atPath: Self.corpus.path) else {
      throw XCTSkip("the corpus is not at \(Self.corpus.path); skipping the real-image tests")
    }
    _ = try requireQemuImg()
    _ = try requireProgram("xz")
    directory = try temporaryDirectory(self)
  }

  /// Unpacks `name` (a path in the corpus without .xz) into the test's folder.
  private func unpack(_ name: String) throws -> String {
    let packed = Self.corpus.appendingPathComponent(name + ".xz").path
    guard FileManager.default.fileExists(atPath: packed) else { throw XCTSkip("\(packed) is missing") }
    let output = directory.appendingPathComponent(URL(fileURLWithPath: name).lastPathComponent).path
    let outcome = try runProgram(try requireProgram("sh"), ["-c", "xz -dc \"$0\" > \"$1\"", packed, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    return output
  }

  func testReadableImagesAgreeWithQemu() throws {
    for name in Self.readable {
      let image = try unpack(name)
      let reader = try openVMDK(image)
      XCTAssertEqual(try VMDK.format.probe(Array(Data(contentsOf: URL(fileURLWithPath: image)).prefix(4))), true, name)
      let raw = image + ".raw"
      try QemuJudge.run("qemu-img", ["convert", "-f", "vmdk", "-O", "raw", image, raw])
      try assertSameContent(reader, rawPath: raw, name)
      XCTAssertEqual(
        mapEntries(try reader.allExtents(in: 0..<reader.virtualSize)), try QemuJudge.map(of: image), "\(name): map")
      let info = try lacuna(["info", "--output=json", image])
      XCTAssertEqual(info.status, 0, "\(name): \(info.stderr)")
      XCTAssertTrue(info.stdout.contains("\"format\": \"vmdk\""), "\(name): \(info.stdout)")
      XCTAssertTrue(info.stdout.contains("\"virtual-size\": \(reader.virtualSize)"), "\(name): \(info.stdout)")
      try FileManager.default.removeItem(atPath: raw)
    }
  }

  /// A real twoGbMaxExtentSparse pair (a hardware-version-18 tool's): the descriptor file
  /// and its one extent, which has no embedded descriptor, read as qemu-img reads them.
  func testSplitSparsePairAgreesWithQemu() throws {
    _ = try unpack("bwlehrpool/image_t1-s001.vmdk")
    let image = try unpack("bwlehrpool/image_t1.vmdk")
    let reader = try openVMDKWithExtents(image)
    XCTAssertEqual(reader.virtualSize, 20480 * 512)
    XCTAssertEqual(reader.companionSources.map(\.name), [directory.appendingPathComponent("image_t1-s001.vmdk").path])
    let raw = image + ".raw"
    try QemuJudge.run("qemu-img", ["convert", "-f", "vmdk", "-O", "raw", image, raw])
    try assertSameContent(reader, rawPath: raw, "image_t1.vmdk")
    XCTAssertEqual(mapEntries(try reader.allExtents(in: 0..<reader.virtualSize)), try QemuJudge.map(of: image))
    let output = image + ".out.raw"
    let outcome = try lacuna(["convert", "-O", "raw", image, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: output)) == Data(contentsOf: URL(fileURLWithPath: raw)))
    let info = try lacuna(["info", "--output=json", image])
    XCTAssertTrue(info.stdout.contains("\"create-type\": \"twoGbMaxExtentSparse\""), info.stdout)
  }

  /// One extent of a split disk has no descriptor of its own: the error says to open the
  /// descriptor instead.
  func testSplitExtentIsRefusedByName() throws {
    let image = try unpack("bwlehrpool/image_t1-s001.vmdk")
    assertImageError("open the disk's descriptor") { _ = try openVMDK(image) }
  }

  /// Damaged files from other projects' test suites: errors naming the file, never zeros.
  func testDamagedImagesAreRefused() throws {
    for (name, expected) in [
      ("go-vmdk-parser/vmdk-invalid.img", "truncated"),
      ("kubevirt-cdi/invalid-qcow-large-memory.img", "grain size"),
      ("kubevirt-cdi/invalid-qcow-backing-file.img", "grain size"),
    ] {
      let image = try unpack(name)
      assertImageError(expected) { _ = try openVMDK(image) }
      let outcome = try lacuna(["info", image])
      XCTAssertEqual(outcome.status, 1, name)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, "\(name): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains(image), "\(name): \(outcome.stderr)")
    }
  }
}

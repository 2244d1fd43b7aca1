import DiskImage
import Foundation
import TestSupport
import VHD
import XCTest

/// The VHDs of the shared corpus (made by other tools: qemu, Hyper-V), unpacked into the
/// test's directory at test time and judged by qemu-img. Skips when the corpus is absent.
final class VHDCorpusTests: QemuTestCase {
  /// The shared corpus: `LACUNA_CORPUS`, or `../shared/corpus` beside the repository.
  static let corpus: URL = corpusRoot() ?? URL(fileURLWithPath: "/work/shared/corpus")

  /// Unpacks `corpus/name.xz` into the test's directory; skips when it is not there.
  private func unpack(_ name: String) throws -> String {
    let packed = Self.corpus.appendingPathComponent(name + ".xz").path
    guard FileManager.default.fileExists(atPath: packed) else {
      throw XCTSkip("the corpus file \(packed) is absent; skipping the corpus check")
    }
    let xz = try requireProgram("xz", skipping: "xz is not installed; skipping the corpus check")
    let output = path(URL(fileURLWithPath: name).lastPathComponent)
    let outcome = try runProgram("/bin/sh", ["-c", "\"$0\" -dc \"$1\" > \"$2\"", xz, packed, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    return output
  }

  private func open(_ path: String) throws -> ImageReader {
    try VHD.format.open(ImageFile.openForReading(path))
  }

  private func qemuInfo(_ path: String) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: Data(qemuImgOK("info", "--output=json", "-f", "vpc", path).utf8))
      as! [String: Any]
  }

  private func qemuRaw(_ path: String) throws -> [UInt8] {
    try qemuImgOK("convert", "-f", "vpc", "-O", "raw", path, path + ".qemu.raw")
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path + ".qemu.raw")))
  }

  /// qemu's data ranges (it calls every allocated block data whatever its bitmap).
  private func qemuDataRanges(_ path: String) throws -> [Range<Int64>] {
    let json = try JSONSerialization.jsonObject(with: Data(qemuImgOK("map", "--output=json", "-f", "vpc", path).utf8))
    return (json as! [[String: Any]]).compactMap { entry in
      guard entry["data"] as! Bool else { return nil }
      let start = (entry["start"] as! NSNumber).int64Value
      return start..<start + (entry["length"] as! NSNumber).int64Value
    }
  }

  /// A dynamic VHD qemu made (creator `qemu`, CHS size 4212736 over a 4 MiB current size):
  /// size, map, bytes and info as qemu-img sees them, converted by the binary.
  func testExt2() throws {
    let image = try unpack("dfvfs/ext2.vhd")
    let reader = try open(image)
    let info = try qemuInfo(image)
    XCTAssertEqual(reader.virtualSize, (info["virtual-size"] as! NSNumber).int64Value)
    XCTAssertEqual(reader.virtualSize, 4_212_736)
    XCTAssertEqual(reader.clusterSize, (info["cluster-size"] as! NSNumber).intValue)
    let bytes = try qemuRaw(image)
    let ours = try reader.allExtents(in: 0..<reader.virtualSize)
    XCTAssertEqual(ours.filter { $0.kind == .data }.map(\.range), try qemuDataRanges(image))
    try assertReaderConforms(reader, truth: LayerTruth(map: ours, bytes: bytes))
    let converted = try lacuna(["convert", "-O", "raw", image, path("ext2.raw")])
    XCTAssertEqual(converted.status, 0, converted.stderr)
    XCTAssertTrue(try [UInt8](Data(contentsOf: URL(fileURLWithPath: path("ext2.raw")))) == bytes)
    let probed = try lacuna(["info", image])
    XCTAssertTrue(probed.stdout.contains("file format: vpc"), probed.stdout)
    try assertVhdiinfo(image, reader.virtualSize)
  }

  /// A Hyper-V differencing VHD (creator `win `: the current size, not CHS 120/4/17, is
  /// the size) whose parent is absent. Its layer holds only sectors whose bitmap bit is set;
  /// qemu, which ignores bitmaps and parents, reads the same bytes there.
  func testFatDifferential() throws {
    let image = try unpack("dfvfs/fat-differential.vhd")
    let reader = try open(image)
    let info = try qemuInfo(image)
    XCTAssertEqual(reader.virtualSize, (info["virtual-size"] as! NSNumber).int64Value)
    XCTAssertEqual(reader.virtualSize, 4_194_304)
    XCTAssertEqual(reader.clusterSize, (info["cluster-size"] as! NSNumber).intValue)
    XCTAssertEqual(reader.backing, BackingReference(name: "fat-parent.vhd", format: "vpc"))
    let bytes = try qemuRaw(image)
    let ours = try reader.allExtents(in: 0..<reader.virtualSize)
    let data = ours.filter { $0.kind == .data }
    XCTAssertFalse(data.isEmpty)
    let qemuData = try qemuDataRanges(image)
    for extent in data {
      XCTAssertTrue(qemuData.contains { $0.lowerBound <= extent.range.lowerBound && extent.range.upperBound <= $0.upperBound }, "\(extent)")
    }
    XCTAssertTrue(ours.allSatisfy { $0.kind != .zero }, "a differencing layer answers data or unallocated")
    try assertReaderConforms(reader, truth: LayerTruth(map: ours, bytes: bytes))
    let json = try lacuna(["info", "--output=json", image])
    XCTAssertTrue(json.stdout.contains(#""backing-filename": "fat-parent.vhd""#), json.stdout)
    let missing = try lacuna(["convert", "-O", "raw", image, path("fat.raw")])
    XCTAssertEqual(missing.status, 1)
    assertOneLineNaming(missing.stderr, "fat-differential.vhd")
    XCTAssertTrue(missing.stderr.contains("fat-parent.vhd"), missing.stderr)
    try assertVhdiinfo(image, reader.virtualSize)
  }

  /// Two VHDs whose footer checksum is wrong: qemu-img refuses them, and so do we, in one
  /// line naming the file.
  func testBadChecksumsAreRefusedAsQemuRefusesThem() throws {
    for name in ["dfvfs/image.vhd", "dfvfs/image-differential.vhd"] {
      let image = try unpack(name)
      XCTAssertNotEqual(try qemuImg("info", image).status, 0)
      let outcome = try lacuna(["info", image])
      XCTAssertEqual(outcome.status, 1)
      assertOneLineNaming(outcome.stderr, URL(fileURLWithPath: name).lastPathComponent)
      XCTAssertTrue(outcome.stderr.contains("checksum"), outcome.stderr)
    }
  }

  private func assertVhdiinfo(_ image: String, _ size: Int64, file: StaticString = #filePath, line: UInt = #line) throws {
    guard let vhdiinfo = which("vhdiinfo") else {
      print("skipping the vhdiinfo check: vhdiinfo is not installed (apt-get install libvhdi-utils)")
      return
    }
    XCTAssertEqual(try mediaSize(vhdiinfo, image), size, "vhdiinfo's media size", file: file, line: line)
  }
}

import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// VDIs made at test time with qemu-img and qemu-io, read by VDIReader and judged by
/// qemu-img: the bytes (`convert -O raw`) and the map (`map --output=json`, host offsets
/// included).
final class GeneratedImageTests: QemuTestCase {
  /// Makes `name` with `qemu-img create -f vdi` (options before the size) and the qemu-io
  /// commands given.
  private func makeImage(_ name: String, options: [String] = [], size: String, writes: [String]) throws -> String {
    let image = path(name)
    try runProgram(qemu, ["create", "-q", "-f", "vdi"] + options + [image, size])
    for write in writes { try qemuIO(image, write) }
    return image
  }

  private func assertMatchesQemu(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let reader = try openVDI(image)
    let qemuMap = try VDIJudge.map(of: image)
    XCTAssertEqual(try wholeMap(reader), qemuMap, "map", file: file, line: line)
    let content = try VDIJudge.rawContent(of: image, in: dir)
    try assertReaderConforms(reader, truth: LayerTruth(map: qemuMap, bytes: content), file: file, line: line)
  }

  /// Writes land in blocks in write order, not virtual order; `write -z` is written out as
  /// zeros by qemu (VDI has no zero flag it uses), and untouched blocks are free.
  func testDynamicImage() throws {
    let image = try makeImage(
      "dynamic.vdi", size: "7M",
      writes: [
        "write -P 0x11 5M 4k", "write -P 0x22 0 1M", "write -z 3M 1M", "write -P 0x33 1048000 1000",
        "write -P 0x44 7167k 1k",
      ])
    try assertMatchesQemu(image)
    let reader = try openVDI(image)
    XCTAssertEqual(reader.clusterSize, 1 << 20)
    XCTAssertNil(reader.backing)
    // Blocks 0 and 1 are data blocks 1 and 3: neighbours on the disk, not in the file.
    let map = try wholeMap(reader)
    XCTAssertEqual(map.map(\.kind), [.data, .data, .zero, .data, .zero, .data, .data])
    XCTAssertEqual(map[2].range, (2 << 20)..<(3 << 20))
  }

  func testFixedImage() throws {
    let image = try makeImage(
      "fixed.vdi", options: ["-o", "static=on"], size: "4M", writes: ["write -P 0x55 1M 64k", "write -P 0x66 4000k 96k"])
    try assertMatchesQemu(image)
    let map = try wholeMap(try openVDI(image))
    XCTAssertEqual(map.count, 1, "a fixed image is one run of data: \(map)")
  }

  /// A disk size that is not a multiple of the block size: the last block is partly used.
  func testPartialLastBlock() throws {
    let image = try makeImage("partial.vdi", size: "2560k", writes: ["write -P 0x77 2M 512k"])
    try assertMatchesQemu(image)
  }

  func testEmptyImageOfOneTebibyte() throws {
    let image = try makeImage("empty.vdi", size: "1T", writes: ["write -P 0x12 1000G 4k"])
    let reader = try openVDI(image)
    XCTAssertEqual(reader.virtualSize, 1 << 40)
    XCTAssertEqual(try wholeMap(reader), try VDIJudge.map(of: image))
    // Bounded work per call: one answer covers at most one window of the block map.
    let first = try reader.extents(in: 0..<reader.virtualSize)
    XCTAssertLessThan(first.last!.range.upperBound, reader.virtualSize)
    var buffer = [UInt8](repeating: 0, count: 8192)
    try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 1000 << 30) }
    XCTAssertEqual(buffer, [UInt8](repeating: 0x12, count: 4096) + [UInt8](repeating: 0, count: 4096))
  }

  /// `lacuna info --output=json` prints what qemu-img prints for the fields both have.
  func testInfoAgreesWithQemu() throws {
    let image = try makeImage("info.vdi", size: "3M", writes: ["write -P 0x21 1M 4k"])
    let ours = try lacuna(["info", "--output=json", image])
    XCTAssertEqual(ours.status, 0, ours.stderr)
    let mine = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as! [String: Any]
    let theirs = try VDIJudge.info(of: image)
    XCTAssertEqual(Set(mine.keys), Set(theirs.keys))
    for key in ["virtual-size", "filename", "cluster-size", "format", "actual-size", "dirty-flag"] {
      XCTAssertEqual("\(mine[key] ?? "nil")", "\(theirs[key] ?? "nil")", key)
    }
  }

  /// Through the binary: probed without -f, converted to raw byte for byte as qemu-img
  /// converts it, and the output keeps the holes.
  func testConvertAndProbeThroughTheBinary() throws {
    let image = try makeImage(
      "convert.vdi", size: "6M", writes: ["write -P 0x31 4M 8k", "write -P 0x32 0 4k", "write -z 2M 1M"])
    let human = try lacuna(["info", image])
    XCTAssertEqual(human.status, 0, human.stderr)
    XCTAssertTrue(human.stdout.contains("file format: vdi"), human.stdout)
    let output = path("out.raw")
    let converted = try lacuna(["convert", "-O", "raw", image, output])
    XCTAssertEqual(converted.status, 0, converted.stderr)
    let ours = try Data(contentsOf: URL(fileURLWithPath: output))
    XCTAssertEqual([UInt8](ours), try VDIJudge.rawContent(of: image, in: dir))
    let qcow2 = path("out.qcow2")
    let toQcow2 = try lacuna(["convert", "-O", "qcow2", image, qcow2])
    XCTAssertEqual(toQcow2.status, 0, toQcow2.stderr)
    XCTAssertEqual(try qemuImg("compare", "-f", "vdi", "-F", "qcow2", image, qcow2).status, 0)
  }
}

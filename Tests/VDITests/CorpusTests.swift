import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// The VDIs of /work/shared/corpus (made by VirtualBox and other tools), unpacked into the
/// test's directory: what qemu-img reads must agree with us; the VirtualBox snapshot, which
/// qemu-img refuses, reads through its parent.
final class CorpusTests: XCTestCase {
  static let corpus = corpusRoot()?.path ?? "/work/shared/corpus"

  /// Every `.vdi.xz` of the corpus, unpacked into `directory`; skips when there is none.
  private func unpackCorpus(into directory: URL) throws -> [String] {
    guard FileManager.default.fileExists(atPath: Self.corpus) else {
      throw XCTSkip("the corpus (\(Self.corpus)) is absent; skipping the real-world VDIs")
    }
    let xz = try requireProgram("xz")
    var unpacked: [String] = []
    let walker = FileManager.default.enumerator(atPath: Self.corpus)
    while let relative = walker?.nextObject() as? String {
      guard relative.lowercased().hasSuffix(".vdi.xz") else { continue }
      let name = String(URL(fileURLWithPath: relative).lastPathComponent.dropLast(3))
      let output = directory.appendingPathComponent(name).path
      let process = Process()
      process.executableURL = URL(fileURLWithPath: "/bin/sh")
      process.arguments = ["-c", "\"$0\" -dc \"$1\" > \"$2\"", xz, Self.corpus + "/" + relative, output]
      let outcome = try runToCompletion(process)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      unpacked.append(output)
    }
    if unpacked.isEmpty { throw XCTSkip("no .vdi.xz in \(Self.corpus)") }
    return unpacked.sorted()
  }

  func testEveryCorpusImage() throws {
    let qemu = try requireQemuImg()
    let directory = try temporaryDirectory(self)
    for image in try unpackCorpus(into: directory) {
      let reader = try openVDI(image)
      let qemuInfo = try runProgram(qemu, ["info", "--output=json", "-f", "vdi", image])
      guard qemuInfo.status == 0 else {
        // qemu-img refuses differencing images; ours must have found its parent.
        XCTAssertNotNil(reader.backing, "\(image): qemu-img refuses it (\(qemuInfo.stderr)) and we found no parent")
        continue
      }
      XCTAssertTrue(try lacuna(["info", image]).stdout.contains("file format: vdi"), image)
      let info = try JSONSerialization.jsonObject(with: Data(qemuInfo.stdout.utf8)) as! [String: Any]
      XCTAssertEqual(reader.virtualSize, (info["virtual-size"] as! NSNumber).int64Value, image)
      XCTAssertEqual(reader.clusterSize, (info["cluster-size"] as! NSNumber).intValue, image)
      XCTAssertEqual(try wholeMap(reader), try VDIJudge.map(of: image), image)
      // Byte for byte through the binary (the corpus disks are sparse: the output stays so).
      let output = directory.appendingPathComponent("out.raw").path
      let converted = try lacuna(["convert", "-O", "raw", image, output])
      XCTAssertEqual(converted.status, 0, converted.stderr)
      XCTAssertEqual(try runProgram(qemu, ["compare", "-f", "vdi", "-F", "raw", image, output]).status, 0, image)
    }
  }

  /// VirtualBox's snapshot names its parent by UUID only; beside it, the parent is found,
  /// recorded as a backing file, and the chain converts to what the parent holds.
  func testSnapshotFindsItsParent() throws {
    let directory = try temporaryDirectory(self)
    let images = try unpackCorpus(into: directory)
    guard let snapshot = images.first(where: { $0.hasSuffix("image-default_snapshot.vdi") }),
      images.contains(where: { $0.hasSuffix("/image-default.vdi") })
    else { throw XCTSkip("the bwlehrpool snapshot and its parent are not in the corpus") }
    let reader = try openVDI(snapshot)
    XCTAssertEqual(reader.backing, BackingReference(name: "image-default.vdi", format: "vdi"))
    XCTAssertEqual(reader.warnings, [])
    let map = try wholeMap(reader)
    XCTAssertEqual(map, [Extent(0..<(1 << 30), .unallocated)])
    let info = try lacuna(["info", "--output=json", snapshot])
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains(#""backing-filename": "image-default.vdi""#), info.stdout)
    let output = directory.appendingPathComponent("snapshot.raw").path
    let converted = try lacuna(["convert", "-O", "raw", snapshot, output])
    XCTAssertEqual(converted.status, 0, converted.stderr)
    XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: output)[.size] as? Int, 1 << 30)

    // Moved into a folder of its own, below its parent's: found one directory up.
    let snapshots = directory.appendingPathComponent("Snapshots")
    try FileManager.default.createDirectory(at: snapshots, withIntermediateDirectories: true)
    let moved = snapshots.appendingPathComponent("{c4c03085}.vdi").path
    try FileManager.default.moveItem(atPath: snapshot, toPath: moved)
    XCTAssertEqual(try openVDI(moved).backing, BackingReference(name: "../image-default.vdi", format: "vdi"))

    // Without its parent: refused by name, exit 1, one line.
    try FileManager.default.removeItem(atPath: directory.appendingPathComponent("image-default.vdi").path)
    assertImageError("is a differencing VDI (a VirtualBox snapshot) whose parent, image UUID 45ec18d9-39c5-4079-8de1-e36437901627") {
      _ = try openVDI(moved)
    }
    let refused = try lacuna(["convert", "-O", "raw", moved, output])
    XCTAssertEqual(refused.status, 1)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertTrue(refused.stderr.contains(moved), refused.stderr)
  }
}

import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// Real VHDX files from DiscUtils' tests (made by Hyper-V/Windows tools), unpacked sparsely
/// into the test's folder. Judged by qemu-img: size, block size, and the bytes of every data
/// range; whatever qemu's raw copy holds outside our data ranges must be holes.
final class CorpusTests: QemuTestCase {
  private func check(_ name: String, judge: String? = nil, dataBlocks: Int) throws {
    let image = try corpusImage(name)
    let reference = judge.map(path) ?? image
    if judge != nil {
      try FileManager.default.copyItem(atPath: image, toPath: reference)
      // qemu refuses a dirty log read-only; its repair replays the log into the copy.
      try qemuImgOK("check", "-r", "all", reference)
    }
    let reader = try openVHDX(image)
    let info = try JSONSerialization.jsonObject(with: Data(qemuImgOK("info", "--output=json", reference).utf8)) as! [String: Any]
    XCTAssertEqual(reader.virtualSize, (info["virtual-size"] as! NSNumber).int64Value, name)
    XCTAssertEqual(reader.clusterSize, (info["cluster-size"] as! NSNumber).intValue, name)
    let extents = try reader.allExtents(in: 0..<reader.virtualSize)
    let data = extents.filter { $0.kind == .data }
    XCTAssertEqual(data.reduce(0) { $0 + Int($1.length) } / reader.clusterSize!, dataBlocks, "\(name): \(extents)")
    XCTAssertFalse(extents.contains { $0.kind == .unallocated }, name)

    let raw = try qemuRaw(reference)
    for hole in try fileDataRanges(raw) {
      XCTAssertTrue(data.contains { $0.range.lowerBound <= hole.lowerBound && hole.upperBound <= $0.range.upperBound },
        "\(name): qemu-img reads data at \(hole) outside our data extents")
    }
    let handle = try ImageFile.openForReading(raw)
    for extent in data {
      let ours = try readBytes(reader, at: extent.range.lowerBound, count: Int(extent.length))
      let theirs = try handle.readBytes(count: Int(extent.length), at: extent.range.lowerBound, what: "qemu's copy")
      XCTAssertTrue(ours == theirs, "\(name): bytes differ in \(extent.range)")
    }
  }

  func testBtrfs() throws { try check("btrfs", dataBlocks: 2) }
  func testSwap() throws { try check("swap", dataBlocks: 1) }
  func testXFS() throws { try check("xfs5", dataBlocks: 5) }

  /// A file with a dirty log: replayed in memory, the input untouched, the same disk as
  /// qemu's replay (`qemu-img check -r all` on a copy).
  func testLogReplay() throws {
    let image = try corpusImage("vhdx-log-replay")
    let before = try Data(contentsOf: URL(fileURLWithPath: image))
    try check("vhdx-log-replay", judge: "replayed-by-qemu.vhdx", dataBlocks: 1)
    XCTAssertTrue(try openVHDX(image).isDirty)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: image)), before, "the input must not be written")
    let info = try lacuna(["info", "--output=json", image])
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains("\"dirty-flag\": true"), info.stdout)
  }

  func testConvertThroughTheBinary() throws {
    let image = try corpusImage("btrfs")
    let output = path("btrfs.raw")
    let convert = try lacuna(["convert", "-O", "raw", image, output])
    XCTAssertEqual(convert.status, 0, convert.stderr)
    let raw = try qemuRaw(image)
    XCTAssertEqual(try fileDataRanges(output), try fileDataRanges(raw))
    let ours = try ImageFile.openForReading(output)
    let theirs = try ImageFile.openForReading(raw)
    XCTAssertEqual(try ours.size(), try theirs.size())
    for range in try fileDataRanges(raw) {
      XCTAssertEqual(
        try ours.readBytes(count: Int(range.count), at: range.lowerBound, what: "ours"),
        try theirs.readBytes(count: Int(range.count), at: range.lowerBound, what: "qemu's"))
    }
  }
}

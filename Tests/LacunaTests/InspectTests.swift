import Foundation
import TestSupport
import XCTest

/// `info`, `map`, probing and the CLI's own surface.
final class InspectTests: XCTestCase {
  func testMapMatchesQemuImgOnRaw() throws {
    let qemu = try requireQemuImg()
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("map.img").path
    try makeSparseFile(
      src, size: 32 << 20,
      pieces: [(0, patternBytes(4096, seed: 1)), (1 << 20, patternBytes(70_000, seed: 2)), (9 << 20, patternBytes(4096, seed: 3)), ((9 << 20) + 8192, patternBytes(4096, seed: 4))])
    let ours = try lacuna("map", "--output=json", src)
    XCTAssertEqual(ours.status, 0, ours.stderr)
    let theirs = try runProgram(qemu, ["map", "--output=json", "-f", "raw", src])
    XCTAssertEqual(try mapEntries(ours.stdout), try mapEntries(theirs.stdout))
    XCTAssertGreaterThan(try mapEntries(ours.stdout).count, 5)
  }

  func testMapHumanListsDataOnly() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("m.img").path
    try makeSparseFile(src, size: 4 << 20, pieces: [(1 << 20, patternBytes(4096, seed: 1))])
    let outcome = try lacuna("map", src)
    XCTAssertEqual(outcome.status, 0)
    let lines = outcome.stdout.split(separator: "\n")
    XCTAssertEqual(lines.count, 2)
    XCTAssertTrue(lines[1].hasPrefix("0x100000        0x1000          0x100000        "), String(lines[1]))
  }

  func testInfoJSONUsesQemuImgFieldNames() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("i.img").path
    try makeSparseFile(src, size: 3 << 20, pieces: [(0, patternBytes(4096, seed: 1))])
    let outcome = try lacuna("info", "--output=json", src)
    XCTAssertEqual(outcome.status, 0)
    let info = try XCTUnwrap(try parseJSON(outcome.stdout) as? [String: Any])
    XCTAssertEqual(info["format"] as? String, "raw")
    XCTAssertEqual(info["filename"] as? String, src)
    XCTAssertEqual((info["virtual-size"] as? NSNumber)?.int64Value, 3 << 20)
    XCTAssertEqual((info["actual-size"] as? NSNumber)?.int64Value, allocatedBytes(src))
    XCTAssertNotNil(info["dirty-flag"])
    if let qemu = which("qemu-img") {
      let theirs = try XCTUnwrap(try parseJSON(try runProgram(qemu, ["info", "--output=json", "-f", "raw", src]).stdout) as? [String: Any])
      XCTAssertEqual(Set(info.keys), Set(theirs.keys))
    }
    let human = try lacuna("info", src).stdout
    XCTAssertTrue(human.contains("file format: raw"), human)
    XCTAssertTrue(human.contains("virtual size: 3 MiB (3145728 bytes)"), human)
  }

  /// With -f the file is never probed: a raw disk whose guest wrote a qcow2 header stays raw.
  /// The human `info` text is qemu-img's, nested format-specific fields included (a
  /// VMDK's extents, a qcow2's bitmaps), apart from the image path and the disk size.
  func testHumanInfoMatchesQemuImgWithNestedFields() throws {
    let qemu = try requireQemuImg()
    for name in ["bitmap.qcow2", "vmdk-sparse.vmdk", "vmdk-stream.vmdk", "v3-64k.qcow2"] {
      let path = fixturePath(name)
      func significant(_ text: String) -> [Substring] {
        text.split(separator: "\n").filter { !$0.hasPrefix("image:") && !$0.hasPrefix("disk size:") }
      }
      let ours = try lacuna("info", path)
      XCTAssertEqual(ours.status, 0, ours.stderr)
      let theirs = try runProgram(qemu, ["info", "-U", path])
      XCTAssertEqual(significant(ours.stdout), significant(theirs.stdout), name)
    }
  }

  func testFormatFlagDisablesProbing() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("guest.img").path
    var header: [UInt8] = [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]
    header += [UInt8](repeating: 0xee, count: 504)
    try makeSparseFile(src, size: 1 << 20, pieces: [(0, header)])
    let raw = try lacuna("info", "-f", "raw", "--output=json", src)
    XCTAssertEqual(raw.status, 0, raw.stderr)
    XCTAssertTrue(raw.stdout.contains("\"format\": \"raw\""))
    let dst = dir.appendingPathComponent("copy.img").path
    XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", src, dst).status, 0)
    XCTAssertTrue(try sameContent(src, dst))
    let probed = try lacuna("info", src)
    XCTAssertNotEqual(probed.status, 0, "probing takes it for a (broken) qcow2 image")
    XCTAssertEqual(probed.stderr.split(separator: "\n").count, 1, probed.stderr)
  }

  func testUnknownFormatIsAUsageError() throws {
    let outcome = try lacuna("info", "-f", "vmdk9", "/dev/null")
    XCTAssertEqual(outcome.status, 2)
    XCTAssertTrue(outcome.stderr.contains("unknown format"), outcome.stderr)
  }

  func testVersionAndHelp() throws {
    let version = try lacuna("--version")
    XCTAssertEqual(version.status, 0)
    XCTAssertFalse(version.stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
    for verb in ["convert", "create", "info", "map", "sparsify", "stream-receiver"] {
      let help = try lacuna(verb, "--help")
      XCTAssertEqual(help.status, 0, verb)
      XCTAssertTrue(help.stdout.contains("Examples:"), "\(verb) --help has examples")
      XCTAssertTrue(help.stdout.contains("lacuna \(verb)"), verb)
    }
    let completion = try lacuna("--generate-completion-script", "bash")
    XCTAssertEqual(completion.status, 0)
    XCTAssertTrue(completion.stdout.contains("convert"))
  }
}

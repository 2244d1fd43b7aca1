import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// Differencing VDIs (snapshots) made by hand: the parent is found by its image UUID
/// beside the snapshot or one directory up; free blocks fall through to it, zero blocks
/// hide it.
final class DifferencingTests: XCTestCase {
  private var directory: URL!

  override func setUpWithError() throws { directory = try temporaryDirectory(self) }

  private func pattern(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: 4096) }

  /// A base of 4 blocks, all data (0xc1..0xc4).
  private func base() -> HandMadeVDI {
    HandMadeVDI(map: [0, 1, 2, 3], blocks: [pattern(0xC1), pattern(0xC2), pattern(0xC3), pattern(0xC4)])
  }

  /// A snapshot of `base()`: block 0 free, 1 data (0xd2), 2 zero, 3 free.
  private func snapshot(parentModification: UInt8 = 0x21) -> HandMadeVDI {
    var image = HandMadeVDI(type: 4, map: [0xFFFF_FFFF, 0, 0xFFFF_FFFE, 0xFFFF_FFFF], blocks: [pattern(0xD2)])
    for i in 0..<16 {
      image.bytes[0x188 + i] = UInt8(0x41 + i)  // its own image UUID
      image.bytes[0x1A8 + i] = UInt8(i + 1)  // link: the base's image UUID
      image.bytes[0x1B8 + i] = UInt8(i) + parentModification  // the base's modification UUID
    }
    return image
  }

  func testParentBesideTheSnapshot() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    let top = directory.appendingPathComponent("{snapshot}.vdi").path
    try snapshot().write(to: top)
    let reader = try openVDI(top)
    XCTAssertEqual(reader.backing, BackingReference(name: "base.vdi", format: "vdi"))
    XCTAssertEqual(reader.warnings, [])
    XCTAssertEqual(
      try wholeMap(reader),
      [
        Extent(0..<4096, .unallocated), Extent(4096..<8192, .data, hostOffset: 0x400),
        Extent(8192..<12288, .zero), Extent(12288..<16384, .unallocated),
      ])
    let output = directory.appendingPathComponent("out.raw").path
    let outcome = try lacuna(["convert", "-O", "raw", top, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
    XCTAssertEqual(bytes, pattern(0xC1) + pattern(0xD2) + pattern(0) + pattern(0xC4))
  }

  /// Finding the parent means looking at other files: an untrusted snapshot is refused
  /// before any is opened (and the fuzz harness, with no opener, refuses it too).
  func testAnUntrustedSnapshotSearchesNothing() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    let top = directory.appendingPathComponent("s.vdi").path
    try snapshot().write(to: top)
    for verb in [["convert", "-O", "raw"], ["info"], ["map"]] {
      let arguments = verb + ["--untrusted", top] + (verb[0] == "convert" ? [directory.appendingPathComponent("o.raw").path] : [])
      let outcome = try lacuna(arguments)
      XCTAssertEqual(outcome.status, 1, "\(verb): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains("\(top): needs other files searched for its parent"), outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains("untrusted"), outcome.stderr)
    }
    XCTAssertFalse(FileManager.default.fileExists(atPath: directory.appendingPathComponent("o.raw").path))
    XCTAssertThrowsError(try VDI.format.open(ImageFile.openForReading(top))) { error in
      XCTAssertTrue("\(error)".contains("which is not done here"), "\(error)")
    }
  }

  func testParentOneDirectoryUp() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    let snapshots = directory.appendingPathComponent("Snapshots")
    try FileManager.default.createDirectory(at: snapshots, withIntermediateDirectories: true)
    let top = snapshots.appendingPathComponent("s.vdi").path
    try snapshot().write(to: top)
    XCTAssertEqual(try openVDI(top).backing, BackingReference(name: "../base.vdi", format: "vdi"))
    let info = try lacuna(["info", "--backing-chain", top])
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains("backing file: ../base.vdi"), info.stdout)
  }

  /// A parent whose modification UUID changed since the snapshot is used, with a warning.
  func testChangedParentWarns() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    let top = directory.appendingPathComponent("s.vdi").path
    try snapshot(parentModification: 0x77).write(to: top)
    let reader = try openVDI(top)
    XCTAssertEqual(reader.backing?.name, "base.vdi")
    XCTAssertEqual(reader.warnings.count, 1)
    XCTAssertTrue(reader.warnings[0].contains("the parent may have changed since"), reader.warnings[0])
  }

  /// Two files with the parent's UUID (a copy) and nothing to choose between them: refused.
  func testAmbiguousParentIsRefused() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    try base().write(to: directory.appendingPathComponent("copy.vdi").path)
    let top = directory.appendingPathComponent("s.vdi").path
    try snapshot().write(to: top)
    assertImageError("is ambiguous: base.vdi, copy.vdi all have that UUID") { _ = try openVDI(top) }
  }

  /// A snapshot of a snapshot: each layer finds its own parent, and the chain converts.
  func testSnapshotOfSnapshot() throws {
    try base().write(to: directory.appendingPathComponent("base.vdi").path)
    var middle = snapshot()
    for i in 0..<16 { middle.bytes[0x198 + i] = UInt8(0x61 + i) }  // its modification UUID
    try middle.write(to: directory.appendingPathComponent("middle.vdi").path)
    var top = HandMadeVDI(type: 4, map: [0, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF], blocks: [pattern(0xE1)])
    for i in 0..<16 {
      top.bytes[0x188 + i] = UInt8(0x81 + i)
      top.bytes[0x1A8 + i] = UInt8(0x41 + i)  // middle's image UUID
      top.bytes[0x1B8 + i] = UInt8(0x61 + i)  // middle's modification UUID
    }
    let topPath = directory.appendingPathComponent("top.vdi").path
    try top.write(to: topPath)
    let output = directory.appendingPathComponent("out.raw").path
    let outcome = try lacuna(["convert", "-O", "raw", topPath, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
    XCTAssertEqual(bytes, pattern(0xE1) + pattern(0xD2) + pattern(0) + pattern(0xC4))
  }
}

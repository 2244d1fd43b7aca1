import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// The VDI fixtures (Fixtures/vdi-*.vdi, made by make-vdi-fixtures.sh), which have 4 KiB
/// blocks that qemu-img refuses: checked against what the script wrote.
final class FixtureTests: XCTestCase {
  private func pattern(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }

  func testDynamicFixture() throws {
    let reader = try openVDI(fixturePath("vdi-dynamic.vdi"))
    XCTAssertEqual(reader.virtualSize, 1 << 20)
    XCTAssertEqual(reader.clusterSize, 4096)
    XCTAssertEqual(
      try wholeMap(reader),
      [
        Extent(0..<4096, .data, hostOffset: 0x600 + 4096), Extent(4096..<8192, .zero),
        Extent(8192..<12288, .data, hostOffset: 0x600), Extent(12288..<1_044_480, .zero),
        Extent(1_044_480..<1_048_576, .data, hostOffset: 0x600 + 8192),
      ])
    var expected = pattern(0, 1 << 20)
    expected.replaceSubrange(0..<4096, with: pattern(0x41, 4096))
    expected.replaceSubrange(8192..<12288, with: pattern(0x42, 4096))
    expected.replaceSubrange(1_044_480..<1_046_528, with: pattern(0x43, 2048))
    try assertReaderConforms(reader, truth: LayerTruth(map: try wholeMap(reader), bytes: expected))
  }

  func testFixedFixture() throws {
    let reader = try openVDI(fixturePath("vdi-fixed.vdi"))
    XCTAssertEqual(try wholeMap(reader), [Extent(0..<16384, .data, hostOffset: 0x400)])
    var expected = pattern(0, 16384)
    expected.replaceSubrange(4096..<8192, with: pattern(0x51, 4096))
    expected.replaceSubrange(16384 - 512..<16384, with: pattern(0x52, 512))
    XCTAssertEqual(try readAll(reader, chunk: 1000), expected)
  }

  /// `lacuna info` probes them as vdi, without -f.
  func testFixturesProbe() throws {
    for name in ["vdi-dynamic.vdi", "vdi-fixed.vdi"] {
      let outcome = try lacuna(["info", fixturePath(name)])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertTrue(outcome.stdout.contains("file format: vdi"), outcome.stdout)
    }
    XCTAssertFalse(VDI.format.probe([UInt8](repeating: 0, count: 0x44)))
    XCTAssertFalse(VDI.format.probe([UInt8](repeating: 0, count: 0x43)))
  }
}

import DiskImage
import Foundation
import TestSupport
import XCTest

/// Header fields checked for issue 6 beyond DamagedImageTests: the refcount and snapshot
/// tables' sizes against qemu's limits and the file, and offsets that mean nothing when
/// their table is empty (any 64-bit value there must not trap).
final class HostileHeaderTests: XCTestCase {
  private var directory: URL!

  override func setUpWithError() throws { directory = try temporaryDirectory(self) }

  private func openAndReadAll(_ image: HandMadeImage) throws {
    let reader = try openQCOW2(image.write(in: directory))
    _ = try reader.allExtents(in: 0..<reader.virtualSize)
    _ = try readAll(reader)
  }

  private func expectFailure(_ expected: String, line: UInt = #line, _ change: (inout HandMadeImage) -> Void) {
    var image = HandMadeImage()
    change(&image)
    assertImageError(expected, line: line) { try openAndReadAll(image) }
  }

  private func expectSuccess(line: UInt = #line, _ change: (inout HandMadeImage) -> Void) {
    var image = HandMadeImage()
    change(&image)
    XCTAssertNoThrow(try openAndReadAll(image), line: line)
  }

  func testRefcountTable() {
    // 512-byte clusters: qemu's 8 MiB limit is 16384 clusters.
    expectFailure("refcount table of 16385 clusters is larger than the 8 MiB limit (16384 clusters)") {
      $0.set(UInt32(16385), at: 56)
    }
    expectFailure("refcount table of 4294967295 clusters is larger than the 8 MiB limit") { $0.set(UInt32.max, at: 56) }
    expectFailure("refcount table at 0x200 (6 clusters) runs past the end of the file (size 0xc00)") {
      $0.set(UInt32(6), at: 56)
    }
    expectFailure("refcount table at 0x10000 (1 clusters) runs past the end of the file") { $0.set(UInt64(0x10000), at: 48) }
    expectFailure("is beyond any file") { $0.set(UInt64(1) << 63, at: 48) }
  }

  func testSnapshotTable() {
    // The file ends 0x200 bytes after 0xa00: room for 12 entries of at least 40 bytes
    // (each here with no L1 table, extra data, id or name).
    expectSuccess {
      $0.set(UInt32(12), at: 60)
      $0.set(UInt64(0xa00), at: 64)
      for entry in 0..<12 {
        for index in 0..<40 { $0.set(UInt8(0), at: 0xa00 + entry * 40 + index) }
      }
    }
    // The entries are read: the data cluster's 0x5a bytes are no snapshot table.
    expectFailure("snapshot table entry 0 at 0xa00 has 1515870810 bytes of extra data, more than qemu's limit of 1024") {
      $0.set(UInt32(12), at: 60)
      $0.set(UInt64(0xa00), at: 64)
    }
    expectFailure("snapshot table at 0xa00 (13 snapshots, at least 520 bytes) runs past the end of the file (size 0xc00)") {
      $0.set(UInt32(13), at: 60)
      $0.set(UInt64(0xa00), at: 64)
    }
    expectFailure("snapshot table at 0x8000000000000000 (1 snapshots, at least 40 bytes) runs past the end") {
      $0.set(UInt32(1), at: 60)
      $0.set(UInt64(1) << 63, at: 64)
    }
    expectFailure("65537 snapshots, more than the limit of 65536") { $0.set(UInt32(65537), at: 60) }
  }

  /// Found by script/fuzz: an offset of 2^63 or more in a table with no entries trapped
  /// when it was converted to Int64.
  func testOffsetsOfEmptyTablesMeanNothing() {
    expectSuccess { $0.set(UInt64(0xf600_0000_0000_0000), at: 64) }  // no snapshots
    expectSuccess {
      $0.set(UInt64(0), at: 24)  // a 0-byte disk needs no L1 entries
      $0.set(UInt32(0), at: 36)
      $0.set(UInt64.max, at: 40)
    }
  }
}

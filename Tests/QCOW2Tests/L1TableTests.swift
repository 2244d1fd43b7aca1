import DiskImage
import TestSupport
import XCTest

@testable import QCOW2

final class L1TableTests: XCTestCase {
  /// A table of 100,000 entries at offset 4096, a few non-zero ones scattered over it
  /// (clustered at both ends, and one alone in the middle of a long empty stretch).
  private func table(dataRanges: Bool) -> (table: L1Table, entries: [UInt64]) {
    var entries = [UInt64](repeating: 0, count: 100_000)
    for index in [0, 1, 8191, 8192, 8193, 50_000, 99_998, 99_999] { entries[index] = UInt64(index + 1) << 16 }
    var bytes = [UInt8](repeating: 0, count: 4096)
    for entry in entries { bytes += (0..<8).map { UInt8(truncatingIfNeeded: entry >> (56 - 8 * $0)) } }
    // The file's own allocation: 4 KiB blocks holding a non-zero byte, as SEEK_DATA reports.
    var allocation: [Range<Int64>] = []
    for block in stride(from: 0, to: bytes.count, by: 4096) where bytes[block..<min(bytes.count, block + 4096)].contains(where: { $0 != 0 }) {
      allocation.append(Int64(block)..<Int64(min(bytes.count, block + 4096)))
    }
    let source = MemorySource(bytes: bytes, dataRanges: dataRanges ? allocation : nil)
    return (L1Table(source: source, offset: 4096, count: entries.count), entries)
  }

  func testFindsEveryNonZeroEntryWithOrWithoutTheFilesAllocation() throws {
    for withRanges in [false, true] {
      let (table, entries) = table(dataRanges: withRanges)
      var generator = SplitMix(seed: withRanges ? 1 : 2)
      for _ in 0..<300 {
        let start = Int(generator.next() % 100_010)
        let limit = start + Int(generator.next() % 60_000)
        let expected = (start..<max(start, min(limit, entries.count))).first { entries[$0] != 0 }
        XCTAssertEqual(try table.firstNonZero(from: start, below: limit), expected, "from \(start) below \(limit)")
        if start < entries.count { XCTAssertEqual(try table.entry(start), entries[start]) }
      }
      XCTAssertEqual(try table.entry(-1), 0)
      XCTAssertEqual(try table.entry(100_000), 0)
      XCTAssertLessThanOrEqual(table.windowsHeld, L1Table.windowLimit)
    }
  }

  /// With the file's allocation known, the empty windows between 8193 and 50,000 and
  /// between 50,000 and 99,998 are never read: only windows with data are kept.
  func testSkipsWindowsThatAreHolesWithoutReadingThem() throws {
    let (table, _) = table(dataRanges: true)
    XCTAssertEqual(try table.firstNonZero(from: 8194, below: 100_000), 50_000)
    XCTAssertEqual(try table.firstNonZero(from: 50_001, below: 100_000), 99_998)
    // Windows 1 (8192...), 6 (50,000) and 12 (99,998) were looked at; none in between.
    XCTAssertEqual(table.windowsHeld, 3)
  }
}

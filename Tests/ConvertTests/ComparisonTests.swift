import DiskImage
import TestSupport
import XCTest

@testable import Convert

/// The comparison engine on layers whose maps the test states: what it reads, and that the
/// first mismatch it reports is the first on the disk whatever the thread count.
final class ComparisonTests: XCTestCase {
  let size = 24 << 20

  func testFirstDifferenceAndFirstNonZeroFindTheFirstByte() {
    var a = [UInt8](repeating: 7, count: 200_000)
    var zeros = [UInt8](repeating: 0, count: 200_000)
    let b = a
    a.withUnsafeBytes { x in b.withUnsafeBytes { y in XCTAssertNil(firstDifference(x, y)) } }
    zeros.withUnsafeBytes { XCTAssertNil(firstNonZero($0)) }
    for index in [0, 1, 63, 64, 65, 511, 512, 65535, 65536, 131_073, 199_999] {
      a[index] = 8
      a[min(index + 700, a.count - 1)] = 9
      zeros[index] = 1
      zeros[min(index + 3, zeros.count - 1)] = 1
      a.withUnsafeBytes { x in b.withUnsafeBytes { y in XCTAssertEqual(firstDifference(x, y), index) } }
      zeros.withUnsafeBytes { XCTAssertEqual(firstNonZero($0), index) }
      a = b
      zeros = [UInt8](repeating: 0, count: zeros.count)
    }
  }

  /// Zeros on both sides are never read; where one side is zero, only the other is read.
  func testReadsOnlyWhatMapsCallData() throws {
    var bytes = [UInt8](repeating: 0, count: size)
    for index in (1 << 20)..<(2 << 20) { bytes[index] = UInt8(truncatingIfNeeded: index) }
    let first = MemoryReader(bytes: bytes, dataRanges: [(1 << 20)..<(2 << 20)])
    // The second holds the same data in a larger allocation, the rest of it zeros.
    let second = MemoryReader(bytes: bytes, dataRanges: [(1 << 20)..<(3 << 20), (20 << 20)..<(21 << 20)])
    let report = try Comparison(first: Chain(layers: [first]), second: Chain(layers: [second])).run()
    XCTAssertEqual(report.outcome, .identical)
    XCTAssertEqual(first.reads.reduce(0) { $0 + $1.count }, 1 << 20)
    XCTAssertEqual(second.reads.reduce(0) { $0 + $1.count }, 3 << 20)
    for read in first.reads + second.reads {
      XCTAssertTrue(read.clamped(to: (1 << 20)..<(3 << 20)) == read || read.clamped(to: (20 << 20)..<(21 << 20)) == read, "\(read)")
    }
  }

  /// Many differences spread over units on several threads: the first is always found.
  func testFirstMismatchInDiskOrderWhateverTheThreads() throws {
    let base = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 5) }
    var changed = base
    for offset in stride(from: 9 << 20, to: size, by: 3 << 20) { changed[offset + 777] ^= 0xff }
    for threads in [1, 2, 4] {
      var comparison = Comparison(
        first: Chain(layers: [MemoryReader(bytes: base, dataRanges: [0..<Int64(size)])]),
        second: Chain(layers: [MemoryReader(bytes: changed, dataRanges: [0..<Int64(size)])]))
      comparison.threads = threads
      XCTAssertEqual(try comparison.run().outcome, .contentMismatch(offset: (9 << 20) + 512), "\(threads) threads")
    }
  }

  func testReadFailureNamesTheStep() throws {
    let bytes = [UInt8](repeating: 1, count: 8 << 20)
    let failing = MemoryReader(bytes: bytes, dataRanges: [0..<(8 << 20)])
    failing.failingRange = (5 << 20)..<(5 << 20) + 1
    let comparison = Comparison(
      first: Chain(layers: [failing]), second: Chain(layers: [MemoryReader(bytes: bytes, dataRanges: [0..<(8 << 20)])]))
    XCTAssertThrowsError(try comparison.run()) { error in
      XCTAssertEqual((error as? ComparisonFailure)?.step, .read, "\(error)")
    }
  }
}

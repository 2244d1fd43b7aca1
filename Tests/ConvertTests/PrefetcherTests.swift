import DiskImage
import Foundation
import XCTest

@testable import Convert

/// The engine reads the source's map a few windows ahead on a thread of its own: values
/// come back in order, an error in its place, and stopping early ends the thread.
final class PrefetcherTests: XCTestCase {
  struct Broken: Error {}

  func testValuesComeInOrderAndStayWithinDepth() throws {
    let lock = Lock()
    var made = 0
    var taken = 0
    var mostAhead = 0
    let prefetcher = Prefetcher<Int>(depth: 3) {
      lock.withLock {
        guard made < 100 else { return nil }
        made += 1
        mostAhead = max(mostAhead, made - taken)
        return made
      }
    }
    defer { prefetcher.stop() }
    var values: [Int] = []
    while let value = try prefetcher.take() {
      values.append(value)
      lock.withLock { taken += 1 }
      if value % 10 == 0 { usleep(2000) }  // let it run ahead
    }
    XCTAssertEqual(values, Array(1...100))
    // Taken, ready (up to 3), and the one being made.
    XCTAssertLessThanOrEqual(mostAhead, 5)
    XCTAssertNil(try prefetcher.take(), "after the end, the end again")
  }

  func testAnErrorComesInItsPlaceAndEndsTheValues() throws {
    var count = 0
    let prefetcher = Prefetcher<Int>(depth: 2) {
      count += 1
      if count == 3 { throw Broken() }
      return count
    }
    defer { prefetcher.stop() }
    XCTAssertEqual(try prefetcher.take(), 1)
    XCTAssertEqual(try prefetcher.take(), 2)
    XCTAssertThrowsError(try prefetcher.take()) { XCTAssertTrue($0 is Broken) }
    XCTAssertEqual(count, 3, "nothing is made after an error")
  }

  func testStoppingEarlyEndsTheThread() throws {
    let lock = Lock()
    var made = 0
    let prefetcher = Prefetcher<Int>(depth: 2) {
      lock.withLock {
        made += 1
        return made
      }
    }
    XCTAssertEqual(try prefetcher.take(), 1)
    prefetcher.stop()
    let after = lock.withLock { made }
    usleep(20000)
    XCTAssertEqual(lock.withLock { made }, after, "no value is made after stop")
    XCTAssertLessThanOrEqual(after, 4)
  }
}

import XCTest

@testable import QCOW2

final class L2CacheTests: XCTestCase {
  func testCapacityIsBoundedInBytesAndTables() {
    XCTAssertEqual(L2Cache(tableBytes: 65536).capacity, 64)
    XCTAssertEqual(L2Cache(tableBytes: 2 << 20).capacity, 16)
    XCTAssertEqual(L2Cache(tableBytes: 2 << 20, byteLimit: 1 << 20).capacity, 4)
  }

  func testLoadsOnceAndEvictsTheLeastRecentlyUsed() {
    let cache = L2Cache(tableBytes: 1 << 20, byteLimit: 4 << 20)
    var loads: [Int64] = []
    func get(_ offset: Int64) -> [UInt64] {
      cache.table(at: offset) {
        loads.append(offset)
        return [UInt64(offset)]
      }
    }
    for offset: Int64 in [1, 2, 3, 4] { XCTAssertEqual(get(offset), [UInt64(offset)]) }
    _ = get(1)  // 1 is now the most recently used; 2 the least
    _ = get(5)  // evicts 2
    XCTAssertEqual(cache.count, 4)
    _ = get(1)
    _ = get(2)  // loaded again
    XCTAssertEqual(loads, [1, 2, 3, 4, 5, 2])
  }
}

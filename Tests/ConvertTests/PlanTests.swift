@testable import Convert
import DiskImage
import XCTest

/// How the engine cuts the layered map into work for the writer.
final class PlanTests: XCTestCase {
  func extent(_ range: Range<Int64>, _ kind: ExtentKind, depth: Int = 0) -> LayeredExtent {
    LayeredExtent(range: range, kind: kind, present: kind != .unallocated, depth: depth, hostOffset: nil)
  }

  func describe(_ items: [Converter.Item]) -> [String] {
    items.map { item in
      switch item {
      case .runs(let runs): return "runs " + runs.map { "\($0.kind)\($0.range.lowerBound)-\($0.range.upperBound)" }.joined(separator: ",")
      case .unit(let segments): return "unit " + segments.map { "\($0.source)\($0.range.lowerBound)-\($0.range.upperBound)" }.joined(separator: ",")
      }
    }
  }

  func items(_ extents: [LayeredExtent], unit: Int64, granularity: Int64, writeZeroBlocks: Bool) -> [Converter.Item] {
    Converter.items(Converter.plan(extents, writeZeroBlocks: writeZeroBlocks), unit: unit, granularity: granularity)
  }

  func testDataChunksBecomeWholeChunkUnitsAndHolesStayRuns() {
    let items = items(
      [extent(0..<150, .zero), extent(150..<160, .data), extent(160..<1000, .zero)],
      unit: 100, granularity: 1, writeZeroBlocks: false)
    XCTAssertEqual(
      describe(items),
      ["runs zero0-100", "unit zero100-150,layer(0)150-160,zero160-200", "runs zero200-1000"])
  }

  func testHugeHolesCostOneRun() {
    let items = items([extent(0..<(1 << 40), .zero)], unit: 2 << 20, granularity: 1, writeZeroBlocks: false)
    XCTAssertEqual(describe(items), ["runs zero0-\(1 << 40)"])
  }

  func testWriteZeroBlocksTurnsZerosIntoData() {
    let items = items([extent(0..<100, .zero)], unit: 100, granularity: 1, writeZeroBlocks: true)
    XCTAssertEqual(describe(items), ["unit zeroFilled0-100"])
  }

  /// A cluster cannot be half the backing file's and half the output's.
  func testMixedGranulesReadTheBackingPart() {
    let items = items(
      [extent(0..<30, .unallocated), extent(30..<40, .data), extent(40..<100, .unallocated)],
      unit: 100, granularity: 20, writeZeroBlocks: false)
    XCTAssertEqual(describe(items), ["unit backing0-20,chain20-30,layer(0)30-40,backing40-100"])
  }
}

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

  func mapped(_ range: Range<Int64>, depth: Int = 0) -> Converter.Segment {
    Converter.Segment(range: range, source: .layer(depth), hostOffset: range.lowerBound + 4096)
  }

  /// Where a unit costs only the scan, it goes on past the unit size while it holds only
  /// mapped data and zeros, until it holds the data asked for.
  func testSpanningUnitsGoOnUntilTheyHoldEnoughData() {
    let plan = [
      mapped(0..<50), Converter.Segment(range: 50..<150, source: .zero), mapped(150..<200),
      Converter.Segment(range: 200..<300, source: .zero), mapped(300..<350), Converter.Segment(range: 350..<450, source: .zero),
      mapped(450..<500),
    ]
    let spanning = Converter.Spanning(data: 120, layers: [0])
    XCTAssertEqual(
      describe(Converter.items(plan, unit: 100, granularity: 1, spanning: spanning)),
      [
        "unit layer(0)0-50,zero50-150,layer(0)150-200,zero200-300,layer(0)300-350,zero350-400",
        "unit zero400-450,layer(0)450-500",
      ])
    // Without spanning, a unit per chunk that holds data.
    XCTAssertEqual(Converter.items(plan, unit: 100, granularity: 1).count, 5)
  }

  /// Data read into the unit's buffer (a layer that is not mapped, a read through the
  /// chain) ends a spanning unit at the next boundary: buffers are unit-sized.
  func testSpanningStopsAtDataThatIsNotMapped() {
    let plan = [
      mapped(0..<50), mapped(100..<150, depth: 1), mapped(200..<250),
      Converter.Segment(range: 300..<350, source: .chain), mapped(400..<450),
    ]
    let spanning = Converter.Spanning(data: 1000, layers: [0])
    XCTAssertEqual(
      describe(Converter.items(plan, unit: 100, granularity: 1, spanning: spanning)),
      ["unit layer(0)0-50", "unit layer(1)100-150", "unit layer(0)200-250", "unit chain300-350", "unit layer(0)400-450"])
  }

  /// A long hole ends a spanning unit once it reaches `Spanning.reach`; the rest of the
  /// hole is one run.
  func testSpanningUnitsReachNoFurtherThanTheirReach() {
    let mib: Int64 = 1 << 20
    let plan = [mapped(0..<mib), Converter.Segment(range: mib..<(1 << 30), source: .zero), mapped((1 << 30)..<((1 << 30) + mib))]
    let spanning = Converter.Spanning(data: 8 * mib, layers: [0])
    let reach = Converter.Spanning.reach
    XCTAssertEqual(
      describe(Converter.items(plan, unit: 2 * mib, granularity: 1, spanning: spanning)),
      [
        "unit layer(0)0-\(mib),zero\(mib)-\(reach)", "runs zero\(reach)-\(1 << 30)",
        "unit layer(0)\(1 << 30)-\((1 << 30) + mib)",
      ])
  }
}

import DiskImage
import FoundationEssentials
#if canImport(Glibc)
  import Glibc
#endif

/// `-B` naming a file that is not a layer of the source: the output stores only the
/// granules (clusters) where the source reads differently from that file.
extension Converter {
  /// The plan for `-B` with an unrelated backing file: ranges where the source or the base
  /// holds data, widened to whole granules, are compared; where both read zero is left to
  /// the base (it reads zero there too).
  static func comparePlan(
    source: Chain, base: Chain, range: Range<Int64>, granularity: Int64
  ) throws -> [Segment] {
    var interesting: [Range<Int64>] = []
    func add(_ extents: [LayeredExtent]) {
      for extent in extents where extent.kind == .data {
        let start = max(range.lowerBound, extent.range.lowerBound / granularity * granularity)
        let end = min(range.upperBound, roundedUp(extent.range.upperBound, to: granularity) ?? range.upperBound)
        interesting.append(start..<end)
      }
    }
    add(try source.extents(in: range))
    let baseRange = range.clamped(to: 0..<base.virtualSize)
    if !baseRange.isEmpty { add(try base.extents(in: baseRange)) }
    interesting.sort { $0.lowerBound < $1.lowerBound }
    var plan: [Segment] = []
    var position = range.lowerBound
    for piece in interesting where piece.upperBound > position {
      plan.appendMerging(Segment(range: position..<max(position, piece.lowerBound), source: .backing))
      plan.appendMerging(Segment(range: max(position, piece.lowerBound)..<piece.upperBound, source: .compare))
      position = piece.upperBound
    }
    plan.appendMerging(Segment(range: position..<range.upperBound, source: .backing))
    return plan
  }

  /// Splits bytes of the source into granules that read the same in `base` (left to it)
  /// and granules that differ (stored: data runs and zero runs at `sparseSize`).
  static func compareWithBase(
    _ bytes: UnsafeMutableRawBufferPointer, at offset: Int64, base: Chain, granularity: Int64, sparseSize: Int
  ) throws -> [Run] {
    let other = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 4096)
    defer { other.deallocate() }
    let inside = min(Int64(bytes.count), max(0, base.virtualSize - offset))
    if inside > 0 { try base.read(into: UnsafeMutableRawBufferPointer(rebasing: other[0..<Int(inside)]), at: offset) }
    if inside < Int64(bytes.count) {
      UnsafeMutableRawBufferPointer(rebasing: other[Int(inside)...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
    var runs: [Run] = []
    var position = offset
    let end = offset + Int64(bytes.count)
    while position < end {
      let granuleEnd = nextBoundary(after: position, step: granularity, limit: end)
      let local = Int(position - offset)..<Int(granuleEnd - offset)
      let mine = UnsafeRawBufferPointer(rebasing: bytes[local])
      if memcmp(mine.baseAddress!, other.baseAddress! + local.lowerBound, local.count) == 0 {
        runs.append(Run(range: position..<granuleEnd, kind: .backing))
      } else {
        for piece in zeroRuns(mine, at: position, blockSize: sparseSize) {
          runs.append(Run(range: piece.range, kind: piece.isZero ? .zero : .data, scanned: true))
        }
      }
      position = granuleEnd
    }
    return runs
  }
}

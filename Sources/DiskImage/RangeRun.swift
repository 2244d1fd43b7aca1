/// Something that covers a range of the virtual disk and may continue the one before it:
/// a layer's extent, the chain's extent, a run the engine hands the writer. Merging them
/// is one loop, here. The loop is `@inlinable` so each caller gets it specialized for its
/// own type: an unspecialized generic call per extent cost a fifth of the time of a
/// 100,000-extent raw conversion.
public protocol RangeRun {
  var range: Range<Int64> { get set }
  /// Whether `next` continues this one: touching, and alike in everything else.
  func canMerge(with next: Self) -> Bool
}

extension RangeRun {
  @inlinable public var length: Int64 { range.upperBound - range.lowerBound }
}

extension Array where Element: RangeRun {
  /// Appends `run`, merging it into the last element when it continues it. Empty runs
  /// are dropped.
  @inlinable public mutating func appendMerging(_ run: Element) {
    guard !run.range.isEmpty else { return }
    if let last = self.last, last.canMerge(with: run) {
      self[count - 1].range = last.range.lowerBound..<run.range.upperBound
    } else {
      append(run)
    }
  }

  /// Appends every run of `runs`, merging as `appendMerging` does.
  @inlinable public mutating func appendMerging(contentsOf runs: some Sequence<Element>) {
    for run in runs { appendMerging(run) }
  }

  /// The runs with every neighbour that continues the one before merged into it.
  @inlinable public func merged() -> [Element] {
    var result: [Element] = []
    result.reserveCapacity(count)
    result.appendMerging(contentsOf: self)
    return result
  }
}

/// What a range of the virtual disk holds, according to one layer only.
public enum ExtentKind: Sendable, Equatable {
  /// The layer stores bytes for this range.
  case data
  /// The layer says this range reads as zeros (a hole, a v3 zero cluster).
  case zero
  /// The layer does not describe this range: ask the backing layer. A layer with no
  /// backing file never answers this; it answers `zero` instead.
  case unallocated
}

/// A contiguous range of the virtual disk with one kind, as one layer sees it.
public struct Extent: RangeRun, Sendable, Equatable, CustomStringConvertible {
  public var range: Range<Int64>
  public var kind: ExtentKind
  /// Where the range starts in the layer's host file, when the bytes sit there plainly
  /// (raw data and holes, uncompressed qcow2 clusters). `nil` for compressed clusters
  /// and for zero clusters with no host cluster. Reported by `map` as `offset`.
  public var hostOffset: Int64?

  public init(_ range: Range<Int64>, _ kind: ExtentKind, hostOffset: Int64? = nil) {
    self.range = range
    self.kind = kind
    self.hostOffset = hostOffset
  }

  public var description: String {
    "\(kind)[\(range.lowerBound)..<\(range.upperBound)]" + (hostOffset.map { "@\($0)" } ?? "")
  }

  /// Whether `next` continues this extent: same kind, touching, and host offsets contiguous.
  @inlinable public func canMerge(with next: Extent) -> Bool {
    kind == next.kind && range.upperBound == next.range.lowerBound
      && hostOffsetsContinue(hostOffset, length: length, next.hostOffset)
  }
}

/// Whether a host offset `next` continues `first` after `length` bytes (both nil: yes).
@inlinable public func hostOffsetsContinue(_ first: Int64?, length: Int64, _ next: Int64?) -> Bool {
  switch (first, next) {
  case (nil, nil): return true
  case let (a?, b?): return a + length == b
  default: return false
  }
}

/// What a range of the virtual disk holds, according to one layer only.
public enum ExtentKind: Sendable, Equatable {
  /// The layer stores bytes for this range.
  case data
  /// The layer says this range reads as zeros (a hole, a v3 zero cluster).
  case zero
  /// The layer does not describe this range: ask the backing layer. A layer with no
  /// backing file answers this only where its storage says no layer behind it holds the
  /// range (`ByteSource.absentRanges`); it reads as zeros, as `zero` does.
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
  /// The layer stores this range as data, but its host bytes are a hole in the file (a
  /// data cluster punched with `fallocate -p`): the range is `.zero`, and `map` reports it
  /// as both data and zero, as qemu-img map does.
  public var isHostHole: Bool

  public init(_ range: Range<Int64>, _ kind: ExtentKind, hostOffset: Int64? = nil, isHostHole: Bool = false) {
    self.range = range
    self.kind = kind
    self.hostOffset = hostOffset
    self.isHostHole = isHostHole
  }

  public var description: String {
    "\(kind)\(isHostHole ? "(hole)" : "")[\(range.lowerBound)..<\(range.upperBound)]" + (hostOffset.map { "@\($0)" } ?? "")
  }

  /// Whether `next` continues this extent: same kind, touching, and host offsets contiguous.
  @inlinable public func canMerge(with next: Extent) -> Bool {
    kind == next.kind && isHostHole == next.isHostHole && range.upperBound == next.range.lowerBound
      && hostOffsetsContinue(hostOffset, length: length, next.hostOffset)
  }
}

extension Array where Element == Extent {
  /// These extents with each data extent's host range checked against `source`'s own
  /// allocation: the parts whose host bytes are a hole in the file read as zeros, and
  /// become `.zero` extents marked `isHostHole` (with their host offset). Unchanged where
  /// the source cannot tell. For readers whose data extents' host offsets are in `source`.
  public func splittingHostHoles(in source: ByteSource) throws -> [Extent] {
    guard contains(where: { $0.kind == .data && $0.hostOffset != nil }) else { return self }
    var result: [Extent] = []
    result.reserveCapacity(count)
    for extent in self {
      guard extent.kind == .data, let host = extent.hostOffset,
        let data = try source.dataRanges(in: host..<host + extent.length)
      else {
        result.appendMerging(extent)
        continue
      }
      if data.count == 1, data[0] == host..<host + extent.length {
        result.appendMerging(extent)
        continue
      }
      var position = host
      func add(_ hostRange: Range<Int64>, _ isData: Bool) {
        guard !hostRange.isEmpty else { return }
        let start = extent.range.lowerBound + (hostRange.lowerBound - host)
        let range = start..<start + Int64(hostRange.count)
        result.appendMerging(
          isData
            ? Extent(range, .data, hostOffset: hostRange.lowerBound)
            : Extent(range, .zero, hostOffset: hostRange.lowerBound, isHostHole: true))
      }
      for run in data {
        add(position..<run.lowerBound, false)
        add(run, true)
        position = run.upperBound
      }
      add(position..<host + extent.length, false)
    }
    return result
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

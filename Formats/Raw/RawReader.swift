import DiskImage

/// Reads a raw file. Its map comes from the file system's holes: SEEK_DATA/SEEK_HOLE walked
/// once over each range asked about, so the cost is two `lseek` calls per data extent, not
/// per block. A raw file has no backing, so holes answer `zero`, never `unallocated`.
public final class RawReader: ImageReader {
  public let source: ByteSource
  public let virtualSize: Int64
  public var formatName: String { "raw" }
  public var backing: BackingReference? { nil }
  public var plainHostFile: ImageFile? { source as? ImageFile }

  public init(source: ByteSource) throws {
    self.source = source
    self.virtualSize = try source.size()
  }

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    guard let data = try source.dataRanges(in: range) else {
      return [Extent(range, .data, hostOffset: range.lowerBound)]
    }
    var result: [Extent] = []
    result.reserveCapacity(data.count * 2 + 1)
    var position = range.lowerBound
    for run in data {
      if run.lowerBound > position {
        result.append(Extent(position..<run.lowerBound, .zero, hostOffset: position))
      }
      result.append(Extent(run, .data, hostOffset: run.lowerBound))
      position = run.upperBound
    }
    if position < range.upperBound {
      result.append(Extent(position..<range.upperBound, .zero, hostOffset: position))
    }
    guard result.contains(where: { $0.kind == .zero }), let absent = try source.absentRanges(in: range),
      !absent.isEmpty
    else { return result }
    return Self.markingAbsent(result, absent)
  }

  /// `extents` with the zero ranges that lie in `absent` (sorted, apart) made
  /// `.unallocated`: no layer behind the storage holds them. Data stays data.
  static func markingAbsent(_ extents: [Extent], _ absent: [Range<Int64>]) -> [Extent] {
    var result: [Extent] = []
    var next = 0
    for extent in extents {
      guard extent.kind == .zero else {
        result.appendMerging(extent)
        continue
      }
      var position = extent.range.lowerBound
      while next < absent.count && absent[next].upperBound <= position { next += 1 }
      var index = next
      while position < extent.range.upperBound {
        guard index < absent.count, absent[index].lowerBound < extent.range.upperBound else {
          result.appendMerging(Extent(position..<extent.range.upperBound, .zero, hostOffset: position))
          break
        }
        let gap = absent[index]
        if gap.lowerBound > position {
          result.appendMerging(Extent(position..<gap.lowerBound, .zero, hostOffset: position))
          position = gap.lowerBound
        }
        let end = min(gap.upperBound, extent.range.upperBound)
        result.appendMerging(Extent(position..<end, .unallocated))
        position = end
        if end == gap.upperBound { index += 1 }
      }
    }
    return result
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    try source.readExactly(into: buffer, at: offset, what: "data")
  }
}

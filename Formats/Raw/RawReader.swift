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
    return result
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    try source.readExactly(into: buffer, at: offset, what: "data")
  }
}

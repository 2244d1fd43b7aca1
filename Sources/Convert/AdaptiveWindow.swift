/// How much of the virtual disk to map at a time: small where extents are dense, so memory
/// follows the extents of one window, and growing where they are sparse, so a huge empty
/// disk (2 EiB with one cluster of data) takes a few dozen windows, not billions.
public struct AdaptiveWindow {
  public private(set) var size: Int64
  /// The smallest window, and the step windows are multiples of.
  public let minimum: Int64

  /// Windows of fewer extents than this double; of more than `crowded`, halve.
  static let sparse = 1024
  static let crowded = 65536

  public init(minimum: Int64) {
    self.minimum = max(minimum, 1)
    size = self.minimum
  }

  /// The next window from `position`, not past `end`.
  public func range(from position: Int64, to end: Int64) -> Range<Int64> {
    position..<position + min(size, end - position)
  }

  /// Adjusts the size after a window that held `extents` extents.
  public mutating func adjust(after extents: Int) {
    if extents < Self.sparse, size <= Int64.max / 4 {
      size *= 2
    } else if extents > Self.crowded, size / 2 >= minimum {
      size = size / 2 / minimum * minimum
    }
  }
}

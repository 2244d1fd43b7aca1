import DiskImage

/// The active L1 table, read in windows of 64 KiB as walks reach them, so memory follows
/// what is visited rather than the table's size: qemu allows 32 MiB L1 tables, and a chain
/// of 64 such layers must not hold 2 GiB of mostly zero entries.
///
/// A window remembers which of its entries are non-zero, so a walk crosses any stretch of
/// unallocated entries in one step; a window whose bytes are a hole in the file (a sparse
/// L1 table, as qemu-img creates) is known to be empty without being read.
final class L1Table: @unchecked Sendable {
  /// Entries per window (64 KiB of the table).
  static let windowEntries = 8192
  /// Windows kept at once (1 MiB of entries at most).
  static let windowLimit = 16
  /// How far ahead of an empty window one look for the file's data reaches.
  private static let dataLookahead: Int64 = 16 << 20

  let count: Int
  private let offset: Int64
  private let source: ByteSource

  private struct Window {
    /// The window's entries; empty when all are zero.
    var entries: [UInt64]
    /// Indices (within the window) of the non-zero entries, ascending.
    var nonZero: [Int32]
  }

  private let windows = BoundedCache<Int, Window>(capacity: L1Table.windowLimit)

  init(source: ByteSource, offset: Int64, count: Int) {
    self.source = source
    self.offset = offset
    self.count = count
  }

  /// Windows held now (for tests of the bound).
  var windowsHeld: Int { windows.count }

  /// The entry at `index` (zero past the end of the table).
  func entry(_ index: Int) throws -> UInt64 {
    guard index >= 0, index < count else { return 0 }
    let window = try self.window(index / Self.windowEntries)
    return window.entries.isEmpty ? 0 : window.entries[index % Self.windowEntries]
  }

  /// The first index in `start..<limit` whose entry is non-zero, or nil when all are zero.
  /// Visits one window per 8192 entries at most, and skips windows that are holes in the
  /// file with one look at its data ranges.
  func firstNonZero(from start: Int, below limit: Int) throws -> Int? {
    let limit = min(limit, count)
    var index = max(start, 0)
    while index < limit {
      let windowIndex = index / Self.windowEntries
      let windowStart = windowIndex * Self.windowEntries
      if index == windowStart, !isCached(windowIndex) {
        // Jump straight to where the file holds data for the rest of the table, if it can tell.
        let from = offset + Int64(index) * 8
        let to = min(offset + Int64(limit) * 8, from + Self.dataLookahead)
        if let data = try source.dataRanges(in: from..<to) {
          guard let first = data.first else {
            index = Int((to - offset) / 8)
            continue
          }
          let firstIndex = Int((first.lowerBound - offset) / 8)
          if firstIndex / Self.windowEntries > windowIndex {
            index = firstIndex / Self.windowEntries * Self.windowEntries
            continue
          }
        }
      }
      let window = try self.window(windowIndex)
      let within = Int32(index - windowStart)
      // The first non-zero index at or after `within` (binary search).
      var low = 0
      var high = window.nonZero.count
      while low < high {
        let middle = (low + high) / 2
        if window.nonZero[middle] < within { low = middle + 1 } else { high = middle }
      }
      if low < window.nonZero.count {
        let found = windowStart + Int(window.nonZero[low])
        return found < limit ? found : nil
      }
      index = windowStart + Self.windowEntries
    }
    return nil
  }

  private func isCached(_ windowIndex: Int) -> Bool { windows.contains(windowIndex) }

  private func window(_ windowIndex: Int) throws -> Window {
    try windows.value(for: windowIndex) { try load(windowIndex) }
  }

  /// Reads one window; the header checked that the whole table lies inside the file.
  private func load(_ windowIndex: Int) throws -> Window {
    let first = windowIndex * Self.windowEntries
    let entryCount = min(Self.windowEntries, count - first)
    let start = offset + Int64(first) * 8
    let byteRange = start..<start + Int64(entryCount) * 8
    if let data = try source.dataRanges(in: byteRange), data.isEmpty {
      return Window(entries: [], nonZero: [])
    }
    var entries = [UInt64](repeating: 0, count: entryCount)
    try entries.withUnsafeMutableBytes {
      try source.readExactly(into: $0, at: start, what: "L1 table (entries \(first)..<\(first + entryCount))")
    }
    var nonZero: [Int32] = []
    entries.withUnsafeMutableBufferPointer { buffer in
      for index in buffer.indices where buffer[index] != 0 {
        buffer[index] = UInt64(bigEndian: buffer[index])
        nonZero.append(Int32(index))
      }
    }
    if nonZero.isEmpty { entries = [] }
    return Window(entries: entries, nonZero: nonZero)
  }
}

import DiskImage

/// The BAT, read in 64 KiB pages as lookups reach them and kept in a small cache (least
/// recently used goes first), so a large sparse disk never holds its whole table.
/// Safe from several threads at once.
final class BlockAllocationTable: @unchecked Sendable {
  static let entriesPerPage = 8192
  static let cachedPages = 64

  /// One page of entries, and the state every payload entry of it shares when they all
  /// share one that holds no block (so a walk can step over the page at once).
  struct Page {
    var entries: [UInt64]
    var uniformEmptyState: UInt64?
  }

  let source: ByteSource
  let offset: Int64
  let count: Int
  /// Payload entries are interleaved with one sector-bitmap entry every `chunkRatio`.
  let chunkRatio: Int
  private let lock = Lock()
  private var pages: [Int: Page] = [:]
  private var recency: [Int] = []

  init(source: ByteSource, offset: Int64, count: Int, chunkRatio: Int) {
    self.source = source
    self.offset = offset
    self.count = count
    self.chunkRatio = chunkRatio
  }

  var pageCount: Int { (count + Self.entriesPerPage - 1) / Self.entriesPerPage }

  /// Whether BAT index `index` holds a sector bitmap rather than a payload block.
  func isBitmapIndex(_ index: Int) -> Bool { index % (chunkRatio + 1) == chunkRatio }

  /// Entry `index` (0 ..< count).
  func entry(_ index: Int) throws -> UInt64 {
    try page(index / Self.entriesPerPage).entries[index % Self.entriesPerPage]
  }

  /// Page `number`, from the cache or the file.
  func page(_ number: Int) throws -> Page {
    if let cached = lock.withLock({ () -> Page? in
      guard let page = pages[number] else { return nil }
      if recency.last != number {
        recency.removeAll { $0 == number }
        recency.append(number)
      }
      return page
    }) {
      return cached
    }
    let page = try readPage(number)
    lock.withLock {
      if pages[number] == nil {
        pages[number] = page
        recency.append(number)
        if recency.count > Self.cachedPages { pages[recency.removeFirst()] = nil }
      }
    }
    return page
  }

  /// Reads page `number` without caching it (the check at open reads each page once).
  func readPage(_ number: Int) throws -> Page {
    let first = number * Self.entriesPerPage
    let entries = min(Self.entriesPerPage, count - first)
    let start = offset + Int64(first) * 8
    if let data = try source.dataRanges(in: start..<start + Int64(entries) * 8), data.isEmpty,
      start + Int64(entries) * 8 <= (try source.size())
    {
      return Page(entries: [UInt64](repeating: 0, count: entries), uniformEmptyState: 0)
    }
    let bytes = try source.readBytes(count: entries * 8, at: start, what: "BAT (entries \(first)..<\(first + entries))")
    var values = [UInt64](repeating: 0, count: entries)
    var uniform: UInt64? = nil
    var mixed = false
    bytes.withUnsafeBytes { raw in
      values.withUnsafeMutableBufferPointer { output in
        // The next sector-bitmap slot, counted down instead of a division per entry.
        var untilBitmap = chunkRatio - first % (chunkRatio + 1)
        for slot in 0..<entries {
          let value = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: slot &* 8, as: UInt64.self))
          output[slot] = value
          if untilBitmap == 0 {
            untilBitmap = chunkRatio
            continue
          }
          untilBitmap &-= 1
          if !mixed {
            let state = value & 7
            if state == 6 || state == 7 || state == 4 || (uniform != nil && uniform != state) {
              mixed = true
            } else {
              uniform = state
            }
          }
        }
      }
    }
    return Page(entries: values, uniformEmptyState: mixed ? nil : uniform)
  }
}

/// A small cache of 1 MiB sector bitmaps (differencing images), keyed by their file offset.
final class SectorBitmapCache: @unchecked Sendable {
  static let capacity = 8
  private let lock = Lock()
  private var bitmaps: [Int64: [UInt8]] = [:]
  private var recency: [Int64] = []

  func bitmap(at offset: Int64, load: () throws -> [UInt8]) throws -> [UInt8] {
    if let cached = lock.withLock({ bitmaps[offset] }) { return cached }
    let bitmap = try load()
    lock.withLock {
      if bitmaps[offset] == nil {
        bitmaps[offset] = bitmap
        recency.append(offset)
        if recency.count > Self.capacity { bitmaps[recency.removeFirst()] = nil }
      }
    }
    return bitmap
  }
}

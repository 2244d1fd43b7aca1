import DiskImage

/// Decoded grain tables by their sector, least recently used evicted first.
///
/// A table is 2 KiB (512 entries), so a few hundred cost little; the bound keeps a walk
/// over a disk of many terabytes from holding every table. Tables are loaded outside the
/// lock: two threads may load one table at once, which costs one extra read and never a
/// wrong answer, and a slow read never stalls other threads.
final class GrainTableCache: @unchecked Sendable {
  private let lock = Lock()
  private var tables: [Int64: (entries: [UInt32], lastUse: UInt64)] = [:]
  private var clock: UInt64 = 0
  let capacity: Int

  init(capacity: Int = 256) {
    self.capacity = max(4, capacity)
  }

  /// The table at byte offset `offset`, loaded with `load` when it is not cached.
  func table(at offset: Int64, load: () throws -> [UInt32]) rethrows -> [UInt32] {
    let cached: [UInt32]? = lock.withLock {
      clock += 1
      guard let hit = tables[offset] else { return nil }
      tables[offset]!.lastUse = clock
      return hit.entries
    }
    if let cached { return cached }
    let entries = try load()
    lock.withLock {
      clock += 1
      if tables[offset] == nil, tables.count >= capacity,
        let oldest = tables.min(by: { $0.value.lastUse < $1.value.lastUse })?.key
      {
        tables[oldest] = nil
      }
      tables[offset] = (entries, clock)
    }
    return entries
  }

  /// Tables held now (for tests of the bound).
  var count: Int { lock.withLock { tables.count } }
}

import DiskImage

/// Decoded L2 tables by host offset, least recently used evicted first.
///
/// Bounded in bytes, so a 2 MiB-cluster image keeps fewer tables than a 64 KiB one. Tables
/// are loaded outside the lock: two threads may load the same table at once, which costs
/// one extra read and never a wrong answer, while a slow read never stalls other threads.
final class L2Cache: @unchecked Sendable {
  private let lock = Lock()
  private var tables: [Int64: (entries: [UInt64], lastUse: UInt64)] = [:]
  private var clock: UInt64 = 0
  let capacity: Int

  /// - Parameters:
  ///   - tableBytes: the size of one L2 table (one cluster).
  ///   - byteLimit: how much the cache may hold; at least a few tables are always kept.
  init(tableBytes: Int, byteLimit: Int = 32 << 20, maximumTables: Int = 64) {
    capacity = max(4, min(maximumTables, byteLimit / tableBytes))
  }

  /// The table at `offset`, loaded with `load` when it is not cached.
  func table(at offset: Int64, load: () throws -> [UInt64]) rethrows -> [UInt64] {
    let cached: [UInt64]? = lock.withLock {
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

  var count: Int { lock.withLock { tables.count } }
}

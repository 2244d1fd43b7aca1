import DiskImage

/// Decoded L2 tables by host offset: a BoundedCache whose capacity is bounded in bytes, so
/// a 2 MiB-cluster image keeps fewer tables than a 64 KiB one.
final class L2Cache: @unchecked Sendable {
  private let cache: BoundedCache<Int64, [UInt64]>
  var capacity: Int { cache.capacity }

  /// - Parameters:
  ///   - tableBytes: the size of one L2 table (one cluster).
  ///   - byteLimit: how much the cache may hold; at least a few tables are always kept.
  init(tableBytes: Int, byteLimit: Int = 32 << 20, maximumTables: Int = 64) {
    cache = BoundedCache(capacity: max(4, min(maximumTables, byteLimit / tableBytes)))
  }

  /// The table at `offset`, loaded with `load` when it is not cached.
  func table(at offset: Int64, load: () throws -> [UInt64]) rethrows -> [UInt64] {
    try cache.value(for: offset, load: load)
  }

  var count: Int { cache.count }
}

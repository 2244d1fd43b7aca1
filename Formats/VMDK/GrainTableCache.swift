import DiskImage

/// Decoded grain tables by their byte offset: a BoundedCache of 256 tables by default. A
/// table is 2 KiB (512 entries), so a few hundred cost little; the bound keeps a walk over
/// a disk of many terabytes from holding every table.
final class GrainTableCache: @unchecked Sendable {
  private let cache: BoundedCache<Int64, [UInt32]>
  var capacity: Int { cache.capacity }

  init(capacity: Int = 256) { cache = BoundedCache(capacity: max(4, capacity)) }

  /// The table at byte offset `offset`, loaded with `load` when it is not cached.
  func table(at offset: Int64, load: () throws -> [UInt32]) rethrows -> [UInt32] {
    try cache.value(for: offset, load: load)
  }

  /// Tables held now (for tests of the bound).
  var count: Int { cache.count }
}

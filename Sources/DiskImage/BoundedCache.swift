/// Values by key, at most `capacity` of them, the least recently used evicted first: the
/// one cache of the format readers (qcow2 L1 windows and L2 tables, VMDK grain tables, VHD
/// sector bitmaps, VDI block-map windows), so memory follows what a walk visits, not the
/// size of a table.
///
/// Safe from several threads. Values are loaded outside the lock: two threads may load one
/// value at once, which costs one extra read and never a wrong answer, and a slow read
/// never stalls other threads.
public final class BoundedCache<Key: Hashable, Value>: @unchecked Sendable {
  private let lock = Lock()
  private var entries: [Key: (value: Value, lastUse: UInt64)] = [:]
  private var clock: UInt64 = 0
  /// The most values kept at once (at least one).
  public let capacity: Int

  public init(capacity: Int) { self.capacity = max(1, capacity) }

  /// The value for `key`, loaded with `load` (and kept) when it is not cached.
  public func value(for key: Key, load: () throws -> Value) rethrows -> Value {
    let cached: Value? = lock.withLock {
      clock += 1
      guard let hit = entries[key] else { return nil }
      entries[key]!.lastUse = clock
      return hit.value
    }
    if let cached { return cached }
    let value = try load()
    lock.withLock {
      clock += 1
      if entries[key] == nil, entries.count >= capacity,
        let oldest = entries.min(by: { $0.value.lastUse < $1.value.lastUse })?.key
      {
        entries[oldest] = nil
      }
      entries[key] = (value, clock)
    }
    return value
  }

  /// Whether `key` is cached now (without counting as a use).
  public func contains(_ key: Key) -> Bool { lock.withLock { entries[key] != nil } }

  /// Values held now.
  public var count: Int { lock.withLock { entries.count } }
}

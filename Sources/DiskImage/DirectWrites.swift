import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// A second way for checked source bytes to reach an ext4 output, beside the writing
/// thread's buffered writes: straight from the source's page cache to the disk (O_DIRECT,
/// submitted through an io_uring, so the writing thread does not wait for the disk).
///
/// A buffered write copies every byte into a new page of the output's page cache, and
/// that copy is the whole cost of a conversion where nothing can be shared: 1 GiB takes
/// 0.23–0.30 s on these machines, two to three times a memcpy. A direct write copies
/// nothing; the device reads the pinned source pages itself. While a few direct writes
/// are in flight, the writing thread copies the other chunks, so the two share the work
/// in proportion to their speeds: 35–45% goes direct on a virtio disk that writes
/// 1.5–1.9 GB/s (W1 raw -> raw: 0.25–0.29 s, was 0.31–0.35), and on a slow disk the lane
/// is full most of the time and the writing thread copies almost everything, as before.
///
/// Chunks are handed over from the engine's mapping of the source, and from a unit's
/// buffer (decompressed clusters, a received stream) together with the unit that owns it:
/// the lane keeps the unit, so its buffer goes back to the pool only once no direct write
/// reads it. Where copying into new page-cache pages is slow (these VMs hand free pages
/// back to the host, and a page touched again must be backed anew), the lane then takes
/// the larger share of decompressed data too. The memory, the offset and the length are 4 KiB-aligned; the writer
/// writes the unaligned edges itself. The output's own page cache never holds the chunks
/// sent here (each output byte is written once), so the two ways never meet in a page.
final class DirectLane {
  let path: String
  private let descriptor: Int32
  private let ring: OpaquePointer
  /// What is in flight, by tag: where it goes and the memory it comes from (still mapped,
  /// to write again should the kernel refuse or write less, and to drop from the page
  /// tables once written).
  private var inFlight: [UInt64: (offset: Int64, bytes: UnsafeRawBufferPointer, memory: Memory)] = [:]
  /// What the writes in flight hold: their mapped bytes, and the whole memory of each
  /// owner they keep (`KeptMemory`), counted once however many of its chunks are in flight.
  private var bytesInFlight = 0
  /// The writes in flight from each kept owner.
  private var owners: [ObjectIdentifier: Int] = [:]

  /// Where the bytes of a direct write lie, and what keeps them there until it completes.
  enum Memory {
    /// The source's page cache, mapped: dropped from the page tables once written.
    case mapped(FileMapping)
    /// Memory of the caller's that stays valid and unchanged while `owner` lives (a unit's
    /// buffer of decompressed or received data).
    case kept(AnyObject)
  }
  private var nextTag: UInt64 = 0
  /// False once the file system refused a direct write: everything is written buffered.
  private(set) var isOpen = true

  /// Alignment of memory, offset and length (the page size, a multiple of every logical
  /// block size and of ext4's block).
  static let alignment = 4096
  /// At most this many bytes in flight: enough to keep the disk busy while the writing
  /// thread copies, and a short wait at the end. Their source pages stay mapped until the
  /// write completes (a ring worker maps them to pin them), so they count in peak RSS:
  /// W1 raw -> raw took 0.258 s with 4 MiB, 0.248 with 8, 0.231 with 12, 0.228 with 16
  /// (medians of 9), and qcow2 -> raw peaked at 50, 51, 55 and 60 MiB (62.5 MiB once with
  /// 12, in the bench): 8 keeps W1 and W4 under 64 MiB with room to spare.
  static let limit = 8 << 20
  /// Of `limit`, at most this much may be kept owners' memory: units kept here are
  /// buffers the engine's pipeline does not have, and it allocates others in their place.
  static let keptLimit = 4 << 20
  /// The kept owners' share of `bytesInFlight`.
  private var keptInFlight = 0
  /// The largest single direct write.
  static let chunk = 1 << 20
  /// The smallest run sent direct; shorter ones are copied by the writing thread. Each
  /// direct write allocates its blocks under the inode's lock and each completion drops
  /// its pages' tables (a madvise): W2's 4 KiB extents went direct one by one, 64,000 of
  /// them, and W2 raw -> raw took 1.60 s (2.4 s of CPU time), 0.55 (0.8) with this bound.
  /// W1's extents (64 KiB and more) still go direct.
  static let smallest: Int64 = 64 << 10

  /// At most this many writes in flight (the ring's size).
  static let slots = 32

  /// Nil where the file cannot be opened for direct I/O or io_uring is unavailable
  /// (`kernel.io_uring_disabled`).
  init?(destination: ImageFile) {
    let direct = lacuna_open_direct(destination.descriptor)
    guard direct >= 0 else { return nil }
    guard let ring = lacuna_ring_open(UInt32(Self.slots)) else {
      Glibc.close(direct)
      return nil
    }
    path = destination.path
    descriptor = direct
    self.ring = ring
  }

  deinit {
    // After a failure: the writes still in flight finish before the ring and the file go.
    var tags = [UInt64](repeating: 0, count: Self.slots)
    var results = [Int64](repeating: 0, count: Self.slots)
    var left = inFlight.count
    while left > 0 {
      let n = lacuna_ring_reap(ring, 1, Int32(Self.slots), &tags, &results)
      if n <= 0 { break }
      left -= Int(n)
    }
    lacuna_ring_close(ring)
    Glibc.close(descriptor)
  }

  /// What sending `bytes` from `memory` adds to `bytesInFlight`.
  private func cost(of bytes: UnsafeRawBufferPointer, in memory: Memory) -> Int {
    switch memory {
    case .mapped: return bytes.count
    case .kept(let owner):
      if owners[ObjectIdentifier(owner)] != nil { return 0 }
      return max((owner as? KeptMemory)?.keptBytes ?? bytes.count, bytes.count)
    }
  }

  /// Sends `bytes` (aligned, at most `chunk`, from `memory`) to `offset` when there is room
  /// in flight; false when there is not (the caller writes them itself).
  func send(
    _ bytes: UnsafeRawBufferPointer, from memory: Memory, at offset: Int64, fallback: ImageFile
  ) throws -> Bool {
    guard isOpen else { return false }
    func fits(_ cost: Int) -> Bool {
      if case .kept = memory, keptInFlight + cost > Self.keptLimit { return false }
      return bytesInFlight + cost <= Self.limit && inFlight.count < Self.slots
    }
    if !fits(cost(of: bytes, in: memory)) { try reap(waiting: false, fallback: fallback) }
    let cost = cost(of: bytes, in: memory)
    guard isOpen, fits(cost) else { return false }
    let tag = nextTag
    nextTag &+= 1
    if lacuna_ring_write(ring, descriptor, bytes.baseAddress, UInt32(bytes.count), offset, tag) != 0 {
      let code = errno
      if code == EAGAIN { return false }
      if Self.isRefusal(code) {
        isOpen = false
        return false
      }
      throw ImageError.system(path: path, operation: "write \(bytes.count) bytes at \(hex(offset)) (direct)", errno: code)
    }
    inFlight[tag] = (offset, bytes, memory)
    bytesInFlight += cost
    if case .kept(let owner) = memory {
      owners[ObjectIdentifier(owner), default: 0] += 1
      keptInFlight += cost
    }
    return true
  }

  /// Waits for every write in flight; the first that failed is thrown.
  func drain(fallback: ImageFile) throws {
    while !inFlight.isEmpty { try reap(waiting: true, fallback: fallback) }
  }

  private static func isRefusal(_ code: Int32) -> Bool {
    code == EINVAL || code == EOPNOTSUPP || code == ENOTSUP
  }

  /// Takes the finished writes (waiting for one when `waiting`). A refusal turns the lane
  /// off and a short write is finished: both by writing the bytes through `fallback`.
  private func reap(waiting: Bool, fallback: ImageFile) throws {
    var tags = [UInt64](repeating: 0, count: Self.slots)
    var results = [Int64](repeating: 0, count: Self.slots)
    let n = lacuna_ring_reap(ring, waiting ? 1 : 0, Int32(Self.slots), &tags, &results)
    guard n >= 0 else {
      throw ImageError.system(path: path, operation: "wait for direct writes", errno: errno)
    }
    var failure: ImageError?
    for i in 0..<Int(n) {
      guard let write = inFlight.removeValue(forKey: tags[i]) else { continue }
      // A write the ring handed to a kernel worker pins its pages only then, faulting
      // back in any the engine had dropped since: they are dropped again now.
      defer { if case .mapped(let mapping) = write.memory { mapping.release(write.bytes) } }
      switch write.memory {
      case .mapped:
        bytesInFlight -= write.bytes.count
      case .kept(let owner):
        let id = ObjectIdentifier(owner)
        if owners[id] == 1 {
          owners[id] = nil
          let cost = max((owner as? KeptMemory)?.keptBytes ?? write.bytes.count, write.bytes.count)
          bytesInFlight -= cost
          keptInFlight -= cost
        } else {
          owners[id]! -= 1
        }
      }
      let result = results[i]
      if result == Int64(write.bytes.count) { continue }
      if result >= 0 || Self.isRefusal(Int32(-result)) {
        if result < 0 { isOpen = false }
        let done = Int(max(result, 0))
        do {
          try fallback.write(UnsafeRawBufferPointer(rebasing: write.bytes[done...]), at: write.offset + Int64(done))
        } catch let error as ImageError {
          failure = failure ?? error
        }
        continue
      }
      failure =
        failure
        ?? ImageError.system(
          path: path, operation: "write \(write.bytes.count) bytes at \(hex(write.offset)) (direct)", errno: Int32(-result))
    }
    if let failure { throw failure }
  }
}

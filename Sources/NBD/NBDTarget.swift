import CLibNBD
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// An NBD export written in place, as `-n` writes a file: never resized, never renamed.
/// Writes go out with several requests in flight (each with its own copy of the bytes, in
/// buffers used again), over several connections when the server offers multi-conn; zero
/// ranges become NBD_CMD_WRITE_ZEROES (which the server may turn into trims), never written
/// zeros. Where the server offers fast zero, the whole export is zeroed with it before the
/// first write, and zero ranges after that cost nothing. An error names how far the disk
/// was written.
public final class NBDTarget: KeepingByteTarget {
  public let name: String
  /// The first connection: the export's facts, reads back, the flush.
  private let connection: NBDConnection
  /// Connections that requests go out on, in turn, each with the requests it has in flight.
  private var lanes: [Lane]
  private var nextLane = 0
  /// The export is taken to read as zeros from the start: `--target-is-zero`, or a writer
  /// that counts on a new file (the export is then zeroed before the first write).
  private let assumedZero: Bool
  /// True once the whole export was zeroed here: zero ranges past what was written since
  /// need no request.
  private var zeroedWhole = false
  /// Where writes ended, at most: zero ranges from here on read as zeros already once the
  /// whole export was zeroed.
  private var writtenEnd: Int64 = 0
  public var readsAsZero: Bool { assumedZero || zeroedWhole }
  /// The export is to be zeroed before the first request that changes it: with fast zero
  /// when the server offers it, and (`mustZero`) by plain write-zeroes if not.
  private var zeroPending = false
  private var mustZero = false
  /// The largest request that carries data, and the buffers of that size sent and done,
  /// kept for the next writes (a fresh buffer per request costs the kernel a page fault
  /// per 4 KiB).
  private let pieceSize: Int
  private var spareBuffers: [UnsafeMutableRawBufferPointer] = []
  /// Requests sent, in order: the oldest in flight over all connections is retired first.
  private var sequence = 0
  /// The callers' buffers requests in flight send from, with how many requests each, and
  /// the memory they and the copies hold (`maximumKeptBytes`).
  private var keptOwners: [ObjectIdentifier: Int] = [:]
  private var keptBytes = 0
  /// False skips the final flush (`-t unsafe`).
  public var synchronizes = true
  private var closed = false
  /// Per connection.
  static let maximumInFlight = 64
  /// Bytes in flight at most, over all connections. More did not go faster: writing W1 to
  /// qemu-nbd took 0.31-0.43 s with 16 MiB (4 MiB per connection) and 0.62-0.75 s with 64.
  static let maximumBytesInFlight = 16 << 20
  /// Memory the requests in flight keep alive, at most: their copies of the bytes, and the
  /// callers' buffers they send from (`KeptMemory`: a work unit's whole 2 MiB, of which
  /// at least half is data, or its data is copied). Counting only the data kept 31 units
  /// alive writing W1 (whose units are part data, part zeros) and peaked at 80 MiB.
  static let maximumKeptBytes = 16 << 20
  /// Connections at most, when the server offers multi-conn.
  static let maximumConnections = 4
  /// Data requests are cut to this size at most. Smaller requests let the server take in
  /// one while it writes another: W1 to qemu-nbd (4 connections, 4 MiB in flight on each)
  /// took 0.42-0.47 s with 256 KiB requests, 0.62-0.72 s with 1 MiB, in the same runs as
  /// nbdcopy's 0.53-0.56 s.
  static let largestPiece = 256 << 10

  /// One connection and the requests sent on it and not yet known done, oldest first, with
  /// the bytes they send.
  final class Lane {
    let connection: NBDConnection
    /// `buffer` is a copy of the bytes made here; `owner` keeps the caller's bytes alive.
    var pending:
      [(
        cookie: Int64, sequence: Int, buffer: UnsafeMutableRawBufferPointer?, owner: AnyObject?, bytes: Int,
        range: Range<Int64>
      )] = []
    var pendingBytes = 0
    init(_ connection: NBDConnection) { self.connection = connection }
    deinit { for request in pending { request.buffer?.deallocate() } }
  }

  /// Connects to `uri`; `targetIsZero` says the export reads as zeros already
  /// (`--target-is-zero`), so zero ranges are skipped.
  public init(uri: String, targetIsZero: Bool, timeoutMilliseconds: Int = NBD.defaultTimeoutMilliseconds) throws {
    name = uri
    connection = try NBDConnection(uri: uri, timeoutMilliseconds: timeoutMilliseconds)
    guard !connection.isReadOnly else {
      throw ImageError.usage(path: uri, "the export is read-only; nothing was written")
    }
    assumedZero = targetIsZero
    pieceSize = min(connection.maximumRequest, NBDTarget.largestPiece)
    // Zero ranges to make zero, on a server that can zero fast: one request for all of them.
    zeroPending = !targetIsZero && connection.canZero && connection.canFastZero
    lanes = [Lane(connection)]
    // With multi-conn, a flush on one connection covers what the others completed, so
    // writes may spread over several.
    if connection.canMultiConnect {
      for _ in 1..<NBDTarget.maximumConnections {
        lanes.append(Lane(try NBDConnection(uri: uri, timeoutMilliseconds: timeoutMilliseconds)))
      }
    }
  }

  /// Connects to `uri` to write an image whose writer counts on a new, empty file: the
  /// export is zeroed before the first write.
  public convenience init(uri: String, zeroingFirst: Void) throws {
    try self.init(uri: uri, targetIsZero: true)
    zeroPending = true
    mustZero = true
  }

  deinit {
    for buffer in spareBuffers { buffer.deallocate() }
  }

  public var isSequential: Bool { false }

  /// What an error adds: how much of the disk is known written (requests go out in disk
  /// order, so everything before the oldest one in flight is done).
  private var progress: String {
    let done = lanes.compactMap { $0.pending.first?.range.lowerBound }.min() ?? 0
    return "the export was written up to \(hex(done)) before this"
  }

  /// Sends one request on the next connection in turn: `start` issues it there.
  private func send(
    range: Range<Int64>, buffer: UnsafeMutableRawBufferPointer?, owner: AnyObject? = nil, bytes: Int = 0,
    what: @autoclosure () -> String,
    _ start: (OpaquePointer) -> Int64
  ) throws {
    let lane = lanes[nextLane]
    nextLane = (nextLane + 1) % lanes.count
    let cookie = start(lane.connection.handle)
    guard cookie != -1 else {
      if let buffer { giveBack(buffer) }
      throw ImageError.advised(lane.connection.failure(what()), advice: progress)
    }
    lane.pending.append((cookie, sequence, buffer, owner, bytes, range))
    sequence += 1
    lane.pendingBytes += bytes
    keep(buffer: buffer, owner: owner)
    // Move the connections along without waiting: send what the sockets take now, and take
    // in the replies that have come.
    try pump(timeout: 0)
    try retire(lane, keeping: NBDTarget.maximumInFlight, bytes: NBDTarget.maximumBytesInFlight / lanes.count)
    while keptBytes > NBDTarget.maximumKeptBytes,
      let oldest = lanes.filter({ !$0.pending.isEmpty }).min(by: { $0.pending[0].sequence < $1.pending[0].sequence })
    {
      try retire(oldest, keeping: oldest.pending.count - 1, bytes: Int.max)
    }
  }

  /// Counts the memory a request keeps: its copy, or its owner's buffer (once per owner).
  private func keep(buffer: UnsafeMutableRawBufferPointer?, owner: AnyObject?) {
    if let buffer { keptBytes += buffer.count }
    guard let owner else { return }
    let key = ObjectIdentifier(owner)
    let count = keptOwners[key, default: 0]
    if count == 0 { keptBytes += (owner as? KeptMemory)?.keptBytes ?? 0 }
    keptOwners[key] = count + 1
  }

  private func release(buffer: UnsafeMutableRawBufferPointer?, owner: AnyObject?) {
    if let buffer { keptBytes -= buffer.count }
    guard let owner else { return }
    let key = ObjectIdentifier(owner)
    let count = keptOwners[key, default: 1] - 1
    if count == 0 {
      keptOwners[key] = nil
      keptBytes -= (owner as? KeptMemory)?.keptBytes ?? 0
    } else {
      keptOwners[key] = count
    }
  }

  /// Waits for the oldest requests of `lane` until at most `count` (and `bytes` bytes) are
  /// in flight there.
  private func retire(_ lane: Lane, keeping count: Int, bytes: Int) throws {
    while let oldest = lane.pending.first, lane.pending.count > count || lane.pendingBytes > bytes {
      let what = oldest.buffer == nil && oldest.owner == nil ? "zero" : "write"
      let request = "\(what) \(oldest.range.count) bytes at \(hex(oldest.range.lowerBound))"
      let deadline = NBDConnection.now() + lane.connection.timeoutMilliseconds
      while true {
        let done = lacuna_nbd_aio_command_completed(lane.connection.handle, UInt64(oldest.cookie))
        if done == 1 { break }
        if done == -1 { throw ImageError.advised(lane.connection.failure(request), advice: progress) }
        let remaining = deadline - NBDConnection.now()
        guard remaining > 0 else {
          throw ImageError.advised(
            ImageError.invalid(
              path: name, "\(request): no answer from the server in \(lane.connection.timeoutMilliseconds / 1000) s"),
            advice: progress)
        }
        try pump(timeout: Int32(min(remaining, 1000)))
      }
      if let buffer = oldest.buffer { giveBack(buffer) }
      release(buffer: oldest.buffer, owner: oldest.owner)
      lane.pendingBytes -= oldest.bytes
      lane.pending.removeFirst()
    }
  }

  /// Moves every connection along at once: waits up to `timeout` milliseconds (0: not at
  /// all) until one of them can send or has a reply, then lets libnbd send and take in what
  /// it can on each. (Waiting on one connection alone would leave the others' requests
  /// unsent meanwhile.) A connection that fails is left for its requests to report.
  private func pump(timeout: Int32) throws {
    var fds = lanes.map { lane -> pollfd in
      let handle = lane.connection.handle
      guard lacuna_nbd_aio_is_dead(handle) == 0, lacuna_nbd_aio_is_closed(handle) == 0 else { return pollfd(fd: -1, events: 0, revents: 0) }
      let direction = lacuna_nbd_aio_get_direction(handle)
      var events: Int16 = 0
      if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
      if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
      return pollfd(fd: lacuna_nbd_aio_get_fd(handle), events: events, revents: 0)
    }
    guard poll(&fds, nfds_t(fds.count), timeout) > 0 else { return }
    for (lane, fd) in zip(lanes, fds) where fd.revents != 0 {
      if fd.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { _ = lacuna_nbd_aio_notify_read(lane.connection.handle) }
      if fd.revents & Int16(POLLOUT) != 0, lacuna_nbd_aio_is_dead(lane.connection.handle) == 0 {
        _ = lacuna_nbd_aio_notify_write(lane.connection.handle)
      }
    }
  }

  /// Waits until every request sent is done. A server may carry out requests in flight in
  /// any order, so requests that must not pass each other (the zeroing of the whole export
  /// and the data after it; everything before a read back or a flush) are separated so.
  private func retireAll() throws {
    for lane in lanes { try retire(lane, keeping: 0, bytes: 0) }
  }

  /// A buffer for a copy of `count` bytes: a spare one of `pieceSize` for a whole piece,
  /// one of just that size for less (a few KiB of data must not hold a whole piece).
  private func copyBuffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
    guard count == pieceSize else { return .allocate(byteCount: count, alignment: 64) }
    return spareBuffers.popLast() ?? .allocate(byteCount: pieceSize, alignment: 4096)
  }

  private func giveBack(_ buffer: UnsafeMutableRawBufferPointer) {
    if buffer.count == pieceSize { spareBuffers.append(buffer) } else { buffer.deallocate() }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try zeroIfPending()
    var done = 0
    writtenEnd = max(writtenEnd, offset + Int64(bytes.count))
    while done < bytes.count {
      let n = min(bytes.count - done, pieceSize)
      let buffer = copyBuffer(n)
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[done..<done + n]))
      let at = offset + Int64(done)
      try send(range: at..<at + Int64(n), buffer: buffer, bytes: n, what: "write \(n) bytes at \(hex(at))") {
        lacuna_nbd_aio_pwrite($0, buffer.baseAddress!, n, UInt64(at), nbd_completion_callback(), 0)
      }
      done += n
    }
  }

  /// Sends `bytes` straight from the caller's buffer, keeping `owner` (and so the buffer)
  /// until the server has answered: no copy.
  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject) throws {
    // Bytes that are a small part of their owner's buffer are copied: keeping a 2 MiB unit
    // alive for 64 KiB of data would let the requests in flight hold 32 times their bytes.
    if let kept = owner as? KeptMemory, keptOwners[ObjectIdentifier(owner)] == nil, bytes.count * 2 < kept.keptBytes {
      return try write(bytes, at: offset)
    }
    try zeroIfPending()
    writtenEnd = max(writtenEnd, offset + Int64(bytes.count))
    var done = 0
    while done < bytes.count {
      let n = min(bytes.count - done, pieceSize)
      let at = offset + Int64(done)
      let start = bytes.baseAddress! + done
      try send(range: at..<at + Int64(n), buffer: nil, owner: owner, bytes: n, what: "write \(n) bytes at \(hex(at))") {
        lacuna_nbd_aio_pwrite($0, UnsafeMutableRawPointer(mutating: start), n, UInt64(at), nbd_completion_callback(), 0)
      }
      done += n
    }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    try zeroIfPending()
    // Zeroed whole and not written there since: it reads as zeros.
    if zeroedWhole && range.lowerBound >= writtenEnd { return }
    try zeroRange(range)
  }

  private func zeroRange(_ range: Range<Int64>) throws {
    guard !range.isEmpty else { return }
    guard connection.canZero else { return try writeZeroBytes(range) }
    writtenEnd = max(writtenEnd, range.upperBound)
    var position = range.lowerBound
    while position < range.upperBound {
      let n = min(range.upperBound - position, 1 << 30)
      let at = position
      // Without NBD_CMD_FLAG_NO_HOLE the server may trim: the range reads as zeros and
      // takes no storage where the export can do that.
      try send(range: at..<at + n, buffer: nil, what: "zero \(n) bytes at \(hex(at))") {
        lacuna_nbd_aio_zero($0, UInt64(n), UInt64(at), nbd_completion_callback(), 0)
      }
      position += n
    }
  }

  /// Zeroes the whole export with fast-zero requests (NBD_CMD_FLAG_FAST_ZERO: the server
  /// does them at once, as a trim, or refuses at once). False when the server refused:
  /// then nothing is known of the export's content.
  private func fastZeroWhole() throws -> Bool {
    try retireAll()
    var cookies: [(cookie: Int64, at: Int64)] = []
    var position: Int64 = 0
    while position < connection.size {
      let n = min(connection.size - position, 1 << 30)
      let cookie = lacuna_nbd_aio_zero(
        connection.handle, UInt64(n), UInt64(position), nbd_completion_callback(), UInt32(LIBNBD_CMD_FLAG_FAST_ZERO))
      cookies.append((cookie, position))
      position += n
    }
    var refused = false
    for sent in cookies {
      let code = try connection.status(of: sent.cookie, "zero the export at \(hex(sent.at))")
      if code == ENOTSUP || code == EOPNOTSUPP {
        refused = true
      } else if code != 0 {
        throw ImageError.advised(connection.failure("zero the export at \(hex(sent.at))"), advice: progress)
      }
    }
    return !refused
  }

  /// Makes the whole export read as zeros (write-zeroes requests, which servers turn into
  /// trims where they can) before the first request that changes it, so the writer may
  /// count on what it never writes reading as zeros, as in a new file. Nothing is zeroed
  /// for a conversion that fails before it writes (a bad option, a source error). The
  /// zeroing is done before any data goes out, which it must not overtake.
  private func zeroIfPending() throws {
    guard zeroPending else { return }
    zeroPending = false
    if connection.canZero && connection.canFastZero, try fastZeroWhole() {
      zeroedWhole = true
      writtenEnd = 0
      return
    }
    guard mustZero else { return }
    try zeroRange(0..<connection.size)
    try retireAll()
    zeroedWhole = true
    writtenEnd = 0
  }

  public func punchHole(_ range: Range<Int64>) throws -> Bool {
    guard connection.canZero else { return false }
    try writeZeroes(range)
    return true
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    try retireAll()
    guard offset < connection.size else { return 0 }
    let n = Int(min(Int64(buffer.count), connection.size - offset))
    try connection.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
    return n
  }

  public func size() throws -> Int64 { connection.size }

  /// Never resizes: an export smaller than `size` is refused before anything is written;
  /// a larger one keeps its tail.
  public func truncate(to size: Int64) throws {
    guard connection.size >= size else {
      throw ImageError.usage(
        path: name, "the export is \(connection.size) bytes, smaller than the \(size) bytes of the disk; nothing was written")
    }
  }

  public func allocate(_ range: Range<Int64>) throws {}

  public func flush() throws {
    try zeroIfPending()
    try retireAll()
    guard lacuna_nbd_can_flush(connection.handle) == 1 else { return }
    let cookie = lacuna_nbd_aio_flush(connection.handle, nbd_completion_callback(), 0)
    try connection.wait(cookie, "flush")
  }

  public func commit() throws {
    guard !closed else { return }
    closed = true
    if synchronizes { try flush() } else { try retireAll() }
  }

  public func abandon() {
    closed = true
  }
}

/// NBD URIs as sources and destinations, for the Resolver and the conversion.
public struct NBDStorage: NetworkStorage {
  public init() {}
  public func handles(_ name: String) -> Bool { NBD.isURI(name) }
  public func openSource(_ name: String) throws -> ByteSource { try NBDSource(uri: name) }
  public func openTarget(_ name: String, targetIsZero: Bool, zeroFirst: Bool, synchronizes: Bool) throws -> ByteTarget {
    let target = zeroFirst && !targetIsZero
      ? try NBDTarget(uri: name, zeroingFirst: ()) : try NBDTarget(uri: name, targetIsZero: targetIsZero)
    target.synchronizes = synchronizes
    return target
  }
}

import CLibNBD
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// An NBD export written in place, as `-n` writes a file: never resized, never renamed.
/// Writes go out with several requests in flight (each with its own copy of the bytes), over
/// several connections when the server offers multi-conn; zero ranges become
/// NBD_CMD_WRITE_ZEROES (which the server may turn into trims), never written zeros. An
/// error names how far the disk was written.
public final class NBDTarget: ByteTarget {
  public let name: String
  /// The first connection: the export's facts, reads back, the flush.
  private let connection: NBDConnection
  /// Connections that requests go out on, in turn, each with the requests it has in flight.
  private var lanes: [Lane]
  private var nextLane = 0
  public let readsAsZero: Bool
  /// The export is to be zeroed before the first request that changes it (`zeroFirst`).
  private var zeroPending = false
  /// False skips the final flush (`-t unsafe`).
  public var synchronizes = true
  private var closed = false
  /// Per connection.
  static let maximumInFlight = 16
  static let maximumBytesInFlight = 16 << 20
  /// Connections at most, when the server offers multi-conn.
  static let maximumConnections = 4

  /// One connection and the requests sent on it and not yet known done, oldest first, with
  /// the bytes they send.
  final class Lane {
    let connection: NBDConnection
    var pending: [(cookie: Int64, buffer: UnsafeMutableRawBufferPointer?, range: Range<Int64>)] = []
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
    readsAsZero = targetIsZero
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
    range: Range<Int64>, buffer: UnsafeMutableRawBufferPointer?, what: @autoclosure () -> String,
    _ start: (OpaquePointer) -> Int64
  ) throws {
    let lane = lanes[nextLane]
    nextLane = (nextLane + 1) % lanes.count
    let cookie = start(lane.connection.handle)
    guard cookie != -1 else {
      buffer?.deallocate()
      throw ImageError.advised(lane.connection.failure(what()), advice: progress)
    }
    lane.pending.append((cookie, buffer, range))
    lane.pendingBytes += buffer?.count ?? 0
    // Move the connection along without waiting: send what the socket takes now, and take
    // in the replies that have come.
    while nbd_aio_in_flight(lane.connection.handle) > 0, nbd_poll(lane.connection.handle, 0) == 1 {}
    try retire(lane, keeping: NBDTarget.maximumInFlight, bytes: NBDTarget.maximumBytesInFlight)
  }

  /// Waits for the oldest requests of `lane` until at most `count` (and `bytes` bytes) are
  /// in flight there.
  private func retire(_ lane: Lane, keeping count: Int, bytes: Int) throws {
    while let oldest = lane.pending.first, lane.pending.count > count || lane.pendingBytes > bytes {
      do {
        try lane.connection.wait(oldest.cookie, "write \(oldest.range.count) bytes at \(hex(oldest.range.lowerBound))")
      } catch let error as ImageError {
        throw ImageError.advised(error, advice: progress)
      }
      oldest.buffer?.deallocate()
      lane.pendingBytes -= oldest.buffer?.count ?? 0
      lane.pending.removeFirst()
    }
  }

  /// Waits until every request sent is done. A server may carry out requests in flight in
  /// any order, so requests that must not pass each other (the zeroing of the whole export
  /// and the data after it; everything before a read back or a flush) are separated so.
  private func retireAll() throws {
    for lane in lanes { try retire(lane, keeping: 0, bytes: 0) }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try zeroIfPending()
    var done = 0
    while done < bytes.count {
      let n = min(bytes.count - done, connection.maximumRequest)
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 4096)
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[done..<done + n]))
      let at = offset + Int64(done)
      try send(range: at..<at + Int64(n), buffer: buffer, what: "write \(n) bytes at \(hex(at))") {
        nbd_aio_pwrite($0, buffer.baseAddress!, n, UInt64(at), nbd_completion_callback(), 0)
      }
      done += n
    }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    try zeroIfPending()
    try zeroRange(range)
  }

  private func zeroRange(_ range: Range<Int64>) throws {
    guard !range.isEmpty else { return }
    guard connection.canZero else { return try writeZeroBytes(range) }
    var position = range.lowerBound
    while position < range.upperBound {
      let n = min(range.upperBound - position, 1 << 30)
      let at = position
      // Without NBD_CMD_FLAG_NO_HOLE the server may trim: the range reads as zeros and
      // takes no storage where the export can do that.
      try send(range: at..<at + n, buffer: nil, what: "zero \(n) bytes at \(hex(at))") {
        nbd_aio_zero($0, UInt64(n), UInt64(at), nbd_completion_callback(), 0)
      }
      position += n
    }
  }

  /// Makes the whole export read as zeros (write-zeroes requests, which servers turn into
  /// trims where they can) before the first request that changes it, so the writer may
  /// count on what it never writes reading as zeros, as in a new file. Nothing is zeroed
  /// for a conversion that fails before it writes (a bad option, a source error). The
  /// zeroing is done before any data goes out, which it must not overtake.
  private func zeroIfPending() throws {
    guard zeroPending else { return }
    zeroPending = false
    try zeroRange(0..<connection.size)
    try retireAll()
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
    guard nbd_can_flush(connection.handle) == 1 else { return }
    let cookie = nbd_aio_flush(connection.handle, nbd_completion_callback(), 0)
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

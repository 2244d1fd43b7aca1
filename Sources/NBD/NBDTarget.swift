import CLibNBD
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// An NBD export written in place, as `-n` writes a file: never resized, never renamed.
/// Writes go out with several requests in flight (each with its own copy of the bytes);
/// zero ranges become NBD_CMD_WRITE_ZEROES (which the server may turn into trims), never
/// written zeros. An error names how far the disk was written.
public final class NBDTarget: ByteTarget {
  public let name: String
  private let connection: NBDConnection
  public let readsAsZero: Bool
  /// The export is to be zeroed before the first request that changes it (`zeroFirst`).
  private var zeroPending = false
  /// False skips the final flush (`-t unsafe`).
  public var synchronizes = true
  /// Requests sent and not yet known done, oldest first, with the bytes they send.
  private var pending: [(cookie: Int64, buffer: UnsafeMutableRawBufferPointer?, range: Range<Int64>)] = []
  private var pendingBytes = 0
  private var closed = false
  static let maximumInFlight = 16
  static let maximumBytesInFlight = 64 << 20

  /// Connects to `uri`; `targetIsZero` says the export reads as zeros already
  /// (`--target-is-zero`), so zero ranges are skipped.
  public init(uri: String, targetIsZero: Bool, timeoutMilliseconds: Int = NBD.defaultTimeoutMilliseconds) throws {
    name = uri
    connection = try NBDConnection(uri: uri, timeoutMilliseconds: timeoutMilliseconds)
    guard !connection.isReadOnly else {
      throw ImageError.usage(path: uri, "the export is read-only; nothing was written")
    }
    readsAsZero = targetIsZero
  }

  /// Connects to `uri` to write an image whose writer counts on a new, empty file: the
  /// export is zeroed before the first write.
  public convenience init(uri: String, zeroingFirst: Void) throws {
    try self.init(uri: uri, targetIsZero: true)
    zeroPending = true
  }

  deinit {
    for request in pending { request.buffer?.deallocate() }
  }

  public var isSequential: Bool { false }

  /// What an error adds: how much of the disk is known written.
  private var progress: String {
    let done = pending.first?.range.lowerBound ?? 0
    return "the export was written up to \(hex(done)) before this"
  }

  /// Sends one request and keeps it until it is known done.
  private func send(_ cookie: Int64, buffer: UnsafeMutableRawBufferPointer?, range: Range<Int64>, what: String) throws {
    guard cookie != -1 else {
      buffer?.deallocate()
      throw ImageError.advised(connection.failure(what), advice: progress)
    }
    pending.append((cookie, buffer, range))
    pendingBytes += buffer?.count ?? 0
    // Move the connection along without waiting: send what the socket takes now, and take
    // in the replies that have come.
    while nbd_aio_in_flight(connection.handle) > 0, nbd_poll(connection.handle, 0) == 1 {}
    try retire(keeping: NBDTarget.maximumInFlight, bytes: NBDTarget.maximumBytesInFlight)
  }

  /// Waits for the oldest requests until at most `count` (and `bytes` bytes) are in flight.
  private func retire(keeping count: Int, bytes: Int) throws {
    while let oldest = pending.first, pending.count > count || pendingBytes > bytes {
      do {
        try connection.wait(oldest.cookie, "write \(oldest.range.count) bytes at \(hex(oldest.range.lowerBound))")
      } catch let error as ImageError {
        throw ImageError.advised(error, advice: progress)
      }
      oldest.buffer?.deallocate()
      pendingBytes -= oldest.buffer?.count ?? 0
      pending.removeFirst()
    }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try zeroIfPending()
    var done = 0
    while done < bytes.count {
      let n = min(bytes.count - done, connection.maximumRequest)
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 4096)
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[done..<done + n]))
      let at = offset + Int64(done)
      let cookie = nbd_aio_pwrite(connection.handle, buffer.baseAddress!, n, UInt64(at), nbd_completion_callback(), 0)
      try send(cookie, buffer: buffer, range: at..<at + Int64(n), what: "write \(n) bytes at \(hex(at))")
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
      // Without NBD_CMD_FLAG_NO_HOLE the server may trim: the range reads as zeros and
      // takes no storage where the export can do that.
      let cookie = nbd_aio_zero(connection.handle, UInt64(n), UInt64(position), nbd_completion_callback(), 0)
      try send(cookie, buffer: nil, range: position..<position + n, what: "zero \(n) bytes at \(hex(position))")
      position += n
    }
  }

  /// Makes the whole export read as zeros (write-zeroes requests, which servers turn into
  /// trims where they can) before the first request that changes it, so the writer may
  /// count on what it never writes reading as zeros, as in a new file. Nothing is zeroed
  /// for a conversion that fails before it writes (a bad option, a source error).
  private func zeroIfPending() throws {
    guard zeroPending else { return }
    zeroPending = false
    try zeroRange(0..<connection.size)
  }

  public func punchHole(_ range: Range<Int64>) throws -> Bool {
    guard connection.canZero else { return false }
    try writeZeroes(range)
    return true
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    try retire(keeping: 0, bytes: 0)
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
    try retire(keeping: 0, bytes: 0)
    guard nbd_can_flush(connection.handle) == 1 else { return }
    let cookie = nbd_aio_flush(connection.handle, nbd_completion_callback(), 0)
    try connection.wait(cookie, "flush")
  }

  public func commit() throws {
    guard !closed else { return }
    closed = true
    if synchronizes { try flush() } else { try retire(keeping: 0, bytes: 0) }
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

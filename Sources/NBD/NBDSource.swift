import CLibNBD
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// An NBD export read as a byte source: a disk image served by qemu-nbd, nbdkit or any
/// NBD server, read through libnbd. Holes and zeros come from the server's block status
/// (`base:allocation`), so the engine never reads what the export does not hold; where the
/// server answers `qemu:allocation-depth` too (qemu-nbd -A), the ranges no layer of its
/// backing chain holds are reported absent (`map` says "present": false there).
///
/// Safe from several threads: each read takes a connection of its own from a small pool.
/// When the server offers multi-conn, the pool grows to `connections`; otherwise there is
/// one connection and reads take turns on it.
public final class NBDSource: ByteSource, @unchecked Sendable {
  public let name: String
  private let exportSize: Int64
  private let hasAllocation: Bool
  private let hasDepth: Bool
  private let limit: Int
  private let timeoutMilliseconds: Int
  private let lock = Lock()
  private var idle: [NBDConnection]
  private var opened = 1

  /// Connects to `uri` (nbd://, nbds://, nbd+unix://, nbds+unix://).
  public init(uri: String, connections: Int = 4, timeoutMilliseconds: Int = NBD.defaultTimeoutMilliseconds) throws {
    name = uri
    self.timeoutMilliseconds = timeoutMilliseconds
    let first = try NBDConnection(uri: uri, timeoutMilliseconds: timeoutMilliseconds)
    exportSize = first.size
    hasAllocation = first.hasAllocation
    hasDepth = first.hasDepth
    limit = first.canMultiConnect ? max(1, connections) : 1
    idle = [first]
  }

  /// Runs `body` with a connection no other thread is using.
  private func withConnection<T>(_ body: (NBDConnection) throws -> T) throws -> T {
    var connection: NBDConnection?
    var open = false
    lock.withLock {
      while idle.isEmpty && opened >= limit { lock.wait() }
      if let last = idle.popLast() { connection = last } else { opened += 1; open = true }
    }
    if open {
      do {
        connection = try NBDConnection(uri: name, timeoutMilliseconds: timeoutMilliseconds)
      } catch {
        lock.withLock { opened -= 1; lock.signal() }
        throw error
      }
    }
    defer { lock.withLock { idle.append(connection!); lock.signal() } }
    return try body(connection!)
  }

  public func size() throws -> Int64 { exportSize }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    guard offset < exportSize, buffer.count > 0 else { return 0 }
    let n = Int(min(Int64(buffer.count), exportSize - offset))
    try withConnection { try $0.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset) }
    return n
  }

  /// The parts of `range` the export holds as data: everything but what block status calls
  /// a hole or zeros. Nil when the server does not answer block status.
  public func dataRanges(in range: Range<Int64>) throws -> [Range<Int64>]? {
    guard hasAllocation else { return nil }
    let hole = UInt32(LIBNBD_STATE_HOLE) | UInt32(LIBNBD_STATE_ZERO)
    return try ranges(in: range, context: "base:allocation") { $0 & hole == 0 }
  }

  /// The parts of `range` that no layer of the server's backing chain holds
  /// (`qemu:allocation-depth` 0, from qemu-nbd -A). Nil when the server does not say.
  public func absentRanges(in range: Range<Int64>) throws -> [Range<Int64>]? {
    guard hasDepth else { return nil }
    return try ranges(in: range, context: NBDConnection.depthContext) { $0 == 0 }
  }

  /// The parts of `range` whose block status in `context` passes `test`, touching parts
  /// merged.
  private func ranges(
    in range: Range<Int64>, context: String, where test: (UInt32) -> Bool
  ) throws -> [Range<Int64>] {
    let range = range.clamped(to: 0..<exportSize)
    var result: [Range<Int64>] = []
    var position = range.lowerBound
    while position < range.upperBound {
      let runs = try withConnection { try $0.blockStatus(position..<range.upperBound, context: context) }
      guard !runs.isEmpty else {
        throw ImageError.invalid(path: name, "the server answered no \(context) status at \(hex(position))")
      }
      for run in runs where position < range.upperBound {
        guard run.length > 0 else {
          throw ImageError.invalid(path: name, "the server answered an empty \(context) run at \(hex(position))")
        }
        let end = min(position + run.length, range.upperBound)
        if test(run.flags) {
          if let last = result.last, last.upperBound == position {
            result[result.count - 1] = last.lowerBound..<end
          } else {
            result.append(position..<end)
          }
        }
        position = end
      }
    }
    return result
  }
}

/// NBD URIs, as qemu-img, nbdcopy and libnbd take them.
public enum NBD {
  /// How long lacuna waits for a server to connect or to answer one request, unless
  /// `LACUNA_NBD_TIMEOUT` (seconds) says otherwise.
  public static var defaultTimeoutMilliseconds: Int {
    if let text = getenv("LACUNA_NBD_TIMEOUT").map({ String(cString: $0) }), let seconds = Double(text), seconds > 0 {
      return Int(seconds * 1000)
    }
    return 60_000
  }

  /// The schemes libnbd connects to.
  public static let schemes = ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"]

  /// True when `name` is an NBD URI rather than a path.
  public static func isURI(_ name: String) -> Bool {
    schemes.contains { name.hasPrefix($0) }
  }
}

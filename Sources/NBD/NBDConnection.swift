import CLibNBD
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// One connection to an NBD server through libnbd. Every step (connecting, each request)
/// waits at most `timeout`: a server that stops answering is an error, never a hang.
/// Not safe from several threads at once; `NBDSource` and `NBDTarget` keep one per thread
/// that works at once, or guard one with a lock.
final class NBDConnection {
  let handle: OpaquePointer
  /// The URI as the user gave it, for errors.
  let uri: String
  let timeoutMilliseconds: Int
  /// The export's size in bytes.
  let size: Int64
  /// The largest request the server takes (its advertised maximum block size, or libnbd's
  /// 32 MiB when it advertises none).
  let maximumRequest: Int
  let canZero: Bool
  let canFastZero: Bool
  let canMultiConnect: Bool
  let isReadOnly: Bool
  /// True when the server answers `base:allocation` block status.
  let hasAllocation: Bool
  /// True when the server answers `qemu:allocation-depth` (qemu-nbd -A): where in its
  /// backing chain each range lies, 0 for none.
  let hasDepth: Bool

  init(uri: String, timeoutMilliseconds: Int) throws {
    try NBDLibrary.load(for: uri)
    guard let handle = lacuna_nbd_create() else { throw NBDConnection.lastError(uri, "cannot start libnbd") }
    self.handle = handle
    self.uri = uri
    self.timeoutMilliseconds = timeoutMilliseconds
    do {
      guard lacuna_nbd_add_meta_context(handle, "base:allocation") != -1,
        lacuna_nbd_add_meta_context(handle, NBDConnection.depthContext) != -1
      else {
        throw NBDConnection.lastError(uri, "cannot ask for block status")
      }
      // The user wrote the URI: files it names (tls-psk-file, tls-certificates) are theirs to
      // name, as on qemu-img's and nbdcopy's command lines.
      _ = lacuna_nbd_set_uri_allow_local_file(handle, true)
      guard lacuna_nbd_aio_connect_uri(handle, uri) != -1 else { throw NBDConnection.lastError(uri, "cannot connect") }
      let deadline = NBDConnection.now() + timeoutMilliseconds
      while lacuna_nbd_aio_is_connecting(handle) != 0 {
        let remaining = deadline - NBDConnection.now()
        guard remaining > 0 else {
          throw ImageError.invalid(path: uri, "cannot connect: no answer from the server in \(timeoutMilliseconds / 1000) s")
        }
        guard lacuna_nbd_poll(handle, Int32(remaining)) != -1 else { throw NBDConnection.lastError(uri, "cannot connect") }
      }
      guard lacuna_nbd_aio_is_ready(handle) != 0 else { throw NBDConnection.lastError(uri, "cannot connect") }
      size = lacuna_nbd_get_size(handle)
      guard size >= 0 else { throw NBDConnection.lastError(uri, "cannot get the export's size") }
      let maximum = lacuna_nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MAXIMUM))
      maximumRequest = maximum > 0 ? Int(min(maximum, 32 << 20)) : 32 << 20
      canZero = lacuna_nbd_can_zero(handle) == 1
      canFastZero = lacuna_nbd_can_fast_zero(handle) == 1
      canMultiConnect = lacuna_nbd_can_multi_conn(handle) == 1
      isReadOnly = lacuna_nbd_is_read_only(handle) == 1
      hasAllocation = lacuna_nbd_can_meta_context(handle, "base:allocation") == 1
      hasDepth = lacuna_nbd_can_meta_context(handle, NBDConnection.depthContext) == 1
    } catch {
      lacuna_nbd_close(handle)
      throw error
    }
  }

  static let depthContext = "qemu:allocation-depth"

  deinit {
    if lacuna_nbd_aio_is_ready(handle) != 0 { _ = lacuna_nbd_shutdown(handle, 0) }
    lacuna_nbd_close(handle)
  }

  /// Milliseconds on a clock that only goes forward.
  static func now() -> Int {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return time.tv_sec * 1000 + time.tv_nsec / 1_000_000
  }

  /// libnbd's last error on this thread, as one line naming the URI: "URI: WHAT: why".
  static func lastError(_ uri: String, _ what: String) -> ImageError {
    var message = lacuna_nbd_get_error().map { String(cString: $0) } ?? "unknown error"
    // libnbd prefixes the function ("nbd_aio_connect_uri: connect: ..."); the user gave no
    // such call.
    if message.hasPrefix("nbd_"), let colon = message.firstIndex(of: ":") {
      message = String(message[message.index(after: colon)...].drop { $0 == " " })
    }
    return ImageError.invalid(path: uri, "\(what): \(message)")
  }

  /// The last error, said plainly when it is that the connection is gone (libnbd then says
  /// "invalid state: DEAD").
  func failure(_ what: String) -> ImageError {
    if lacuna_nbd_aio_is_dead(handle) != 0 || lacuna_nbd_aio_is_closed(handle) != 0 {
      return ImageError.invalid(path: uri, "\(what): the connection to the server was lost")
    }
    return NBDConnection.lastError(uri, what)
  }

  /// Waits until the request `cookie` (from an `nbd_aio_*` call) is done; a failed request,
  /// a dead connection or no answer in time is an error saying `what` was asked.
  func wait(_ cookie: Int64, _ what: @autoclosure () -> String) throws {
    guard try status(of: cookie, what()) == 0 else { throw failure(what()) }
  }

  /// Waits until the request `cookie` is done and returns 0, or the errno the server
  /// answered it with (ENOTSUP for a fast zero it cannot do fast). A dead connection or no
  /// answer in time is an error saying `what` was asked.
  func status(of cookie: Int64, _ what: @autoclosure () -> String) throws -> Int32 {
    guard cookie != -1 else { throw failure(what()) }
    let deadline = NBDConnection.now() + timeoutMilliseconds
    while true {
      switch lacuna_nbd_aio_command_completed(handle, UInt64(cookie)) {
      case 1: return 0
      case -1:
        let code = lacuna_nbd_get_errno()
        guard code != 0, lacuna_nbd_aio_is_dead(handle) == 0, lacuna_nbd_aio_is_closed(handle) == 0 else { throw failure(what()) }
        return code
      default: break
      }
      let remaining = deadline - NBDConnection.now()
      guard remaining > 0 else {
        throw ImageError.invalid(path: uri, "\(what()): no answer from the server in \(timeoutMilliseconds / 1000) s")
      }
      guard lacuna_nbd_poll(handle, Int32(remaining)) != -1 else { throw failure(what()) }
    }
  }

  /// Waits until at most `count` requests are in flight (retiring the ones that are done).
  func drain(to count: Int, _ what: @autoclosure () -> String) throws {
    let deadline = NBDConnection.now() + timeoutMilliseconds
    while lacuna_nbd_aio_in_flight(handle) > count {
      let remaining = deadline - NBDConnection.now()
      guard remaining > 0 else {
        throw ImageError.invalid(path: uri, "\(what()): no answer from the server in \(timeoutMilliseconds / 1000) s")
      }
      guard lacuna_nbd_poll(handle, Int32(remaining)) != -1 else { throw failure(what()) }
    }
  }

  /// Reads `buffer.count` bytes at `offset`: a large read goes out as several requests at
  /// once (each within the server's maximum), so the server works on them together.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    let piece = min(maximumRequest, max(256 << 10, buffer.count / 4))
    var cookies: [(cookie: Int64, at: Int64, count: Int)] = []
    var done = 0
    while done < buffer.count {
      let n = min(buffer.count - done, piece)
      let at = offset + Int64(done)
      let cookie = lacuna_nbd_aio_pread(handle, buffer.baseAddress! + done, n, UInt64(at), nbd_completion_callback(), 0)
      if cookie == -1 {
        // Let the requests already sent finish before the buffer they fill goes away.
        for sent in cookies { try? wait(sent.cookie, "read") }
        throw failure("read \(n) bytes at \(hex(at))")
      }
      cookies.append((cookie, at, n))
      done += n
    }
    var failure: Error?
    for sent in cookies {
      do { try wait(sent.cookie, "read \(sent.count) bytes at \(hex(sent.at))") } catch { if failure == nil { failure = error } }
    }
    if let failure { throw failure }
  }

  /// The export's allocation in `range`: runs of (length, flags), flags holding
  /// LIBNBD_STATE_HOLE and LIBNBD_STATE_ZERO for `base:allocation`, or the depth for
  /// `qemu:allocation-depth`. Covers at least part of the range.
  func blockStatus(_ range: Range<Int64>, context: String = "base:allocation") throws -> [(length: Int64, flags: UInt32)] {
    final class Box {
      let context: String
      var runs: [(length: Int64, flags: UInt32)] = []
      init(_ context: String) { self.context = context }
    }
    let box = Box(context)
    let callback: @convention(c) (
      UnsafeMutableRawPointer?, UnsafePointer<CChar>?, UInt64, UnsafeMutablePointer<UInt32>?, Int,
      UnsafeMutablePointer<Int32>?
    ) -> Int32 = { user, context, _, entries, count, _ in
      guard let user, let context, let entries else { return 0 }
      let box = Unmanaged<Box>.fromOpaque(user).takeUnretainedValue()
      guard String(cString: context) == box.context else { return 0 }
      var i = 0
      while i + 1 < count {
        box.runs.append((Int64(entries[i]), entries[i + 1]))
        i += 2
      }
      return 0
    }
    // A request covers at most 2 GiB (the protocol's counts are 32 bits).
    let length = UInt64(min(range.count, 1 << 31))
    let cookie = withExtendedLifetime(box) {
      lacuna_nbd_aio_block_status(
        handle, length, UInt64(range.lowerBound),
        nbd_extent_callback(callback: callback, user_data: Unmanaged.passUnretained(box).toOpaque(), free: nil),
        nbd_completion_callback(), 0)
    }
    try withExtendedLifetime(box) { try wait(cookie, "get the allocation at \(hex(range.lowerBound))") }
    return box.runs
  }
}

/// libnbd, loaded on first use (not linked: see CLibNBD.h).
public enum NBDLibrary {
  /// Loads libnbd for a connection to `uri`; throws, naming the URI and what is missing,
  /// where it cannot be loaded.
  static func load(for uri: String) throws {
    guard lacuna_nbd_load() == 0 else {
      let why = lacuna_nbd_load_error().map { String(cString: $0) } ?? "libnbd.so.0: cannot load"
      throw ImageError.unsupported(path: uri, "NBD needs libnbd, which cannot be loaded (\(why)): install Debian's libnbd0")
    }
  }

  /// libnbd's version at run time (e.g. "1.14.2"), or nil if it cannot be loaded or cannot
  /// make a handle.
  public static var version: String? {
    guard lacuna_nbd_load() == 0, let handle = lacuna_nbd_create() else { return nil }
    defer { lacuna_nbd_close(handle) }
    guard let text = lacuna_nbd_get_version(handle) else { return nil }
    return String(cString: text)
  }
}

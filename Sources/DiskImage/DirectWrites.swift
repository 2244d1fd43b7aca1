import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// A second way for checked source bytes to reach an ext4 output, beside the writing
/// thread's buffered writes: straight from the source's page cache to the disk (O_DIRECT,
/// submitted by kernel AIO, so the writing thread does not wait for the disk).
///
/// A buffered write copies every byte into a new page of the output's page cache, and
/// that copy is the whole cost of a conversion where nothing can be shared: 1 GiB takes
/// 0.24–0.30 s on these machines, three times a memcpy. A direct write copies nothing;
/// the device reads the pinned source pages itself. While a few direct writes are in
/// flight, the writing thread copies the other chunks, so the two share the work in
/// proportion to their speeds: about a third goes direct on a virtio disk that writes
/// 1.8 GB/s, and on a slow disk the lane is full most of the time and the writing thread
/// copies almost everything, as before.
///
/// Only chunks whose memory is a file mapping are handed over (the engine's mapping of the
/// source): a buffer is reused after its unit is written, while a direct write may still
/// be reading it. The memory, the offset and the length are 4 KiB-aligned; the writer
/// writes the unaligned edges itself. The output's own page cache never holds the chunks
/// sent here (each output byte is written once), so the two ways never meet in a page.
final class DirectLane {
  let path: String
  private let descriptor: Int32
  private let context: UInt64
  /// What is in flight, by tag: where it goes and the memory it comes from (still mapped,
  /// to write again should the kernel refuse or write less).
  private var inFlight: [UInt64: (offset: Int64, bytes: UnsafeRawBufferPointer)] = [:]
  private var bytesInFlight = 0
  private var nextTag: UInt64 = 0
  /// False once the file system refused a direct write: everything is written buffered.
  private(set) var isOpen = true

  /// Alignment of memory, offset and length (the page size, a multiple of every logical
  /// block size and of ext4's block).
  static let alignment = 4096
  /// At most this many bytes in flight: enough to keep the disk busy while the writing
  /// thread copies, and a short wait at the end.
  static let limit = 4 << 20
  /// The largest single direct write.
  static let chunk = 1 << 20

  /// Nil where the file cannot be opened for direct I/O or kernel AIO is unavailable.
  init?(destination: ImageFile) {
    let direct = lacuna_open_direct(destination.descriptor)
    guard direct >= 0 else { return nil }
    var context: UInt64 = 0
    guard lacuna_aio_setup(64, &context) == 0 else {
      Glibc.close(direct)
      return nil
    }
    path = destination.path
    descriptor = direct
    self.context = context
  }

  deinit {
    lacuna_aio_destroy(context)
    Glibc.close(descriptor)
  }

  /// Sends `bytes` (mapped memory, aligned, at most `chunk`) to `offset` when there is room
  /// in flight; false when there is not (the caller writes them itself).
  func send(_ bytes: UnsafeRawBufferPointer, at offset: Int64, fallback: ImageFile) throws -> Bool {
    guard isOpen else { return false }
    if bytesInFlight + bytes.count > Self.limit { try reap(waiting: false, fallback: fallback) }
    guard isOpen, bytesInFlight + bytes.count <= Self.limit else { return false }
    let tag = nextTag
    nextTag &+= 1
    if lacuna_aio_write(context, descriptor, bytes.baseAddress, Int64(bytes.count), offset, tag) != 0 {
      let code = errno
      if code == EAGAIN { return false }
      if Self.isRefusal(code) {
        isOpen = false
        return false
      }
      throw ImageError.system(path: path, operation: "write \(bytes.count) bytes at \(hex(offset)) (direct)", errno: code)
    }
    inFlight[tag] = (offset, bytes)
    bytesInFlight += bytes.count
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
    var tags = [UInt64](repeating: 0, count: 64)
    var results = [Int64](repeating: 0, count: 64)
    let n = lacuna_aio_reap(context, waiting ? 1 : 0, 64, &tags, &results)
    guard n >= 0 else {
      throw ImageError.system(path: path, operation: "wait for direct writes", errno: errno)
    }
    var failure: ImageError?
    for i in 0..<Int(n) {
      guard let write = inFlight.removeValue(forKey: tags[i]) else { continue }
      bytesInFlight -= write.bytes.count
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

import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// An open file of an image, read-only or writable, addressed by absolute offsets.
/// Safe to use from several threads at once: every call is a positioned system call.
public final class ImageFile: ByteSource, @unchecked Sendable {
  /// The path as the user or the referring image gave it; used in every error.
  public let path: String
  public var name: String { path }
  public let descriptor: Int32
  public let writable: Bool
  /// True for a block device: its size comes from the device (`BLKGETSIZE64`), not from
  /// `st_size`, which is 0.
  public let isBlockDevice: Bool
  private var closed = false

  private init(path: String, descriptor: Int32, writable: Bool, isBlockDevice: Bool = false) {
    self.path = path
    self.descriptor = descriptor
    self.writable = writable
    self.isBlockDevice = isBlockDevice
  }

  deinit { close() }

  /// Opens an existing regular file or block device read-only. Inputs are never opened for
  /// writing. Anything else (a directory, a FIFO, a socket, a character device such as
  /// /dev/null or /dev/zero) is refused at once: its size says nothing of a disk, and
  /// opening a FIFO would wait for a writer forever.
  ///
  /// The corresponding C function is `open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)`, then
  /// `fstat`; O_NONBLOCK, which keeps `open` from waiting on a FIFO, is cleared afterwards.
  public static func openForReading(_ path: String) throws -> ImageFile {
    try openExisting(path, writable: false)
  }

  /// Opens an existing regular file or block device to write into it in place (`-n`, a
  /// device as the destination); the same refusals as `openForReading`.
  public static func openForWritingInPlace(_ path: String) throws -> ImageFile {
    try openExisting(path, writable: true)
  }

  private static func openExisting(_ path: String, writable: Bool) throws -> ImageFile {
    let fd = retryingOnInterrupt { open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK) }
    guard fd >= 0 else { throw ImageError.system(path: path, operation: "open", errno: errno) }
    var info = stat()
    guard fstat(fd, &info) == 0 else {
      let code = errno
      Glibc.close(fd)
      throw ImageError.system(path: path, operation: "stat", errno: code)
    }
    let type = info.st_mode & S_IFMT
    guard type == S_IFREG || type == S_IFBLK else {
      Glibc.close(fd)
      throw ImageError.usage(path: path, "is \(describeFileType(type)), not an image (lacuna reads regular files and block devices)")
    }
    let flags = fcntl(fd, F_GETFL)
    if flags >= 0 { _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
    return ImageFile(path: path, descriptor: fd, writable: writable, isBlockDevice: type == S_IFBLK)
  }

  /// Wraps a descriptor opened for writing (by `OutputFile`).
  public static func adoptWritable(descriptor: Int32, path: String) -> ImageFile {
    ImageFile(path: path, descriptor: descriptor, writable: true)
  }

  /// Closes the descriptor; later calls fail with EBADF. Safe to call twice.
  public func close() {
    guard !closed else { return }
    closed = true
    _ = Glibc.close(descriptor)
  }

  /// Closes the descriptor and reports a failure (on some file systems the last write
  /// error shows only here).
  public func closeChecked() throws {
    guard !closed else { return }
    closed = true
    if Glibc.close(descriptor) != 0 {
      throw ImageError.system(path: path, operation: "close", errno: errno)
    }
  }

  /// The file's metadata. The corresponding C function is `fstat`.
  public func status() throws -> stat {
    var info = stat()
    guard fstat(descriptor, &info) == 0 else {
      throw ImageError.system(path: path, operation: "stat", errno: errno)
    }
    return info
  }

  /// What the file is opened for, in qemu's terms, for `lock(for:)`.
  public enum Use {
    /// Read, and let nobody write or resize meanwhile (what `qemu-img convert` takes of
    /// its source).
    case reading
    /// Read and write in place, and let nobody else write or resize meanwhile.
    case writingInPlace
  }

  /// Takes the byte-range locks qemu takes on image files, so lacuna and qemu see each
  /// other: a file a running VM is writing is refused ("in use"), and while lacuna holds
  /// it, qemu cannot start writing it. The locks last as long as the descriptor. Where the
  /// file system has no such locks, nothing is taken and nothing is refused.
  public func lock(for use: Use) throws {
    let (held, unshared): (UInt32, UInt32) =
      switch use {
      case .reading: (0b0001, 0b1010)
      case .writingInPlace: (0b0011, 0b1010)
      }
    let result = lacuna_lock_image(descriptor, held, unshared)
    if result == 1 {
      throw ImageError.unsupported(
        path: path,
        use == .reading
          ? "in use: another process holds a write lock (a running VM?); -U to read anyway"
          : "in use: another process has the image open; -U to write anyway")
    }
    if result < 0 && errno != EINVAL && errno != ENOLCK && errno != EOPNOTSUPP && errno != ENOSYS {
      throw ImageError.system(path: path, operation: "lock (as qemu does)", errno: errno)
    }
  }

  /// The file's size in bytes; for a block device, the device's.
  public func size() throws -> Int64 {
    guard isBlockDevice else { return Int64(try status().st_size) }
    var bytes: UInt64 = 0
    guard lacuna_block_device_size(descriptor, &bytes) == 0 else {
      throw ImageError.system(path: path, operation: "get the device size (BLKGETSIZE64)", errno: errno)
    }
    return Int64(clamping: bytes)
  }

  /// Bytes of storage the file occupies (`st_blocks * 512`), as `du` counts them.
  public func allocatedSize() throws -> Int64? { Int64(try status().st_blocks) * 512 }

  /// Reads up to `buffer.count` bytes at `offset`, retrying short reads; returns how many
  /// were read (fewer only at the end of the file).
  ///
  /// The corresponding C function is `pread`.
  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    var done = 0
    while done < buffer.count {
      let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
      if n < 0 {
        if errno == EINTR { continue }
        throw ImageError.system(
          path: path, operation: "read \(buffer.count) bytes at \(hex(offset))", errno: errno)
      }
      if n == 0 { break }
      done += n
    }
    return done
  }

  /// The most one `pwrite` passes. The kernel sizes the page-cache folios of a buffered
  /// write by its length; 1 MiB writes into ext4 took large folios, whose allocation here
  /// (a virtual machine that hands free memory back to its host) sometimes cost more than
  /// the copy: 1 GiB from a mapped file took 0.34 s at best and 0.75–2.4 s in most runs,
  /// against 0.31 s every time in 256 KiB writes (0.33 s in 64 KiB writes).
  public static let writePiece = 256 << 10

  /// Writes all of `bytes` at `offset`, retrying short writes, in pieces of at most
  /// `writePiece`.
  ///
  /// The corresponding C function is `pwrite`.
  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    var done = 0
    while done < bytes.count {
      let n = pwrite(
        descriptor, bytes.baseAddress! + done, min(bytes.count - done, Self.writePiece), off_t(offset) + off_t(done))
      if n < 0 {
        if errno == EINTR { continue }
        throw ImageError.system(
          path: path, operation: "write \(bytes.count) bytes at \(hex(offset))", errno: errno)
      }
      done += n
    }
  }

  /// Sets the file's size; growing leaves a hole. The corresponding C function is `ftruncate`.
  public func truncate(to size: Int64) throws {
    guard retryingOnInterrupt({ ftruncate(descriptor, off_t(size)) }) == 0 else {
      throw ImageError.system(path: path, operation: "resize to \(size) bytes", errno: errno)
    }
  }

  /// Reserves blocks for `range`, extending the file if needed. The corresponding C
  /// function is `fallocate(fd, 0, ...)`.
  public func allocate(_ range: Range<Int64>) throws {
    guard range.count > 0 else { return }
    guard retryingOnInterrupt({ lacuna_fallocate(descriptor, range.lowerBound, range.upperBound - range.lowerBound) }) == 0 else {
      throw ImageError.system(path: path, operation: "reserve space (fallocate)", errno: errno)
    }
  }

  /// Frees the blocks of `range`; it then reads as zeros and the size is kept. Returns false
  /// when the file system cannot punch holes (the caller falls back to writing zeros).
  /// The corresponding C function is `fallocate(fd, PUNCH_HOLE | KEEP_SIZE, ...)`.
  public func punchHole(_ range: Range<Int64>) throws -> Bool {
    guard range.count > 0 else { return true }
    if retryingOnInterrupt({ lacuna_punch_hole(descriptor, range.lowerBound, range.upperBound - range.lowerBound) }) == 0 {
      return true
    }
    if errno == EOPNOTSUPP || errno == ENOSYS { return false }
    throw ImageError.system(path: path, operation: "punch a hole at \(hex(range.lowerBound))", errno: errno)
  }

  /// Makes `range` read as zeros, whatever it held: BLKZEROOUT on a block device,
  /// fallocate(ZERO_RANGE) or a punched hole on a file, written zeros where neither works.
  /// Ranges not aligned to 512 bytes are zeroed by writing at their edges.
  public func zero(_ range: Range<Int64>) throws {
    guard !range.isEmpty else { return }
    let inner = roundedUp(range.lowerBound, to: 512).map { $0..<max($0, range.upperBound / 512 * 512) } ?? range
    if !inner.isEmpty {
      let result =
        isBlockDevice
        ? lacuna_zero_device_range(descriptor, inner.lowerBound, Int64(inner.count))
        : lacuna_zero_file_range(descriptor, inner.lowerBound, Int64(inner.count))
      if result == 0 {
        try writeZeroBytes(range.lowerBound..<inner.lowerBound)
        try writeZeroBytes(inner.upperBound..<range.upperBound)
        return
      }
      if errno != EOPNOTSUPP && errno != EINVAL && errno != ENOTTY && errno != ENOSYS {
        throw ImageError.system(path: path, operation: "zero \(inner.count) bytes at \(hex(inner.lowerBound))", errno: errno)
      }
    }
    try writeZeroBytes(range)
  }

  private func writeZeroBytes(_ range: Range<Int64>) throws {
    guard !range.isEmpty else { return }
    let chunk = 1 << 20
    let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { zeros.deallocate() }
    zeros.initializeMemory(as: UInt8.self, repeating: 0)
    var position = range.lowerBound
    while position < range.upperBound {
      let n = Int(min(Int64(chunk), range.upperBound - position))
      try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: position)
      position += Int64(n)
    }
  }

  /// Flushes the file's data and metadata to stable storage. The corresponding C function is `fsync`.
  public func synchronize() throws {
    guard retryingOnInterrupt({ fsync(descriptor) }) == 0 else {
      throw ImageError.system(path: path, operation: "fsync", errno: errno)
    }
  }

  /// The data extents of `range` as the file system reports them, by walking SEEK_DATA and
  /// SEEK_HOLE once: two calls per data extent, however small the blocks. Ranges between
  /// the returned ones are holes. Past the end of the file counts as a hole.
  /// Returns nil when the file system does not support SEEK_DATA (then all is data).
  ///
  /// The corresponding C function is `lseek` with `SEEK_DATA` and `SEEK_HOLE`.
  public func dataRanges(in range: Range<Int64>) throws -> [Range<Int64>]? {
    var result: [Range<Int64>] = []
    var position = range.lowerBound
    while position < range.upperBound {
      let dataStart = lacuna_seek_data(descriptor, position)
      if dataStart < 0 {
        if errno == ENXIO { break }
        if errno == EINVAL || errno == EOPNOTSUPP { return nil }
        throw ImageError.system(path: path, operation: "find data (SEEK_DATA) from \(hex(position))", errno: errno)
      }
      if dataStart >= range.upperBound { break }
      var holeStart = lacuna_seek_hole(descriptor, dataStart)
      if holeStart < 0 {
        if errno == ENXIO { holeStart = range.upperBound } else {
          throw ImageError.system(path: path, operation: "find a hole (SEEK_HOLE) from \(hex(dataStart))", errno: errno)
        }
      }
      let end = min(holeStart, range.upperBound)
      result.append(dataStart..<end)
      position = end
    }
    return result
  }

  /// The device and inode that identify the file, to refuse writing over an input.
  public func identity() throws -> FileIdentity? {
    let info = try status()
    return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
  }
}

/// "a directory", "a FIFO", ... for messages.
public func describeFileType(_ type: mode_t) -> String {
  switch type {
  case S_IFDIR: return "a directory"
  case S_IFIFO: return "a FIFO"
  case S_IFSOCK: return "a socket"
  case S_IFCHR: return "a character device"
  case S_IFBLK: return "a block device"
  case S_IFLNK: return "a symbolic link"
  default: return "a regular file"
  }
}

/// A file's identity on this machine, whatever path reaches it.
public struct FileIdentity: Hashable, Sendable {
  public var device: UInt64
  public var inode: UInt64

  /// The identity of the file at `path`, or nil when nothing is there.
  public static func of(path: String) -> FileIdentity? {
    var info = stat()
    guard stat(path, &info) == 0 else { return nil }
    return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
  }
}

@inline(__always)
func retryingOnInterrupt(_ call: () -> Int32) -> Int32 {
  while true {
    let result = call()
    if result == -1 && errno == EINTR { continue }
    return result
  }
}

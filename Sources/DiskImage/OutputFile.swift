import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// A destination that becomes visible only on success: the bytes go to a temporary file
/// beside it (`.NAME.lacuna-XXXXXX`, a name no image tool would take for the output), which
/// `commit()` fsyncs and renames into place, then fsyncs the directory. `abandon()`, any
/// error path, or SIGINT/SIGTERM/SIGHUP removes the temporary file.
public final class OutputFile: ByteTarget {
  /// The destination path as the user gave it.
  public let path: String
  /// Where the output is renamed to: `path`, or the file a symbolic link at `path` points
  /// to (the link stays, and reads the new image).
  public let finalPath: String
  /// The temporary file's path while the output is being written.
  public let temporaryPath: String
  /// The open temporary file; writers write here.
  public let file: ImageFile
  /// False skips the fsyncs of `commit()` (qemu-img's `-t unsafe`): faster, but a crash
  /// soon after may leave a renamed file whose blocks never reached the disk.
  public var synchronizes = true {
    didSet { if !synchronizes { stopFlusher() } }
  }
  private var cleanupSlot: Int32
  /// Writes the file's dirty pages to disk while it is being written (flusher.c), so the
  /// disk works alongside the conversion instead of only in the fsync at the end.
  private var flusher: OpaquePointer?
  /// A write error the flusher saw, which the kernel will not report to the fsync again.
  private var flusherError: Int32 = 0
  private var finished = false

  /// Creates the temporary file beside `path` (beside the file it links to, for a symbolic
  /// link), after `checkDestination`. A file that is replaced passes its mode, owner and
  /// group on to the new one. Installs the signal handlers on first use.
  public init(creatingBeside path: String) throws {
    OutputFile.installHandlersOnce
    self.path = path
    let (finalPath, existing) = try OutputFile.checkDestination(path)
    if let existing, existing.st_mode & S_IFMT == S_IFBLK {
      throw ImageError.usage(path: path, "is a block device: it is written in place, not replaced")
    }
    self.finalPath = finalPath
    let (directory, name) = splitPath(finalPath)
    let template = (directory.isEmpty ? "" : directory + "/") + "." + OutputFile.shortened(name) + ".lacuna-XXXXXX"
    var buffer = Array(template.utf8CString)
    var slot: Int32 = -1
    let fd = buffer.withUnsafeMutableBufferPointer { lacuna_make_registered_temporary($0.baseAddress!, &slot) }
    guard fd >= 0 else {
      throw ImageError.system(path: path, operation: "create a temporary file in \(directory.isEmpty ? "." : directory)", errno: errno)
    }
    temporaryPath = String(cString: buffer)
    if let existing {
      // A private disk stays private; a file owned by someone else stays theirs (as root;
      // otherwise fchown fails and the mode alone is kept).
      _ = fchown(fd, existing.st_uid, existing.st_gid)
      fchmod(fd, existing.st_mode & 0o7777)
    } else {
      fchmod(fd, 0o644 & ~OutputFile.umaskValue)
    }
    cleanupSlot = slot
    file = ImageFile.adoptWritable(descriptor: fd, path: path)
    flusher = lacuna_flusher_start(fd)
  }

  /// What a destination may be, decided before any work: a new name, a regular file
  /// (replaced), a block device (written in place, by `InPlaceTarget`), or a symbolic link
  /// to one of them. A directory, a name ending in `/`, a character device, a FIFO or a
  /// socket is refused: replacing it with a regular file would silently give the user
  /// something else than asked. Returns the path to rename to and what is there now.
  public static func checkDestination(_ path: String) throws -> (finalPath: String, existing: stat?) {
    if path.hasSuffix("/") {
      throw ImageError.usage(path: path, "names a directory; give the output a file name")
    }
    var finalPath = path
    var info = stat()
    // Follow symbolic links by hand, so a dangling one still leads to where the image goes.
    for _ in 0..<40 {
      guard lstat(finalPath, &info) == 0 else {
        if errno == ENOENT { return (finalPath, nil) }
        throw ImageError.system(path: path, operation: "stat", errno: errno)
      }
      guard (info.st_mode & S_IFMT) == S_IFLNK else { break }
      var target = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
      let n = readlink(finalPath, &target, target.count - 1)
      guard n >= 0 else { throw ImageError.system(path: path, operation: "read the symbolic link", errno: errno) }
      let link = String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
      let directory = splitPath(finalPath).directory
      finalPath = link.hasPrefix("/") || directory.isEmpty ? link : directory + "/" + link
    }
    let type = info.st_mode & S_IFMT
    if type == S_IFLNK {
      throw ImageError.system(path: path, operation: "follow the symbolic link", errno: ELOOP)
    }
    guard type == S_IFREG || type == S_IFBLK else {
      throw ImageError.usage(
        path: path, "is \(describeFileType(type)); lacuna writes image files and block devices, and will not replace it")
    }
    return (finalPath, info)
  }

  /// `name` cut (on a character boundary) so that ".NAME.lacuna-XXXXXX" fits in a file
  /// name (NAME_MAX, 255 bytes): any name that fits on its own works as a destination.
  static func shortened(_ name: String) -> String {
    let room = Int(NAME_MAX) - ".".utf8.count - ".lacuna-XXXXXX".utf8.count
    guard name.utf8.count > room else { return name }
    var result = ""
    for character in name {
      guard result.utf8.count + character.utf8.count <= room else { break }
      result.append(character)
    }
    return result
  }

  private func stopFlusher() {
    guard let running = flusher else { return }
    flusher = nil
    let error = lacuna_flusher_stop(running)
    if flusherError == 0 { flusherError = error }
  }

  /// True for standard output (see `init(standardOutput:)`).
  public private(set) var isStandardOutput = false

  /// Standard output, for formats written as a stream (`-` as the destination): no
  /// temporary file and nothing to rename. `commit()` only flushes (fsync when it is a
  /// regular file); `abandon()` cannot take back what was sent, so a stream format must end
  /// with a record whose absence the reader detects.
  public init(standardOutput: Void) {
    OutputFile.installHandlersOnce  // SIGPIPE ignored: a closed pipe is EPIPE, an error
    path = "-"
    finalPath = "-"
    temporaryPath = ""
    file = ImageFile.adoptWritable(descriptor: STDOUT_FILENO, path: "standard output")
    cleanupSlot = -1
    isStandardOutput = true
  }

  deinit { abandon() }

  // MARK: - ByteTarget

  public var name: String { path }
  public var isSequential: Bool { isStandardOutput }
  /// Bytes appended so far to standard output.
  private var appended: Int64 = 0

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard isStandardOutput else { return try file.write(bytes, at: offset) }
    guard offset == appended else {
      throw ImageError.invalid(
        path: file.path, "internal: standard output is at byte \(appended), a write asked for byte \(offset)")
    }
    var done = 0
    while done < bytes.count {
      let n = Glibc.write(file.descriptor, bytes.baseAddress! + done, bytes.count - done)
      if n < 0 {
        if errno == EINTR { continue }
        let code = errno
        throw ImageError.system(
          path: file.path,
          operation: "write \(bytes.count - done) bytes at stream offset \(appended + Int64(done))"
            + (code == EPIPE ? " (the reading end of the pipe has closed)" : ""),
          errno: code)
      }
      done += n
    }
    appended += Int64(bytes.count)
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    guard !isStandardOutput else { throw ImageError.usage(path: file.path, "cannot read back standard output") }
    return try file.read(into: buffer, at: offset)
  }

  public func size() throws -> Int64 { isStandardOutput ? appended : try file.size() }

  public func truncate(to size: Int64) throws {
    guard !isStandardOutput else { throw ImageError.usage(path: file.path, "cannot resize standard output") }
    try file.truncate(to: size)
  }

  public func allocate(_ range: Range<Int64>) throws {
    guard !isStandardOutput else { throw ImageError.usage(path: file.path, "cannot reserve space on standard output") }
    try file.allocate(range)
  }

  public func punchHole(_ range: Range<Int64>) throws -> Bool {
    isStandardOutput ? false : try file.punchHole(range)
  }

  public func flush() throws {
    if isStandardOutput {
      if fsync(file.descriptor) != 0 && errno != EINVAL && errno != EROFS {
        throw ImageError.system(path: file.path, operation: "fsync", errno: errno)
      }
    } else {
      try file.synchronize()
    }
  }

  /// Makes the output visible at `path`: fsync the file, close it, rename it over the
  /// destination, fsync the directory.
  public func commit() throws {
    guard !finished else { return }
    if isStandardOutput {
      finished = true
      if synchronizes { try flush() }
      return
    }
    do {
      stopFlusher()
      if synchronizes {
        if flusherError != 0 {
          throw ImageError.system(path: path, operation: "write (reported while flushing)", errno: flusherError)
        }
        try file.synchronize()
      }
      try file.closeChecked()
      lacuna_commit_begin()
      guard rename(temporaryPath, finalPath) == 0 else {
        let code = errno
        lacuna_commit_end(0)
        throw ImageError.system(path: path, operation: "rename \(temporaryPath) into place", errno: code)
      }
      finished = true
      lacuna_cleanup_unregister(cleanupSlot)
      lacuna_commit_end(1)
      let directory = splitPath(finalPath).directory
      let dfd = synchronizes ? open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1
      if dfd >= 0 {
        defer { Glibc.close(dfd) }
        if fsync(dfd) != 0 && errno != EINVAL {
          throw ImageError.system(path: path, operation: "fsync the directory", errno: errno)
        }
      }
    } catch {
      abandon()
      throw error
    }
  }

  /// Removes the temporary file. Does nothing after `commit()`.
  public func abandon() {
    guard !finished else { return }
    if isStandardOutput {
      finished = true
      return
    }
    finished = true
    stopFlusher()
    file.close()
    unlink(temporaryPath)
    lacuna_cleanup_unregister(cleanupSlot)
  }

  private static let installHandlersOnce: Void = { lacuna_install_signal_handlers() }()
  private static let umaskValue: mode_t = {
    let old = umask(0)
    umask(old)
    return old
  }()
}

/// Splits a path into its directory ("" for the current one) and last component.
public func splitPath(_ path: String) -> (directory: String, name: String) {
  guard let slash = path.lastIndex(of: "/") else { return ("", path) }
  let directory = String(path[..<slash])
  return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
}

/// An existing file or block device written in place (`-n`, or a block device as the
/// destination): no temporary name, no rename. The target must already be as large as the
/// disk (checked before the first write, never resized); ranges the disk has as zeros are
/// made zero (BLKZEROOUT, ZERO_RANGE) unless the caller knows it reads as zeros already
/// (`--target-is-zero`). A failure cannot be taken back: what was written stays.
public final class InPlaceTarget: ByteTarget {
  public let file: ImageFile
  public let readsAsZero: Bool
  /// False skips the final fsync (`-t unsafe`).
  public var synchronizes = true
  private var closed = false

  public init(opening path: String, targetIsZero: Bool, lock: Bool) throws {
    file = try ImageFile.openForWritingInPlace(path)
    readsAsZero = targetIsZero
    if lock { try file.lock(for: .writingInPlace) }
  }

  public var name: String { file.path }
  public var isSequential: Bool { false }
  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws { try file.write(bytes, at: offset) }
  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    try file.read(into: buffer, at: offset)
  }
  public func size() throws -> Int64 { try file.size() }

  /// Never resizes: a target smaller than `size` is refused, a larger one keeps its tail.
  public func truncate(to size: Int64) throws {
    let available = try file.size()
    guard available >= size else {
      throw ImageError.usage(
        path: name, "is \(available) bytes, smaller than the \(size) bytes of the disk; nothing was written")
    }
  }

  public func allocate(_ range: Range<Int64>) throws {
    if !file.isBlockDevice { try file.allocate(range) }
  }

  public func punchHole(_ range: Range<Int64>) throws -> Bool {
    try file.zero(range)
    return true
  }

  public func writeZeroes(_ range: Range<Int64>) throws { try file.zero(range) }

  public func flush() throws { try file.synchronize() }

  public func commit() throws {
    guard !closed else { return }
    closed = true
    if synchronizes { try file.synchronize() }
    try file.closeChecked()
  }

  public func abandon() {
    guard !closed else { return }
    closed = true
    file.close()
  }
}

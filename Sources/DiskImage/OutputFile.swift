import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// A destination that becomes visible only on success. The bytes go to an unnamed file in
/// the destination's directory (O_TMPFILE), which `commit()` fsyncs and links into place:
/// until then the file has no name, so even SIGKILL leaves nothing behind. Where the file
/// system has no O_TMPFILE, a named temporary file beside the destination
/// (`.NAME.lacuna-XXXXXX`, a name no image tool would take for the output) is renamed
/// into place instead, and `abandon()`, any error path, or a terminating signal removes it.
/// The directory is fsynced after.
///
/// `LACUNA_TEMPORARY_FILE=named` in the environment forces the named temporary file (the
/// tests use it to check what such file systems get).
public final class OutputFile: ByteTarget {
  /// The destination path as the user gave it.
  public let path: String
  /// Where the output is renamed to: `path`, or the file a symbolic link at `path` points
  /// to (the link stays, and reads the new image).
  public let finalPath: String
  /// A path that reaches the temporary file while the output is being written: its name
  /// beside the destination, or `/proc/self/fd/N` for an unnamed file.
  public let temporaryPath: String
  /// True when the temporary file has no name (O_TMPFILE) until `commit()` links it.
  public let isUnnamed: Bool
  /// What the destination held when the output was started (a file that is replaced).
  private let replaced: stat?
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
  /// True once `commit()` has made the file visible at its destination.
  public private(set) var isCommitted = false

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
    replaced = existing
    let directory = splitPath(finalPath).directory
    var slot: Int32 = -1
    var fd: Int32 = -1
    let forceNamed = getenv("LACUNA_TEMPORARY_FILE").map { String(cString: $0) == "named" } ?? false
    if !forceNamed {
      fd = lacuna_open_unnamed(directory.isEmpty ? "." : directory)
      if fd < 0 && ![EOPNOTSUPP, EISDIR, EINVAL].contains(errno) {
        throw ImageError.system(
          path: path, operation: "create a temporary file in \(directory.isEmpty ? "." : directory)", errno: errno)
      }
    }
    if fd >= 0 {
      isUnnamed = true
      temporaryPath = "/proc/self/fd/\(fd)"
    } else {
      isUnnamed = false
      let template = OutputFile.temporaryName(beside: finalPath) + "XXXXXX"
      var buffer = Array(template.utf8CString)
      fd = buffer.withUnsafeMutableBufferPointer { lacuna_make_registered_temporary($0.baseAddress!, &slot) }
      guard fd >= 0 else {
        throw ImageError.system(
          path: path, operation: "create a temporary file in \(directory.isEmpty ? "." : directory)", errno: errno)
      }
      temporaryPath = String(cString: buffer)
    }
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

  /// `.NAME.lacuna-` beside `path` (its directory kept), for a random suffix to follow.
  static func temporaryName(beside path: String) -> String {
    let (directory, name) = splitPath(path)
    return (directory.isEmpty ? "" : directory + "/") + "." + shortened(name) + ".lacuna-"
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
    isUnnamed = false
    replaced = nil
  }

  deinit { abandon() }

  // MARK: - ByteTarget

  public var name: String { path }
  public var isSequential: Bool { isStandardOutput }
  /// Bytes appended so far to standard output.
  private var appended: Int64 = 0

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard isStandardOutput else { return try explainingRoom { try file.write(bytes, at: offset) } }
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
    try explainingRoom { try file.truncate(to: size) }
  }

  public func allocate(_ range: Range<Int64>) throws {
    guard !isStandardOutput else { throw ImageError.usage(path: file.path, "cannot reserve space on standard output") }
    try explainingRoom { try file.allocate(range) }
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
      try explainingRoom { try file.synchronize() }
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
      if isUnnamed {
        try linkIntoPlace()
      } else {
        try file.closeChecked()
        lacuna_commit_begin()
        guard rename(temporaryPath, finalPath) == 0 else {
          let code = errno
          lacuna_commit_end(0)
          throw ImageError.system(path: path, operation: "rename \(temporaryPath) into place", errno: code)
        }
      }
      finished = true
      isCommitted = true
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
      throw explainedRoom(error)
    }
  }

  /// Runs `body`, explaining a lack of room (see `explainedRoom`): also for writes that
  /// reach this file by another way than `write` (a `KernelCopier` on `file`).
  public func explainingRoom<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch { throw explainedRoom(error) }
  }

  /// ENOSPC or EDQUOT while a file is replaced: the old file keeps its room until the new
  /// one is complete, so an output that would fit in its place may not fit beside it. The
  /// error says so, and names the ways out.
  private func explainedRoom(_ error: Error) -> Error {
    guard let imageError = error as? ImageError, case .system(_, _, let code) = imageError,
      code == ENOSPC || code == EDQUOT,
      let old = replaced, old.st_mode & S_IFMT == S_IFREG, old.st_blocks > 0
    else { return error }
    let mebibytes = Double(old.st_blocks) * 512 / 1_048_576
    return ImageError.advised(
      imageError,
      advice: "the file being replaced (\(cFormat("%.1f", mebibytes)) MiB on disk) stays until the new image is complete, and there is no room for both: remove it first, or write into it in place with -n")
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
    if !isUnnamed { unlink(temporaryPath) }
    lacuna_cleanup_unregister(cleanupSlot)
  }

  /// Gives the unnamed file its name. A new destination is linked straight to its name; an
  /// existing one is replaced by linking to a temporary name (registered for cleanup) and
  /// renaming that over it, since a link cannot replace a file. Signals are held from the
  /// first link to the end, so the exit status matches what is at the destination.
  private func linkIntoPlace() throws {
    lacuna_commit_begin()
    var linked: String?
    do {
      if lacuna_link_unnamed(file.descriptor, finalPath) == 0 {
        linked = finalPath
      } else {
        guard errno == EEXIST else { throw ImageError.system(path: path, operation: "link the new image into place", errno: errno) }
        let prefix = OutputFile.temporaryName(beside: finalPath)
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        for _ in 0..<100 {
          let candidate = prefix + String((0..<6).map { _ in letters.randomElement()! })
          if lacuna_link_unnamed(file.descriptor, candidate) == 0 {
            linked = candidate
            cleanupSlot = lacuna_cleanup_register(candidate)
            break
          }
          guard errno == EEXIST else {
            throw ImageError.system(path: path, operation: "link the new image beside the old one", errno: errno)
          }
        }
        guard linked != nil else {
          throw ImageError.system(path: path, operation: "link the new image beside the old one", errno: EEXIST)
        }
      }
      // Linux reports some write errors only at close: a name that got linked goes again.
      try file.closeChecked()
      if let temporary = linked, temporary != finalPath, rename(temporary, finalPath) != 0 {
        throw ImageError.system(path: path, operation: "rename \(temporary) into place", errno: errno)
      }
    } catch {
      if let linked { unlink(linked) }
      lacuna_commit_end(0)
      throw error
    }
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

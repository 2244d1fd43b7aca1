import CLacunaSys

#if canImport(Glibc)
  import Glibc
#endif

/// How data whose bytes lie plainly in a source file (a raw image, an uncompressed qcow2
/// cluster) reaches a file output (`--copy-mode`). The bytes are read first in every mode:
/// zero detection decides what becomes a hole; only the non-zero blocks are cloned or copied.
public enum CopyMode: String, CaseIterable, Sendable {
  /// Share extents where the file system can (FICLONERANGE: XFS with reflink, btrfs,
  /// bcachefs), else let the kernel copy (copy_file_range), else write the bytes read. The
  /// first refusal of each turns it off silently. Where nothing can be shared (ext4,
  /// tmpfs), the bytes are written from the source's page cache, where the engine checked
  /// them mapped: one copy per byte, where reading into a buffer and writing it back
  /// copies every byte twice (W1 qcow2 -> raw on ext4 took half the CPU), and cheaper
  /// than copy_file_range's splice (`KernelCopier.writesMappedBytes`). On ext4, part of
  /// them goes to the disk from there without a copy (`DirectLane`).
  case auto
  /// Share extents; an output on a file system that cannot is an error.
  case clone
  /// copy_file_range: the kernel copies (and may share extents itself); write where it
  /// refuses.
  case copy
  /// Write the bytes read, as before.
  case rw
}

/// How many data bytes went which way.
public struct CopyTally: Equatable, Sendable {
  /// Shared with the source (FICLONERANGE).
  public var cloned: Int64 = 0
  /// Copied by the kernel (copy_file_range).
  public var copied: Int64 = 0
  /// Written from the source's pages where they lie mapped (`KernelCopier.writesMappedBytes`).
  public var fromPageCache: Int64 = 0
  /// Of `fromPageCache`, the bytes sent to the disk from there without a copy (`DirectLane`).
  public var direct: Int64 = 0
  /// Of `written`, the bytes sent to the disk from memory (a unit's buffer) without a copy.
  public var directFromMemory: Int64 = 0
  /// Written from the bytes read.
  public var written: Int64 = 0

  public init() {}

  public static func += (a: inout CopyTally, b: CopyTally) {
    a.cloned += b.cloned
    a.copied += b.copied
    a.fromPageCache += b.fromPageCache
    a.direct += b.direct
    a.directFromMemory += b.directFromMemory
    a.written += b.written
  }
}

/// Where a run of the disk's bytes lies plainly in a source file.
public struct HostBytes {
  public let file: ImageFile
  public let offset: Int64
  /// The engine's mapping of `file`, when it checked the bytes there: a writer may then
  /// send them to the disk straight from it (`DirectLane`).
  public let mapping: FileMapping?
  public init(file: ImageFile, offset: Int64, mapping: FileMapping? = nil) {
    self.file = file
    self.offset = offset
    self.mapping = mapping
  }

  /// The same file and mapping, `count` bytes further on.
  public func advanced(by count: Int64) -> HostBytes {
    HostBytes(file: file, offset: offset + count, mapping: mapping)
  }
}

/// A writer that can take data from a source file by the kernel instead of writing it.
/// Called on the writing thread, in disk order, in place of `write`.
public protocol CopyingImageWriter: ImageWriter {
  /// Whether `mode` may do anything but write here (false once cloning proved impossible
  /// in `auto`): the engine then stops tracking where the bytes lie.
  func copies(in mode: CopyMode) -> Bool
  /// Whether `write(_:at:from:mode:)` stores the bytes it is handed rather than taking
  /// them from the file (`KernelCopier.writesMappedBytes`): the engine then keeps the
  /// mapped source pages it checked until the write is done.
  func writesMappedBytes(in mode: CopyMode) -> Bool
  /// Stores `bytes` (read from `source`, found not to be zero) at `offset` of the disk.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, from source: HostBytes, mode: CopyMode) throws -> CopyTally
  /// Stores `bytes` from memory (found not to be zero) that stay valid and unchanged
  /// while `owner` lives (`KernelCopier.write(_:at:keeping:mode:)`). `direct` in the tally
  /// counts what went to the disk without a copy.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject, mode: CopyMode) throws -> CopyTally
}

/// A writer that prepares units on the workers (`PreparingImageWriter`) and can take the
/// data of a unit stored as it is (no compression) from a source file by the kernel.
public protocol CopyingPreparingImageWriter: PreparingImageWriter {
  /// As `CopyingImageWriter.copies(in:)`.
  func copies(in mode: CopyMode) -> Bool
  /// As `CopyingImageWriter.writesMappedBytes(in:)`.
  func writesMappedBytes(in mode: CopyMode) -> Bool
  /// `commit`, taking the parts of the unit's data that lie in `sources` (disk ranges, in
  /// order, and where each starts in its file) from there. The unit's bytes are valid too,
  /// and stay valid and unchanged while `owner` lives, when there is one: the rest may go
  /// to the disk from them (`KernelCopier.write(_:at:keeping:mode:)`).
  func commit(
    _ prepared: AnyObject, sources: [(range: Range<Int64>, bytes: HostBytes)], keeping owner: AnyObject?,
    mode: CopyMode
  ) throws -> CopyTally
}

/// Clones or copies runs of a source file into an output file, falling back to writing.
/// One per output; used from the writing thread only.
public final class KernelCopier {
  public let destination: ImageFile
  /// The file system's block size: clones cover whole blocks; the parts of a run outside
  /// them are written.
  private let blockSize: Int64
  private var canClone = true
  private var canCopy = true
  /// Set once a clone worked: the file system shares extents between these files.
  private var hasCloned = false
  /// A clone waiting to be joined by the next one. The engine hands data unit by unit;
  /// one FICLONERANGE per contiguous run instead of one per unit saves a file-system
  /// transaction at every unit boundary. Only clones after the first wait: the first one
  /// finds out at once whether the file system can share at all.
  private var pendingClone: (destination: Range<Int64>, source: ImageFile, sourceOffset: Int64)?

  /// The output's file system never shares extents (ext4, tmpfs): see `writesMappedBytes`.
  private let neverShares: Bool

  public init(destination: ImageFile) {
    self.destination = destination
    var info = statvfs()
    blockSize = fstatvfs(destination.descriptor, &info) == 0 && info.f_bsize > 0 ? Int64(info.f_bsize) : 4096
    // File systems known never to share extents: auto does not even try, it copies by the
    // kernel from the start.
    let type = lacuna_file_system_type(destination.descriptor)
    neverShares = Self.neverShares.contains(type)
    canClone = !neverShares
    mayWriteDirect = type == 0xEF53
  }

  /// On ext4, checked bytes go to the disk straight from the source's page cache while
  /// the writing thread copies others (`DirectLane`), made for the first chunk that can go.
  private let mayWriteDirect: Bool
  private var directLane: DirectLane?
  private var triedDirectLane = false
  /// At most the file's size: the size last seen or set.
  private var knownSize: Int64 = -1
  /// How far ahead of a direct write past its end the file is made longer.
  private static let growth: Int64 = 64 << 20
  /// Whether the file was made longer than the writer wrote, ahead of direct writes: the
  /// writer then sets its final size.
  public private(set) var extendedAhead = false

  /// In `auto` on a file system that never shares extents, the bytes the engine checked
  /// for zeros where they lie mapped (the source's page cache) are written from there: one
  /// copy per byte, as copy_file_range makes, without its page-by-page splice. W1 raw ->
  /// raw on ext4 (1 GiB of data): 0.31 s against 0.34–0.37 s by copy_file_range.
  public func writesMappedBytes(in mode: CopyMode) -> Bool { mode == .auto && neverShares }

  /// ext2/3/4, tmpfs, ramfs.
  private static let neverShares: Set<Int64> = [0xEF53, 0x0102_1994, 0x8584_58f6]

  public func copies(in mode: CopyMode) -> Bool {
    switch mode {
    case .auto: return canClone || canCopy
    case .clone: return true
    case .copy: return canCopy
    case .rw: return false
    }
  }

  /// Errors that mean "this file system (pair) cannot", not "this copy failed".
  private static func isRefusal(_ code: Int32) -> Bool {
    [EOPNOTSUPP, ENOTSUP, EXDEV, EINVAL, ENOTTY, ENOSYS, EBADF, EPERM, ETXTBSY, EISDIR].contains(code)
  }

  public func write(
    _ bytes: UnsafeRawBufferPointer, at offset: Int64, from source: HostBytes, mode: CopyMode
  ) throws -> CopyTally {
    var tally = CopyTally()
    let count = Int64(bytes.count)
    func writePart(_ range: Range<Int64>) throws {
      guard !range.isEmpty else { return }
      try destination.write(
        UnsafeRawBufferPointer(rebasing: bytes[Int(range.lowerBound - offset)..<Int(range.upperBound - offset)]),
        at: range.lowerBound)
      tally.written += Int64(range.count)
    }
    func copy() throws {
      var done: Int64 = 0
      while canCopy && done < count {
        let n = lacuna_copy_range(
          destination.descriptor, offset + done, source.file.descriptor, source.offset + done, count - done)
        if n > 0 {
          done += n
          tally.copied += n
          continue
        }
        let code = errno
        if n < 0 && code == EINTR { continue }
        if n < 0 && !Self.isRefusal(code) {
          throw ImageError.system(
            path: destination.path, operation: "copy \(count - done) bytes at \(offset + done) from \(source.file.path)",
            errno: code)
        }
        canCopy = false  // refused, or the source ended early: write the rest
      }
      try writePart(offset + done..<offset + count)
    }
    switch mode {
    case .rw:
      try writePart(offset..<offset + count)
    case .auto where neverShares:
      tally.direct += try writeFromPageCache(bytes, at: offset, from: source)
      tally.fromPageCache += count
    case .auto where !canClone:
      try copy()
    case .auto, .clone:
      let shift = source.offset - offset
      let head = (offset + blockSize - 1) / blockSize * blockSize
      let tail = (offset + count) / blockSize * blockSize
      guard canClone || mode == .clone, shift % blockSize == 0, tail > head else {
        if mode == .auto { try copy() } else { try writePart(offset..<offset + count) }
        break
      }
      if hasCloned {
        if let pending = pendingClone, pending.destination.upperBound == head, pending.source === source.file,
          pending.sourceOffset + Int64(pending.destination.count) == head + shift
        {
          pendingClone = (pending.destination.lowerBound..<tail, pending.source, pending.sourceOffset)
        } else {
          try flush()
          pendingClone = (head..<tail, source.file, head + shift)
        }
        tally.cloned += tail - head
        try writePart(offset..<head)
        try writePart(tail..<offset + count)
      } else if lacuna_clone_range(destination.descriptor, head, source.file.descriptor, head + shift, tail - head) == 0 {
        hasCloned = true
        tally.cloned += tail - head
        try writePart(offset..<head)
        try writePart(tail..<offset + count)
      } else {
        let code = errno
        guard Self.isRefusal(code) else {
          throw ImageError.system(
            path: destination.path, operation: "share \(tail - head) bytes at \(head) with \(source.file.path)",
            errno: code)
        }
        guard mode == .auto else {
          throw ImageError.advised(
            .system(path: destination.path, operation: "share extents with \(source.file.path)", errno: code),
            advice: "--copy-mode=clone needs the source and the output on one file system that shares extents (XFS with reflink, btrfs); --copy-mode=auto writes instead")
        }
        canClone = false
        try copy()
      }
    case .copy:
      try copy()
    }
    return tally
  }

  /// Writes checked bytes that lie mapped in the source's page cache: the aligned chunks
  /// the direct lane has room for go to the disk from there, the rest is written through
  /// the output's page cache. Returns the bytes sent direct.
  private func writeFromPageCache(_ bytes: UnsafeRawBufferPointer, at offset: Int64, from source: HostBytes) throws -> Int64 {
    guard let mapping = source.mapping else {
      try destination.write(bytes, at: offset)
      return 0
    }
    return try writeSharingWithLane(bytes, at: offset, memory: .mapped(mapping)) { range in
      mapping.window(source.offset + range.lowerBound - offset..<source.offset + range.upperBound - offset)
    }
  }

  /// Data bytes from memory (a unit's buffer) that stay valid and unchanged while `owner`
  /// lives: in `auto` on ext4, the aligned chunks the direct lane has room for go to the
  /// disk from there, keeping `owner` until they are written; the rest, and everything in
  /// other modes and on other file systems, is written through the page cache.
  public func write(
    _ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject, mode: CopyMode
  ) throws -> CopyTally {
    var tally = CopyTally()
    tally.written = Int64(bytes.count)
    guard mode == .auto, mayWriteDirect, let base = bytes.baseAddress else {
      try destination.write(bytes, at: offset)
      return tally
    }
    tally.directFromMemory = try writeSharingWithLane(bytes, at: offset, memory: .kept(owner)) { range in
      UnsafeRawBufferPointer(start: base + Int(range.lowerBound - offset), count: range.count)
    }
    return tally
  }

  /// Writes `bytes` at `offset`, offering the direct lane each aligned chunk (`window`
  /// gives its memory, 4 KiB-aligned when the bytes are aligned like the offset) before
  /// each piece the writing thread copies. Returns the bytes sent direct.
  private func writeSharingWithLane(
    _ bytes: UnsafeRawBufferPointer, at offset: Int64, memory: DirectLane.Memory,
    window: (Range<Int64>) -> UnsafeRawBufferPointer?
  ) throws -> Int64 {
    let count = Int64(bytes.count)
    let align = Int64(DirectLane.alignment)
    let head = (offset + align - 1) / align * align
    let tail = (offset + count) / align * align
    if mayWriteDirect && !triedDirectLane && tail - head >= align {
      triedDirectLane = true
      directLane = DirectLane(destination: destination)
    }
    guard let lane = directLane, lane.isOpen, tail - head >= max(align, DirectLane.smallest),
      let first = window(head..<head + align), Int(bitPattern: first.baseAddress) % Int(align) == 0
    else {
      try destination.write(bytes, at: offset)
      return 0
    }
    // A direct write past the end of the file makes ext4 wait for it in the submission
    // (the size changes when it completes). A qcow2 output grows as its clusters are written:
    // the file is made longer ahead of them, and the writer cuts it back at the end
    // (`extendedAhead`).
    if tail > knownSize {
      knownSize = try destination.size()
      if tail > knownSize {
        knownSize = (tail + Self.growth) / Self.growth * Self.growth
        try destination.truncate(to: knownSize)
        extendedAhead = true
      }
    }
    var direct: Int64 = 0
    var position = head
    var pending = offset  // written up to here, or waiting to be written buffered from here
    func writeBuffered(upTo end: Int64) throws {
      if end > pending {
        try destination.write(
          UnsafeRawBufferPointer(rebasing: bytes[Int(pending - offset)..<Int(end - offset)]), at: pending)
      }
      pending = end
    }
    // The lane is offered a chunk before each piece the writing thread copies: one that
    // copied a whole chunk between offers left the disk idle behind it when copies are slow.
    while position < tail {
      let end = min(position + Int64(DirectLane.chunk), tail)
      if let chunk = window(position..<end), try lane.send(chunk, from: memory, at: position, fallback: destination) {
        try writeBuffered(upTo: position)
        pending = end
        direct += end - position
        position = end
      } else {
        position = min(position + Int64(ImageFile.writePiece), tail)
        try writeBuffered(upTo: position)
      }
    }
    try writeBuffered(upTo: offset + count)
    return direct
  }

  /// Makes the clone still waiting to be joined. Writers call it before their metadata
  /// is final and the output is synced. A refusal now is an error like any other: the
  /// file system shared extents between these files before (a source truncated under
  /// the conversion gives EINVAL here).
  public func flush() throws {
    try directLane?.drain(fallback: destination)
    guard let pending = pendingClone else { return }
    pendingClone = nil
    let count = Int64(pending.destination.count)
    if lacuna_clone_range(
      destination.descriptor, pending.destination.lowerBound, pending.source.descriptor, pending.sourceOffset, count)
      != 0
    {
      let code = errno
      throw ImageError.system(
        path: destination.path,
        operation: "share \(count) bytes at \(pending.destination.lowerBound) with \(pending.source.path) at \(pending.sourceOffset)",
        errno: code)
    }
  }
}

/// A read-only mapping of a whole file, unmapped when released. The engine checks data it
/// may clone for zeros here, in the page cache, instead of copying it out with pread: one
/// mapping per source file for the whole conversion, so no mmap/munmap per unit. Nil for
/// an empty file or where mmap fails (the caller reads instead). A file truncated under
/// the conversion faults (SIGBUS) where a read would fail: `zeroRuns` catches that fault
/// and throws, and the kernel refuses to copy from (EFAULT) or clone past the lost pages.
public final class FileMapping: @unchecked Sendable {
  private let base: UnsafeMutableRawPointer
  public let length: Int
  private let path: String
  private let descriptor: Int32
  /// Kept open for `truncation`.
  private let file: ImageFile

  public init?(file: ImageFile) {
    guard let size = try? file.size(), size > 0, let length = Int(exactly: size) else { return nil }
    lacuna_guard_mapped_reads()
    guard let pointer = mmap(nil, length, PROT_READ, MAP_SHARED, file.descriptor, 0), pointer != MAP_FAILED
    else { return nil }
    base = pointer
    self.length = length
    path = file.path
    descriptor = file.descriptor
    self.file = file
  }

  /// The error to report when the file is now shorter than when it was mapped (another
  /// process truncated it): reads of the lost pages fault, the kernel's copies from them
  /// fail with EFAULT and clones with EINVAL, all of which say less than this. Nil when
  /// the file is as long as before.
  public func truncation() -> ImageError? {
    var info = stat()
    guard fstat(descriptor, &info) == 0, info.st_size < length else { return nil }
    return .invalid(
      path: path, "the file shrank from \(length) to \(info.st_size) bytes during the conversion (another process truncated it)")
  }

  /// The bytes of `range` of the file, which hold the virtual-disk range starting at
  /// `offset`, split into zero and data runs as `zeroRuns` does; nil when `range` is not
  /// inside the mapping. Throws when the file lost the pages under us (truncated by
  /// another process), where reading them would otherwise kill the process.
  public func zeroRuns(
    _ range: Range<Int64>, at offset: Int64, blockSize: Int
  ) throws -> (bytes: UnsafeRawBufferPointer, runs: [(range: Range<Int64>, isZero: Bool)])? {
    guard let mapped = bytes(range) else { return nil }
    guard let runs = guardedZeroRuns(mapped, at: offset, blockSize: blockSize) else {
      throw truncation()
        ?? .system(path: path, operation: "read \(range.count) bytes at \(hex(range.lowerBound)) (mapped)", errno: EIO)
    }
    return (mapped, runs)
  }

  /// The bytes of `range` of the file (inside it), not read in advance: a view for a
  /// writer that reads only some of them; nil outside the mapping.
  public func window(_ range: Range<Int64>) -> UnsafeRawBufferPointer? {
    guard range.lowerBound >= 0, range.upperBound <= Int64(length), !range.isEmpty else { return nil }
    return UnsafeRawBufferPointer(start: base + Int(range.lowerBound), count: range.count)
  }

  /// The bytes of `range` of the file (inside it), about to be read. Their page tables are
  /// left to the faults of the scan that follows: filling them first in one call
  /// (MADV_POPULATE_READ) took 4 ms more CPU time on a warm XFS W1 raw -> raw (83 against
  /// 87 ms), and on a cold source it read fault by fault (3-5.5 s where `prefetch` now
  /// makes it 1.1-1.3).
  public func bytes(_ range: Range<Int64>) -> UnsafeRawBufferPointer? {
    guard range.lowerBound >= 0, range.upperBound <= Int64(length), !range.isEmpty else { return nil }
    return UnsafeRawBufferPointer(start: base + Int(range.lowerBound), count: range.count)
  }

  /// Whether the page holding `offset` is in the page cache (being read counts).
  public func isCached(_ offset: Int64) -> Bool {
    guard offset >= 0, offset < Int64(length) else { return true }
    var resident: UInt8 = 0
    return mincore(base + Int(offset / 4096 * 4096), 1, &resident) != 0 || resident & 1 != 0
  }

  /// Asks the kernel to read `range` into the page cache now, in large requests, without
  /// waiting for them (MADV_WILLNEED), for a scan that comes later. Left to the scan's
  /// faults, the kernel reads 128 KiB around each faulting page and waits for it. Only
  /// data ranges: asked for, the holes of a sparse file are read too, as pages of zeros.
  public func prefetch(_ range: Range<Int64>) {
    let start = max(range.lowerBound, 0) / 4096 * 4096
    let end = min(range.upperBound, Int64(length))
    guard end > start else { return }
    _ = madvise(base + Int(start), Int(end - start), MADV_WILLNEED)
  }

  /// How far around a faulting address the kernel maps pages already in the page cache
  /// (fault-around, `fault_around_bytes`: 64 KiB unless changed), in aligned blocks.
  public static let faultAround = 64 << 10

  /// Drops the page tables of `bytes` (got from `bytes(_:)` of this mapping) once they
  /// were checked: the pages stay in the page cache, but no longer count in the process's
  /// resident memory, which would otherwise grow to the source's size. The range dropped
  /// is widened to the aligned 64 KiB blocks around it (inside the mapping): filling in
  /// a page maps the cached pages of its block too, and on a fragmented source (W2: 4 KiB
  /// extents) those neighbours, never dropped, took peak RSS to 220 MiB. A page touched
  /// again (a write that falls back to the bytes, a neighbour another unit is checking)
  /// is faulted back in.
  public func release(_ bytes: UnsafeRawBufferPointer) {
    guard let start = bytes.baseAddress, bytes.count > 0 else { return }
    let block = Self.faultAround
    let low = Int(bitPattern: base)
    let high = low + (length + 4095) / 4096 * 4096
    let first = max(Int(bitPattern: start) / block * block, low)
    let last = min((Int(bitPattern: start) + bytes.count + block - 1) / block * block, high)
    guard last > first, let pointer = UnsafeMutableRawPointer(bitPattern: first) else { return }
    _ = madvise(pointer, last - first, MADV_DONTNEED)
  }

  deinit { munmap(base, length) }
}

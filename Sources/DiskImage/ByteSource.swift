/// Where an image's bytes live, apart from what they mean: a local file today, a block
/// device or an NBD export later. Format readers read their tables and clusters through
/// this and never see a path.
///
/// Random access and safe from several threads at once. What only some storage has (its own
/// allocation map, an identity, an allocated size) is optional: a source that lacks it
/// answers nil and callers do without.
public protocol ByteSource: AnyObject, Sendable {
  /// What errors name: the path as the user or the referring image gave it, or a URI.
  var name: String { get }
  /// The storage's size in bytes.
  func size() throws -> Int64
  /// Reads up to `buffer.count` bytes at `offset`; returns how many were read (fewer only
  /// at the end of the storage).
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int
  /// The ranges of `range` that the storage holds data for (SEEK_DATA/SEEK_HOLE on a file);
  /// what lies between them reads as zeros. Nil when the storage cannot tell.
  func dataRanges(in range: Range<Int64>) throws -> [Range<Int64>]?
  /// The ranges of `range` that no layer behind the storage holds (an NBD export whose
  /// server answers `qemu:allocation-depth` 0): they read as zeros, and `map` reports them
  /// as not present. Nil when the storage cannot tell.
  func absentRanges(in range: Range<Int64>) throws -> [Range<Int64>]?
  /// What identifies the storage on this machine, whatever name reaches it, to refuse loops
  /// and writing over an input. Nil when the storage has no such identity.
  func identity() throws -> FileIdentity?
  /// Bytes of storage the source occupies (`du`), where that is known.
  func allocatedSize() throws -> Int64?
}

extension ByteSource {
  public func dataRanges(in range: Range<Int64>) throws -> [Range<Int64>]? { nil }
  public func absentRanges(in range: Range<Int64>) throws -> [Range<Int64>]? { nil }
  public func identity() throws -> FileIdentity? { nil }
  public func allocatedSize() throws -> Int64? { nil }

  /// Reads exactly `buffer.count` bytes at `offset`; running into the end is an error naming
  /// `what` was being read (damage is never read as zeros).
  public func readExactly(
    into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, what: @autoclosure () -> String
  ) throws {
    let n = try read(into: buffer, at: offset)
    if n < buffer.count {
      let size = (try? self.size()) ?? -1
      throw ImageError.invalid(
        path: name,
        "\(what()) at \(hex(offset)) (\(buffer.count) bytes) runs past the end of the file (size \(hex(size)))")
    }
  }

  /// Reads exactly `count` bytes at `offset` into a new array.
  public func readBytes(count: Int, at offset: Int64, what: @autoclosure () -> String) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    try bytes.withUnsafeMutableBytes { try readExactly(into: $0, at: offset, what: what()) }
    return bytes
  }
}

/// Where an output's bytes go: a temporary file renamed into place, standard output, and
/// later a block device or an NBD export written in place. Format writers write through
/// this and never see a path.
public protocol ByteTarget: AnyObject {
  /// What errors name: the destination as the user gave it.
  var name: String { get }
  /// True when bytes can only be appended in order (a pipe): each `write` must start where
  /// the last one ended, and nothing can be read back, resized or punched.
  var isSequential: Bool { get }
  /// True when what is never written reads as zeros (a new file, or `--target-is-zero`);
  /// false for a target written in place, where zero ranges must be made zero.
  var readsAsZero: Bool { get }
  /// Makes `range` read as zeros whatever it held.
  func writeZeroes(_ range: Range<Int64>) throws
  /// Writes all of `bytes` at `offset`.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws
  /// Reads back up to `buffer.count` bytes written earlier; returns how many were read.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int
  /// The target's size in bytes.
  func size() throws -> Int64
  /// Sets the size; growing reads as zeros.
  func truncate(to size: Int64) throws
  /// Reserves storage for `range` (fallocate).
  func allocate(_ range: Range<Int64>) throws
  /// Frees the storage of `range`, which then reads as zeros; false when the storage cannot.
  func punchHole(_ range: Range<Int64>) throws -> Bool
  /// Makes everything written durable.
  func flush() throws
  /// Makes the output visible at its destination (for a file: fsync and rename). After a
  /// failure nothing is left there.
  func commit() throws
  /// Takes back what was written where that is possible; nothing is left at the destination.
  func abandon()
}

extension ByteTarget {
  public var readsAsZero: Bool { true }

  /// Makes `range` read as zeros: a hole where the storage can punch one, written zeros
  /// elsewhere.
  public func writeZeroes(_ range: Range<Int64>) throws {
    guard !range.isEmpty else { return }
    if !isSequential, try punchHole(range) { return }
    try writeZeroBytes(range)
  }

  /// Writes zero bytes over `range` (storage is allocated, as `preallocation=full` wants).
  public func writeZeroBytes(_ range: Range<Int64>) throws {
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

  /// Reads back exactly `count` bytes at `offset`.
  public func readBytes(count: Int, at offset: Int64, what: @autoclosure () -> String) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    let n = try bytes.withUnsafeMutableBytes { try read(into: $0, at: offset) }
    guard n == count else {
      throw ImageError.invalid(path: name, "\(what()) at \(hex(offset)) (\(count) bytes) runs past the end of the output")
    }
    return bytes
  }
}

/// A target that sends bytes on after `write` returns (an NBD connection with requests in
/// flight): handed the object that keeps the caller's buffer alive and unchanged, it keeps
/// that instead of copying the bytes.
public protocol KeepingByteTarget: ByteTarget {
  /// Writes `bytes` at `offset`; they stay valid and unchanged while `owner` lives.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject) throws
}

/// An owner a `KeepingByteTarget` keeps alive: how much memory keeping it holds (a work
/// unit's whole buffer, however few of its bytes are data).
public protocol KeptMemory: AnyObject {
  var keptBytes: Int { get }
}

/// Storage reached by a URI instead of a path (NBD exports): the Resolver asks it before
/// opening a name as a file, and the conversion before creating an output file.
public protocol NetworkStorage: Sendable {
  /// True when `name` is one of its URIs.
  func handles(_ name: String) -> Bool
  /// Connects to the storage `name` names, to read it.
  func openSource(_ name: String) throws -> ByteSource
  /// Connects to the storage `name` names, to write into it in place. `targetIsZero` says
  /// it reads as zeros already; `zeroFirst` makes it read as zeros before anything is
  /// written (for formats whose writers count on a new, empty file).
  func openTarget(_ name: String, targetIsZero: Bool, zeroFirst: Bool, synchronizes: Bool) throws -> ByteTarget
}

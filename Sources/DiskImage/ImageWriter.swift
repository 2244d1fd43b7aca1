/// What the user asked of the output, beyond its format.
public struct WriterOptions {
  /// `-o key=value,...` as given; each writer takes the keys it knows and refuses the rest.
  public var options: [String: String]
  /// The backing file the output records (`-B`/`-b`), if any.
  public var backing: BackingReference?
  /// `-c`: compress data clusters.
  public var compress: Bool
  /// The image `backing` names, opened (the top of its chain), for writers that record
  /// facts of the parent besides its name (a VMDK delta's parent CID, a VHDX parent's
  /// DataWriteGuid) or check that it suits them. Nil without a backing file.
  public var backingImage: ImageReader?
  /// Makes the other files an output consists of (a VMDK descriptor's extent files), beside
  /// it; nil where the output is one file only (standard output, a device written in place).
  public var companions: CompanionTargets?

  public init(
    options: [String: String] = [:], backing: BackingReference? = nil, compress: Bool = false,
    backingImage: ImageReader? = nil, companions: CompanionTargets? = nil
  ) {
    self.options = options
    self.backing = backing
    self.compress = compress
    self.backingImage = backingImage
    self.companions = companions
  }
}

/// Creates the files an output is made of besides the one it is written to: the extent
/// files a VMDK descriptor names (`disk-flat.vmdk`, `disk-s001.vmdk`). Each is a target of
/// its own that appears, like the output, only when committed; the writer commits them
/// before its main target, and on failure abandons them (or, once committed, has them
/// removed with `removeCommitted`), so a failed conversion leaves none of them.
public protocol CompanionTargets: AnyObject {
  /// The output's own file name, without its directory, as it will be once committed
  /// (`disk.vmdk`): the names of companions are made from it.
  var outputName: String { get }
  /// Creates the companion `name`, a plain file name (no `/`) in the output's directory.
  /// Refused when that file is one of the conversion's inputs, the output itself, or
  /// anything but a regular file or a new name.
  func create(named name: String) throws -> ByteTarget
  /// Removes every companion that has been committed (the writer failed after committing
  /// them).
  func removeCommitted()
}

/// The receiving end of a conversion.
///
/// The engine covers the virtual disk exactly once, in increasing order, with calls to
/// `write` (bytes that are not all zero) and `writeZeroes` (ranges that must read as
/// zero), then calls `finish()`. On any failure it calls `abandon()` instead.
public protocol ImageWriter: AnyObject {
  /// The size of the pieces the writer stores (a qcow2 cluster; 1 for raw). The engine
  /// cuts work at multiples of it.
  var granularity: Int { get }
  /// Writes `bytes` at `offset` of the virtual disk.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws
  /// Writes `bytes` at `offset`; they stay valid and unchanged while `owner` lives, so a
  /// writer that passes them on to a `KeepingByteTarget` may keep `owner` instead of
  /// copying them. By default, `write(_:at:)`.
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject) throws
  /// Makes `range` read as zeros. On a fresh sparse target this costs nothing.
  func writeZeroes(_ range: Range<Int64>) throws
  /// Writes the metadata, flushes, and makes the output visible at its path.
  func finish() throws
  /// Removes everything written; nothing is left at the destination.
  func abandon()
}

extension ImageWriter {
  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject) throws {
    try write(bytes, at: offset)
  }
}

extension WriterOptions {
  /// Refuses option keys the writer does not know, the way qemu-img does.
  public func checkKnown(_ known: Set<String>, format: String, path: String) throws {
    for key in options.keys.sorted() where !known.contains(key) {
      throw ImageError.usage(
        path: path,
        "format '\(format)' has no option '\(key)' (it takes: \(known.sorted().joined(separator: ", ")))")
    }
  }
}

/// A writer that does heavy work per unit (compression) on the engine's worker threads.
///
/// For each unit of the disk that holds data, the engine calls `prepare` on a worker
/// thread, then, on the writing thread and in disk order, `commit` with what it returned,
/// in place of `write` for that unit's data runs (`writeZeroes` still comes for its zero
/// runs, before `commit`). So the output is the same bytes whatever the thread count.
public protocol PreparingImageWriter: ImageWriter {
  /// Works on a unit: `bytes` hold the disk at `offset`; the length is a multiple of
  /// `granularity` except at the end of the disk. `dataRanges` are the parts that hold
  /// non-zero data (everything else in `bytes` is zero, or left to the backing file).
  /// `bytes` stay valid and unchanged until `commit` for this unit returns, so the result
  /// may point into them instead of copying. Called from several threads at once.
  func prepare(_ bytes: UnsafeRawBufferPointer, at offset: Int64, dataRanges: [Range<Int64>]) throws -> AnyObject
  /// Stores a prepared unit. Called on one thread, in disk order.
  func commit(_ prepared: AnyObject) throws
}

/// A writer that knows, from its options alone, how long its output would be for a disk whose
/// every byte is data that does not compress: `measure` asks it instead of running it over
/// such a disk, which costs time in proportion to the disk.
public protocol FullyAllocatedLength: ImageWriter {
  /// The output's length in bytes (all its files) for a fully allocated disk.
  var fullyAllocatedLength: Int64 { get }
}

import DiskImage

/// Writes a raw file of exactly the virtual size (no rounding to sectors).
///
/// `-o preallocation=`: `off` (default) sizes the file with ftruncate and never writes a
/// zero block, so creating many images at once never races for space; `falloc` reserves
/// every block with fallocate; `full` writes zeros over every range that holds no data.
///
/// Data the engine read from a plain source file (a raw image, uncompressed qcow2 clusters)
/// can be taken from there by the kernel (`CopyingImageWriter`): shared extents where the
/// file system has them, else copy_file_range or written, as `--copy-mode` says.
public final class RawWriter: CopyingImageWriter {
  public enum Preallocation: String { case off, falloc, full }

  private let target: ByteTarget
  private let preallocation: Preallocation
  /// For an output that is a file (not standard output).
  private let copier: KernelCopier?
  public var granularity: Int { 1 }

  public init(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    try options.checkKnown(["preallocation"], format: "raw", path: target.name)
    if options.backing != nil {
      throw ImageError.usage(path: target.name, "raw images cannot record a backing file")
    }
    if options.compress {
      throw ImageError.usage(path: target.name, "raw images cannot be compressed (-c needs -O qcow2)")
    }
    let name = options.options["preallocation"] ?? "off"
    guard let mode = Preallocation(rawValue: name) else {
      throw ImageError.usage(path: target.name, "preallocation '\(name)' is not one of off, falloc, full")
    }
    self.target = target
    self.preallocation = mode
    if let output = target as? OutputFile, !output.isStandardOutput {
      copier = KernelCopier(destination: output.file)
    } else if let output = target as? InPlaceTarget, !output.file.isBlockDevice {
      copier = KernelCopier(destination: output.file)
    } else {
      copier = nil
    }
    try target.truncate(to: virtualSize)
    if mode == .falloc { try target.allocate(0..<virtualSize) }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try target.write(bytes, at: offset)
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject) throws {
    if let keeping = target as? KeepingByteTarget {
      try keeping.write(bytes, at: offset, keeping: owner)
    } else {
      try target.write(bytes, at: offset)
    }
  }

  public func copies(in mode: CopyMode) -> Bool { copier?.copies(in: mode) ?? false }

  public func writesMappedBytes(in mode: CopyMode) -> Bool { copier?.writesMappedBytes(in: mode) ?? false }

  public func write(
    _ bytes: UnsafeRawBufferPointer, at offset: Int64, from source: HostBytes, mode: CopyMode
  ) throws -> CopyTally {
    guard let copier else {
      try target.write(bytes, at: offset)
      var tally = CopyTally()
      tally.written = Int64(bytes.count)
      return tally
    }
    guard let output = target as? OutputFile else { return try copier.write(bytes, at: offset, from: source, mode: mode) }
    return try output.explainingRoom { try copier.write(bytes, at: offset, from: source, mode: mode) }
  }

  public func write(
    _ bytes: UnsafeRawBufferPointer, at offset: Int64, keeping owner: AnyObject, mode: CopyMode
  ) throws -> CopyTally {
    guard let copier else {
      try write(bytes, at: offset, keeping: owner)
      var tally = CopyTally()
      tally.written = Int64(bytes.count)
      return tally
    }
    guard let output = target as? OutputFile else { return try copier.write(bytes, at: offset, keeping: owner, mode: mode) }
    return try output.explainingRoom { try copier.write(bytes, at: offset, keeping: owner, mode: mode) }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    if preallocation == .full {
      try target.writeZeroBytes(range)
    } else if !target.readsAsZero {
      // Written in place over old content: the range must be made zero.
      try target.writeZeroes(range)
    }
    // Otherwise the file is new: it already reads as zeros where it was not written.
  }

  public func finish() throws {
    try copier?.flush()
    try target.commit()
  }

  public func abandon() { target.abandon() }
}

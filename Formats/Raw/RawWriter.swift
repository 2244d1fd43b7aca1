import DiskImage

/// Writes a raw file of exactly the virtual size (no rounding to sectors).
///
/// `-o preallocation=`: `off` (default) sizes the file with ftruncate and never writes a
/// zero block, so creating many images at once never races for space; `falloc` reserves
/// every block with fallocate; `full` writes zeros over every range that holds no data.
public final class RawWriter: ImageWriter {
  public enum Preallocation: String { case off, falloc, full }

  private let target: ByteTarget
  private let preallocation: Preallocation
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
    try target.truncate(to: virtualSize)
    if mode == .falloc { try target.allocate(0..<virtualSize) }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try target.write(bytes, at: offset)
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

  public func finish() throws { try target.commit() }

  public func abandon() { target.abandon() }
}

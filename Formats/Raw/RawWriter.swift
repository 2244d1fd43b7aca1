import DiskImage

/// Writes a raw file of exactly the virtual size (no rounding to sectors).
///
/// `-o preallocation=`: `off` (default) sizes the file with ftruncate and never writes a
/// zero block, so creating many images at once never races for space; `falloc` reserves
/// every block with fallocate; `full` writes zeros over every range that holds no data.
public final class RawWriter: ImageWriter {
  public enum Preallocation: String { case off, falloc, full }

  private let output: OutputFile
  private let preallocation: Preallocation
  public var granularity: Int { 1 }

  public init(output: OutputFile, virtualSize: Int64, options: WriterOptions) throws {
    try options.checkKnown(["preallocation"], format: "raw", path: output.path)
    if options.backing != nil {
      throw ImageError.usage(path: output.path, "raw images cannot record a backing file")
    }
    if options.compress {
      throw ImageError.usage(path: output.path, "raw images cannot be compressed (-c needs -O qcow2)")
    }
    let name = options.options["preallocation"] ?? "off"
    guard let mode = Preallocation(rawValue: name) else {
      throw ImageError.usage(path: output.path, "preallocation '\(name)' is not one of off, falloc, full")
    }
    self.output = output
    self.preallocation = mode
    try output.file.truncate(to: virtualSize)
    if mode == .falloc { try output.file.allocate(0..<virtualSize) }
  }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try output.file.write(bytes, at: offset)
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // The file is new: it already reads as zeros everywhere it has not been written.
    guard preallocation == .full else { return }
    let chunk = 1 << 20
    let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { zeros.deallocate() }
    zeros.initializeMemory(as: UInt8.self, repeating: 0)
    var position = range.lowerBound
    while position < range.upperBound {
      let n = Int(min(Int64(chunk), range.upperBound - position))
      try output.file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: position)
      position += Int64(n)
    }
  }

  public func finish() throws { try output.commit() }

  public func abandon() { output.abandon() }
}

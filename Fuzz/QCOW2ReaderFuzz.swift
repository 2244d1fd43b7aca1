// libFuzzer target for the qcow2 reader: the fuzzer's bytes become an image file, which is
// opened, mapped and read the way `lacuna convert` reads a layer. Built by script/fuzz,
// which compiles this file together with the reader's sources into one module (so there
// are no `import DiskImage` / `import QCOW2` lines here).
//
// Anything the reader may do with hostile bytes is to answer or to throw an ImageError;
// a trap, a sanitizer report, a hang or an allocation past libFuzzer's -rss_limit_mb is a
// finding.

#if canImport(Glibc)
  import Glibc
#endif

/// How much of the virtual disk one input may map and read, so each input stays fast.
private let walkLimit: Int64 = 64 << 20
/// The most bytes read at once (the engine's largest work unit).
private let readChunk = 1 << 20

/// One file reused for every input (in memory when /dev/shm is there): rewriting it costs
/// less than making a new one.
private let scratchPath =
  (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") + "/lacuna-fuzz-\(getpid()).qcow2"

private var readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: readChunk, alignment: 4096)

@_cdecl("LLVMFuzzerTestOneInput")
public func lacunaFuzzQCOW2(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
  let fd = open(scratchPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
  guard fd >= 0 else { fatalError("cannot write \(scratchPath): errno \(errno)") }
  var written = 0
  while written < size {
    let n = write(fd, data! + written, size - written)
    guard n > 0 else { fatalError("cannot write \(scratchPath): errno \(errno)") }
    written += n
  }
  close(fd)

  do {
    let file = try ImageFile.openForReading(scratchPath)
    let reader = try QCOW2Reader(file: file)
    _ = reader.formatSpecific
    _ = reader.backing
    let end = min(reader.virtualSize, walkLimit)
    var position: Int64 = 0
    while position < end {
      let extents = try reader.extents(in: position..<end)
      guard let last = extents.last, extents.first?.range.lowerBound == position else {
        fatalError("extents(in: \(position)..<\(end)) answered \(extents), not a prefix of the range")
      }
      for extent in extents where extent.kind == .data {
        var offset = extent.range.lowerBound
        while offset < extent.range.upperBound {
          let count = Int(min(Int64(readChunk), extent.range.upperBound - offset))
          try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: readBuffer[0..<count]), at: offset)
          offset += Int64(count)
        }
      }
      position = last.range.upperBound
    }
    // An unaligned read across the start of the disk, as a partial cluster would be read.
    if reader.virtualSize > 0 {
      let count = Int(min(reader.virtualSize, 3000))
      try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: readBuffer[0..<count]), at: reader.virtualSize - Int64(count))
    }
  } catch let error as ImageError {
    // The message must be one line naming the file.
    let message = error.description
    if message.contains("\n") || !message.hasPrefix(scratchPath) { fatalError("bad error message: \(message)") }
  } catch {
    fatalError("an error that is not an ImageError: \(error)")
  }
  return 0
}

// The fuzz harness: one input becomes an image file, which a format's reader opens, maps
// and reads the way `lacuna convert` reads a layer. The same function runs under libFuzzer
// (script/fuzz) and when lacuna-fuzz replays files (Main.swift).
//
// Anything a reader may do with hostile bytes is to answer or to throw an ImageError
// whose description is one line naming the file; a trap, a fatalError below, a sanitizer
// report, a hang or an allocation past libFuzzer's -rss_limit_mb is a finding.

import DiskImage

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
  (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") + "/lacuna-fuzz-\(getpid()).img"

private let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: readChunk, alignment: 4096)

/// Removes the scratch file when the process exits normally (libFuzzer's -max_total_time
/// exits through exit(); a crash leaves it behind, named by the pid).
private let scratchCleanup: Void = { atexit { unlink(scratchPath) } }()

/// Runs `format`'s reader over `input`, written to the scratch file first.
func fuzz(_ format: ImageFormat, _ input: UnsafeRawBufferPointer) {
  _ = scratchCleanup
  let fd = open(scratchPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
  guard fd >= 0 else { fatalError("cannot write \(scratchPath): errno \(errno)") }
  var written = 0
  while written < input.count {
    let n = write(fd, input.baseAddress! + written, input.count - written)
    guard n > 0 else { fatalError("cannot write \(scratchPath): errno \(errno)") }
    written += n
  }
  close(fd)

  do {
    let source = try ImageFile.openForReading(scratchPath)
    if format.openReader == nil, let openSequential = format.openSequential {
      try take(try openSequential(SequentialInput(source: source)))
    } else {
      try walk(try format.open(source))
    }
  } catch let error as ImageError {
    // The message must be one line naming the file.
    let message = error.description
    if message.contains("\n") || !message.hasPrefix(scratchPath) {
      fatalError("\(format.name): bad error message: \(message)")
    }
  } catch {
    fatalError("\(format.name): an error that is not an ImageError: \(error)")
  }
}

/// Takes a sequential image's pieces as the engine takes them, in varied sizes, to the end
/// of the disk, then its end check. Every piece starts where the last ended, covers
/// something, and stays within what was asked.
private func take(_ reader: SequentialImageReader) throws {
  var position: Int64 = 0
  var turn: Int64 = 0
  while position < reader.virtualSize {
    turn += 1
    let limit = turn % 3 == 0 ? 4096 + turn : reader.virtualSize - position
    let room = turn % 2 == 0 ? readChunk : 3000
    let piece = try reader.next(limit: limit, into: UnsafeMutableRawBufferPointer(rebasing: readBuffer[0..<room]))
    guard piece.range.lowerBound == position, !piece.range.isEmpty, piece.length <= min(limit, reader.virtualSize - position),
      piece.kind == .zero || (piece.kind == .data && piece.length <= Int64(room))
    else {
      fatalError("next(limit: \(limit)) at \(position) answered \(piece)")
    }
    position = piece.range.upperBound
  }
  try reader.finish()
}

/// Asks everything `info`, `map` and `convert` ask, and reads every data extent of the
/// first `walkLimit` bytes.
private func walk(_ reader: ImageReader) throws {
  _ = reader.formatSpecific
  _ = reader.backing
  _ = reader.clusterSize
  _ = reader.warnings
  _ = reader.isDirty
  let end = min(reader.virtualSize, walkLimit)
  var position: Int64 = 0
  while position < end {
    let extents = try reader.extents(in: position..<end)
    guard let last = extents.last, extents.first?.range.lowerBound == position,
      zip(extents, extents.dropFirst()).allSatisfy({ $0.range.upperBound == $1.range.lowerBound }),
      last.range.upperBound > position, last.range.upperBound <= end
    else {
      fatalError("extents(in: \(position)..<\(end)) answered \(extents), not a nonempty prefix of the range")
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
  // An unaligned read that ends at the end of the disk, as a partial cluster is read.
  if reader.virtualSize > 0 {
    let count = Int(min(reader.virtualSize, 3000))
    try reader.read(
      into: UnsafeMutableRawBufferPointer(rebasing: readBuffer[0..<count]), at: reader.virtualSize - Int64(count))
  }
}

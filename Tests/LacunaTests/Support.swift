import Foundation
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// Makes a sparse file of `size` bytes with `pieces` written at their offsets.
func makeSparseFile(_ path: String, size: Int64, pieces: [(Int64, [UInt8])]) throws {
  let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o644)
  guard fd >= 0 else { throw POSIXError(.EIO) }
  defer { close(fd) }
  for (offset, bytes) in pieces {
    let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
    guard n == bytes.count else { throw POSIXError(.EIO) }
  }
  guard ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(.EIO) }
}

/// Deterministic bytes that do not compress and contain no zero block.
func patternBytes(_ count: Int, seed: UInt64) -> [UInt8] {
  var state = seed &* 6364136223846793005 &+ 1442695040888963407
  return (0..<count).map { _ in
    state = state &* 6364136223846793005 &+ 1442695040888963407
    return UInt8(truncatingIfNeeded: state >> 33) | 1
  }
}

/// Bytes of storage a file occupies, as `du` counts them.
func allocatedBytes(_ path: String) -> Int64 {
  var info = stat()
  guard stat(path, &info) == 0 else { return -1 }
  return Int64(info.st_blocks) * 512
}

func fileSize(_ path: String) -> Int64 {
  var info = stat()
  guard stat(path, &info) == 0 else { return -1 }
  return Int64(info.st_size)
}

/// The data ranges of a file by SEEK_DATA/SEEK_HOLE (independent of lacuna's own code).
func dataRanges(_ path: String) -> [Range<Int64>] {
  let fd = open(path, O_RDONLY)
  defer { close(fd) }
  let size = Int64(lseek(fd, 0, SEEK_END))
  var ranges: [Range<Int64>] = []
  var position: Int64 = 0
  while position < size {
    let start = Int64(lseek(fd, off_t(position), 3 /* SEEK_DATA */))
    if start < 0 { break }
    let end = Int64(lseek(fd, off_t(start), 4 /* SEEK_HOLE */))
    ranges.append(start..<end)
    position = end
  }
  return ranges
}

/// True when two files hold the same bytes, comparing only where either has data (holes
/// read as zeros), so a 1 TiB sparse file compares in milliseconds.
func sameContent(_ a: String, _ b: String) throws -> Bool {
  guard fileSize(a) == fileSize(b) else { return false }
  let ranges = (dataRanges(a) + dataRanges(b)).sorted { $0.lowerBound < $1.lowerBound }
  let fa = open(a, O_RDONLY)
  let fb = open(b, O_RDONLY)
  defer {
    close(fa)
    close(fb)
  }
  let chunk = 1 << 20
  var bufferA = [UInt8](repeating: 0, count: chunk)
  var bufferB = [UInt8](repeating: 0, count: chunk)
  for range in ranges {
    var position = range.lowerBound
    while position < range.upperBound {
      let n = Int(min(Int64(chunk), range.upperBound - position))
      let ra = bufferA.withUnsafeMutableBytes { pread(fa, $0.baseAddress, n, off_t(position)) }
      let rb = bufferB.withUnsafeMutableBytes { pread(fb, $0.baseAddress, n, off_t(position)) }
      guard ra == n, rb == n, bufferA[0..<n] == bufferB[0..<n] else { return false }
      position += Int64(n)
    }
  }
  return true
}

/// Parses a JSON document printed by lacuna or qemu-img.
func parseJSON(_ text: String) throws -> Any {
  try JSONSerialization.jsonObject(with: Data(text.utf8))
}

/// The entries of a `map --output=json`, as comparable dictionaries.
func mapEntries(_ text: String) throws -> [[String: Int64]] {
  guard let list = try parseJSON(text) as? [[String: Any]] else { throw POSIXError(.EINVAL) }
  return list.map { entry in
    var row: [String: Int64] = [:]
    for (key, value) in entry {
      if let flag = value as? Bool { row[key] = flag ? 1 : 0 } else if let number = value as? NSNumber {
        row[key] = number.int64Value
      }
    }
    return row
  }
}

/// Names in a directory, hidden ones included.
func listing(_ directory: URL) -> [String] {
  ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).sorted()
}

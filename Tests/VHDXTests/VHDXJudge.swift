import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// Opens `path` as VHDX.
func openVHDX(_ path: String) throws -> VHDXReader {
  try VHDXReader(source: ImageFile.openForReading(path))
}

/// Reads `count` bytes of the virtual disk at `offset`.
func readBytes(_ reader: ImageReader, at offset: Int64, count: Int) throws -> [UInt8] {
  var bytes = [UInt8](repeating: 0xEE, count: count)
  try bytes.withUnsafeMutableBytes { try reader.read(into: $0, at: offset) }
  return bytes
}

/// Every extent of the disk, merged, without host offsets (for comparing kinds).
func kinds(_ reader: ImageReader) throws -> [Extent] {
  try reader.allExtents(in: 0..<reader.virtualSize).map { Extent($0.range, $0.kind) }.merged()
}

/// The map a VHDX made by qemu must have: every block a write touched holds data (qemu
/// allocates blocks for `write -z` too), everything else reads as zero.
func expectedMap(size: Int64, blockSize: Int64, writes: [Range<Int64>]) -> [Extent] {
  var map: [Extent] = []
  var block: Int64 = 0
  while block * blockSize < size {
    let range = block * blockSize..<min(size, (block + 1) * blockSize)
    map.appendMerging(Extent(range, writes.contains { $0.overlaps(range) } ? .data : .zero))
    block += 1
  }
  return map
}

extension QemuTestCase {
  /// The virtual disk as qemu-img reads it, converted to a sparse raw file in the test's folder.
  func qemuRaw(_ image: String, format: String = "vhdx") throws -> String {
    let output = path(UUID().uuidString + ".raw")
    try qemuImgOK("convert", "-f", format, "-O", "raw", image, output)
    return output
  }

  /// The ranges of a file that hold data (SEEK_DATA/SEEK_HOLE).
  func fileDataRanges(_ file: String) throws -> [Range<Int64>] {
    let handle = try ImageFile.openForReading(file)
    let size = try handle.size()
    return try handle.dataRanges(in: 0..<size) ?? [0..<size]
  }

  /// Unpacks a corpus image sparsely into the test's folder, or skips when the corpus is absent.
  func corpusImage(_ name: String) throws -> String {
    let packed = (corpusRoot()?.path ?? "/work/shared/corpus") + "/discutils/\(name).vhdx.gz"
    guard FileManager.default.fileExists(atPath: packed) else {
      throw XCTSkip("the shared corpus (/work/shared/corpus) is not here; skipping \(name)")
    }
    let output = path("\(name).vhdx")
    let outcome = try runProgram(
      "/bin/sh", ["-c", "gunzip -c \"$0\" | cp --sparse=always /dev/stdin \"$1\"", packed, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    return output
  }
}

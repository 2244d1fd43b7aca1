import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// `lacuna sparsify`: holes dug in place, content unchanged.
final class SparsifyTests: XCTestCase {
  func testInflatedCopyReturnsToTheSourcesAllocation() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    let copy = dir.appendingPathComponent("copy.img").path
    try makeSparseFile(
      src, size: 64 << 20,
      pieces: [
        (0, patternBytes(8192, seed: 1)), (5 << 20, patternBytes(300 << 10, seed: 2)),
        (33 << 20 + 4096, patternBytes(4096, seed: 3)), ((64 << 20) - 4096, patternBytes(4096, seed: 4)),
      ])
    XCTAssertEqual(try runProgram("/bin/cp", ["--sparse=never", src, copy]).status, 0)
    XCTAssertGreaterThanOrEqual(allocatedBytes(copy), 64 << 20, "cp --sparse=never fills the holes")

    let outcome = try lacuna("sparsify", "--summary", copy)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("sparsified"), outcome.stderr)
    XCTAssertEqual(try runProgram("/usr/bin/cmp", [src, copy]).status, 0, "content unchanged")
    XCTAssertEqual(fileSize(copy), 64 << 20)
    XCTAssertEqual(allocatedBytes(copy), allocatedBytes(src), "du: back to the source's allocation")
    XCTAssertEqual(dataRanges(copy), dataRanges(src))

    // A second run finds nothing to do and changes nothing.
    XCTAssertEqual(try lacuna("sparsify", copy).status, 0)
    XCTAssertEqual(allocatedBytes(copy), allocatedBytes(src))
    XCTAssertEqual(listing(dir), ["copy.img", "src.img"])
  }

  func testZeroBlocksInsideDataAndAnOddTail() throws {
    let dir = try temporaryDirectory(self)
    let path = dir.appendingPathComponent("odd.img").path
    var bytes = [UInt8](repeating: 0, count: (3 << 20) + 777)
    bytes.replaceSubrange(4096..<8192, with: patternBytes(4096, seed: 5))
    bytes.replaceSubrange(65536..<65537, with: [7])  // one byte keeps its 4 KiB block (and its 64 KiB one)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    let before = try Data(contentsOf: URL(fileURLWithPath: path))

    XCTAssertEqual(try lacuna("sparsify", "-S", "64k", path).status, 0)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
    XCTAssertEqual(dataRanges(path), [0..<131072], "with -S 64k the first two 64 KiB blocks stay")

    XCTAssertEqual(try lacuna("sparsify", path).status, 0)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
    XCTAssertEqual(dataRanges(path), [4096..<8192, 65536..<69632])
    XCTAssertEqual(fileSize(path), (3 << 20) + 777)
  }

  func testQcow2IsRefusedWithAPointerToConvert() throws {
    let qemuImg = try requireQemuImg()
    let dir = try temporaryDirectory(self)
    let path = dir.appendingPathComponent("disk.qcow2").path
    XCTAssertEqual(try runProgram(qemuImg, ["create", "-q", "-f", "qcow2", path, "16M"]).status, 0)
    let before = try Data(contentsOf: URL(fileURLWithPath: path))
    let outcome = try lacuna("sparsify", path)
    XCTAssertEqual(outcome.status, 2)
    XCTAssertTrue(outcome.stderr.contains("lacuna convert -O qcow2"), outcome.stderr)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
  }

  func testMissingFileAndBadSize() throws {
    let dir = try temporaryDirectory(self)
    XCTAssertEqual(try lacuna("sparsify", dir.appendingPathComponent("nope.img").path).status, 1)
    XCTAssertEqual(try lacuna("sparsify", "-S", "100", dir.path).status, 2)
    XCTAssertEqual(try lacuna("sparsify", dir.path).status, 2, "a directory is not an image")
  }
}

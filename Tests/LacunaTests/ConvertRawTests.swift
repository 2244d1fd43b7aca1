import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// raw → raw through the built binary, on real files: bytes and allocation.
final class ConvertRawTests: XCTestCase {
  func testSparseCopyKeepsHolesAndBytes() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    let dst = dir.appendingPathComponent("dst.img").path
    try makeSparseFile(
      src, size: 64 << 20,
      pieces: [(0, patternBytes(8192, seed: 1)), (5 << 20, patternBytes(300_000, seed: 2)), ((64 << 20) - 4096, patternBytes(4096, seed: 3))])
    let outcome = try lacuna("convert", "-f", "raw", "-O", "raw", src, dst)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(fileSize(dst), 64 << 20)
    XCTAssertTrue(try sameContent(src, dst))
    XCTAssertLessThanOrEqual(allocatedBytes(dst), allocatedBytes(src))
    XCTAssertEqual(dataRanges(dst), dataRanges(src))
    XCTAssertEqual(listing(dir), ["dst.img", "src.img"], "no temporary file is left")
  }

  func testOddSizeIsKeptExactly() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("odd.img").path
    let dst = dir.appendingPathComponent("out.img").path
    let size: Int64 = 5 << 20 + 4097
    try makeSparseFile(src, size: size, pieces: [(size - 100, patternBytes(100, seed: 9)), (1 << 20, patternBytes(10, seed: 4))])
    XCTAssertEqual(try lacuna("convert", "-O", "raw", src, dst).status, 0)
    XCTAssertEqual(fileSize(dst), size, "qemu-img rounds up to 512; lacuna keeps the exact size")
    XCTAssertTrue(try sameContent(src, dst))
    let info = try parseJSON(try lacuna("info", "--output=json", dst).stdout) as? [String: Any]
    XCTAssertEqual((info?["virtual-size"] as? NSNumber)?.int64Value, size)
  }

  /// An image inflated by a byte-stream copy gets its holes back.
  func testAllocatedZeroBlocksBecomeHoles() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("inflated.img").path
    let dst = dir.appendingPathComponent("sparse.img").path
    var bytes = [UInt8](repeating: 0, count: 16 << 20)
    bytes.replaceSubrange(3 << 20..<(3 << 20) + 5000, with: patternBytes(5000, seed: 5))
    try Data(bytes).write(to: URL(fileURLWithPath: src))
    XCTAssertGreaterThanOrEqual(allocatedBytes(src), 16 << 20)
    XCTAssertEqual(try lacuna("convert", "-O", "raw", src, dst).status, 0)
    XCTAssertTrue(try sameContent(src, dst))
    XCTAssertLessThanOrEqual(allocatedBytes(dst), 12 << 10, "only the 5000 bytes of data (two 4 KiB blocks, maybe a third) are allocated")
    XCTAssertEqual(dataRanges(dst), [(3 << 20)..<(3 << 20) + 8192])
  }

  func testSparseSizeZeroWritesEverything() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    let dst = dir.appendingPathComponent("full.img").path
    try makeSparseFile(src, size: 4 << 20, pieces: [(1 << 20, patternBytes(4096, seed: 6))])
    XCTAssertEqual(try lacuna("convert", "-S", "0", "-O", "raw", src, dst).status, 0)
    XCTAssertTrue(try sameContent(src, dst))
    XCTAssertEqual(allocatedBytes(dst), 4 << 20)
  }

  func testLargerSparseSizeKeepsSmallZeroRuns() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    let dst = dir.appendingPathComponent("dst.img").path
    // 64 KiB of data whose second 4 KiB block is zero: with -S 64k it stays one data run.
    var piece = patternBytes(65536, seed: 7)
    piece.replaceSubrange(4096..<8192, with: [UInt8](repeating: 0, count: 4096))
    try makeSparseFile(src, size: 1 << 20, pieces: [(0, piece)])
    XCTAssertEqual(try lacuna("convert", "-S", "64k", src, dst).status, 0)
    XCTAssertEqual(dataRanges(dst), [0..<65536])
    XCTAssertEqual(try lacuna("convert", "-S", "4k", src, dst + "2").status, 0)
    XCTAssertEqual(dataRanges(dst + "2"), [0..<4096, 8192..<65536])
  }

  func testPreallocationModes() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    try makeSparseFile(src, size: 8 << 20, pieces: [(0, patternBytes(4096, seed: 8))])
    for (mode, expectFull) in [("off", false), ("falloc", true), ("full", true)] {
      let dst = dir.appendingPathComponent("\(mode).img").path
      let outcome = try lacuna("convert", "-O", "raw", "-o", "preallocation=\(mode)", src, dst)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertTrue(try sameContent(src, dst), mode)
      if expectFull {
        XCTAssertGreaterThanOrEqual(allocatedBytes(dst), 8 << 20, mode)
      } else {
        XCTAssertLessThanOrEqual(allocatedBytes(dst), 8192, mode)
      }
    }
    let bad = try lacuna("convert", "-O", "raw", "-o", "preallocation=lots", src, dir.appendingPathComponent("bad.img").path)
    XCTAssertEqual(bad.status, 2)
    XCTAssertTrue(bad.stderr.contains("preallocation"), bad.stderr)
    XCTAssertFalse(listing(dir).contains("bad.img"))
  }

  /// A 1 TiB sparse raw with a few MiB of data: the map walk follows the data, not the size.
  func testTerabyteSparseRaw() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("big.img").path
    let dst = dir.appendingPathComponent("copy.img").path
    let tib: Int64 = 1 << 40
    try makeSparseFile(
      src, size: tib,
      pieces: [(0, patternBytes(1 << 20, seed: 10)), (tib / 2, patternBytes(2 << 20, seed: 11)), (tib - 65536, patternBytes(65536, seed: 12))])
    let started = Date()
    let outcome = try lacuna("convert", "-O", "raw", src, dst)
    let seconds = Date().timeIntervalSince(started)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(fileSize(dst), tib)
    XCTAssertEqual(dataRanges(dst), dataRanges(src))
    XCTAssertTrue(try sameContent(src, dst))
    // Not a timing assertion (machines are shared); printed for the reader of the log.
    print("1 TiB sparse raw with 3 MiB of data converted in \(String(format: "%.2f", seconds)) s")
  }

  func testSameFileIsRefused() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("disk.img").path
    try makeSparseFile(src, size: 1 << 20, pieces: [(0, patternBytes(512, seed: 13))])
    XCTAssertEqual(link(src, dir.appendingPathComponent("hardlink.img").path), 0)
    let before = try Data(contentsOf: URL(fileURLWithPath: src))
    for target in [src, dir.appendingPathComponent("hardlink.img").path] {
      let outcome = try lacuna("convert", src, target)
      XCTAssertEqual(outcome.status, 2)
      XCTAssertTrue(outcome.stderr.contains("same file as an input"), outcome.stderr)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1)
    }
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: src)), before)
    XCTAssertEqual(listing(dir), ["disk.img", "hardlink.img"])
  }

  func testMissingInputIsOneLineAndLeavesNothing() throws {
    let dir = try temporaryDirectory(self)
    let outcome = try lacuna("convert", dir.appendingPathComponent("absent.img").path, dir.appendingPathComponent("out.img").path)
    XCTAssertEqual(outcome.status, 1)
    XCTAssertTrue(outcome.stderr.contains("absent.img"), outcome.stderr)
    XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr)
    XCTAssertEqual(listing(dir), [])
  }

  func testUsageErrorsExitTwo() throws {
    XCTAssertEqual(try lacuna("convert", "-S", "3", "a", "b").status, 2)
    XCTAssertEqual(try lacuna("convert", "--no-such-flag", "a", "b").status, 2)
    XCTAssertEqual(try lacuna("convert", "onlyone").status, 2)
    XCTAssertEqual(try lacuna("frobnicate").status, 2)
  }

  /// An existing destination is replaced only once the new image is complete: a failed
  /// conversion leaves the old file as it was.
  func testFailedConversionKeepsExistingDestination() throws {
    let dir = try temporaryDirectory(self)
    let dst = dir.appendingPathComponent("out.img").path
    try Data("old contents".utf8).write(to: URL(fileURLWithPath: dst))
    let src = dir.appendingPathComponent("src.img").path
    try makeSparseFile(src, size: 1 << 20, pieces: [])
    let outcome = try lacuna("convert", "-O", "raw", "-o", "nonsense=1", src, dst)
    XCTAssertEqual(outcome.status, 2)
    XCTAssertEqual(try String(contentsOfFile: dst, encoding: .utf8), "old contents")
    XCTAssertEqual(listing(dir), ["out.img", "src.img"])
  }

  /// SIGTERM in the middle of a conversion: the temporary file is removed and nothing
  /// appears at the destination.
  func testInterruptedConversionLeavesNothing() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    let dst = dir.appendingPathComponent("dst.img").path
    // 512 MiB of non-zero data takes seconds to copy with one thread: plenty of time to
    // interrupt once the temporary file exists.
    let fd = open(src, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
    let block = patternBytes(1 << 20, seed: 14)
    for i in 0..<512 { _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(i) << 20) } }
    close(fd)
    for signal in [SIGTERM, SIGINT] {
      let process = Process()
      process.executableURL = URL(fileURLWithPath: try lacunaBinary())
      process.arguments = ["convert", "-m", "1", "-S", "0", "-O", "raw", src, dst]
      try process.run()
      waitUntilWriting(process, in: dir.path)
      kill(process.processIdentifier, signal)
      process.waitUntilExit()
      XCTAssertEqual(process.terminationReason, .uncaughtSignal, "the conversion finished before the signal; the test needs a slower input")
      XCTAssertEqual(listing(dir), ["src.img"], "signal \(signal) left files behind")
    }
  }
}

/// What a conversion reports as it runs and when it ends.
final class ProgressTests: XCTestCase {
  func testJSONProgressAndSummary() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    var pieces: [(Int64, [UInt8])] = [(1 << 20, patternBytes(3 << 20, seed: 1))]
    pieces.append((40 << 20, [UInt8](repeating: 0, count: 2 << 20)))  // allocated zeros
    try makeSparseFile(src, size: 64 << 20, pieces: pieces)
    let outcome = try lacuna("convert", "--progress=json", "--summary", src, dir.appendingPathComponent("dst.img").path)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let lines = outcome.stdout.split(separator: "\n")
    XCTAssertGreaterThanOrEqual(lines.count, 1)
    var previous: Int64 = -1
    for line in lines {
      let object = try XCTUnwrap(try parseJSON(String(line)) as? [String: Any], String(line))
      let done = try XCTUnwrap((object["bytes-done"] as? NSNumber)?.int64Value)
      XCTAssertEqual((object["bytes-total"] as? NSNumber)?.int64Value, 64 << 20)
      XCTAssertNotNil(object["elapsed"])
      XCTAssertGreaterThan(done, previous)
      previous = done
    }
    XCTAssertEqual(previous, 64 << 20, "the last line says everything is done")
    XCTAssertTrue(outcome.stderr.contains("\((3 << 20)) written"), outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("\(2 << 20) as zero blocks"), outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("\((64 << 20) - (5 << 20)) skipped as holes"), outcome.stderr)
  }

  func testBarProgressEndsAtOneHundred() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    try makeSparseFile(src, size: 8 << 20, pieces: [(0, patternBytes(4096, seed: 2))])
    let outcome = try lacuna("convert", "-p", src, dir.appendingPathComponent("dst.img").path)
    XCTAssertEqual(outcome.status, 0)
    XCTAssertTrue(outcome.stdout.hasSuffix("(100.00/100%)\r\n"), outcome.stdout.debugDescription)
  }
}

import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// A raw source that is not in the page cache is read in large requests, all of a unit's
/// data at once (MADV_WILLNEED on the unit's range), not fault by fault: the kernel reads
/// around each faulting page of a mapping and waits for it, and a cold W1 raw -> raw took
/// two to three times qemu-img's time that way. Judged by the calls lacuna makes (strace):
/// on a cold source the ranges asked for cover its data and no hole; on a warm one nothing
/// is asked for (the check costs one mincore per unit).
final class ColdSourceTests: QemuTestCase {
  /// The madvise calls of a traced run: (length, advice) of each.
  private func advice(_ trace: String) throws -> [(length: Int, advice: String)] {
    let text = try String(contentsOfFile: trace, encoding: .utf8)
    return text.split(separator: "\n").compactMap { line in
      guard let open = line.range(of: "madvise(") else { return nil }
      let fields = line[open.upperBound...].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
      guard fields.count >= 3, let length = Int(fields[1]) else { return nil }
      // "MADV_WILLNEED) = 0", or "MADV_WILLNEED <unfinished ...>" where threads interleave.
      return (length, String(fields[2].prefix { $0.isLetter || $0.isNumber || $0 == "_" }))
    }
  }

  /// Drops `path`'s pages from the page cache; false where they stay (tmpfs, or a kernel
  /// that ignores the advice).
  private func evict(_ path: String) -> Bool {
    let descriptor = open(path, O_RDONLY)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    fsync(descriptor)
    guard posix_fadvise(descriptor, 0, 0, POSIX_FADV_DONTNEED) == 0 else { return false }
    var info = stat()
    guard fstat(descriptor, &info) == 0, let mapping = mmap(nil, Int(info.st_size), PROT_READ, MAP_SHARED, descriptor, 0),
      mapping != MAP_FAILED
    else { return false }
    defer { munmap(mapping, Int(info.st_size)) }
    var resident = [UInt8](repeating: 0, count: (Int(info.st_size) + 4095) / 4096)
    guard mincore(mapping, Int(info.st_size), &resident) == 0 else { return false }
    return resident.allSatisfy { $0 & 1 == 0 }
  }

  func testAColdRawSourceIsAskedForInLargeRangesAndAWarmOneNotAtAll() throws {
    let strace = try requireProgram("strace", skipping: "strace is not installed (apt-get install strace)")
    // 12 MiB of data in three extents (a zero MiB inside the first), holes between.
    let source = path("src.raw")
    var first = patternBytes(8 << 20, seed: 11)
    for i in (2 << 20)..<(3 << 20) { first[i] = 0 }
    try makeSparseFile(
      source, size: 256 << 20,
      pieces: [(1 << 20, first), (40 << 20, patternBytes(3 << 20, seed: 12)), (200 << 20, patternBytes(1 << 20, seed: 13))])
    let data = dataRanges(source).reduce(0) { $0 + $1.count }
    XCTAssertEqual(data, 12 << 20)
    guard evict(source) else { throw XCTSkip("the page cache keeps \(source) here (tmpfs?): nothing is cold") }

    func convert(_ name: String) throws -> [(length: Int, advice: String)] {
      let output = path(name)
      let trace = path("\(name).trace")
      let outcome = try runProgram(
        strace, ["-f", "-e", "trace=madvise", "-o", trace, try lacunaBinary(), "convert", "-O", "raw", source, output])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertEqual(try qemuImg("compare", "-f", "raw", "-F", "raw", source, output).status, 0)
      XCTAssertEqual(dataRanges(output).reduce(0) { $0 + $1.count }, 11 << 20, "\(dataRanges(output))")
      return try advice(trace)
    }

    let cold = try convert("cold.raw")
    let asked = cold.filter { $0.advice == "MADV_WILLNEED" }
    // Every data byte asked for once, a page more at most per range; no hole (the source is
    // 256 MiB: reading ahead into holes fills the page cache with zero pages).
    XCTAssertGreaterThanOrEqual(asked.reduce(0) { $0 + $1.length }, data, "\(asked)")
    XCTAssertLessThanOrEqual(asked.reduce(0) { $0 + $1.length }, data + asked.count * 4096, "\(asked)")
    XCTAssertFalse(cold.contains { $0.advice.contains("POPULATE") }, "\(cold)")

    // Now the source is in the page cache: nothing to ask for.
    let warm = try convert("warm.raw")
    XCTAssertFalse(warm.contains { $0.advice == "MADV_WILLNEED" }, "\(warm)")
    XCTAssertFalse(warm.contains { $0.advice.contains("POPULATE") }, "\(warm)")
  }

  /// Where lacuna clones (XFS), a unit spans up to 16 MiB of data over up to 64 MiB of the
  /// disk, and its first page says nothing of the rest: whether data is asked for is
  /// decided for each 2 MiB of the disk. A source whose first 8 MiB extent is in the
  /// page cache and whose 3 MiB and 1 MiB ones (40 and 50 MiB in) are not: those 4 MiB are
  /// asked for, the 8 MiB are not. (Decided on a unit's first page, nothing was asked for.)
  func testAPartlyColdSourceIsAskedForWhereItIsColdInsideAUnit() throws {
    let strace = try requireProgram("strace", skipping: "strace is not installed (apt-get install strace)")
    let mountPoint = try mountScratch("xfs")
    let source = mountPoint + "/src.raw"
    try makeSparseFile(
      source, size: 256 << 20,
      pieces: [
        (1 << 20, patternBytes(8 << 20, seed: 21)), (40 << 20, patternBytes(3 << 20, seed: 22)),
        (50 << 20, patternBytes(1 << 20, seed: 23)),
      ])
    guard evict(source) else { throw XCTSkip("the page cache keeps \(source) here: nothing is cold") }
    let handle = try XCTUnwrap(FileHandle(forReadingAtPath: source))
    try handle.seek(toOffset: 1 << 20)
    XCTAssertEqual(try handle.read(upToCount: 8 << 20)?.count, 8 << 20)
    try handle.close()

    let output = mountPoint + "/out.raw"
    let trace = path("partly-cold.trace")
    let outcome = try runProgram(
      strace, ["-f", "-e", "trace=madvise", "-o", trace, try lacunaBinary(), "convert", "--summary", "-O", "raw", source, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("\(12 << 20) cloned"), outcome.stderr)
    XCTAssertEqual(try qemuImg("compare", "-f", "raw", "-F", "raw", source, output).status, 0)
    let asked = try advice(trace).filter { $0.advice == "MADV_WILLNEED" }
    let total = asked.reduce(0) { $0 + $1.length }
    XCTAssertGreaterThanOrEqual(total, 4 << 20, "\(asked)")
    XCTAssertLessThanOrEqual(total, (4 << 20) + asked.count * 4096, "\(asked)")
  }
}

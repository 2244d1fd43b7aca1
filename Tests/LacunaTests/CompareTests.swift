import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// `lacuna compare` against `qemu-img compare` on the same pairs: the same exit status and
/// the same lines on standard output.
final class CompareTests: QemuTestCase {
  /// Runs both tools on the same arguments (names relative to the test's directory) and
  /// insists they agree; returns lacuna's outcome.
  @discardableResult
  func judge(_ arguments: String..., file: StaticString = #filePath, line: UInt = #line) throws -> Outcome {
    let theirs = try runProgram(qemu, ["compare"] + arguments, in: dir)
    let ours = try lacuna(["compare"] + arguments, in: dir)
    let call = arguments.joined(separator: " ")
    XCTAssertEqual(ours.status, theirs.status, "compare \(call): \(ours.stdout)\(ours.stderr) vs \(theirs.stdout)\(theirs.stderr)", file: file, line: line)
    XCTAssertEqual(ours.stdout, theirs.stdout, "compare \(call)", file: file, line: line)
    return ours
  }

  /// An 8 MiB raw disk with data at the start, in the middle and at the very end, and holes.
  func makeSeed(_ name: String = "seed.raw") throws {
    try qemuImgOK("create", "-q", "-f", "raw", name, "8M")
    try qemuIO(name, "write -P 0x41 0 100k", "write -P 0x42 3M 1M", "write -P 0x43 8380416 8192")
  }

  func testIdenticalAcrossFormats() throws {
    try makeSeed()
    let made: [(String, [String])] = [
      ("qcow2", []), ("vmdk", []), ("vhdx", []), ("vdi", []), ("vpc", []), ("vpc", ["-o", "force_size=on"]),
    ]
    for (index, (format, options)) in made.enumerated() {
      let name = "copy\(index).\(format)"
      let converted = try runProgram(qemu, ["convert", "-q", "-f", "raw", "-O", format] + options + ["seed.raw", name], in: dir)
      XCTAssertEqual(converted.status, 0, converted.stderr)
      try judge("seed.raw", name)
      try judge("-f", "raw", "-F", format, "seed.raw", name)
      try judge(name, "seed.raw")
      try judge(name, "copy0.qcow2")
    }
  }

  func testMismatchAtKnownOffsets() throws {
    try makeSeed()
    // Each: a qemu-io write on a qcow2 copy of the seed.
    let changes = [
      "write -P 0x01 0 1",  // the first byte, inside data
      "write -P 0x01 66001 1",  // an odd offset inside data
      "write -P 0x01 8388607 1",  // the last byte
      "write -P 0x01 2000001 3",  // an odd offset where the seed has a hole
      "write -P 0x42 3M 4k",  // the same bytes written again: still identical
      "write -z 3M 64k",  // a zero cluster over data
      "write -z 5M 64k",  // a zero cluster over a hole: identical
      "write -P 0x00 6M 64k",  // written zeros over a hole: identical
    ]
    for (index, change) in changes.enumerated() {
      let name = "changed\(index).qcow2"
      try qemuImgOK("convert", "-q", "-f", "raw", "-O", "qcow2", "seed.raw", name)
      try qemuIO(name, change)
      try judge("seed.raw", name)
      try judge(name, "seed.raw")
    }
    // Raw against raw, with the difference in the second half of a large sparse disk.
    try qemuImgOK("create", "-q", "-f", "raw", "big1.raw", "64G")
    try qemuImgOK("create", "-q", "-f", "raw", "big2.raw", "64G")
    try qemuIO("big1.raw", "write -P 0x51 40G 1M")
    try qemuIO("big2.raw", "write -P 0x51 40G 1M", "write -P 0x52 42949673001 7")
    try judge("big1.raw", "big2.raw")
    try judge("-f", "raw", "-F", "raw", "big2.raw", "big1.raw")
  }

  /// A raw file whose size is not a multiple of 512: qemu sees it rounded up, and counts
  /// sectors from the end of its data.
  func testUnalignedRawSizes() throws {
    var bytes = Data((0..<1001).map { UInt8(truncatingIfNeeded: $0 * 7 + 1) })
    try bytes.write(to: URL(fileURLWithPath: path("odd.raw")))
    bytes.append(Data(count: 23))
    try bytes.write(to: URL(fileURLWithPath: path("even.raw")))
    try judge("odd.raw", "even.raw")
    try judge("-s", "odd.raw", "even.raw")
    bytes[1010] = 0x78
    try bytes.write(to: URL(fileURLWithPath: path("even.raw")))
    try judge("odd.raw", "even.raw")
    bytes.append(Data(count: 476))
    try bytes.write(to: URL(fileURLWithPath: path("longer.raw")))
    try judge("odd.raw", "longer.raw")
  }

  func testDifferentSizes() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "small.qcow2", "4M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "large.qcow2", "8M")
    try qemuIO("small.qcow2", "write -P 0x61 1M 64k")
    try qemuIO("large.qcow2", "write -P 0x61 1M 64k", "write -z 6M 64k", "write -P 0 7M 4k")
    try judge("small.qcow2", "large.qcow2")
    try judge("large.qcow2", "small.qcow2")
    try judge("-s", "small.qcow2", "large.qcow2")
    // The larger disk's tail holds data.
    try qemuIO("large.qcow2", "write -P 0x62 5000001 1")
    try judge("small.qcow2", "large.qcow2")
    try judge("large.qcow2", "small.qcow2")
    // A difference in the common part comes first, without the size warning.
    try qemuIO("large.qcow2", "write -P 0x63 1000001 1")
    try judge("small.qcow2", "large.qcow2")
    // A raw tail of data that reads as zeros.
    try qemuImgOK("create", "-q", "-f", "raw", "large.raw", "6M")
    try qemuIO("large.raw", "write -P 0x61 1M 64k", "write -P 0 5M 64k")
    try judge("small.qcow2", "large.raw")
  }

  func testStrictMode() throws {
    try makeSeed()
    try qemuImgOK("convert", "-q", "-f", "raw", "-O", "qcow2", "seed.raw", "copy.qcow2")
    try judge("-s", "seed.raw", "copy.qcow2")
    try judge("-s", "seed.raw", "seed.raw")
    try judge("-s", "copy.qcow2", "copy.qcow2")
    // The same allocation, written in another order: qemu's status runs reach the end at
    // different places.
    try qemuImgOK("create", "-q", "-f", "qcow2", "one.qcow2", "128k")
    try qemuIO("one.qcow2", "write -P 1 0 64k", "write -P 2 64k 64k")
    try qemuImgOK("create", "-q", "-f", "qcow2", "two.qcow2", "128k")
    try qemuIO("two.qcow2", "write -P 2 64k 64k", "write -P 1 0 64k")
    try judge("-s", "one.qcow2", "two.qcow2")
    try judge("one.qcow2", "two.qcow2")
    // A zero cluster against nothing.
    try qemuImgOK("create", "-q", "-f", "qcow2", "empty.qcow2", "4M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "zeroed.qcow2", "4M")
    try qemuIO("zeroed.qcow2", "write -z 1M 64k")
    try judge("-s", "empty.qcow2", "zeroed.qcow2")
    try judge("empty.qcow2", "zeroed.qcow2")
    // Content differs before the allocation does.
    try qemuImgOK("create", "-q", "-f", "qcow2", "a.qcow2", "4M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "b.qcow2", "4M")
    try qemuIO("a.qcow2", "write -P 1 0 64k", "write -P 2 1M 64k")
    try qemuIO("b.qcow2", "write -P 3 0 64k")
    try judge("-s", "a.qcow2", "b.qcow2")
  }

  /// base <- mid <- top, against its flattened copy and against a chain whose middle layer
  /// was changed where the top does not cover it.
  func testChains() throws {
    func makeChain(_ prefix: String) throws {
      try qemuImgOK("create", "-q", "-f", "qcow2", "\(prefix)base.qcow2", "8M")
      try qemuIO("\(prefix)base.qcow2", "write -P 0x11 0 1M", "write -P 0x12 6M 1M")
      try qemuImgOK(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "\(prefix)base.qcow2", "-F", "qcow2",
        "\(prefix)mid.qcow2", "8M")
      try qemuIO("\(prefix)mid.qcow2", "write -P 0x22 512k 256k", "write -z 0 64k", "write -P 0x23 5M 4k")
      try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "\(prefix)mid.qcow2", "-F", "qcow2", "\(prefix)top.qcow2", "8M")
      try qemuIO("\(prefix)top.qcow2", "write -P 0x33 2M 64k", "write -z 640k 64k", "write -z 6M 128k")
    }
    try makeChain("")
    try makeChain("other-")
    try qemuImgOK("convert", "-q", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    try qemuImgOK("convert", "-q", "-O", "raw", "top.qcow2", "flat.raw")
    try judge("top.qcow2", "flat.qcow2")
    try judge("flat.raw", "top.qcow2")
    try judge("top.qcow2", "other-top.qcow2")
    try qemuIO("other-mid.qcow2", "write -P 0x24 5M 512")
    try judge("top.qcow2", "other-top.qcow2")
    try judge("other-top.qcow2", "flat.raw")
    // Masked by the top's zero cluster: still identical.
    try qemuIO("other-mid.qcow2", "write -P 0x24 5M 512")
    try qemuIO("other-base.qcow2", "write -P 0x25 6M 4k")
    try judge("top.qcow2", "other-top.qcow2")
    // A top larger than its backing file: past the backing file's end, qemu counts the
    // zeros as allocated (strict mode sees it).
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "flat.qcow2", "-F", "qcow2", "grown.qcow2", "12M")
    try qemuIO("grown.qcow2", "write -P 0x44 10M 64k")
    try qemuImgOK("convert", "-q", "-O", "qcow2", "grown.qcow2", "grown-flat.qcow2")
    try judge("-s", "grown.qcow2", "grown-flat.qcow2")
    try judge("grown.qcow2", "grown-flat.qcow2")
    // An untrusted image may not make lacuna open its backing file.
    let refused = try lacuna("compare", "--untrusted", "top.qcow2", "flat.qcow2", in: dir)
    XCTAssertEqual(refused.status, 2, refused.stderr)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertEqual(try lacuna("compare", "--untrusted", "flat.raw", "flat.qcow2", in: dir).status, 0)
  }

  func testErrorsAreOneLine() throws {
    try makeSeed()
    for arguments in [["missing.img", "seed.raw"], ["seed.raw", "missing.img"], ["-f", "nonsense", "seed.raw", "seed.raw"], ["-F", "qcow2", "seed.raw", "seed.raw"]] {
      let theirs = try runProgram(qemu, ["compare"] + arguments, in: dir)
      let ours = try lacuna(["compare"] + arguments, in: dir)
      XCTAssertEqual(ours.status, theirs.status, "\(arguments): \(ours.stderr)")
      XCTAssertEqual(ours.status, 2)
      XCTAssertEqual(ours.stdout, "")
      XCTAssertEqual(ours.stderr.split(separator: "\n").count, 1, ours.stderr)
    }
  }

  /// A qcow2 whose data lies past the end of its file: qemu-img reads zeros there; lacuna
  /// stops with exit 3 (the allocation query failed) and one line naming the image.
  func testDamagedImageIsAnError() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "cut.qcow2", "4M")
    try qemuIO("cut.qcow2", "write -P 1 0 1M", "write -P 2 2M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "whole.qcow2", "4M")
    try qemuIO("whole.qcow2", "write -P 1 0 1M", "write -P 2 2M 1M")
    XCTAssertEqual(truncate(path("cut.qcow2"), 1_500_000), 0)
    let ours = try lacuna("compare", "cut.qcow2", "whole.qcow2", in: dir)
    XCTAssertEqual(ours.status, 3, ours.stderr)
    XCTAssertEqual(ours.stdout, "")
    XCTAssertEqual(ours.stderr.split(separator: "\n").count, 1, ours.stderr)
    XCTAssertTrue(ours.stderr.contains("cut.qcow2"), ours.stderr)
  }

  /// qemu-img's `-p`: progress lines ended by a carriage return, the verdict, an empty line.
  func testProgressEndsAsQemuImgDoes() throws {
    try makeSeed()
    try qemuImgOK("convert", "-q", "-f", "raw", "-O", "qcow2", "seed.raw", "copy.qcow2")
    let ours = try lacuna("compare", "-p", "seed.raw", "copy.qcow2", in: dir)
    XCTAssertEqual(ours.status, 0)
    XCTAssertTrue(ours.stdout.hasPrefix("    (0.00/100%)\r"), ours.stdout)
    XCTAssertTrue(ours.stdout.hasSuffix("    (100.00/100%)\rImages are identical.\n\n"), ours.stdout)
    let quiet = try lacuna("compare", "-q", "seed.raw", "seed.raw", in: dir)
    XCTAssertEqual(quiet.stdout, "")
  }

  /// Holes are never read: a 1 TiB disk with 1 MiB of data, as raw (sparse) against qcow2,
  /// compares in well under a second, and reads little more than that megabyte.
  func testHolesAreNotRead() throws {
    try qemuImgOK("create", "-q", "-f", "raw", "huge.raw", "1T")
    try qemuIO("huge.raw", "write -P 0x71 700G 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "huge.qcow2", "1T")
    try qemuIO("huge.qcow2", "write -P 0x71 700G 1M")
    let started = Date()
    let ours = try lacuna("compare", "huge.raw", "huge.qcow2", in: dir)
    let seconds = Date().timeIntervalSince(started)
    XCTAssertEqual(ours.status, 0, ours.stderr)
    XCTAssertEqual(ours.stdout, "Images are identical.\n")
    XCTAssertLessThan(seconds, 1.5, "1 TiB of holes took \(seconds) s")
    if let strace = which("strace") {
      let traced = try runProgram(
        strace, ["-f", "-e", "trace=pread64,read", "-o", path("trace.txt"), try lacunaBinary(), "compare", "huge.raw", "huge.qcow2"],
        in: dir)
      XCTAssertEqual(traced.status, 0, traced.stderr)
      let trace = try String(contentsOfFile: path("trace.txt"), encoding: .utf8)
      let bytesRead = trace.split(separator: "\n").compactMap { line -> Int? in
        guard let equals = line.range(of: "= ", options: .backwards) else { return nil }
        return Int(line[equals.upperBound...].split(separator: " ").first ?? "")
      }.filter { $0 > 0 }.reduce(0, +)
      XCTAssertLessThan(bytesRead, 8 << 20, "lacuna read \(bytesRead) bytes for 2 MiB of data")
    }
  }
}

import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// Backing chains made by qemu-img, read by the built binary and judged by qemu-img.
final class ChainTests: QemuTestCase {
  /// base (8 MiB, 64 KiB clusters) <- mid (16 MiB, 4 KiB clusters) <- top (32 MiB), with
  /// zero clusters in upper layers masking data below, and each layer larger than the last.
  func makeThreeLayers() throws -> String {
    try qemuImgOK("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    try qemuIO("base.qcow2", "write -P 0x11 0 1M", "write -P 0x12 6M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "16M")
    try qemuIO("mid.qcow2", "write -P 0x22 512k 256k", "write -z 0 64k", "write -P 0x23 10M 4k")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "32M")
    try qemuIO("top.qcow2", "write -P 0x33 2M 64k", "write -z 640k 64k", "write -z 6M 128k", "write -P 0x34 20M 100k")
    return "top.qcow2"
  }

  func testThreeLayerChainConvertsLikeQemuImg() throws {
    let top = try makeThreeLayers()
    try qemuImgOK("convert", "-O", "raw", top, "theirs.raw")
    let outcome = try lacuna("convert", "-O", "raw", path(top), path("ours.raw"))
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(fileSize(path("ours.raw")), 32 << 20)
    XCTAssertTrue(try sameContent(path("ours.raw"), path("theirs.raw")))
    // Zero clusters masking data below come out as holes, as does everything unallocated.
    for masked in [0..<65536, (640 << 10)..<(704 << 10), (6 << 20)..<((6 << 20) + (128 << 10))] as [Range<Int64>] {
      XCTAssertFalse(dataRanges(path("ours.raw")).contains { $0.overlaps(masked) }, "\(masked) is a hole")
    }
    XCTAssertLessThanOrEqual(allocatedBytes(path("ours.raw")), allocatedBytes(path("theirs.raw")))
  }

  /// Chains across formats: a qcow2 overlay on a base of each format lacuna reads (made by
  /// qemu-img, filled with qemu-io), converted to raw and to qcow2 through the binary and
  /// judged by qemu-img; the overlay's zero clusters stay holes over the base's data.
  func testQcow2OverlaysOnEveryReadFormat() throws {
    for (format, options) in [("vmdk", [String]()), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vpc", []), ("vhdx", []), ("vdi", [])] {
      let base = "base-\(options.isEmpty ? format : "stream").\(format)"
      var seed = Data(count: 8 << 20)
      seed.replaceSubrange(0..<(1 << 20), with: Data(repeating: 0x41, count: 1 << 20))
      seed.replaceSubrange((5 << 20)..<((5 << 20) + (512 << 10)), with: Data(repeating: 0x42, count: 512 << 10))
      try seed.write(to: URL(fileURLWithPath: path("seed.raw")))
      let made = try runProgram(qemu, ["convert", "-f", "raw", "-O", format] + options + ["seed.raw", base], in: dir)
      XCTAssertEqual(made.status, 0, made.stderr)
      let top = "over-\(base).qcow2"
      try qemuImgOK("create", "-q", "-f", "qcow2", "-b", base, "-F", format, top, "8M")
      try qemuIO(top, "write -P 0x43 512k 64k", "write -z 5M 128k")
      try qemuImgOK("convert", "-O", "raw", top, "theirs.raw")
      let outcome = try lacuna("convert", "-O", "raw", path(top), path("ours.raw"))
      XCTAssertEqual(outcome.status, 0, "\(base): \(outcome.stderr)")
      XCTAssertTrue(try sameContent(path("ours.raw"), path("theirs.raw")), "\(base): bytes differ from qemu-img's")
      XCTAssertFalse(dataRanges(path("ours.raw")).contains { $0.overlaps((5 << 20)..<((5 << 20) + (128 << 10))) }, base)
      let flat = try lacuna("convert", "-O", "qcow2", path(top), path("flat.qcow2"))
      XCTAssertEqual(flat.status, 0, "\(base): \(flat.stderr)")
      XCTAssertTrue(try qemuImgOK("compare", "-f", "raw", "-F", "qcow2", "theirs.raw", "flat.qcow2").contains("identical"), base)
      for name in ["ours.raw", "theirs.raw", "flat.qcow2"] { try FileManager.default.removeItem(atPath: path(name)) }
    }
  }

  func testChainMapMatchesQemuImg() throws {
    let top = try makeThreeLayers()
    let ours = try lacuna("map", "--output=json", path(top), in: dir)
    XCTAssertEqual(ours.status, 0, ours.stderr)
    let theirs = try qemuImgOK("map", "--output=json", top)
    XCTAssertEqual(try mapEntries(ours.stdout), try mapEntries(theirs))
    XCTAssertEqual(Set(try mapEntries(ours.stdout).map { $0["depth"]! }), [0, 1, 2])
  }

  func testInfoBackingChainMatchesQemuImg() throws {
    let top = try makeThreeLayers()
    let ours = try lacuna("info", "--output=json", "--backing-chain", top, in: dir)
    XCTAssertEqual(ours.status, 0, ours.stderr)
    let theirs = try qemuImgOK("info", "--output=json", "--backing-chain", top)
    let a = try XCTUnwrap(try parseJSON(ours.stdout) as? [[String: Any]])
    let b = try XCTUnwrap(try parseJSON(theirs) as? [[String: Any]])
    XCTAssertEqual(a.count, 3)
    XCTAssertEqual(a.count, b.count)
    for (mine, qemus) in zip(a, b) {
      XCTAssertEqual(Set(mine.keys), Set(qemus.keys))
      for key in ["virtual-size", "filename", "format", "cluster-size", "backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag", "actual-size"] {
        XCTAssertEqual(mine[key].map { "\($0)" }, qemus[key].map { "\($0)" }, key)
      }
      let myData = try XCTUnwrap((mine["format-specific"] as? [String: Any])?["data"] as? [String: Any])
      let qemuData = try XCTUnwrap((qemus["format-specific"] as? [String: Any])?["data"] as? [String: Any])
      XCTAssertEqual(NSDictionary(dictionary: myData), NSDictionary(dictionary: qemuData))
    }
    let human = try lacuna("info", "--backing-chain", top, in: dir).stdout
    XCTAssertTrue(human.contains("backing file: mid.qcow2"), human)
    XCTAssertTrue(human.contains("compat: 1.1"), human)
  }

  /// Backing names resolve against the directory of the image naming them, not the cwd.
  func testRelativeBackingNamesResolveFromTheImage() throws {
    _ = try makeThreeLayers()
    let elsewhere = try temporaryDirectory(self)
    let outcome = try lacuna("convert", "-O", "raw", path("top.qcow2"), elsewhere.appendingPathComponent("flat.raw").path, in: elsewhere)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try qemuImgOK("convert", "-O", "raw", "top.qcow2", "theirs.raw")
    XCTAssertTrue(try sameContent(elsewhere.appendingPathComponent("flat.raw").path, path("theirs.raw")))
  }

  func testRawBackingFile() throws {
    try makeSparseFile(path("base.raw"), size: 4 << 20, pieces: [(0, patternBytes(1 << 20, seed: 1))])
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over.qcow2", "6M")
    try qemuIO("over.qcow2", "write -P 0x44 128k 64k", "write -z 512k 64k")
    try qemuImgOK("convert", "-O", "raw", "over.qcow2", "theirs.raw")
    XCTAssertEqual(try lacuna("convert", "-O", "raw", path("over.qcow2"), path("ours.raw")).status, 0)
    XCTAssertTrue(try sameContent(path("ours.raw"), path("theirs.raw")))
    let ours = try lacuna("map", "--output=json", "over.qcow2", in: dir)
    XCTAssertEqual(try mapEntries(ours.stdout), try mapEntries(try qemuImgOK("map", "--output=json", "over.qcow2")))
  }

  /// `-f raw` reads a qcow2 file as the bytes it is.
  func testFormatRawReadsAQcow2FileAsBytes() throws {
    _ = try makeThreeLayers()
    XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", path("base.qcow2"), path("bytes.raw")).status, 0)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path("bytes.raw"))), try Data(contentsOf: URL(fileURLWithPath: path("base.qcow2"))))
  }

  func testBackingLoopIsRefused() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2")
    try qemuImgOK("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
    for verb in [["convert", "-O", "raw"], ["map"], ["info", "--backing-chain"]] {
      let outcome = try runProgram(try lacunaBinary(), verb + ["b.qcow2"] + (verb[0] == "convert" ? ["out.raw"] : []), in: dir)
      XCTAssertEqual(outcome.status, 1, outcome.stderr)
      // The image the user named, then the chain down to where it loops.
      XCTAssertTrue(outcome.stderr.contains("b.qcow2 -> a.qcow2 -> b.qcow2: backing chain loops"), outcome.stderr)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1)
    }
    XCTAssertFalse(listing(dir).contains("out.raw"))
  }

  func testChainDeeperThanTheLimitIsRefused() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "l0.qcow2", "1M")
    for i in 1...64 {
      try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "l\(i - 1).qcow2", "-F", "qcow2", "l\(i).qcow2")
    }
    // 64 layers (l63 down to l0) are fine; 65 are not.
    XCTAssertEqual(try lacuna("map", "l63.qcow2", in: dir).status, 0)
    let outcome = try lacuna("convert", "l64.qcow2", "out.raw", in: dir)
    XCTAssertEqual(outcome.status, 1)
    XCTAssertTrue(outcome.stderr.contains("deeper than 64"), outcome.stderr)
  }

  func testMissingBackingFileNamesIt() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "gone.qcow2", "1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2")
    try FileManager.default.removeItem(atPath: path("gone.qcow2"))
    let outcome = try lacuna("convert", "orphan.qcow2", "out.raw", in: dir)
    XCTAssertEqual(outcome.status, 1)
    XCTAssertTrue(outcome.stderr.contains("orphan.qcow2") && outcome.stderr.contains("gone.qcow2"), outcome.stderr)
    XCTAssertEqual(listing(dir), ["orphan.qcow2"])
  }

  /// A backing reference without a recorded format is refused unless the user gives one.
  func testUnrecordedBackingFormatNeedsTheUser() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    try qemuIO("base.qcow2", "write -P 0x55 0 64k")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    // Blank the backing-format extension's type: the extension list then ends there.
    let header = try ImageHeaderPatch(path: path("top.qcow2"))
    XCTAssertEqual(try header.uint32(at: 112), 0xe279_2aca, "qemu 7.2 puts the backing-format extension at 112")
    try header.write(uint32: 0, at: 112)
    XCTAssertFalse(try qemuImgOK("info", "top.qcow2").contains("backing file format"))
    let refused = try lacuna("convert", "top.qcow2", "out.raw", in: dir)
    XCTAssertEqual(refused.status, 2, refused.stderr)
    XCTAssertTrue(refused.stderr.contains("no recorded format"), refused.stderr)
    let given = try lacuna("convert", "--source-backing-format", "qcow2", "top.qcow2", "out.raw", in: dir)
    XCTAssertEqual(given.status, 0, given.stderr)
    try qemuImgOK("convert", "-O", "raw", "base.qcow2", "base.raw")
    XCTAssertTrue(try sameContent(path("out.raw"), path("base.raw")))
  }

  /// A 1 TiB overlay on a 3-layer chain maps and converts by its data, not its size.
  func testTerabyteTopOfAChain() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "b0.qcow2", "64M")
    try qemuIO("b0.qcow2", "write -P 0x61 0 4M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "b0.qcow2", "-F", "qcow2", "b1.qcow2", "1G")
    try qemuIO("b1.qcow2", "write -z 1M 1M", "write -P 0x62 512M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "b2.qcow2", "1T")
    try qemuIO("b2.qcow2", "write -P 0x63 1000G 2M", "write -z 2M 64k")
    let ours = try lacuna("map", "--output=json", "b2.qcow2", in: dir)
    XCTAssertEqual(try mapEntries(ours.stdout), try mapEntries(try qemuImgOK("map", "--output=json", "b2.qcow2")))
    let started = Date()
    let outcome = try lacuna("convert", "-O", "raw", "b2.qcow2", "flat.raw", in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    print("3-layer chain with a 1 TiB top converted to raw in \(String(format: "%.2f", Date().timeIntervalSince(started))) s")
    XCTAssertEqual(fileSize(path("flat.raw")), 1 << 40)
    XCTAssertLessThanOrEqual(allocatedBytes(path("flat.raw")), 8 << 20)
    let compare = try runProgram(qemu, ["compare", "-f", "qcow2", "-F", "raw", "b2.qcow2", "flat.raw"], in: dir)
    XCTAssertEqual(compare.status, 0, compare.stdout + compare.stderr)
  }
}

/// Reads and changes big-endian fields of a file in place (for damaging copies in tests).
struct ImageHeaderPatch {
  let path: String

  func uint32(at offset: Int) throws -> UInt32 {
    let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: UInt64(offset))
    let bytes = try XCTUnwrap(try handle.read(upToCount: 4))
    return bytes.reduce(0) { $0 << 8 | UInt32($1) }
  }

  func write(uint32 value: UInt32, at offset: Int) throws {
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: UInt64(offset))
    handle.write(Data([24, 16, 8, 0].map { UInt8(truncatingIfNeeded: value >> $0) }))
  }
}

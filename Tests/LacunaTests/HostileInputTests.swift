import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// One damaged or hostile input: how to make it, and what lacuna must say about it.
struct BadInput {
  var name: String
  /// A fragment of the one line lacuna prints on standard error.
  var expected: String
  /// `-f qcow2` for cases that must not depend on probing.
  var format: [String] = []
  /// 1 for damage and system errors, 2 for what the user can fix with a flag.
  var status: Int32 = 1
  /// Writes `bad.qcow2` (and any file it refers to) into the directory.
  var make: (URL) throws -> Void
}

/// Every bad input that issue 6 lists, converted by the built binary: one line on standard
/// error naming the file and the problem, a non-zero exit, no crash, no hang, an address
/// space of 1 GiB at most, nothing in the destination directory, the input unchanged.
final class HostileInputTests: XCTestCase {
  /// A copy of `fixture` with `change` applied, written as `bad.qcow2`.
  static func patched(_ fixture: String, _ change: @escaping (inout PatchableImage) -> Void) -> (URL) throws -> Void {
    return { directory in
      var image = try PatchableImage(fixture: fixture)
      change(&image)
      try image.write(to: directory.appendingPathComponent("bad.qcow2"))
    }
  }

  static func bytes(_ bytes: [UInt8]) -> (URL) throws -> Void {
    return { try Data(bytes).write(to: $0.appendingPathComponent("bad.qcow2")) }
  }

  /// `bad.qcow2` is chain-top.qcow2 naming `backing`; `others` are more overlays, each
  /// (name, its backing name); chain-base.qcow2 is there too.
  static func chain(backing: String, others: [(String, String)] = [], change: ((inout PatchableImage) -> Void)? = nil)
    -> (URL) throws -> Void
  {
    return { directory in
      var top = try PatchableImage(fixture: "chain-top.qcow2")
      top.setBackingName(backing)
      change?(&top)
      try top.write(to: directory.appendingPathComponent("bad.qcow2"))
      for (name, backingName) in others {
        var image = try PatchableImage(fixture: "chain-top.qcow2")
        image.setBackingName(backingName)
        try image.write(to: directory.appendingPathComponent(name))
      }
      try PatchableImage(fixture: "chain-base.qcow2").write(to: directory.appendingPathComponent("chain-base.qcow2"))
    }
  }

  // v3-64k.qcow2: 64 KiB clusters, 4 MiB, refcount table at 0x10000 (1 cluster), L1 table
  // at 0x30000 (1 entry), a feature-name table, 512 KiB long. compressed-*.qcow2: 4 KiB
  // clusters, 1 MiB, compressed cluster at virtual 0. chain-top.qcow2: 4 KiB clusters,
  // backing name at 0x88, backing-format extension at 0x70.
  static let cases: [BadInput] = {
    let v3 = "v3-64k.qcow2"
    var cases: [BadInput] = [
      BadInput(name: "empty file, -f qcow2", expected: "file of 0 bytes is too short for a qcow2 header", format: ["-f", "qcow2"], make: bytes([])),
      BadInput(name: "empty file, probed", expected: "the file is empty (0 bytes), not an image", make: bytes([])),
      BadInput(name: "wrong magic, -f qcow2", expected: "not a qcow2 image: magic is 0x514649fa", format: ["-f", "qcow2"], make: patched(v3) { $0.set(UInt32(0x5146_49fa), at: 0) }),
      BadInput(name: "truncated header (50 bytes)", expected: "file of 50 bytes is too short for a qcow2 header", make: patched(v3) { $0.bytes.removeLast($0.bytes.count - 50) }),
      BadInput(name: "truncated v3 header (100 bytes)", expected: "version 3 header needs 104 bytes, file has 100", make: patched(v3) { $0.bytes.removeLast($0.bytes.count - 100) }),
      BadInput(name: "truncated header extensions (108 bytes)", expected: "header_length 112 runs past the end of the file", make: patched(v3) { $0.bytes.removeLast($0.bytes.count - 108) }),
      BadInput(name: "truncated in the header cluster (4 KiB)", expected: "L1 table at 0x30000 (1 entries) runs past the end of the file (size 0x1000)", make: patched(v3) { $0.bytes.removeLast($0.bytes.count - 4096) }),
      BadInput(name: "version 0", expected: "qcow2 version 0 is not supported", make: patched(v3) { $0.set(UInt32(0), at: 4) }),
      BadInput(name: "version 1", expected: "qcow version 1 is not supported", make: patched(v3) { $0.set(UInt32(1), at: 4) }),
      BadInput(name: "version 4", expected: "qcow2 version 4 is not supported", make: patched(v3) { $0.set(UInt32(4), at: 4) }),
      BadInput(name: "cluster_bits 8", expected: "cluster_bits is 8, expected 9 to 21", make: patched(v3) { $0.set(UInt32(8), at: 20) }),
      BadInput(name: "cluster_bits 22", expected: "cluster_bits is 22 (clusters of 2^22 bytes); clusters larger than 2 MiB", make: patched(v3) { $0.set(UInt32(22), at: 20) }),
      BadInput(name: "cluster_bits 63", expected: "cluster_bits is 63 (clusters of 2^63 bytes)", make: patched(v3) { $0.set(UInt32(63), at: 20) }),
      BadInput(name: "header_length 100 (under 104)", expected: "header_length is 100, expected a multiple of 8 from 104", make: patched(v3) { $0.set(UInt32(100), at: 100) }),
      BadInput(name: "header_length over the cluster size", expected: "header_length is 1024, expected a multiple of 8 from 104 to the cluster size 512", make: patched("cluster-512.qcow2") { $0.set(UInt32(1024), at: 100) }),
      BadInput(name: "unknown incompatible bit, no feature table", expected: "unknown incompatible feature bit 5 set", make: patched("cluster-512.qcow2") { $0.set(UInt64(1 << 5), at: 72) }),
      BadInput(name: "unknown incompatible bit, named in the feature table", expected: "unknown incompatible feature bit 9 (time travel) set", make: patched(v3) {
        // The table's entry for incompatible bit 4 (at 0x78 + 4 * 48) renamed to bit 9.
        $0.replace(at: 0x78 + 4 * 48, with: [0, 9] + Array("time travel".utf8) + [UInt8](repeating: 0, count: 35))
        $0.set(UInt64(1 << 9), at: 72)
      }),
      BadInput(name: "L1 table misaligned", expected: "L1 table offset 0x30200 is not aligned to the cluster size 0x10000", make: patched(v3) { $0.set(UInt64(0x30200), at: 40) }),
      BadInput(name: "L1 table huge (8 Mi entries)", expected: "L1 table of 8388608 entries is larger than the 32 MiB limit", make: patched(v3) { $0.set(UInt32(8 << 20), at: 36) }),
      BadInput(name: "L1 table huge (4 Mi entries, at the limit, past the end)", expected: "L1 table at 0x30000 (4194304 entries) runs past the end of the file", make: patched(v3) { $0.set(UInt32(4 << 20), at: 36) }),
      BadInput(name: "L1 table past the end of the file", expected: "L1 table at 0x100000 (1 entries) runs past the end of the file (size 0x80000)", make: patched(v3) { $0.set(UInt64(0x10_0000), at: 40) }),
      BadInput(name: "L1 table past 2^63", expected: "L1 table at 0x8000000000000000 (1 entries) runs past the end of the file", make: patched(v3) { $0.set(UInt64(1) << 63, at: 40) }),
      BadInput(name: "refcount table misaligned", expected: "refcount table offset 0x10200 is not aligned to the cluster size 0x10000", make: patched(v3) { $0.set(UInt64(0x10200), at: 48) }),
      BadInput(name: "refcount table huge (2^32-1 clusters)", expected: "refcount table of 4294967295 clusters is larger than the 8 MiB limit (128 clusters)", make: patched(v3) { $0.set(UInt32.max, at: 56) }),
      BadInput(name: "refcount table huge (129 clusters, just over 8 MiB)", expected: "refcount table of 129 clusters is larger than the 8 MiB limit", make: patched(v3) { $0.set(UInt32(129), at: 56) }),
      BadInput(name: "refcount table past the end of the file", expected: "refcount table at 0x100000 (1 clusters) runs past the end of the file (size 0x80000)", make: patched(v3) { $0.set(UInt64(0x10_0000), at: 48) }),
      BadInput(name: "refcount table past 2^63", expected: "refcount table at 0x8000000000000000 (1 clusters) is beyond any file", make: patched(v3) { $0.set(UInt64(1) << 63, at: 48) }),
      BadInput(name: "snapshot table misaligned", expected: "snapshot table offset 0x10200 is not aligned to the cluster size 0x10000", make: patched(v3) {
        $0.set(UInt32(1), at: 60)
        $0.set(UInt64(0x10200), at: 64)
      }),
      BadInput(name: "snapshot table huge (2^32-1 snapshots)", expected: "4294967295 snapshots, more than the limit of 65536", make: patched(v3) {
        $0.set(UInt32.max, at: 60)
        $0.set(UInt64(0x20000), at: 64)
      }),
      BadInput(name: "snapshot table huge (65536 snapshots in a 512 KiB file)", expected: "snapshot table at 0x20000 (65536 snapshots, at least 2621440 bytes) runs past the end of the file (size 0x80000)", make: patched(v3) {
        $0.set(UInt32(65536), at: 60)
        $0.set(UInt64(0x20000), at: 64)
      }),
      BadInput(name: "snapshot table past the end of the file", expected: "snapshot table at 0x100000 (1 snapshots, at least 40 bytes) runs past the end of the file", make: patched(v3) {
        $0.set(UInt32(1), at: 60)
        $0.set(UInt64(0x10_0000), at: 64)
      }),
      BadInput(name: "snapshot table past 2^63", expected: "snapshot table at 0x8000000000000000 (1 snapshots, at least 40 bytes) runs past the end of the file", make: patched(v3) {
        $0.set(UInt32(1), at: 60)
        $0.set(UInt64(1) << 63, at: 64)
      }),
      BadInput(name: "L1 table too small for the virtual size", expected: "L1 table has 1 entries, the virtual size 1073741824 needs 2", make: patched(v3) { $0.set(UInt64(1 << 30), at: 24) }),
      BadInput(name: "virtual size 2^63", expected: "virtual size 9223372036854775808 is 2^63 or more", make: patched(v3) { $0.set(UInt64(1) << 63, at: 24) }),
      BadInput(name: "virtual size 2^64-1", expected: "virtual size 18446744073709551615 is 2^63 or more", make: patched(v3) { $0.set(UInt64.max, at: 24) }),
      BadInput(name: "virtual size 2^63-1 (L1 too small)", expected: "the virtual size 9223372036854775807 needs", make: patched(v3) { $0.set(UInt64(Int64.max), at: 24) }),
      BadInput(name: "backing name over 1023 bytes", expected: "backing file name is 1024 bytes long, at most 1023 allowed", make: chain(backing: "chain-base.qcow2") { $0.set(UInt32(1024), at: 16) }),
      BadInput(name: "backing name past the first cluster", expected: "backing file name at 0xff8 (16 bytes) is outside the header cluster (0x70 to 0x1000)", make: chain(backing: "chain-base.qcow2") { $0.set(UInt64(0xff8), at: 8) }),
      BadInput(name: "backing name far past the first cluster", expected: "backing file name at 0x100000 (16 bytes) is outside the header cluster", make: chain(backing: "chain-base.qcow2") { $0.set(UInt64(0x10_0000), at: 8) }),
      BadInput(name: "L2 entry with reserved bits (56)", expected: "(L1 index 0, L2 index 0) has reserved bits set: 0x100000000000000", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, $0.l2Entry(virtualOffset: 0) | 1 << 56)
      }),
      BadInput(name: "L2 entry with reserved bits (1-8)", expected: "(L1 index 0, L2 index 0) has reserved bits set: 0x1fe", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, $0.l2Entry(virtualOffset: 0) | 0x1fe)
      }),
      BadInput(name: "L2 entry unaligned", expected: "not aligned to the cluster size 0x10000", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, $0.l2Entry(virtualOffset: 0) + 0x200)
      }),
      BadInput(name: "L2 entry past the end of the file", expected: "data for virtual offset 0x0 at host 0x1000000 (65536 bytes) is past the end of the file (size 0x80000)", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, 0x100_0000 | PatchableImage.copied)
      }),
      BadInput(name: "L2 entry into the header", expected: "points at host offset 0 with the copied bit set", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, PatchableImage.copied)
      }),
      BadInput(name: "L2 entry into the L1 table", expected: "data cluster at 0x30000 for virtual offset 0x0 (L1 index 0, L2 index 0) overlaps the L1 table at 0x30000..0x40000", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, 0x30000 | PatchableImage.copied)
      }),
      BadInput(name: "L2 entry into the refcount table", expected: "overlaps the refcount table at 0x10000..0x20000", make: patched(v3) {
        $0.setL2Entry(virtualOffset: 0, 0x10000 | PatchableImage.copied)
      }),
      BadInput(name: "L1 entry into the refcount table", expected: "L2 table at 0x200 (L1 index 0) overlaps the refcount table at 0x200..0x400", make: patched("cluster-512.qcow2") {
        $0.set(UInt64(0x200) | PatchableImage.copied, at: $0.l1Offset)
      }),
      BadInput(name: "L1 entry into the L1 table", expected: "L2 table at 0x600 (L1 index 0) overlaps the L1 table", make: patched("cluster-512.qcow2") {
        $0.set(UInt64(0x600) | PatchableImage.copied, at: $0.l1Offset)
      }),
      BadInput(name: "L1 entry past the end of the file", expected: "L2 table at 0x1000000 (L1 index 0) is past the end of the file", make: patched(v3) {
        $0.set(UInt64(0x100_0000) | PatchableImage.copied, at: $0.l1Offset)
      }),
      BadInput(name: "unknown compression type", expected: "compression_type 2 is not supported (expected 0 zlib or 1 zstd)", make: patched("compressed-zstd.qcow2") { $0.bytes[104] = 2 }),
      BadInput(name: "zstd type without the feature bit", expected: "compression_type is 1 but the compression type bit (incompatible bit 3) is not set", make: patched("compressed-zstd.qcow2") { $0.set(UInt64(0), at: 72) }),
      BadInput(name: "feature bit with type zlib", expected: "compression type bit is set but compression_type is 0 (zlib)", make: patched("compressed-zlib.qcow2") { $0.set(UInt64(1 << 3), at: 72) }),
      BadInput(name: "backing loop (self)", expected: "backing chain loops", make: chain(backing: "bad.qcow2")),
      BadInput(name: "backing loop (two images)", expected: "backing chain loops", make: chain(backing: "loop.qcow2", others: [("loop.qcow2", "bad.qcow2")])),
      BadInput(name: "chain deeper than the limit", expected: "backing chain is deeper than 64 layers", make: chain(
        backing: "d01.qcow2", others: (1...65).map { (String(format: "d%02d.qcow2", $0), $0 == 65 ? "chain-base.qcow2" : String(format: "d%02d.qcow2", $0 + 1)) })),
      BadInput(name: "missing backing file", expected: "open backing file", make: chain(backing: "gone.qcow2")),
      BadInput(name: "backing file with no recorded format", expected: "backing file 'chain-base.qcow2' has no recorded format", status: 2, make: chain(backing: "chain-base.qcow2") {
        $0.set(UInt32(0), at: 0x70)  // the backing-format extension becomes the end marker
      }),
      BadInput(name: "backing file is a URL", expected: "backing file 'http://example.com/base.qcow2' is not a plain file name", make: chain(backing: "http://example.com/base.qcow2")),
      BadInput(name: "backing file is json:", expected: "is not a plain file name (URLs and json: are not supported)", make: chain(backing: #"json:{"driver":"file","filename":"/etc/passwd"}"#)),
      BadInput(name: "data file is a URL", expected: "images with an external data file are not supported", make: patched(v3) {
        $0.set(UInt64(1 << 2), at: 72)
        let name = Array("nbd://example.com/disk".utf8)
        $0.set(UInt32(0x4441_5441), at: 0x1f8)
        $0.set(UInt32(name.count), at: 0x1fc)
        $0.replace(at: 0x200, with: name + [UInt8](repeating: 0, count: 16))
      }),
      BadInput(name: "data file is json:", expected: "images with an external data file are not supported", make: patched(v3) {
        let name = Array(#"json:{"driver":"file","filename":"/dev/sda"}"#.utf8)
        $0.set(UInt32(0x4441_5441), at: 0x1f8)
        $0.set(UInt32(name.count), at: 0x1fc)
        $0.replace(at: 0x200, with: name + [UInt8](repeating: 0, count: 16))
      }),
    ]
    // Compressed clusters: the cluster at virtual 0 of the 4 KiB-cluster fixtures.
    for (fixture, type) in [("compressed-zlib.qcow2", "zlib"), ("compressed-zstd.qcow2", "zstd")] {
      let isZlib = type == "zlib"
      cases += [
        BadInput(name: "\(type): compressed cluster past the end of the file", expected: "has compressed data at 0x100000, past the end of the file (size 0x7000)", make: patched(fixture) {
          $0.setL2Entry(virtualOffset: 0, PatchableImage.compressed | 0x10_0000)
        }),
        BadInput(name: "\(type): decompresses to more than a cluster", expected: "does not decompress: \(type): data expands past the expected 4096 bytes", make: patched(fixture) {
          $0.setCompressedCluster(stream: isZlib ? HandMadeStream.deflateStored(count: 4097) : HandMadeStream.zstdRLE(blocks: [4097]))
        }),
        BadInput(name: "\(type): decompresses to less than a cluster", expected: isZlib ? "does not decompress: zlib: data ends after 4095 bytes, expected 4096" : "does not decompress: zstd: frame ends after 4095 bytes, expected 4096", make: patched(fixture) {
          $0.setCompressedCluster(stream: isZlib ? HandMadeStream.deflateStored(count: 4095) : HandMadeStream.zstdRLE(blocks: [4095]))
        }),
        BadInput(name: "\(type): garbage", expected: isZlib ? "does not decompress: zlib: invalid deflate data (invalid block type)" : "does not decompress: zstd: invalid data (Unknown frame descriptor)", make: patched(fixture) {
          $0.setCompressedCluster(stream: [UInt8](repeating: 0xff, count: 1000))
        }),
        BadInput(name: "\(type): decompression bomb", expected: "does not decompress: \(type): data expands past the expected 4096 bytes", make: patched(fixture) {
          // Under 8 KiB stored (the most a 4 KiB-cluster entry can say), hundreds of MiB out.
          $0.setCompressedCluster(stream: isZlib ? HandMadeStream.deflateBomb(matches: 4900) : HandMadeStream.zstdRLE(blocks: [Int](repeating: 128 << 10, count: 2000)))
        }),
      ]
    }
    cases.append(BadInput(name: "zstd: frame asking for a 1 TiB window", expected: "does not decompress: zstd: invalid data (Frame requires too much memory for decoding)", make: patched("compressed-zstd.qcow2") {
      $0.setCompressedCluster(stream: HandMadeStream.zstdHugeWindow())
    }))
    return cases
  }()

  func testEveryBadInputIsRefusedCleanly() throws {
    var table: [(String, String)] = []
    for badInput in Self.cases {
      for output in ["raw", "qcow2"] {
        let message = try check(badInput, output: output)
        if output == "raw" { table.append((badInput.name, message)) }
      }
    }
    print("| case | what lacuna prints |\n|---|---|")
    for (name, message) in table { print("| \(name) | `\(message)` |") }
  }

  /// The corrupt bit: reading is allowed (we never write the image), with one warning line.
  func testCorruptBitWarnsAndConverts() throws {
    let work = try temporaryDirectory(self)
    var image = try PatchableImage(fixture: "v3-64k.qcow2")
    image.set(UInt64(1 << 1), at: 72)
    let input = work.appendingPathComponent("bad.qcow2")
    try image.write(to: input)
    let (outcome, timedOut) = try runLacunaBounded(
      ["convert", "-O", "raw", input.path, work.appendingPathComponent("out.raw").path], seconds: 30)
    XCTAssertFalse(timedOut)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(
      outcome.stderr,
      "lacuna: \(input.path): the image is marked corrupt (incompatible bit 1); reading it anyway, check the result\n")
    let (clean, _) = try runLacunaBounded(
      ["convert", "-O", "raw", fixturesDirectory.appendingPathComponent("v3-64k.qcow2").path,
        work.appendingPathComponent("clean.raw").path])
    XCTAssertEqual(clean.status, 0, clean.stderr)
    XCTAssertTrue(try sameContent(work.appendingPathComponent("out.raw").path, work.appendingPathComponent("clean.raw").path))
    XCTAssertEqual(try Data(contentsOf: input), Data(image.bytes))
  }

  /// The dirty bit: reading is allowed, and the image is never written back (no repair, no
  /// clearing the bit): the file stays byte for byte and time for time what it was.
  func testDirtyImageConvertsAndIsNeverWritten() throws {
    let work = try temporaryDirectory(self)
    let input = work.appendingPathComponent("dirty.qcow2").path
    try FileManager.default.copyItem(
      atPath: fixturesDirectory.appendingPathComponent("dirty.qcow2").path, toPath: input)
    let before = try Data(contentsOf: URL(fileURLWithPath: input))
    var beforeStatus = stat()
    stat(input, &beforeStatus)
    XCTAssertNotEqual(before[79] & 1, 0, "the fixture is dirty")
    for output in ["raw", "qcow2"] {
      let (outcome, _) = try runLacunaBounded(
        ["convert", "-O", output, input, work.appendingPathComponent("out.\(output)").path], seconds: 30)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertEqual(outcome.stderr, "")
    }
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: input)), before)
    var afterStatus = stat()
    stat(input, &afterStatus)
    XCTAssertEqual(afterStatus.st_mtim.tv_sec, beforeStatus.st_mtim.tv_sec)
    XCTAssertEqual(afterStatus.st_mtim.tv_nsec, beforeStatus.st_mtim.tv_nsec)
    if let qemu = which("qemu-img") {
      let judged = work.appendingPathComponent("qemu.raw").path
      XCTAssertEqual(try runProgram(qemu, ["convert", "-O", "raw", input, judged]).status, 0)
      XCTAssertTrue(try sameContent(work.appendingPathComponent("out.raw").path, judged))
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: input)), before)
    }
  }

  /// A valid image cut at many offsets: each conversion fails cleanly, or, when the cut
  /// removed nothing the image refers to, succeeds with what qemu-img reads. Never a crash.
  func testTruncatedAtAnyOffset() throws {
    let work = try temporaryDirectory(self)
    let qemu = which("qemu-img")
    struct Cut { var fixture: String; var length: Int }
    var cuts: [Cut] = []
    // Every 512 bytes of a 4 KiB-cluster image with plain and compressed clusters...
    let small = try PatchableImage(fixture: "compressed-zlib.qcow2").bytes.count
    cuts += stride(from: 0, through: small, by: 512).map { Cut(fixture: "compressed-zlib.qcow2", length: $0) }
    // ...and a spread of odd offsets through a 64 KiB-cluster one and a 2-table v2 one.
    for fixture in ["v3-64k.qcow2", "v2.qcow2"] {
      let size = try PatchableImage(fixture: fixture).bytes.count
      cuts += (0..<20).map { Cut(fixture: fixture, length: min(size - 1, $0 * size / 20 + ($0 * 7919) % 4096)) }
      cuts.append(Cut(fixture: fixture, length: size))  // nothing cut: converts like qemu-img
    }
    struct Result { var cut: Cut; var outcome: Outcome; var timedOut: Bool; var leftover: [String]; var sameAsQemu: Bool? }
    var results = [Result?](repeating: nil, count: cuts.count)
    let lock = NSLock()
    let binaryError: Error? = { do { _ = try lacunaBinary(); return nil } catch { return error } }()
    if let binaryError { throw binaryError }
    DispatchQueue.concurrentPerform(iterations: cuts.count) { index in
      let cut = cuts[index]
      let directory = work.appendingPathComponent("cut-\(index)")
      let outputs = directory.appendingPathComponent("out")
      try! FileManager.default.createDirectory(at: outputs, withIntermediateDirectories: true)
      var image = try! PatchableImage(fixture: cut.fixture)
      image.bytes.removeLast(image.bytes.count - cut.length)
      let input = directory.appendingPathComponent("cut.qcow2")
      try! image.write(to: input)
      let output = outputs.appendingPathComponent("out.raw").path
      let (outcome, timedOut) = try! runLacunaBounded(["convert", "-f", "qcow2", "-O", "raw", input.path, output], seconds: 30)
      var same: Bool?
      if outcome.status == 0, let qemu {
        let judged = directory.appendingPathComponent("qemu.raw").path
        let ran = try! runProgram(qemu, ["convert", "-f", "qcow2", "-O", "raw", input.path, judged])
        same = ran.status == 0 && (try? sameContent(output, judged)) == true
      }
      let unchanged = (try? Data(contentsOf: input)) == Data(image.bytes)
      let leftover = listing(outputs).filter { outcome.status != 0 || $0 != "out.raw" } + (unchanged ? [] : ["input changed"])
      lock.lock()
      results[index] = Result(cut: cut, outcome: outcome, timedOut: timedOut, leftover: leftover, sameAsQemu: same)
      lock.unlock()
    }
    var refused = 0
    var converted = 0
    for case let result? in results {
      let context = "\(result.cut.fixture) cut at \(result.cut.length): \(result.outcome.stderr)"
      XCTAssertFalse(result.timedOut, "hung: " + context)
      XCTAssertNil(result.outcome.signal, "crashed: " + context)
      XCTAssertEqual(result.leftover, [], context)
      if result.outcome.status == 0 {
        converted += 1
        if qemu != nil { XCTAssertEqual(result.sameAsQemu, true, "differs from qemu-img: " + context) }
      } else {
        refused += 1
        XCTAssertEqual(result.outcome.status, 1, context)
        XCTAssertEqual(result.outcome.stderr.split(separator: "\n").count, 1, context)
        XCTAssertTrue(result.outcome.stderr.contains("cut.qcow2: "), context)
      }
    }
    print("truncated images: \(cuts.count) cuts, \(refused) refused, \(converted) converted like qemu-img")
    XCTAssertGreaterThan(refused, cuts.count / 2)
  }

  /// Converts one bad input and checks everything issue 6 asks; returns the error line.
  @discardableResult
  func check(_ badInput: BadInput, output: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let work = try temporaryDirectory(self)
    let source = work.appendingPathComponent("in")
    let destination = work.appendingPathComponent("out")
    try FileManager.default.createDirectory(at: source, withIntermediateDirectories: true)
    try FileManager.default.createDirectory(at: destination, withIntermediateDirectories: true)
    try badInput.make(source)
    let before = try snapshotFiles(source)
    let (outcome, timedOut) = try runLacunaBounded(
      ["convert"] + badInput.format + ["-O", output, source.appendingPathComponent("bad.qcow2").path,
        destination.appendingPathComponent("out.img").path], seconds: 30)
    let context = "\(badInput.name) (-O \(output)): \(outcome.stderr)"
    XCTAssertFalse(timedOut, "hung: " + context, file: file, line: line)
    XCTAssertNil(outcome.signal, "killed by signal \(outcome.signal ?? 0): " + context, file: file, line: line)
    XCTAssertEqual(outcome.status, badInput.status, context, file: file, line: line)
    let lines = outcome.stderr.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
    XCTAssertEqual(lines.count, 1, "expected one line: " + context, file: file, line: line)
    XCTAssertTrue(outcome.stderr.contains("bad.qcow2") || outcome.stderr.contains("loop.qcow2"), "the file is not named: " + context, file: file, line: line)
    XCTAssertTrue(outcome.stderr.contains(badInput.expected), "expected '\(badInput.expected)': " + context, file: file, line: line)
    XCTAssertEqual(listing(destination), [], "left in the destination: " + context, file: file, line: line)
    XCTAssertTrue(try snapshotFiles(source) == before, "the input changed: " + context, file: file, line: line)
    return outcome.stderr.trimmingCharacters(in: .newlines).replacingOccurrences(of: source.path + "/", with: "")
  }
}

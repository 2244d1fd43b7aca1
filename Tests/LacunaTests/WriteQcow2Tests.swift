import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// `convert -O qcow2` and `create` through the built binary, judged by qemu-img.
final class WriteQcow2Tests: QemuTestCase {
  func assertClean(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let check = try qemuImg("check", image)
    XCTAssertEqual(check.status, 0, check.stdout + check.stderr, file: file, line: line)
    XCTAssertTrue(check.stdout.contains("No errors were found"), check.stdout, file: file, line: line)
    XCTAssertFalse(check.stdout.contains("leaked"), check.stdout, file: file, line: line)
  }

  func assertSame(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let compare = try qemuImg("compare", a, b)
    XCTAssertEqual(compare.status, 0, compare.stdout + compare.stderr, file: file, line: line)
  }

  func info(_ image: String) throws -> [String: Any] {
    try XCTUnwrap(try parseJSON(try qemuImg("info", "--output=json", image).stdout) as? [String: Any])
  }

  /// base <- mid <- top, each writing different clusters, with zeros masking data below.
  func makeChain() throws {
    XCTAssertEqual(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "16M").status, 0)
    try qemuIO("base.qcow2", "write -P 0x11 0 4M", "write -P 0x12 8M 1M")
    XCTAssertEqual(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2").status, 0)
    try qemuIO("mid.qcow2", "write -P 0x21 1M 512k", "write -z 3M 256k")
    XCTAssertEqual(try qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2").status, 0)
    try qemuIO("top.qcow2", "write -P 0x31 2M 128k", "write -z 8M 64k", "write -P 0x32 12M 64k")
  }

  func testRawToQcow2RoundTrip() throws {
    try makeSparseFile(
      path("src.raw"), size: (48 << 20) + 4096,
      pieces: [(0, patternBytes(100_000, seed: 1)), (7 << 20, patternBytes(3 << 20, seed: 2)), (40 << 20, [UInt8](repeating: 0, count: 1 << 20))])
    for clusterSize in ["512", "64k", "2M"] {
      let out = path("out-\(clusterSize).qcow2")
      let outcome = try lacuna("convert", "-O", "qcow2", "-o", "cluster_size=\(clusterSize)", path("src.raw"), out)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try assertClean(out)
      try assertSame(path("src.raw"), out)
      // Our own reader reads it back to the same bytes.
      XCTAssertEqual(try lacuna("convert", "-O", "raw", out, out + ".raw").status, 0)
      XCTAssertTrue(try sameContent(path("src.raw"), out + ".raw"), clusterSize)
    }
    // Only data is stored: holes and the allocated zero MiB cost nothing.
    XCTAssertLessThan(fileSize(path("out-64k.qcow2")), (3 << 20) + 100_000 + (1 << 20))
  }

  func testCompressedOutputIsTheSameForAnyThreadCount() throws {
    var text = [UInt8]()
    while text.count < 4 << 20 { text += Array("block cluster sector image disk volume snapshot backing \(text.count)\n".utf8) }
    try makeSparseFile(path("src.raw"), size: 32 << 20, pieces: [(0, patternBytes(1 << 20, seed: 3)), (4 << 20, text)])
    for type in ["zlib", "zstd"] {
      let one = path("\(type)-1.qcow2")
      let eight = path("\(type)-8.qcow2")
      XCTAssertEqual(try lacuna("convert", "-c", "-m", "1", "-O", "qcow2", "-o", "compression_type=\(type)", path("src.raw"), one).status, 0)
      XCTAssertEqual(try lacuna("convert", "-c", "-m", "8", "-O", "qcow2", "-o", "compression_type=\(type)", path("src.raw"), eight).status, 0)
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: one)), try Data(contentsOf: URL(fileURLWithPath: eight)), type)
      try assertClean(one)
      try assertSame(path("src.raw"), one)
      let data = try XCTUnwrap((try info(one)["format-specific"] as? [String: Any])?["data"] as? [String: Any])
      XCTAssertEqual(data["compression-type"] as? String, type)
      XCTAssertLessThan(fileSize(one), (1 << 20) + (3 << 20), "text compresses")
    }
  }

  func testChainFlattensToOneStandaloneImage() throws {
    try makeChain()
    XCTAssertEqual(try lacuna("convert", "-O", "qcow2", "top.qcow2", "flat.qcow2", in: dir).status, 0)
    try assertClean("flat.qcow2")
    try assertSame("top.qcow2", "flat.qcow2")
    XCTAssertNil(try info("flat.qcow2")["backing-filename"])
  }

  /// -B naming the immediate backing, a deeper ancestor, or an unrelated file: the output
  /// read through its backing always equals the source.
  func testBackingOptionIsRightForAnyBacking() throws {
    try makeChain()
    // An unrelated image: the flattened source with a few clusters changed.
    XCTAssertEqual(try qemuImg("convert", "-O", "qcow2", "top.qcow2", "other.qcow2").status, 0)
    try qemuIO("other.qcow2", "write -P 0x77 64k 64k", "write -P 0x78 12M 64k", "write -P 0x79 15M 64k")
    for backing in ["mid.qcow2", "base.qcow2", "other.qcow2"] {
      let out = "over-\(backing)"
      let outcome = try lacuna("convert", "-O", "qcow2", "-B", backing, "-F", "qcow2", "top.qcow2", out, in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try assertClean(out)
      try assertSame("top.qcow2", out)
      let recorded = try info(out)
      XCTAssertEqual(recorded["backing-filename"] as? String, backing)
      XCTAssertEqual(recorded["backing-filename-format"] as? String, "qcow2")
    }
    // Over the unrelated copy only the three changed clusters differ: little is stored.
    let map = try mapEntries(try lacuna("map", "--output=json", "over-other.qcow2", in: dir).stdout)
    let stored = map.filter { $0["depth"] == 0 && $0["present"] == 1 }.reduce(0) { $0 + $1["length"]! }
    XCTAssertEqual(stored, 3 * 65536, "\(map)")
    // Over the immediate backing, exactly what top holds is stored.
    let topMap = try mapEntries(try lacuna("map", "--output=json", "top.qcow2", in: dir).stdout)
    let overMid = try mapEntries(try lacuna("map", "--output=json", "over-mid.qcow2", in: dir).stdout)
    XCTAssertEqual(
      overMid.filter { $0["depth"] == 0 }.map { [$0["start"]!, $0["length"]!, $0["zero"]!] },
      topMap.filter { $0["depth"] == 0 }.map { [$0["start"]!, $0["length"]!, $0["zero"]!] })
  }

  func testCreate() throws {
    let plain = try lacuna("create", "-f", "qcow2", "disk.qcow2", "16T", in: dir)
    XCTAssertEqual(plain.status, 0, plain.stderr)
    try assertClean("disk.qcow2")
    XCTAssertEqual((try info("disk.qcow2")["virtual-size"] as? NSNumber)?.int64Value, 16 << 40)
    XCTAssertLessThan(fileSize(path("disk.qcow2")), 1 << 20, "tables follow the data, not the size")

    XCTAssertEqual(try lacuna("create", "-f", "raw", "disk.img", "1.5G", in: dir).status, 0)
    XCTAssertEqual(fileSize(path("disk.img")), 3 << 29)
    XCTAssertEqual(allocatedBytes(path("disk.img")), 0)

    try makeChain()
    let overlay = try lacuna("create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "overlay.qcow2", in: dir)
    XCTAssertEqual(overlay.status, 0, overlay.stderr)
    try assertClean("overlay.qcow2")
    try assertSame("top.qcow2", "overlay.qcow2")
    XCTAssertEqual((try info("overlay.qcow2")["virtual-size"] as? NSNumber)?.int64Value, 16 << 20, "size from the backing file")

    XCTAssertEqual(try lacuna("create", "-f", "qcow2", "nosize.qcow2", in: dir).status, 2)
    XCTAssertEqual(try lacuna("create", "-f", "qcow2", "bad.qcow2", "12Q", in: dir).status, 2)
    XCTAssertFalse(listing(dir).contains("nosize.qcow2") || listing(dir).contains("bad.qcow2"))
  }

  func testVersion2Output() throws {
    try makeSparseFile(path("src.raw"), size: 8 << 20, pieces: [(1 << 20, patternBytes(200_000, seed: 4))])
    XCTAssertEqual(try lacuna("convert", "-O", "qcow2", "-o", "compat=0.10", path("src.raw"), path("v2.qcow2")).status, 0)
    try assertClean(path("v2.qcow2"))
    try assertSame(path("src.raw"), path("v2.qcow2"))
    let data = try XCTUnwrap((try info(path("v2.qcow2"))["format-specific"] as? [String: Any])?["data"] as? [String: Any])
    XCTAssertEqual(data["compat"] as? String, "0.10")
  }
}

import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// Runs `script` with /bin/sh under `timeout` (a hang is a failure, not a stuck CI job),
/// with `$LACUNA` set to the built binary, in `directory`.
@discardableResult
func streamShell(_ script: String, in directory: URL, seconds: Int = 120) throws -> Outcome {
  let binary = try lacunaBinary()
  return try runProgram(
    "/usr/bin/env", ["LACUNA=\(binary)", "timeout", "\(seconds)", "/bin/sh", "-c", script], in: directory)
}

/// A sparse raw source: data extents of random and text-like bytes, allocated zero blocks,
/// holes, and an odd size.
func makeStreamSource(_ path: String) throws -> Int64 {
  let size: Int64 = (96 << 20) + 1234
  var zeroBlock = patternBytes(65536, seed: 21)
  zeroBlock.replaceSubrange(8192..<24576, with: [UInt8](repeating: 0, count: 16384))  // allocated zeros inside data
  try makeSparseFile(
    path, size: size,
    pieces: [
      (0, patternBytes(4096, seed: 20)), (1 << 20, zeroBlock), (7 << 20, patternBytes(3 << 20, seed: 22)),
      (50 << 20, [UInt8](repeating: 0, count: 1 << 20)),  // allocated, all zero
      (size - 1000, patternBytes(1000, seed: 23)),
    ])
  return size
}

/// The sparse stream through real pipes: lacuna to lacuna, lacuna to the shell receiver,
/// and the ways a stream or a pipe can fail.
final class StreamPipeTests: XCTestCase {
  func testRawRoundTripThroughAPipe() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    let outcome = try streamShell(
      #""$LACUNA" convert -O stream src.img - | "$LACUNA" convert -f stream -O raw - dst.img"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(fileSize(dir.appendingPathComponent("dst.img").path), fileSize(src))
    XCTAssertTrue(try sameContent(src, dir.appendingPathComponent("dst.img").path))
    // Allocated zero blocks of the source arrive as holes: the output holds the data only.
    let dataBytes: Int64 = 4096 + 65536 - 16384 + (3 << 20) + 1000
    XCTAssertLessThanOrEqual(allocatedBytes(dir.appendingPathComponent("dst.img").path), dataBytes + 4 * 4096)
    XCTAssertEqual(listing(dir), ["dst.img", "src.img"], "no temporary file is left")
  }

  /// The receiver's workers scan, compress and checksum units in whatever order they
  /// finish: the output is the same bytes for one worker or eight, and what the source holds.
  func testReceivedStreamGivesTheSameBytesWithOneOrEightWorkers() throws {
    let qemuImg = try requireQemuImg()
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    let dataBytes: Int64 = 4096 + 65536 - 16384 + (3 << 20) + 1000
    for (format, options) in [("raw", ""), ("qcow2", ""), ("qcow2", "-c -o compression_type=zstd"), ("qcow2", "-c")] {
      var outputs: [String] = []
      for workers in [1, 8] {
        let name = "out-\(workers).\(format)"
        let outcome = try streamShell(
          #""$LACUNA" convert -O stream src.img - | "$LACUNA" convert -f stream -O \#(format) \#(options) -m \#(workers) - \#(name)"#,
          in: dir)
        XCTAssertEqual(outcome.status, 0, "\(format) \(options) -m \(workers): \(outcome.stderr)")
        let compare = try runProgram(qemuImg, ["compare", "-f", "raw", "-F", format, "src.img", name], in: dir)
        XCTAssertEqual(compare.status, 0, "\(format) \(options) -m \(workers): \(compare.stdout)\(compare.stderr)")
        outputs.append(dir.appendingPathComponent(name).path)
      }
      XCTAssertEqual(try runProgram("/usr/bin/cmp", outputs).status, 0, "\(format) \(options): -m 1 and -m 8 differ")
      if format == "raw" {
        XCTAssertLessThanOrEqual(allocatedBytes(outputs[0]), dataBytes + 4 * 4096, "the holes stay holes")
      } else {
        // qemu-img map: only clusters that hold data are allocated in the output.
        let map = try runProgram(qemuImg, ["map", "--output=json", outputs[0]], in: dir)
        let extents = try parseJSON(map.stdout) as? [[String: Any]] ?? []
        let stored = extents.filter { ($0["data"] as? Bool) == true }.reduce(Int64(0)) {
          $0 + (($1["length"] as? NSNumber)?.int64Value ?? 0)
        }
        XCTAssertGreaterThan(stored, 0, "\(options): \(map.stdout)")
        XCTAssertLessThanOrEqual(stored, dataBytes + 5 * 65536, "\(options): the holes stay holes")
      }
      for output in outputs { try FileManager.default.removeItem(atPath: output) }
    }
  }

  func testStreamSizeIsCloseToTheDataSize() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    let outcome = try streamShell(#""$LACUNA" convert -O stream src.img - | wc -c"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let streamBytes = Int64(outcome.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
    // Data is sent at 4 KiB block granularity, as the engine finds it.
    let dataBytes: Int64 = 4096 + 65536 - 16384 + (3 << 20) + 1000
    XCTAssertGreaterThanOrEqual(streamBytes, dataBytes)
    XCTAssertLessThan(streamBytes, dataBytes + dataBytes / 100 + 4096, "a 96 MiB disk holding 3.1 MiB")
  }

  func testQcow2ChainToQcow2AndRawThroughAPipe() throws {
    let qemuImg = try requireQemuImg()
    guard let qemuIO = which("qemu-io") else { throw XCTSkip("qemu-io is not installed") }
    let dir = try temporaryDirectory(self)
    func run(_ program: String, _ arguments: String...) throws {
      let outcome = try runProgram(program, arguments, in: dir)
      XCTAssertEqual(outcome.status, 0, "\(arguments): \(outcome.stderr)")
    }
    try run(qemuImg, "create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    try run(qemuIO, "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 20M 64k", "base.qcow2")
    try run(qemuImg, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    try run(qemuIO, "-c", "write -P 0x33 1M 128k", "-c", "write -z 2M 512k", "-c", "write -P 0x44 40M 4k", "top.qcow2")

    var outcome = try streamShell(
      #""$LACUNA" convert -O stream top.qcow2 - | "$LACUNA" convert -f stream -O qcow2 - out.qcow2"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try run(qemuImg, "compare", "top.qcow2", "out.qcow2")
    try run(qemuImg, "check", "out.qcow2")
    let info = try parseJSON(try runProgram(qemuImg, ["info", "--output=json", "out.qcow2"], in: dir).stdout) as? [String: Any]
    XCTAssertNil(info?["backing-filename"], "the chain is flattened")

    outcome = try streamShell(
      #""$LACUNA" convert -O stream top.qcow2 - | "$LACUNA" convert -f stream -O raw - out.img"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try run(qemuImg, "compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "out.img")
    // 3 MiB of base data, less the 512 KiB zeroed in the overlay, plus 64 KiB and 4 KiB.
    XCTAssertLessThanOrEqual(allocatedBytes(dir.appendingPathComponent("out.img").path), (3 << 20) - (512 << 10) + (68 << 10) + 8192)

    // Compressed qcow2 output works from a stream too.
    outcome = try streamShell(
      #""$LACUNA" convert -O stream top.qcow2 - | "$LACUNA" convert -f stream -c -O qcow2 - c.qcow2"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try run(qemuImg, "compare", "top.qcow2", "c.qcow2")
    try run(qemuImg, "check", "c.qcow2")
  }

  func testStreamFileIsProbedAndOtherVerbsPointToConvert() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    XCTAssertEqual(try lacuna("convert", "-O", "stream", src, dir.appendingPathComponent("s.stream").path).status, 0)
    XCTAssertEqual(
      try lacuna("convert", dir.appendingPathComponent("s.stream").path, dir.appendingPathComponent("out.img").path).status, 0)
    XCTAssertTrue(try sameContent(src, dir.appendingPathComponent("out.img").path))
    let info = try lacuna("info", dir.appendingPathComponent("s.stream").path)
    XCTAssertEqual(info.status, 2)
    XCTAssertTrue(info.stderr.contains("lacuna convert -f stream"), info.stderr)
  }

  func testOnlyAStreamGoesToStandardOutput() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    try makeSparseFile(src, size: 1 << 20, pieces: [(0, patternBytes(4096, seed: 1))])
    let outcome = try streamShell(#""$LACUNA" convert -O raw src.img - | cat >/dev/null"#, in: dir)
    XCTAssertTrue(outcome.stderr.contains("only -O stream"), outcome.stderr)
    XCTAssertEqual(listing(dir), ["src.img"])
  }

  func testShellReceiver() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    let script = try lacuna("stream-receiver")
    XCTAssertEqual(script.status, 0)
    try script.stdout.write(to: dir.appendingPathComponent("receive.sh"), atomically: true, encoding: .utf8)
    let outcome = try streamShell(#""$LACUNA" convert -O stream src.img - | sh receive.sh out.img"#, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let out = dir.appendingPathComponent("out.img").path
    XCTAssertEqual(fileSize(out), fileSize(src))
    XCTAssertEqual(try runProgram("/usr/bin/cmp", [src, out]).status, 0, "cmp: same bytes")
    let dataBytes: Int64 = 4096 + 65536 - 16384 + (3 << 20) + 1000
    XCTAssertLessThanOrEqual(allocatedBytes(out), dataBytes + 4 * 4096, "the holes stay holes")
    XCTAssertEqual(listing(dir), ["out.img", "receive.sh", "src.img"])
  }

  func testShellReceiverFailsOnACutOrDamagedStream() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    try makeSparseFile(src, size: 8 << 20, pieces: [(0, patternBytes(100_000, seed: 3)), (5 << 20, patternBytes(5000, seed: 4))])
    try lacuna("stream-receiver").stdout.write(to: dir.appendingPathComponent("receive.sh"), atomically: true, encoding: .utf8)
    XCTAssertEqual(try lacuna("convert", "-O", "stream", src, dir.appendingPathComponent("s.stream").path).status, 0)
    let length = fileSize(dir.appendingPathComponent("s.stream").path)
    for cut in [0, 10, 16, 30, 42, 50, 68, 1000, length - 100_000, length - 27, length - 1] {
      let outcome = try streamShell("head -c \(cut) s.stream | sh receive.sh out.img", in: dir)
      XCTAssertEqual(outcome.status, 1, "cut at \(cut): \(outcome.stderr)")
      XCTAssertEqual(listing(dir), ["receive.sh", "s.stream", "src.img"], "cut at \(cut): nothing left")
    }
    let outcome = try streamShell("cat s.stream s.stream | sh receive.sh out.img", in: dir)
    XCTAssertEqual(outcome.status, 1, "bytes after DONE")
    XCTAssertEqual(listing(dir), ["receive.sh", "s.stream", "src.img"])
  }

  func testTruncatedStreamLeavesNothing() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    XCTAssertEqual(try lacuna("convert", "-O", "stream", src, dir.appendingPathComponent("s.stream").path).status, 0)
    let length = fileSize(dir.appendingPathComponent("s.stream").path)
    for cut in [0, 5, 16, 41, 42, 60, 4000, length / 2, length - 26, length - 1] {
      for format in ["raw", "qcow2"] {
        let outcome = try streamShell(
          #"head -c \#(cut) s.stream | "$LACUNA" convert -f stream -O \#(format) - out"#, in: dir)
        XCTAssertEqual(outcome.status, 1, "cut at \(cut): \(outcome.stderr)")
        XCTAssertTrue(outcome.stderr.contains("standard input: "), outcome.stderr)
        XCTAssertEqual(listing(dir), ["s.stream", "src.img"], "cut at \(cut), \(format): nothing at the destination")
      }
    }
  }

  func testCorruptedStreamLeavesNothing() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("src.img").path
    _ = try makeStreamSource(src)
    let streamPath = dir.appendingPathComponent("s.stream").path
    XCTAssertEqual(try lacuna("convert", "-O", "stream", src, streamPath).status, 0)
    let good = [UInt8](try Data(contentsOf: URL(fileURLWithPath: streamPath)))

    func attempt(_ bytes: [UInt8], expecting message: String) throws {
      let bad = dir.appendingPathComponent("bad.stream").path
      try Data(bytes).write(to: URL(fileURLWithPath: bad))
      let outcome = try lacuna("convert", "-f", "stream", "-O", "raw", bad, dir.appendingPathComponent("out.img").path)
      XCTAssertEqual(outcome.status, 1, outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains(bad + ": "), "names the input: \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains(message), "\(outcome.stderr) does not say \(message)")
      XCTAssertEqual(listing(dir), ["bad.stream", "s.stream", "src.img"])
      try FileManager.default.removeItem(atPath: bad)
    }
    var flipped = good
    flipped[16 + 26 + 26 + 100] ^= 0x40  // a byte of the first DATA payload
    try attempt(flipped, expecting: "checksum mismatch")
    flipped = good
    flipped[16 + 26 + 2] ^= 0x01  // the first record's kind
    try attempt(flipped, expecting: "bad record header")
    flipped = good
    flipped[good.count - 5] ^= 0x01  // a digit of the checksum
    try attempt(flipped, expecting: "checksum mismatch")
  }

  func testBrokenPipeOnTheSenderIsAnErrorNotAHang() throws {
    let dir = try temporaryDirectory(self)
    let src = dir.appendingPathComponent("big.img").path
    let mebibyte = patternBytes(1 << 20, seed: 8)
    try makeSparseFile(src, size: 64 << 20, pieces: (0..<32).map { (Int64($0) << 20, mebibyte) })
    let outcome = try streamShell(
      #"{ "$LACUNA" convert -O stream big.img -; echo "status=$?" >status.txt; } | head -c 1000 >/dev/null"#,
      in: dir, seconds: 60)
    XCTAssertEqual(outcome.status, 0, "timeout did not fire: \(outcome.stderr)")
    let status = try String(contentsOf: dir.appendingPathComponent("status.txt"), encoding: .utf8)
    XCTAssertEqual(status, "status=1\n", outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("Broken pipe"), outcome.stderr)
  }
}

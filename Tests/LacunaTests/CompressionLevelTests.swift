import Foundation
import TestSupport
import XCTest

/// `convert -c -o compression_level=N`: qemu-img reads the result, a higher level gives no
/// larger output, the bytes do not depend on the thread count, and levels outside the
/// codec's range are refused with one line.
final class CompressionLevelTests: QemuTestCase {
  /// 6 MiB of text-like data (words drawn from a small vocabulary by a fixed generator),
  /// which compresses, and better at higher levels, in a 16 MiB disk with a hole.
  func makeSource() throws -> String {
    let words = [
      "block", "cluster", "sector", "image", "disk", "volume", "snapshot", "backing", "extent", "refcount",
      "header", "table", "offset", "length", "zero", "data", "guest", "host", "file", "system",
    ]
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    var text = [UInt8]()
    text.reserveCapacity(6 << 20)
    while text.count < 6 << 20 {
      state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      text += Array(words[Int(state >> 59) % words.count].utf8)
      text.append((state >> 40) & 7 == 0 ? 10 : 32)
      if (state >> 30) & 63 == 0 { text += Array(String(state >> 44).utf8) }
    }
    let source = path("src.raw")
    try makeSparseFile(source, size: 16 << 20, pieces: [(1 << 20, Array(text[0..<(6 << 20)]))])
    return source
  }

  func convert(_ source: String, type: String, level: Int, threads: Int = 2) throws -> String {
    let out = path("\(type)-\(level)-m\(threads).qcow2")
    let outcome = try lacuna(
      "convert", "-c", "-m", "\(threads)", "-O", "qcow2", "-o", "compression_type=\(type),compression_level=\(level)",
      source, out)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(try qemuImg("compare", source, out).status, 0, "\(type) level \(level): qemu-img compare")
    let check = try qemuImg("check", out)
    XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
    XCTAssertTrue(check.stdout.contains("No errors were found"), check.stdout)
    return out
  }

  func assertLevels(_ type: String, low: Int, high: Int) throws {
    let source = try makeSource()
    let lowOut = try convert(source, type: type, level: low)
    let highOut = try convert(source, type: type, level: high)
    XCTAssertLessThanOrEqual(fileSize(highOut), fileSize(lowOut), "\(type): level \(high) no larger than \(low)")
    XCTAssertLessThan(fileSize(highOut), 4 << 20, "\(type): text compresses")
    // The level decides the bytes, not the thread count.
    let one = try convert(source, type: type, level: high, threads: 1)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: one)), try Data(contentsOf: URL(fileURLWithPath: highOut)))
  }

  func testZstdLevels() throws { try assertLevels("zstd", low: 1, high: 19) }

  func testZlibLevels() throws { try assertLevels("zlib", low: 1, high: 9) }

  func testLevelsOutsideTheRangeAreRefused() throws {
    try makeSparseFile(path("src.raw"), size: 1 << 20, pieces: [])
    for (type, level) in [("zstd", "0"), ("zstd", "20"), ("zlib", "0"), ("zlib", "10"), ("zlib", "high")] {
      let outcome = try lacuna(
        "convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type),compression_level=\(level)", "src.raw",
        "out.qcow2", in: dir)
      XCTAssertEqual(outcome.status, 2, "\(type) \(level): a usage error")
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains("compression_level"), outcome.stderr)
      XCTAssertFalse(FileManager.default.fileExists(atPath: path("out.qcow2")))
    }
    // Without -c there is nothing to compress: refused too.
    let plain = try lacuna("convert", "-O", "qcow2", "-o", "compression_level=3", "src.raw", "out.qcow2", in: dir)
    XCTAssertEqual(plain.status, 2, plain.stderr)
    XCTAssertTrue(plain.stderr.contains("needs compressed output (-c)"), plain.stderr)
  }
}

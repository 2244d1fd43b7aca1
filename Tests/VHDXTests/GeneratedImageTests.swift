import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// VHDX images made by qemu-img and filled by qemu-io, read by `VHDXReader` and judged by
/// qemu-img: the bytes byte for byte, the map by what the writes allocated (qemu 7.2 has
/// no block status for VHDX: its `map` calls everything data).
final class GeneratedImageTests: QemuTestCase {
  /// Makes an image, applies qemu-io writes (pattern or `nil` for `write -z`), and checks
  /// the reader against qemu-img's content and the expected map.
  private func check(
    size: Int64, options: [String], writes: [(Range<Int64>, UInt8?)], blockSize: Int64,
    expectAllData: Bool = false, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let image = path("image.vhdx")
    try? FileManager.default.removeItem(atPath: image)
    var arguments = ["create", "-f", "vhdx"]
    if !options.isEmpty { arguments += ["-o", options.joined(separator: ",")] }
    _ = try runProgram(qemu, arguments + [image, String(size)], in: dir)
    for (range, pattern) in writes {
      let command =
        pattern.map { "write -P 0x\(String($0, radix: 16)) \(range.lowerBound) \(range.count)" }
        ?? "write -z \(range.lowerBound) \(range.count)"
      try qemuIO(image, command)
    }
    let reader = try openVHDX(image)
    XCTAssertEqual(reader.clusterSize, Int(blockSize), file: file, line: line)
    XCTAssertNil(reader.backing, file: file, line: line)
    XCTAssertFalse(reader.isDirty, file: file, line: line)
    let raw = try qemuRaw(image)
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: raw)))
    let map =
      expectAllData
      ? [Extent(0..<size, .data)]
      : expectedMap(size: size, blockSize: blockSize, writes: writes.map(\.0))
    try assertReaderConforms(reader, truth: LayerTruth(map: map, bytes: bytes), file: file, line: line)
  }

  func testDynamicDefault() throws {
    try check(
      size: 64 << 20, options: [],
      writes: [(1 << 20..<3 << 20, 0x11), (30 << 20..<(30 << 20) + 512, 0x22), (40 << 20..<48 << 20, nil)],
      blockSize: 8 << 20)
  }

  func testDynamicOneMebibyteBlocksOddSize() throws {
    // 1 MiB blocks: chunk ratio 4096; a size that ends inside a block.
    let size: Int64 = (9 << 20) + 3 * 512
    try check(
      size: size, options: ["block_size=1M"],
      writes: [(0..<4096, 0x31), (5 << 20..<(5 << 20) + 100_000, 0x32), (size - 1024..<size, 0x33)],
      blockSize: 1 << 20)
  }

  func testFixedWithZeroBlockState() throws {
    // qemu's default block_state_zero=on leaves every entry ZERO, even for a fixed file.
    try check(size: 16 << 20, options: ["subformat=fixed"], writes: [(2 << 20..<(2 << 20) + 8192, 0x41)], blockSize: 8 << 20)
  }

  func testFixedFullyPresent() throws {
    try check(
      size: 16 << 20, options: ["subformat=fixed", "block_state_zero=off"],
      writes: [(1 << 20..<(1 << 20) + 1024, 0x44)], blockSize: 8 << 20, expectAllData: true)
  }

  func testLargerBlocks() throws {
    try check(
      size: 96 << 20, options: ["block_size=32M"], writes: [(33 << 20..<34 << 20, 0x55), (95 << 20..<96 << 20, 0x56)],
      blockSize: 32 << 20)
  }

  /// End to end through the binary: `info --output=json` agrees with qemu-img's, and
  /// `convert -O raw` gives qemu-img's bytes.
  func testCommandLine() throws {
    let image = path("cli.vhdx")
    try qemuImgOK("create", "-f", "vhdx", "-o", "block_size=2M", image, "20M")
    try qemuIO(image, "write -P 0x61 3M 1M", "write -P 0x62 19M 4k")
    let info = try lacuna(["info", "--output=json", image])
    XCTAssertEqual(info.status, 0, info.stderr)
    let ours = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any]
    let theirs = try JSONSerialization.jsonObject(with: Data(qemuImgOK("info", "--output=json", image).utf8)) as! [String: Any]
    for key in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
      XCTAssertEqual("\(ours[key] ?? "missing")", "\(theirs[key] ?? "missing")", key)
    }
    XCTAssertEqual(ours["format-specific"] == nil, theirs["format-specific"] == nil)

    let output = path("cli.raw")
    let convert = try lacuna(["convert", "-O", "raw", image, output])
    XCTAssertEqual(convert.status, 0, convert.stderr)
    let compare = try qemuImg("compare", "-f", "raw", "-F", "vhdx", output, image)
    XCTAssertEqual(compare.status, 0, compare.stdout + compare.stderr)
    // Holes stay holes: only the two written blocks hold data in the output.
    let data = try fileDataRanges(output).reduce(Int64(0)) { $0 + Int64($1.count) }
    XCTAssertLessThanOrEqual(data, 4 << 20)
  }
}

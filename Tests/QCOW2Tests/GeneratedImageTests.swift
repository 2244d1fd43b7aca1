import DiskImage
import Foundation
import TestSupport
import XCTest

/// Images too large for the Fixtures folder (git keeps no holes), made with qemu-img at
/// test time in a temporary directory and judged by qemu-img.
final class GeneratedImageTests: XCTestCase {
  private func makeImage(_ name: String, create: [String], writes: [String]) throws -> String {
    let directory = try temporaryDirectory(self)
    let path = directory.appendingPathComponent(name).path
    try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2"] + create.dropLast() + [path, create.last!])
    if !writes.isEmpty {
      try Qemu.run("qemu-io", writes.flatMap { ["-c", $0] } + [path])
    }
    return path
  }

  private func assertMatchesQemu(_ path: String, readContent: Bool = true, file: StaticString = #filePath, line: UInt = #line) throws {
    let reader = try openQCOW2(path)
    let ours = mapEntries(try reader.allExtents(in: 0..<reader.virtualSize))
    XCTAssertEqual(ours, try Qemu.map(of: path), file: file, line: line)
    if readContent {
      let expected = try Qemu.rawContent(of: path, in: URL(fileURLWithPath: path).deletingLastPathComponent())
      XCTAssertTrue(try readAll(reader) == expected, "content differs from qemu-img", file: file, line: line)
    }
  }

  /// A 1 TiB overlay with a few writes: the map is walked from the L1 table, skipping the
  /// unallocated L1 entries whole, so this returns at once however large the disk.
  func testOneTebibyteOverlay() throws {
    let path = try makeImage(
      "big.qcow2", create: ["1T"],
      writes: ["write -P 0x11 0 64k", "write -P 0x22 512G 1M", "write -z 768G 64k", "write -P 0x33 1048575M 1M"])
    let reader = try openQCOW2(path)
    XCTAssertEqual(reader.virtualSize, 1 << 40)
    let extents = try reader.allExtents(in: 0..<reader.virtualSize)
    XCTAssertEqual(extents.map(\.kind), [.data, .unallocated, .data, .unallocated, .zero, .unallocated, .data])
    XCTAssertEqual(mapEntries(extents), try Qemu.map(of: path))
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 512 << 30) }
    XCTAssertEqual(buffer, [UInt8](repeating: 0x22, count: 1 << 20))
    try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: (1 << 40) - (1 << 20)) }
    XCTAssertEqual(buffer, [UInt8](repeating: 0x33, count: 1 << 20))
  }

  /// The map of 64 MiB of data spread over a large disk, asked for piece by piece as the
  /// engine does, agrees with the one answer for the whole disk.
  func testPiecewiseMapAgreesWithWholeMap() throws {
    let writes = (0..<64).map { "write -P \($0 + 1) \($0 * 3)G 1M" }
    let path = try makeImage("spread.qcow2", create: ["256G"], writes: writes)
    let reader = try openQCOW2(path)
    let whole = try reader.allExtents(in: 0..<reader.virtualSize)
    var piecewise: [Extent] = []
    var position: Int64 = 0
    while position < reader.virtualSize {
      let window = position..<min(reader.virtualSize, position + (64 << 20) + 12345)
      for extent in try reader.allExtents(in: window) { piecewise.appendMerging(extent) }
      position = window.upperBound
    }
    XCTAssertEqual(piecewise, whole)
    XCTAssertEqual(whole.filter { $0.kind == .data }.count, 64)
    XCTAssertEqual(mapEntries(whole), try Qemu.map(of: path))
  }

  func testTwoMebibyteClusters() throws {
    let path = try makeImage(
      "2m.qcow2", create: ["-o", "cluster_size=2M", "6M"],
      writes: ["write -P 0x41 4k 4k", "write -z 2M 2M", "write -P 0x42 5M 100k"])
    try assertMatchesQemu(path)
  }

  func testTwoMebibyteClustersWithExtendedL2() throws {
    let path = try makeImage(
      "2m-ext.qcow2", create: ["-o", "cluster_size=2M,extended_l2=on", "6M"],
      writes: ["write -P 0x41 4k 4k", "write -z 2M 64k", "write -P 0x42 5M 100k"])
    try assertMatchesQemu(path)
  }

  func testConvertCompressedZstdWith64KiBClusters() throws {
    let directory = try temporaryDirectory(self)
    let path = directory.appendingPathComponent("zstd.qcow2").path
    try Qemu.run(
      "qemu-img",
      ["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type=zstd", fixturePath("v3-64k.qcow2"), path])
    try assertMatchesQemu(path)
    XCTAssertTrue(try openQCOW2(path).formatSpecific.contains { $0.0 == "compression-type" && $0.1 == .string("zstd") })
  }

  func testPreallocatedMetadataReadsAsZero() throws {
    let path = try makeImage(
      "prealloc.qcow2", create: ["-o", "preallocation=metadata,cluster_size=4096", "1M"],
      writes: ["write -P 0x61 8k 4k"])
    try assertMatchesQemu(path)
  }

  func testVersion2ZeroWritesDeallocate() throws {
    let path = try makeImage(
      "v2.qcow2", create: ["-o", "compat=0.10", "1M"],
      writes: ["write -P 0x61 0 128k", "write -z 0 64k"])
    try assertMatchesQemu(path)
  }
}

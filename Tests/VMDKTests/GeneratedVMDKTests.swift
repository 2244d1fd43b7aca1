import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// VMDKs made by qemu-img and qemu-io at test time, read by VMDKReader and judged by
/// qemu-img: the bytes (`convert -O raw`) and the map (`map --output=json`).
final class GeneratedVMDKTests: QemuTestCase {
  /// A raw disk of `size` bytes with these qemu-io writes.
  private func makeRaw(_ name: String, size: String, writes: [String]) throws -> String {
    try qemuImgOK("create", "-q", "-f", "raw", path(name), size)
    if !writes.isEmpty { try qemuIO(format: "raw", path(name), writes) }
    return path(name)
  }

  /// A monolithicSparse image of `size` with these qemu-io writes.
  private func makeSparse(_ name: String, size: String, options: String = "", writes: [String]) throws -> String {
    let arguments = ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse" + options, path(name), size]
    let outcome = try runProgram(qemu, arguments, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    if !writes.isEmpty { try qemuIO(format: "vmdk", path(name), writes) }
    return path(name)
  }

  /// A streamOptimized image converted from a raw disk with these writes.
  private func makeStream(_ name: String, size: String, writes: [String]) throws -> String {
    let raw = try makeRaw(name + ".raw", size: size, writes: writes)
    try qemuImgOK("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path(name))
    return path(name)
  }

  /// Map, bytes and the reader contract against qemu-img.
  private func assertMatchesQemu(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let reader = try openVMDK(image)
    let ours = mapEntries(try reader.allExtents(in: 0..<reader.virtualSize))
    XCTAssertEqual(ours, try QemuJudge.map(of: image), "map", file: file, line: line)
    let expected = try QemuJudge.rawContent(of: image, in: dir)
    XCTAssertEqual(reader.virtualSize, Int64(expected.count), file: file, line: line)
    XCTAssertTrue(try readAll(reader) == expected, "content differs from qemu-img", file: file, line: line)
    try assertReaderConforms(reader, truth: try QemuJudge.truth(of: image, in: dir), file: file, line: line)
  }

  func testMonolithicSparse() throws {
    let image = try makeSparse(
      "sparse.vmdk", size: "100M",
      writes: ["write -P 0x11 0 100k", "write -P 0x12 1M 4k", "write -P 0x13 33M 200k", "write -P 0x14 104790016 65536"])
    try assertMatchesQemu(image)
    let reader = try openVMDK(image)
    XCTAssertEqual(reader.formatName, "vmdk")
    XCTAssertEqual(reader.clusterSize, 65536)
    XCTAssertNil(reader.backing)
  }

  /// `write -z` on an image with zeroed grains stores GTE 1, which reads as zeros and maps
  /// as zero (present, no data); without the option qemu writes a grain of zeros.
  func testZeroedGrains() throws {
    let image = try makeSparse(
      "zeroed.vmdk", size: "10M", options: ",zeroed_grain=on",
      writes: ["write -P 0x21 0 128k", "write -z 64k 64k", "write -z 1M 128k", "write -P 0x22 2M 4k", "write -z 9M 4k"])
    try assertMatchesQemu(image)
    let kinds = try openVMDK(image).allExtents(in: 0..<(10 << 20)).map(\.kind)
    XCTAssertTrue(kinds.contains(.zero), "\(kinds)")
  }

  func testStreamOptimized() throws {
    let image = try makeStream(
      "stream.vmdk", size: "5M",
      writes: ["write -P 0x33 0 100k", "write -P 0x44 3M 64k", "write -P 0x55 5000k 120k"])
    try assertMatchesQemu(image)
    let reader = try openVMDK(image)
    let data = try reader.allExtents(in: 0..<reader.virtualSize).filter { $0.kind == .data }
    XCTAssertFalse(data.isEmpty)
    XCTAssertTrue(data.allSatisfy { $0.hostOffset == nil }, "compressed grains have no host offset: \(data)")
  }

  /// A capacity that is not a grain multiple: qemu-img writes the last grain short.
  func testStreamOptimizedShortLastGrain() throws {
    let image = try makeStream("short.vmdk", size: "103936", writes: ["write -P 0x66 0 103936"])
    try assertMatchesQemu(image)
    let sparse = try makeSparse("short-sparse.vmdk", size: "103936", writes: ["write -P 0x67 65536 38400"])
    try assertMatchesQemu(sparse)
  }

  /// A stream whose header says GD_AT_END finds its grain directory through the footer at
  /// the end, as VMware's exports have it (qemu-img writes the directory at the front, so
  /// the test moves the header's offset into an appended footer).
  func testGrainDirectoryThroughFooter() throws {
    let image = try makeStream("front.vmdk", size: "3M", writes: ["write -P 0x71 64k 64k", "write -P 0x72 2M 8k"])
    let expected = try QemuJudge.rawContent(of: image, in: dir)
    var patched = try PatchableVMDK(path: image)
    let header = Array(patched.bytes[0..<512])
    patched.set(UInt64.max, at: 56)
    var marker = [UInt8](repeating: 0, count: 512)
    marker[0] = 1
    marker[12] = 3
    _ = patched.append(marker)
    _ = patched.append(header)
    _ = patched.append([UInt8](repeating: 0, count: 512))
    try patched.write(to: path("footer.vmdk"))
    let reader = try openVMDK(path("footer.vmdk"))
    XCTAssertTrue(try readAll(reader) == expected)
    // qemu reads the footer too: the maps agree.
    XCTAssertEqual(mapEntries(try reader.allExtents(in: 0..<reader.virtualSize)), try QemuJudge.map(of: path("footer.vmdk")))

    // Without the footer, GD_AT_END cannot be resolved.
    var truncated = patched
    truncated.bytes.removeLast(512)
    try truncated.write(to: path("no-footer.vmdk"))
    assertImageError("GD_AT_END") { _ = try openVMDK(path("no-footer.vmdk")) }
  }

  /// A 64 GiB disk with a few writes: one `extents` answer visits a bounded number of grain
  /// tables (callers loop), and the whole map still agrees with qemu-img's.
  func testLargeDiskMapIsAnsweredInBoundedPieces() throws {
    let image = try makeSparse(
      "large.vmdk", size: "64G", writes: ["write -P 0x81 0 64k", "write -P 0x82 40G 1M", "write -P 0x83 65535M 1M"])
    let reader = try openVMDK(image)
    let first = try reader.extents(in: 0..<reader.virtualSize)
    XCTAssertLessThan(first.last!.range.upperBound, reader.virtualSize, "one answer should not cover 2048 tables")
    let whole = try reader.allExtents(in: 0..<reader.virtualSize)
    XCTAssertEqual(whole.filter { $0.kind == .data }.count, 3)
    XCTAssertEqual(mapEntries(whole), try QemuJudge.map(of: image))
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 40 << 30) }
    XCTAssertEqual(buffer, [UInt8](repeating: 0x82, count: 1 << 20))
  }

  /// The fuzzer's seeds in Fixtures/ (make-vmdk-fixtures.sh) read as qemu-img reads them.
  func testFixtures() throws {
    for name in ["vmdk-sparse.vmdk", "vmdk-stream.vmdk"] {
      try assertMatchesQemu(fixturePath(name))
    }
    let kinds = try openVMDK(fixturePath("vmdk-sparse.vmdk")).allExtents(in: 0..<(1 << 20)).map(\.kind)
    XCTAssertEqual(kinds, [.data, .unallocated, .zero, .unallocated])
  }

  // MARK: - Through the binary

  func testConvertAndInfoThroughTheBinary() throws {
    let sparse = try makeSparse("bin.vmdk", size: "8M", writes: ["write -P 0x91 0 12k", "write -P 0x92 5M 64k"])
    let stream = try makeStream("bin-stream.vmdk", size: "3M", writes: ["write -P 0x93 1M 100k"])
    for image in [sparse, stream] {
      let output = image + ".out.raw"
      let outcome = try lacuna(["convert", "-O", "raw", image, output])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      let ours = [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
      XCTAssertTrue(ours == (try QemuJudge.rawContent(of: image, in: dir)), "\(image): converted bytes differ")

      // Probed without -f, and format-specific as qemu-img prints it.
      let info = try lacuna(["info", "--output=json", image])
      XCTAssertEqual(info.status, 0, info.stderr)
      let qemuInfo = try QemuJudge.run("qemu-img", ["info", "--output=json", image])
      XCTAssertEqual(withoutActualSize(info.stdout), withoutActualSize(qemuInfo), "info of \(image)")
      let human = try lacuna(["info", image])
      XCTAssertTrue(human.stdout.contains("file format: vmdk"), human.stdout)
    }
  }

  /// qemu-img's actual-size counts blocks the file system holds, which may differ from one
  /// stat to the next only in what we do not control; everything else must match exactly.
  private func withoutActualSize(_ text: String) -> String {
    text.split(separator: "\n").filter { !$0.contains("\"actual-size\"") }.joined(separator: "\n")
  }

  /// `vmdkinfo` (libvmdk) as a second opinion on the sizes, where it is installed.
  func testVmdkinfoAgreesOnSizes() throws {
    let vmdkinfo = try requireProgram(
      "vmdkinfo", skipping: "vmdkinfo is not installed (apt-get install libvmdk-utils); skipping the second opinion")
    let sparse = try makeSparse("li.vmdk", size: "7M", writes: ["write -P 0xb1 0 64k"])
    let stream = try makeStream("li-stream.vmdk", size: "3M", writes: ["write -P 0xb2 1M 64k"])
    for image in [sparse, stream] {
      let reader = try openVMDK(image)
      let outcome = try runProgram(vmdkinfo, [image])
      guard outcome.status == 0 else { throw XCTSkip("vmdkinfo could not read \(image): \(outcome.stderr)") }
      let lines = outcome.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
      let media = lines.first { $0.hasPrefix("Media size:") } ?? ""
      XCTAssertTrue(media.hasSuffix("(\(reader.virtualSize) bytes)"), "vmdkinfo says:\n\(outcome.stdout)")
      guard case .integer(let cid)? = reader.formatSpecific.first(where: { $0.0 == "cid" })?.1 else {
        return XCTFail("no cid in format-specific")
      }
      let identifier = lines.first { $0.hasPrefix("Content identifier:") } ?? ""
      // vmdkinfo prints all 8 digits (0x01e94b68).
      let digits = String(cid, radix: 16)
      let padded = String(repeating: "0", count: max(0, 8 - digits.count)) + digits
      XCTAssertTrue(identifier.hasSuffix("0x" + padded), "vmdkinfo says:\n\(outcome.stdout)")
    }
  }
}

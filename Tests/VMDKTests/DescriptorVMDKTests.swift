import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// VMDKs whose descriptor is a text file of its own and whose disk lies in extent files
/// (monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs), made by qemu-img at test time and
/// judged by it: bytes (`convert -O raw`), map (`map --output=json`) and `info`.
final class DescriptorVMDKTests: QemuTestCase {
  /// A VMDK of `subformat` and `size` with these qemu-io writes.
  private func make(_ name: String, _ subformat: String, size: String, writes: [String]) throws -> String {
    try qemuImgOK("create", "-q", "-f", "vmdk", "-o", "subformat=" + subformat, path(name), size)
    if !writes.isEmpty { try qemuIO(format: "vmdk", path(name), writes) }
    return path(name)
  }

  private let writes = ["write -P 0x11 0 100k", "write -P 0x12 1M 4k", "write -P 0x13 3000k 72k"]

  /// Bytes, map and info against qemu-img, through the reader and through the binary.
  private func assertMatchesQemu(_ image: String, flat: Bool, file: StaticString = #filePath, line: UInt = #line) throws {
    let reader = try openVMDKWithExtents(image)
    XCTAssertEqual(
      mapEntries(try reader.allExtents(in: 0..<reader.virtualSize)), try QemuJudge.map(of: image, holesAsZero: flat),
      "map of \(image)", file: file, line: line)
    let expected = try QemuJudge.rawContent(of: image, in: dir)
    XCTAssertTrue(try readAll(reader, chunk: 300_000) == expected, "content of \(image)", file: file, line: line)

    let output = image + ".out.raw"
    let outcome = try lacuna(["convert", "-O", "raw", image, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr, file: file, line: line)
    XCTAssertTrue([UInt8](try Data(contentsOf: URL(fileURLWithPath: output))) == expected, file: file, line: line)
    try FileManager.default.removeItem(atPath: output)

    let info = try lacuna(["info", "--output=json", image])
    XCTAssertEqual(info.status, 0, info.stderr, file: file, line: line)
    let qemuInfo = try QemuJudge.run("qemu-img", ["info", "--output=json", image])
    XCTAssertEqual(withoutActualSize(info.stdout), withoutActualSize(qemuInfo), "info of \(image)", file: file, line: line)
  }

  private func withoutActualSize(_ text: String) -> String {
    text.split(separator: "\n").filter { !$0.contains("\"actual-size\"") }.joined(separator: "\n")
  }

  func testMonolithicFlat() throws {
    try assertMatchesQemu(try make("flat.vmdk", "monolithicFlat", size: "4M", writes: writes), flat: true)
  }

  func testTwoGbMaxExtentFlat() throws {
    try assertMatchesQemu(try make("split-flat.vmdk", "twoGbMaxExtentFlat", size: "4M", writes: writes), flat: true)
  }

  func testTwoGbMaxExtentSparse() throws {
    let image = try make("split-sparse.vmdk", "twoGbMaxExtentSparse", size: "4M", writes: writes)
    try assertMatchesQemu(image, flat: false)
    XCTAssertEqual(try openVMDKWithExtents(image).clusterSize, 65536)
  }

  /// ESXi's shape: the same raw file, as a VMFS extent without an offset.
  func testVMFS() throws {
    _ = try make("esx.vmdk", "monolithicFlat", size: "4M", writes: writes)
    let text = try String(contentsOfFile: path("esx.vmdk"), encoding: .utf8)
      .replacingOccurrences(of: "createType=\"monolithicFlat\"", with: "createType=\"vmfs\"")
      .replacingOccurrences(of: "FLAT \"esx-flat.vmdk\" 0", with: "VMFS \"esx-flat.vmdk\"")
    XCTAssertTrue(text.contains("VMFS \"esx-flat.vmdk\""), text)
    try text.write(toFile: path("esx.vmdk"), atomically: false, encoding: .utf8)
    try assertMatchesQemu(path("esx.vmdk"), flat: true)
  }

  /// A disk just over 2 GiB is cut into two extent files; holes stay holes, and the map and
  /// the bytes around the cut agree with qemu-img.
  func testSplitAtTwoGiB() throws {
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
      let image = try make(
        "big-\(subformat).vmdk", subformat, size: "2200M",
        writes: ["write -P 0x31 2047M 2M", "write -P 0x32 2150M 64k", "write -P 0x33 0 4k"])
      let reader = try openVMDKWithExtents(image)
      XCTAssertEqual(reader.virtualSize, 2200 << 20)
      XCTAssertEqual(reader.companionSources.count, 2)
      let flat = subformat.hasSuffix("Flat")
      XCTAssertEqual(
        mapEntries(try reader.allExtents(in: 0..<reader.virtualSize)), try QemuJudge.map(of: image, holesAsZero: flat),
        subformat)
      // qemu-img's conversion is a sparse file: only the ranges compared are read.
      let raw = path("big.raw")
      try QemuJudge.run("qemu-img", ["convert", "-f", "vmdk", "-O", "raw", image, raw])
      let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: raw))
      defer { try? handle.close() }
      for (offset, length) in [(0, 8192), ((2047 << 20) - 4096, 3 << 20), ((2150 << 20) - 100, 70_000)] {
        try handle.seek(toOffset: UInt64(offset))
        let expected = [UInt8](try handle.read(upToCount: length) ?? Data())
        var ours = [UInt8](repeating: 0xEE, count: length)
        try ours.withUnsafeMutableBytes { try reader.read(into: $0, at: Int64(offset)) }
        XCTAssertTrue(ours == expected, "\(subformat): \(length) bytes at \(offset)")
      }
      try FileManager.default.removeItem(atPath: raw)
      for file in try FileManager.default.contentsOfDirectory(atPath: dir.path) where file.hasPrefix("big-") {
        try FileManager.default.removeItem(atPath: path(file))
      }
    }
  }

  /// A monolithicSparse file described by a separate descriptor (VMware writes these; qemu
  /// refuses them): the disk is the sparse file's.
  func testSparseFileBehindASeparateDescriptor() throws {
    let inner = try make("inner.vmdk", "monolithicSparse", size: "2M", writes: ["write -P 0x41 64k 64k"])
    try """
      # Disk DescriptorFile
      version=1
      CID=12345678
      parentCID=ffffffff
      createType="monolithicSparse"

      RW 4096 SPARSE "inner.vmdk"
      RW 2048 ZERO
      """.write(toFile: path("outer.vmdk"), atomically: false, encoding: .utf8)
    let reader = try openVMDKWithExtents(path("outer.vmdk"))
    XCTAssertEqual(reader.virtualSize, 3 << 20)
    let expected = try QemuJudge.rawContent(of: inner, in: dir) + [UInt8](repeating: 0, count: 1 << 20)
    XCTAssertTrue(try readAll(reader) == expected)
    XCTAssertEqual(
      try reader.allExtents(in: 0..<reader.virtualSize).map(\.kind), [.unallocated, .data, .unallocated, .zero])
  }

  /// The fuzz seed: a descriptor of one ZERO extent, which needs no other file.
  func testZeroExtentFixture() throws {
    let reader = try openVMDK(fixturePath("vmdk-descriptor.vmdk"))
    XCTAssertEqual(reader.virtualSize, 1 << 20)
    XCTAssertEqual(try reader.allExtents(in: 0..<reader.virtualSize).map(\.kind), [.zero])
    XCTAssertTrue(try readAll(reader) == [UInt8](repeating: 0, count: 1 << 20))
    let info = try lacuna(["info", "--output=json", fixturePath("vmdk-descriptor.vmdk")])
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains("\"create-type\": \"monolithicFlat\""), info.stdout)
  }

  // MARK: - Delta disks

  func testDeltaDiskReadsThroughItsParent() throws {
    _ = try make("base.vmdk", "monolithicSparse", size: "4M", writes: ["write -P 0xa1 0 1M", "write -P 0xa3 3M 64k"])
    try qemuImgOK("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", path("child.vmdk"))
    try qemuIO(format: "vmdk", path("child.vmdk"), ["write -P 0xa2 512k 64k", "write -P 0xa4 2M 4k"])
    let child = try openVMDK(path("child.vmdk"))
    XCTAssertEqual(child.backing, BackingReference(name: "base.vmdk", format: "vmdk"))
    XCTAssertEqual(child.checkBackingAgainst(try openVMDK(path("base.vmdk"))), nil)

    let output = path("child.raw")
    let outcome = try lacuna(["convert", "-O", "raw", path("child.vmdk"), output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(
      [UInt8](try Data(contentsOf: URL(fileURLWithPath: output))) == (try QemuJudge.rawContent(of: path("child.vmdk"), in: dir)))
    let info = try lacuna(["info", "--output=json", "--backing-chain", path("child.vmdk")])
    let qemuInfo = try QemuJudge.run("qemu-img", ["info", "--output=json", "--backing-chain", path("child.vmdk")])
    XCTAssertEqual(withoutActualSize(info.stdout), withoutActualSize(qemuInfo))

    // The parent written since: its CID changed, so the child's disk no longer exists.
    try qemuIO(format: "vmdk", path("base.vmdk"), ["write -P 0xa5 2M 4k"])
    let stale = try lacuna(["convert", "-O", "raw", path("child.vmdk"), path("stale.raw")])
    XCTAssertEqual(stale.status, 1, stale.stderr)
    XCTAssertEqual(stale.stderr.split(separator: "\n").count, 1, stale.stderr)
    XCTAssertTrue(stale.stderr.contains(path("child.vmdk") + ": the parent"), stale.stderr)
    XCTAssertTrue(stale.stderr.contains("parentCID"), stale.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("stale.raw")))
  }
}

extension ImageReader {
  /// The error `checkBacking` throws for `parent`, or nil.
  func checkBackingAgainst(_ parent: ImageReader) -> String? {
    do {
      try checkBacking(parent)
      return nil
    } catch {
      return "\(error)"
    }
  }
}

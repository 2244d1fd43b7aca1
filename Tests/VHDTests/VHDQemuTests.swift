import DiskImage
import Foundation
import TestSupport
import VHD
import XCTest

/// VHDs made by qemu-img and qemu-io at test time, read by VHDReader and by the lacuna
/// binary, judged by qemu-img (map, convert, info). Skips where qemu-utils is missing.
final class VHDQemuTests: QemuTestCase {
  /// Makes a VHD with qemu-img (`subformat` dynamic or fixed) and fills it with qemu-io.
  private func makeVHD(_ name: String, subformat: String, size: String, writes: [String]) throws -> String {
    try qemuImgOK("create", "-q", "-f", "vpc", "-o", "subformat=\(subformat)", path(name), size)
    if !writes.isEmpty {
      let outcome = try runProgram(which("qemu-io")!, ["-f", "vpc"] + writes.flatMap { ["-c", $0] } + [path(name)])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
    }
    return path(name)
  }

  private func open(_ path: String) throws -> ImageReader {
    try VHD.format.open(ImageFile.openForReading(path))
  }

  /// qemu-img's map of a VHD as extents: data over a file hole ("zero" and "data" both
  /// true, which qemu says for a fixed disk's holes) counts as zero, as we answer it.
  private func qemuMap(_ path: String) throws -> [Extent] {
    let json = try JSONSerialization.jsonObject(with: Data(qemuImgOK("map", "--output=json", "-f", "vpc", path).utf8))
    var result: [Extent] = []
    for entry in json as! [[String: Any]] {
      let start = (entry["start"] as! NSNumber).int64Value
      let length = (entry["length"] as! NSNumber).int64Value
      let kind: ExtentKind =
        !(entry["present"] as! Bool) ? .unallocated : (entry["data"] as! Bool) && !(entry["zero"] as! Bool) ? .data : .zero
      result.appendMerging(Extent(start..<start + length, kind, hostOffset: (entry["offset"] as? NSNumber)?.int64Value))
    }
    return result
  }

  /// The virtual disk as qemu-img reads it.
  private func qemuRaw(_ path: String) throws -> [UInt8] {
    let output = path + ".qemu.raw"
    try qemuImgOK("convert", "-f", "vpc", "-O", "raw", path, output)
    defer { try? FileManager.default.removeItem(atPath: output) }
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
  }

  /// The reader agrees with qemu-img on size, map (kinds and host offsets) and bytes, and
  /// keeps the reader contract.
  private func assertAgreesWithQemu(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let reader = try open(path)
    let map = try qemuMap(path)
    let bytes = try qemuRaw(path)
    XCTAssertEqual(reader.virtualSize, Int64(bytes.count), "virtual size", file: file, line: line)
    XCTAssertEqual(try reader.allExtents(in: 0..<reader.virtualSize), map, "map", file: file, line: line)
    try assertReaderConforms(reader, truth: LayerTruth(map: map, bytes: bytes), file: file, line: line)
  }

  func testDynamicAgreesWithQemu() throws {
    let image = try makeVHD(
      "dynamic.vhd", subformat: "dynamic", size: "10M",
      writes: ["write -P 0x11 0 64k", "write -P 0x22 3M 4k", "write -P 0x33 7340544 1k", "write -P 0x44 10M 4k"])
    try assertAgreesWithQemu(image)
    XCTAssertEqual(try open(image).clusterSize, 2 << 20)
  }

  func testFixedAgreesWithQemu() throws {
    let image = try makeVHD(
      "fixed.vhd", subformat: "fixed", size: "3M", writes: ["write -P 0x55 0 8k", "write -P 0x66 2M 64k"])
    try assertAgreesWithQemu(image)
    XCTAssertNil(try open(image).clusterSize)
  }

  /// `force_size=on`: creator `qem2`, the current size is the size (no CHS rounding).
  func testForceSizeAgreesWithQemu() throws {
    try qemuImgOK("create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", path("forced.vhd"), "5M")
    try qemuIO(path("forced.vhd"), "write -P 0x77 1M 4k")
    try assertAgreesWithQemu(path("forced.vhd"))
    XCTAssertEqual(try open(path("forced.vhd")).virtualSize, 5 << 20)
  }

  /// The fixtures `make-vhd-fixtures.sh` made (the fuzzer's seeds), as checked out.
  func testFixturesAgreeWithQemu() throws {
    let names = try FileManager.default.contentsOfDirectory(atPath: fixturesDirectory.path)
      .filter { $0.hasPrefix("vhd-") && $0.hasSuffix(".vhd") }.sorted()
    XCTAssertEqual(names, ["vhd-dynamic-empty.vhd", "vhd-fixed-force-size.vhd", "vhd-fixed.vhd"])
    for name in names {
      let copy = path(name)
      try FileManager.default.copyItem(atPath: fixturePath(name), toPath: copy)
      try assertAgreesWithQemu(copy)
    }
  }

  /// `lacuna info --output=json` prints what `qemu-img info --output=json -f vpc` prints
  /// for the fields both have; without -f lacuna says vpc for dynamic and fixed disks.
  func testInfoAgreesWithQemu() throws {
    let dynamic = try makeVHD("d.vhd", subformat: "dynamic", size: "20M", writes: ["write -P 1 0 4k"])
    let fixed = try makeVHD("f.vhd", subformat: "fixed", size: "1M", writes: [])
    for image in [dynamic, fixed] {
      let ours = try lacuna(["info", "--output=json", image])
      XCTAssertEqual(ours.status, 0, ours.stderr)
      let mine = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as! [String: Any]
      let theirs =
        try JSONSerialization.jsonObject(with: Data(qemuImgOK("info", "--output=json", "-f", "vpc", image).utf8))
        as! [String: Any]
      for key in ["virtual-size", "filename", "format", "cluster-size", "dirty-flag", "format-specific"] {
        XCTAssertEqual(
          mine[key].map { "\($0)" }, theirs[key].map { "\($0)" }, "\(image): \(key)")
      }
      let human = try lacuna(["info", image])
      XCTAssertTrue(human.stdout.contains("file format: vpc"), human.stdout + human.stderr)
    }
  }

  func testConvertThroughTheBinary() throws {
    let dynamic = try makeVHD(
      "d.vhd", subformat: "dynamic", size: "6M", writes: ["write -P 0x12 4k 8k", "write -P 0x34 5M 1M"])
    let fixed = try makeVHD("f.vhd", subformat: "fixed", size: "2M", writes: ["write -P 0x56 1M 4k"])
    for image in [dynamic, fixed] {
      let outcome = try lacuna(["convert", "-O", "raw", image, image + ".raw"])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertTrue(try [UInt8](Data(contentsOf: URL(fileURLWithPath: image + ".raw"))) == qemuRaw(image), image)
    }
  }

  /// qemu cannot make a differencing VHD (vpc has no backing support), so the child is
  /// built by hand over a base qemu made: sectors whose bitmap bit is 1 come from the
  /// child, the rest (bit 0 or unallocated block) from the base, through the binary.
  func testDifferencingThroughTheBinary() throws {
    let base = try makeVHD(
      "base.vhd", subformat: "dynamic", size: "4M", writes: ["write -P 0xb1 0 3M", "write -P 0xb2 3M 1M"])
    let baseBytes = try qemuRaw(base)
    var child = VHDBuilder()
    child.diskType = .differencing
    child.size = Int64(baseBytes.count)
    child.blockSize = 1 << 20
    var bitmap = [UInt8](repeating: 0, count: child.bitmapSize)
    bitmap[0] = 0xf0  // sectors 0-3 of block 1
    bitmap[100] = 0x81  // sectors 800 and 807
    child.blocks = [
      (index: 1, bitmap: bitmap, data: [UInt8](repeating: 0xc1, count: 1 << 20)),
      (index: 3, bitmap: nil, data: [UInt8](repeating: 0xc2, count: 100)),
    ]
    child.locators = [("W2ku", "C:\\VMs\\base.vhd"), ("W2ru", ".\\base.vhd")]
    // The child records the unique id of the base's footer (bytes 68-83 of the last 512).
    let baseFile = [UInt8](try Data(contentsOf: URL(fileURLWithPath: base)))
    let footerStart = baseFile.count - 512
    child.parentUniqueID = Array(baseFile[footerStart + 68..<footerStart + 84])
    try write(child.build(), to: path("child.vhd"))

    var expected = baseBytes
    for sector in [0, 1, 2, 3, 800, 807] {
      let start = (1 << 20) + sector * 512
      expected.replaceSubrange(start..<start + 512, with: [UInt8](repeating: 0xc1, count: 512))
    }
    let lastBlock = 3 << 20
    expected.replaceSubrange(lastBlock..<lastBlock + (1 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
    expected.replaceSubrange(lastBlock..<lastBlock + 100, with: [UInt8](repeating: 0xc2, count: 100))
    expected.removeLast(expected.count - Int(child.size))

    let outcome = try lacuna(["convert", "-O", "raw", path("child.vhd"), path("out.raw")])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(try [UInt8](Data(contentsOf: URL(fileURLWithPath: path("out.raw")))) == expected)
    let info = try lacuna(["info", path("child.vhd")])
    XCTAssertTrue(info.stdout.contains("backing file: base.vhd"), info.stdout)

    // A parent that is not the one the child was made from (another unique id) is refused.
    var stranger = child
    stranger.parentUniqueID = [UInt8](repeating: 0x77, count: 16)
    try write(stranger.build(), to: path("stranger.vhd"))
    let refused = try lacuna(["convert", "-O", "raw", path("stranger.vhd"), path("out3.raw")])
    XCTAssertEqual(refused.status, 1, refused.stderr)
    assertOneLineNaming(refused.stderr, "stranger.vhd")
    XCTAssertTrue(refused.stderr.contains("this differencing VHD was made from 77777777"), refused.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("out3.raw")))

    // Without its parent the child cannot be read: one line naming the image.
    try FileManager.default.removeItem(atPath: base)
    let missing = try lacuna(["convert", "-O", "raw", path("child.vhd"), path("out2.raw")])
    XCTAssertEqual(missing.status, 1)
    assertOneLineNaming(missing.stderr, "child.vhd")
  }

  /// Damaged files: exit 1, one line naming the file and the problem.
  func testHostileFilesGiveOneLineErrors() throws {
    let good = try makeVHD("good.vhd", subformat: "dynamic", size: "6M", writes: ["write -P 0x12 0 4k", "write -P 3 4M 4k"])
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: good)))
    var cases: [(String, [UInt8], String)] = []
    cases.append(("truncated.vhd", Array(bytes.prefix(3000)), "past the end of the file"))
    cases.append(("short.vhd", Array(bytes.prefix(300)), "shorter than a VHD footer"))
    var pastEnd = bytes
    BigEndianWriter.store(UInt32(0x00ff_0000), at: 1536, in: &pastEnd)
    cases.append(("bat-past-end.vhd", pastEnd, "past the end of the file"))
    var absurd = bytes
    BigEndianWriter.store(UInt32(0xffff_fff0), at: 512 + 28, in: &absurd)
    cases.append(("absurd-bat.vhd", absurd, "past the end of the file"))
    var checksum = bytes
    checksum[40] ^= 0x40
    cases.append(("checksum.vhd", checksum, "checksum"))
    for (name, content, message) in cases {
      try write(content, to: path(name))
      for arguments in [["info", path(name)], ["convert", "-O", "raw", path(name), path(name + ".raw")]] {
        let outcome = try lacuna(arguments)
        XCTAssertEqual(outcome.status, 1, "\(arguments): \(outcome.stderr)")
        XCTAssertNil(outcome.signal)
        assertOneLineNaming(outcome.stderr, name)
        XCTAssertTrue(outcome.stderr.contains(message), outcome.stderr)
      }
    }
  }

  /// vhdiinfo (libvhdi) as a second opinion on sizes: its media size is the footer's
  /// current size, which qemu-img's `qemu` creator sets to the CHS size.
  func testVhdiinfoAgreesOnSize() throws {
    let vhdiinfo = try requireProgram(
      "vhdiinfo", skipping: "vhdiinfo is not installed (apt-get install libvhdi-utils); skipping the second opinion")
    let dynamic = try makeVHD("d.vhd", subformat: "dynamic", size: "10M", writes: [])
    let fixed = try makeVHD("f.vhd", subformat: "fixed", size: "3M", writes: [])
    for image in [dynamic, fixed] {
      XCTAssertEqual(try mediaSize(vhdiinfo, image), try open(image).virtualSize, image)
    }
  }
}

/// The media size vhdiinfo prints.
func mediaSize(_ vhdiinfo: String, _ path: String) throws -> Int64? {
  let output = try runProgram(vhdiinfo, [path]).stdout
  guard let line = output.split(separator: "\n").first(where: { $0.contains("Media size") }),
    let open = line.lastIndex(of: "("), let space = line[open...].firstIndex(of: " ")
  else { return nil }
  return Int64(line[line.index(after: open)..<space])
}

/// `stderr` is one line naming `name`.
func assertOneLineNaming(_ stderr: String, _ name: String, file: StaticString = #filePath, line: UInt = #line) {
  let lines = stderr.split(separator: "\n")
  XCTAssertEqual(lines.count, 1, stderr, file: file, line: line)
  XCTAssertTrue(stderr.contains(name), stderr, file: file, line: line)
}

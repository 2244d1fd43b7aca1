import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHD

/// The VHD writer (`-O vpc`), judged against qemu-img's own conversions with the same
/// options (content, virtual size, file size, holes) and opened by libvhdi's vhdiinfo.
/// qemu-img has no check for vpc, so `assertCheckClean` passes without a word.
final class VHDWriterTests: QemuTestCase {
  private var judge: WriterJudge { WriterJudge(qemu: qemu, dir: dir) }

  /// The option sets qemu-img's vpc driver takes, as `-o` strings.
  private static let optionSets = [
    "subformat=dynamic", "subformat=fixed", "subformat=dynamic,force_size=on", "subformat=fixed,force_size=on",
  ]

  // MARK: - Sources and tools

  /// A sparse raw disk of `size` bytes with qemu-io's `writes`.
  private func makeRaw(_ name: String, size: Int64, writes: [String]) throws -> String {
    try qemuImgOK("create", "-q", "-f", "raw", path(name), String(size))
    if !writes.isEmpty {
      let outcome = try runProgram(which("qemu-io")!, ["-f", "raw"] + writes.flatMap { ["-c", $0] } + [path(name)])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
    }
    return path(name)
  }

  /// 24 MiB (a whole number of MiB, so every option set takes it): data in part of block 0,
  /// a little in block 1, nothing in blocks 2 to 4, a written run of zeros over block 5
  /// (data to the source's map, zeros to the engine: the block must stay unallocated), all
  /// of block 7 and a bit of block 8, and the last 4 KiB.
  private static let mixedSize: Int64 = 24 << 20
  private static let mixedData: Int64 = (64 << 10) + (4 << 10) + (8 << 10) + (2 << 20) + (64 << 10) + (4 << 10)
  private func mixedSource(_ name: String = "src.raw") throws -> String {
    try makeRaw(
      name, size: Self.mixedSize,
      writes: [
        "write -P 0x11 0 64k", "write -P 0x22 1052672 4k", "write -P 0x33 3M 8k", "write -P 0 10M 1M",
        "write -P 0x44 14M 2M", "write -P 0x55 16M 64k", "write -P 0x66 \(Self.mixedSize - 4096) 4k",
      ])
  }

  /// vhdiinfo (libvhdi) opens the image and reports `size` as its media size. Skipped,
  /// with a note, where libvhdi-utils is missing.
  private func assertVhdiOpens(_ image: String, size: Int64, file: StaticString = #filePath, line: UInt = #line) throws {
    guard let vhdiinfo = which("vhdiinfo") else {
      print("vhdiinfo is not installed (apt-get install libvhdi-utils): \(image) not checked with it")
      return
    }
    let outcome = try runProgram(vhdiinfo, [image], in: dir)
    XCTAssertEqual(outcome.status, 0, "vhdiinfo \(image): \(outcome.stdout)\(outcome.stderr)", file: file, line: line)
    XCTAssertTrue(
      outcome.stdout.contains("(\(size) bytes)"), "vhdiinfo \(image) media size, expected \(size): \(outcome.stdout)",
      file: file, line: line)
  }

  private func virtualSize(_ image: String) throws -> Int64 {
    Int64(try XCTUnwrap(judge.info(image, format: "vpc")["virtual-size"] as? Int))
  }

  private func bytes(_ file: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: file))) }

  /// Blanks the footer fields that differ by design between two runs: the timestamp, the
  /// checksum (which covers it) and the unique id, in the footer at the end and, for a
  /// dynamic disk, in its copy at 0.
  private static func maskFooters(_ bytes: inout [UInt8]) {
    var footers = [bytes.count - 512]
    if bytes.starts(with: Array("conectix".utf8)) { footers.append(0) }
    for footer in footers where footer >= 0 {
      for field in [24..<28, 64..<84] { for index in field { bytes[footer + index] = 0 } }
    }
  }

  /// Converts `source` with lacuna and qemu-img to vpc with `options` and judges ours:
  /// same disk, same virtual size, no larger, opened by vhdiinfo. Returns both outputs.
  @discardableResult
  private func assertConvertsLikeQemu(
    _ source: String, options: String, name: String, file: StaticString = #filePath, line: UInt = #line
  ) throws -> (ours: String, theirs: String) {
    let fileName = name.replacingOccurrences(of: ",", with: "_").replacingOccurrences(of: "=", with: "-")
    let (ours, theirs) = try judge.convertBoth(
      source, sourceFormat: "raw", to: "vpc", options: options, name: fileName, ext: "vhd", file: file, line: line)
    try judge.assertIdentical(ours, format: "vpc", to: source, sourceFormat: "raw", file: file, line: line)
    try judge.assertCheckClean(ours, format: "vpc", file: file, line: line)
    try judge.assertSameVirtualSize(ours, theirs, format: "vpc", file: file, line: line)
    try judge.assertNoLarger([ours], than: [theirs], file: file, line: line)
    try assertVhdiOpens(ours, size: try virtualSize(ours), file: file, line: line)
    let mine = try WriterJudge.sizes([ours])
    let qemus = try WriterJudge.sizes([theirs])
    print(
      "vpc \(options) \(name): ours \(mine.apparent) bytes long, \(mine.allocated) allocated; "
        + "qemu-img's \(qemus.apparent) long, \(qemus.allocated) allocated")
    return (ours, theirs)
  }

  // MARK: - Conversions judged against qemu-img

  func testEveryOptionSetMatchesQemuAndKeepsHoles() throws {
    let source = try mixedSource()
    for (index, options) in Self.optionSets.enumerated() {
      let (ours, _) = try assertConvertsLikeQemu(source, options: options, name: "mixed\(index)")
      // Data, plus one 4 KiB host block per allocated bitmap and per footer, header, BAT.
      try judge.assertHoles([ours], data: Self.mixedData, metadata: 48 << 10)
    }
  }

  /// Sizes that are not a whole geometry, nor whole MiB, nor small: qemu-img's virtual size
  /// in every case, with force_size on and off, dynamic and fixed. A fixed force_size disk
  /// that is not whole MiB is refused instead (testAzureRefusesSizesThatAreNotWholeMiB).
  func testAwkwardSizesMatchQemu() throws {
    let sizes: [(String, Int64)] = [
      ("1M+512", (1 << 20) + 512), ("100M", 100 << 20), ("1G", 1 << 30), ("3G+7s", (3 << 30) + 7 * 512),
    ]
    for (label, size) in sizes {
      let source = try makeRaw(
        "\(label).raw", size: size, writes: ["write -P 0x5a 0 64k", "write -P 0xa5 \(size - 512) 512"])
      for options in Self.optionSets {
        if options.hasSuffix("fixed,force_size=on") && size % (1 << 20) != 0 { continue }
        try assertConvertsLikeQemu(source, options: options, name: "\(label)-\(options)")
      }
    }
  }

  /// Small pieces of data spread over a block: each takes one 4 KiB block of the host file
  /// (block data starts 4 KiB-aligned), where qemu-img's takes two (its data starts 512
  /// bytes past a 4 KiB boundary).
  func testScatteredDataTakesOneHostBlockPerPiece() throws {
    let writes = (0..<64).map { "write -P 0x\(String($0 + 1, radix: 16)) \($0 * 96 << 10) 4k" }
    let source = try makeRaw("scattered.raw", size: 8 << 20, writes: writes)
    let (ours, theirs) = try assertConvertsLikeQemu(source, options: "subformat=dynamic", name: "scattered")
    try judge.assertHoles([ours], data: 64 * 4096, metadata: 32 << 10)
    XCTAssertLessThan(try WriterJudge.sizes([ours]).allocated, try WriterJudge.sizes([theirs]).allocated)
  }

  // MARK: - Azure

  /// `subformat=fixed,force_size=on` (what Azure's documentation tells qemu-img users to
  /// run) makes the fixed VHD Azure checks for: footer as below, file = size + 512.
  func testFixedForceSizeIsWhatAzureAccepts() throws {
    let source = try mixedSource()
    let output = path("azure.vhd")
    // Spelled as Azure's documentation spells it: force_size without a value.
    let outcome = try lacuna(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size", source, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let file = try bytes(output)
    XCTAssertEqual(Int64(file.count), Self.mixedSize + 512, "file length = size + 512")
    let footer = Array(file.suffix(512))
    let fields = BigEndianReader(footer)
    XCTAssertEqual(Array(footer[0..<8]), Array("conectix".utf8))
    XCTAssertEqual(fields.uint32(at: 8), 2, "features")
    XCTAssertEqual(fields.uint32(at: 12), 0x0001_0000, "file format version")
    XCTAssertEqual(fields.uint64(at: 16), UInt64.max, "data offset")
    XCTAssertEqual(String(decoding: footer[28..<32], as: UTF8.self), "qem2")
    XCTAssertEqual(fields.uint64(at: 40), UInt64(Self.mixedSize), "original size")
    XCTAssertEqual(fields.uint64(at: 48), UInt64(Self.mixedSize), "current size")
    XCTAssertEqual(fields.uint16(at: 56), 65535)
    XCTAssertEqual(fields.uint8(at: 58), 16)
    XCTAssertEqual(fields.uint8(at: 59), 255)
    XCTAssertEqual(fields.uint32(at: 60), 2, "disk type fixed")
    XCTAssertEqual(fields.uint32(at: 64), VHDFooter.checksum(footer, checksumOffset: 64), "checksum")
    XCTAssertEqual(Self.mixedSize % (1 << 20), 0)
    XCTAssertEqual(try virtualSize(output), Self.mixedSize)
    try judge.assertIdentical(output, format: "vpc", to: source, sourceFormat: "raw")
    try assertVhdiOpens(output, size: Self.mixedSize)
  }

  func testAzureRefusesSizesThatAreNotWholeMiB() throws {
    for (size, below, above) in [
      ((1 << 20) + 512, "1048576 bytes (1 MiB)", "2097152 bytes (2 MiB)"),
      ((3 << 30) + 7 * 512, "3221225472 bytes (3 GiB)", "3222274048 bytes (3073 MiB)"),
    ] as [(Int64, String, String)] {
      let source = try makeRaw("odd-\(size).raw", size: size, writes: ["write -P 0x77 0 4k"])
      let before = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
      for arguments in [
        ["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", source, path("azure.vhd")],
        ["create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", path("azure.vhd"), String(size)],
      ] {
        let outcome = try lacuna(arguments, in: dir)
        XCTAssertEqual(outcome.status, 2, "\(arguments): \(outcome.stderr)")
        let message = outcome.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertFalse(message.contains("\n"), "one line: \(message)")
        XCTAssertTrue(message.contains(below) && message.contains(above), message)
        XCTAssertTrue(message.contains("Azure") && message.contains("whole number of MiB"), message)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), before, "left behind")
      }
      // Without force_size, the size is rounded to a CHS geometry, as qemu-img does.
      try assertConvertsLikeQemu(source, options: "subformat=fixed", name: "odd-chs-\(size)")
    }
  }

  // MARK: - Sizes and geometry

  func testGeometryAndSizesAsQemuMakesThem() throws {
    func disk(_ size: Int64, force: Bool = false, fixed: Bool = false) throws -> VHDWriter.Disk {
      var settings = VHDWriter.Settings()
      settings.forceSize = force
      settings.subformat = fixed ? .fixed : .dynamic
      return try VHDWriter.Disk(requestedSize: size, settings: settings, path: "x.vhd")
    }
    XCTAssertEqual(try disk(1 << 30).geometry, VHDGeometry(cylinders: 2081, heads: 16, sectorsPerTrack: 63))
    XCTAssertEqual(try disk(1 << 30).size, 1_073_995_776)
    XCTAssertEqual(try disk(20 << 20).size, 20_994_048)
    XCTAssertEqual(try disk(1_048_577).size, 1_079_296)  // rounded up to a sector, then to CHS
    XCTAssertEqual(try disk(1_048_577, force: true).size, 1_049_088)
    XCTAssertEqual(try disk(1_048_577, force: true).creator, "qem2")
    XCTAssertEqual(try disk(1 << 30).creator, "qemu")
    XCTAssertEqual(try disk(0).size, 0)
    // Past the largest geometry (about 127 GiB) the current size holds the disk.
    XCTAssertEqual(try disk(136_899_993_601).size, 136_899_994_112)
    XCTAssertEqual(try disk(136_899_993_601).geometry, .maximum)
    XCTAssertEqual(try disk(2040 << 30).size, 2040 << 30)
    XCTAssertThrowsError(try disk((2040 << 30) + 512))
    XCTAssertThrowsError(try disk((2040 << 30) + 512, force: true, fixed: true))
    XCTAssertThrowsError(try disk(-1))
    XCTAssertEqual(try disk(2040 << 30, force: true, fixed: true).size, 2040 << 30)
    // The covering geometry never falls short, and is the first that covers.
    for sectors: Int64 in [1, 17, 4095, 69_632, 1_048_576, 4_194_303, 66_059_279, 66_059_280, 200_000_000] {
      let geometry = VHDGeometry.covering(sectors)
      XCTAssertGreaterThanOrEqual(geometry.sectors, sectors)
    }
  }

  /// `lacuna create -f vpc` makes the image qemu-img creates: same virtual size, same
  /// length, same dynamic header; qemu-io writes and reads it; vhdiinfo opens it.
  func testCreateMatchesQemu() throws {
    for size in ["1049088", "100M", "1G", "0"] {
      for options in Self.optionSets {
        if options.hasSuffix("fixed,force_size=on") && size == "1049088" { continue }
        let name = "create-\(size)-\(options.replacingOccurrences(of: ",", with: "_"))"
        let ours = path("\(name).lacuna.vhd")
        let theirs = path("\(name).qemu.vhd")
        let outcome = try lacuna(["create", "-f", "vpc", "-o", options, ours, size], in: dir)
        XCTAssertEqual(outcome.status, 0, outcome.stderr)
        try qemuImgOK("create", "-q", "-f", "vpc", "-o", options, theirs, size)
        XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, try WriterJudge.sizes([theirs]).apparent, name)
        if size == "0" && options.contains("fixed") { continue }  // qemu cannot open a 0-byte fixed VHD
        XCTAssertEqual(try virtualSize(ours), try virtualSize(theirs), name)
        if options.contains("dynamic") {
          XCTAssertEqual(Array(try bytes(ours)[512..<1536]), Array(try bytes(theirs)[512..<1536]), "\(name): header")
        }
        if size != "0" {
          // libvhdi refuses a BAT of no entries (qemu-img's empty disk too).
          try assertVhdiOpens(ours, size: try virtualSize(ours))
          let io = try runProgram(
            which("qemu-io")!,
            ["-f", "vpc", "-c", "write -P 0x5a 512k 4k", "-c", "read -P 0x5a 512k 4k", "-c", "read -P 0 0 512k", ours])
          XCTAssertEqual(io.status, 0, io.stderr)
          XCTAssertFalse(io.stdout.contains("error") || io.stdout.contains("fail"), io.stdout)
        }
      }
    }
  }

  // MARK: - Layout

  /// The dynamic layout, field by field: footer copy at 0 equal to the footer at the end,
  /// the header, the BAT (unallocated where no data came, the run of written zeros too),
  /// all-ones bitmaps, block data on 4 KiB boundaries, the footer right after the last block.
  func testDynamicLayout() throws {
    let source = try mixedSource()
    let output = path("layout.vhd")
    let outcome = try lacuna(["convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", source, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let file = try bytes(output)
    XCTAssertEqual(Array(file[0..<512]), Array(file.suffix(512)), "footer copy at 0")
    let footer = BigEndianReader(Array(file[0..<512]))
    XCTAssertEqual(footer.uint64(at: 16), 512, "data offset")
    XCTAssertEqual(footer.uint32(at: 60), 3, "disk type dynamic")
    let headerBytes = Array(file[512..<1536])
    let header = BigEndianReader(headerBytes)
    XCTAssertEqual(Array(headerBytes[0..<8]), Array("cxsparse".utf8))
    XCTAssertEqual(header.uint64(at: 8), UInt64.max)
    XCTAssertEqual(header.uint64(at: 16), 1536, "table offset")
    XCTAssertEqual(header.uint32(at: 24), 0x0001_0000)
    XCTAssertEqual(header.uint32(at: 28), 12, "max table entries")
    XCTAssertEqual(header.uint32(at: 32), 2 << 20, "block size")
    XCTAssertEqual(header.uint32(at: 36), VHDFooter.checksum(headerBytes, checksumOffset: 36))
    let bat = BigEndianReader(Array(file[1536..<2048]))
    var allocated: [Int] = []
    var lastEnd = 0
    for block in 0..<12 {
      let entry = bat.uint32(at: block * 4)!
      if entry == 0xFFFF_FFFF { continue }
      allocated.append(block)
      let start = Int(entry) * 512
      XCTAssertGreaterThanOrEqual(start, max(2048, lastEnd), "block \(block) overlaps what comes before it")
      XCTAssertEqual((start + 512) % 4096, 0, "block \(block) data alignment")
      XCTAssertTrue(file[start..<start + 512].allSatisfy { $0 == 0xFF }, "block \(block) bitmap")
      lastEnd = start + 512 + (2 << 20)
    }
    XCTAssertEqual(allocated, [0, 1, 7, 8, 11], "blocks with data, in disk order")
    XCTAssertTrue(file[2048 - 512 + 12 * 4..<2048].allSatisfy { $0 == 0xFF }, "BAT padding")
    XCTAssertEqual(file.count, lastEnd + 512, "footer right after the last block")
  }

  // MARK: - Thread counts, stream, round trip

  func testSameBytesForOneAndEightThreads() throws {
    let source = try mixedSource()
    for (index, options) in Self.optionSets.enumerated() {
      try judge.assertSameBytesForThreadCounts(
        source, to: "vpc", options: options, name: "threads\(index)", extraFlags: ["-f", "raw"],
        mask: Self.maskFooters)
    }
  }

  /// `lacuna convert -O stream src.qcow2 - | lacuna convert -f stream -O vpc - out.vhd`
  /// writes the disk a direct conversion writes.
  func testStreamReceiverWritesVHD() throws {
    let raw = try mixedSource()
    try qemuImgOK("convert", "-f", "raw", "-O", "qcow2", raw, path("src.qcow2"))
    let binary = try lacunaBinary()
    for (index, options) in Self.optionSets.enumerated() {
      let received = path("received\(index).vhd")
      let direct = path("direct\(index).vhd")
      let pipeline = "'\(binary)' convert -O stream src.qcow2 - | '\(binary)' convert -f stream -O vpc -o \(options) - '\(received)'"
      let outcome = try runProgram("/bin/sh", ["-c", pipeline], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertEqual(try lacuna(["convert", "-O", "vpc", "-o", options, path("src.qcow2"), direct], in: dir).status, 0)
      try judge.assertIdentical(received, format: "vpc", to: raw, sourceFormat: "raw")
      var a = try bytes(received)
      var b = try bytes(direct)
      Self.maskFooters(&a)
      Self.maskFooters(&b)
      XCTAssertTrue(a == b, "\(options): the received image differs from the direct conversion")
      try assertVhdiOpens(received, size: try virtualSize(received))
    }
  }

  /// raw -> vpc -> raw with lacuna gives the disk qemu-img's own round trip gives: the
  /// source itself with force_size, the source and zeros up to the CHS size without.
  func testRoundTripToRaw() throws {
    let source = try makeRaw(
      "odd.raw", size: (5 << 20) + 3 * 512, writes: ["write -P 0x31 0 4k", "write -P 0x32 \((5 << 20) + 1024) 512"])
    let original = try bytes(source)
    for (index, options) in Self.optionSets.dropLast().enumerated() {
      let (ours, theirs) = try assertConvertsLikeQemu(source, options: options, name: "round\(index)")
      let back = path("back\(index).raw")
      let qemuBack = path("qemu-back\(index).raw")
      XCTAssertEqual(try lacuna(["convert", "-O", "raw", ours, back], in: dir).status, 0)
      try qemuImgOK("convert", "-f", "vpc", "-O", "raw", theirs, qemuBack)
      let disk = try bytes(back)
      XCTAssertTrue(disk == (try bytes(qemuBack)), "\(options): round trip differs from qemu-img's")
      XCTAssertTrue(Array(disk.prefix(original.count)) == original, "\(options): the source is not kept")
      XCTAssertTrue(disk.dropFirst(original.count).allSatisfy { $0 == 0 }, "\(options): CHS padding is not zero")
      if options.contains("force_size=on") { XCTAssertEqual(disk.count, original.count) }
    }
    // And vpc -> vpc: our own output read back and written again.
    let again = path("again.vhd")
    XCTAssertEqual(try lacuna(["convert", "-O", "vpc", path("round0.lacuna.vhd"), again], in: dir).status, 0)
    try judge.assertIdentical(again, format: "vpc", to: source, sourceFormat: "raw")
  }

  // MARK: - Refusals

  func testRefusalsLeaveNothing() throws {
    let source = try mixedSource()
    let output = path("refused.vhd")
    for (arguments, expected) in [
      (["convert", "-c", "-O", "vpc", source, output], "cannot be compressed"),
      (["convert", "-B", source, "-F", "raw", "-O", "vpc", source, output], "cannot record a backing file"),
      (["convert", "-O", "vpc", "-o", "cluster_size=64k", source, output], "has no option 'cluster_size'"),
      (["convert", "-O", "vpc", "-o", "subformat=streamOptimized", source, output], "is not one of dynamic, fixed"),
      (["convert", "-O", "vpc", "-o", "force_size=maybe", source, output], "is not one of on, off"),
      (["create", "-f", "vpc", output, "2041G"], "at most 2040 GiB"),
      (["create", "-f", "vpc", "-b", source, "-F", "raw", output], "cannot record a backing file"),
    ] {
      let outcome = try lacuna(arguments, in: dir)
      XCTAssertEqual(outcome.status, 2, "\(arguments): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains(expected), "\(arguments): \(outcome.stderr)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(arguments) left \(output)")
    }
    // qemu-img's other spellings of a boolean are taken.
    for spelling in ["yes", "true", "off", "no", "false"] {
      let outcome = try lacuna(["create", "-f", "vpc", "-o", "force_size=\(spelling)", path("b-\(spelling).vhd"), "1M"])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
    }
  }
}

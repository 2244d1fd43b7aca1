import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// `-O vhdx` and `create -f vhdx`, judged by qemu-img (check, compare, virtual size, file
/// size against its own output), by libvhdi's `vhdiinfo`, and by the host allocation.
final class VHDXWriterTests: QemuTestCase {
  var judge: WriterJudge!
  static let mebibyte: Int64 = 1 << 20

  override func setUpWithError() throws {
    try super.setUpWithError()
    judge = WriterJudge(qemu: qemu, dir: dir)
  }

  /// A 64 MiB sparse raw disk: 64 KiB of data in block 0, 9 MiB across blocks 2 and 3,
  /// 1 MiB at the end, 512 bytes in block 5; 10 MiB + 64.5 KiB of data.
  func mixedSource(_ name: String = "src.raw") throws -> (path: String, data: Int64) {
    let source = path(name)
    try qemuImgOK("create", "-q", "-f", "raw", source, "64M")
    try qemuIO(
      source, "write -P 0xab 1M 64k", "write -P 0xcd 20M 9M", "write -P 0x11 63M 1M", "write -P 0x5a 45M 512")
    return (source, (64 << 10) + (9 << 20) + (1 << 20) + 512)
  }

  /// `vhdiinfo` (libvhdi) opens `image`, and what it printed; skips where it is missing.
  @discardableResult
  func vhdiinfo(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
    guard let program = which("vhdiinfo") else { return "" }
    let outcome = try runProgram(program, [image], in: dir)
    XCTAssertEqual(outcome.status, 0, "vhdiinfo \(image): \(outcome.stdout)\(outcome.stderr)", file: file, line: line)
    return outcome.stdout
  }

  /// Every check of an output against qemu-img's conversion with the same options.
  func judgeBoth(
    _ source: String, options: String?, name: String, data: Int64, file: StaticString = #filePath, line: UInt = #line
  ) throws -> (ours: String, theirs: String) {
    let (ours, theirs) = try judge.convertBoth(source, to: "vhdx", options: options, name: name, file: file, line: line)
    try judge.assertCheckClean(ours, format: "vhdx", file: file, line: line)
    try judge.assertIdentical(ours, format: "vhdx", to: source, file: file, line: line)
    try judge.assertSameVirtualSize(ours, theirs, format: "vhdx", file: file, line: line)
    try judge.assertNoLarger([ours], than: [theirs], file: file, line: line)
    // Data, plus the headers, region tables, metadata and a BAT page or two.
    try judge.assertHoles([ours], data: data, metadata: 256 << 10, file: file, line: line)
    try vhdiinfo(ours, file: file, line: line)
    return (ours, theirs)
  }

  // MARK: - Reading back what was written

  struct Layout {
    var logLength: Int64
    var logOffset: Int64
    var batOffset: Int64
    var metadataOffset: Int64
    var bat: [UInt64]
  }

  /// The log, region and BAT placement of `image`, and its first `entries` BAT entries.
  func layout(_ image: String, entries: Int = 64) throws -> Layout {
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
    let reader = LittleEndianReader(bytes)
    let table = 192 << 10
    var batOffset: Int64 = 0
    var metadataOffset: Int64 = 0
    for index in 0..<Int(reader.uint32(at: table + 8)!) {
      let base = table + 16 + index * 32
      let offset = Int64(reader.uint64(at: base + 16)!)
      if reader.guid(at: base) == .bat { batOffset = offset } else { metadataOffset = offset }
    }
    let bat = (0..<entries).map { reader.uint64(at: Int(batOffset) + $0 * 8)! }
    return Layout(
      logLength: Int64(reader.uint32(at: (64 << 10) + 68)!), logOffset: Int64(reader.uint64(at: (64 << 10) + 72)!),
      batOffset: batOffset, metadataOffset: metadataOffset, bat: bat)
  }

  /// Blanks what is random by design: both headers' checksums and File/DataWrite GUIDs,
  /// and the page 83 data (virtual disk id), found through the region table.
  static func maskRandomFields(_ bytes: inout [UInt8]) {
    for header in [64 << 10, 128 << 10] {
      for index in (header + 4)..<(header + 8) { bytes[index] = 0 }
      for index in (header + 16)..<(header + 48) { bytes[index] = 0 }
    }
    let reader = LittleEndianReader(bytes)
    let table = 192 << 10
    for index in 0..<Int(reader.uint32(at: table + 8) ?? 0) {
      let base = table + 16 + index * 32
      guard reader.guid(at: base) == .metadata, let region = reader.uint64(at: base + 16).map(Int.init) else { continue }
      for item in 0..<Int(reader.uint16(at: region + 10)!) {
        let entry = region + 32 + item * 32
        guard reader.guid(at: entry) == .page83Data else { continue }
        let offset = region + Int(reader.uint32(at: entry + 16)!)
        for index in offset..<offset + 16 { bytes[index] = 0 }
      }
    }
  }

  // MARK: - Dynamic and fixed

  func testDynamicDefaultMatchesQemuAndIsSparse() throws {
    let (source, data) = try mixedSource()
    let (ours, _) = try judgeBoth(source, options: nil, name: "dynamic", data: data)
    let info = try judge.info(ours, format: "vhdx")
    XCTAssertEqual(info["cluster-size"] as? Int, 8 << 20)
    let layout = try layout(ours)
    XCTAssertEqual(layout.logOffset, Self.mebibyte)
    XCTAssertEqual(layout.logLength, Self.mebibyte)
    XCTAssertEqual(layout.batOffset, 2 * Self.mebibyte)
    XCTAssertEqual(layout.metadataOffset, 3 * Self.mebibyte)
    // Blocks 0, 2, 3, 5, 7 hold data, in that order from BAT end + 5 MiB; the others are
    // ZERO with offset 0 (block_state_zero=on).
    let states = layout.bat.prefix(8).map { $0 & 7 }
    XCTAssertEqual(states, [6, 2, 6, 6, 2, 6, 2, 6])
    XCTAssertEqual(layout.bat.prefix(8).map { $0 & ~0xF_FFFF }, [8, 0, 16, 24, 0, 32, 0, 40].map { UInt64($0) << 20 })
    XCTAssertTrue(layout.bat.dropFirst(8).allSatisfy { $0 == 0 }, "sector bitmap entries and past the end")
    // Block 0 holds 64 KiB of data: the rest of its 8 MiB are holes.
    XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, 48 << 20)
  }

  func testOptionVariantsMatchQemu() throws {
    let (source, data) = try mixedSource()
    let variants: [(String, Int64, [UInt64])] = [
      // options, block size, the BAT states of the first blocks
      ("block_state_zero=off", 8 << 20, [6, 0, 6, 6, 0, 6, 0, 6]),
      ("subformat=fixed", 8 << 20, [6, 6, 6, 6, 6, 6, 6, 6]),
      ("subformat=fixed,block_state_zero=off", 8 << 20, [6, 6, 6, 6, 6, 6, 6, 6]),
      ("block_size=1M,log_size=3M", 1 << 20, [2, 6, 2, 2, 2, 2, 2, 2]),
      ("block_size=32M,log_size=1500K", 32 << 20, [6, 6]),
      ("block_size=256M", 256 << 20, [6]),
    ]
    for (options, blockSize, states) in variants {
      let name = options.replacingOccurrences(of: "=", with: "-").replacingOccurrences(of: ",", with: "_")
      let (ours, _) = try judgeBoth(source, options: options, name: name, data: data)
      XCTAssertEqual(try judge.info(ours, format: "vhdx")["cluster-size"] as? Int, Int(blockSize), options)
      let layout = try layout(ours)
      XCTAssertEqual(Array(layout.bat.prefix(states.count).map { $0 & 7 }), states, options)
      if options.contains("log_size=3M") { XCTAssertEqual(layout.logLength, 3 * Self.mebibyte) }
      if options.contains("log_size=1500K") { XCTAssertEqual(layout.logLength, 2 * Self.mebibyte) }
      XCTAssertEqual(layout.batOffset, Self.mebibyte + layout.logLength, options)
      if options.contains("fixed") {
        // Block b at payload start + b × block size, the file payload start + disk size.
        let start = UInt64(layout.batOffset + Self.mebibyte + 5 * Self.mebibyte)
        XCTAssertEqual(layout.bat.prefix(8).map { $0 & ~0xF_FFFF }, (0..<8).map { start + UInt64($0) * UInt64(blockSize) })
        XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, Int64(start) + (64 << 20))
      }
    }
  }

  func testAutomaticBlockSizeAndCreateFollowQemu() throws {
    for size in ["100M", "1G", "2G", "101G", "33T"] {
      let ours = path("create-\(size).lacuna.vhdx")
      let theirs = path("create-\(size).qemu.vhdx")
      let outcome = try lacuna(["create", "-f", "vhdx", ours, size], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try qemuImgOK("create", "-q", "-f", "vhdx", theirs, size)
      try judge.assertCheckClean(ours, format: "vhdx")
      try judge.assertSameVirtualSize(ours, theirs, format: "vhdx")
      XCTAssertEqual(
        try judge.info(ours, format: "vhdx")["cluster-size"] as? Int,
        try judge.info(theirs, format: "vhdx")["cluster-size"] as? Int, size)
      XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, try WriterJudge.sizes([theirs]).apparent, size)
      try judge.assertNoLarger([ours], than: [theirs])
      try vhdiinfo(ours)
    }
    // An empty fixed image reads as zeros and takes almost no room.
    let fixed = path("fixed.vhdx")
    XCTAssertEqual(try lacuna(["create", "-f", "vhdx", "-o", "subformat=fixed", fixed, "20M"], in: dir).status, 0)
    let zeros = path("zeros.raw")
    try qemuImgOK("create", "-q", "-f", "raw", zeros, "20M")
    try judge.assertIdentical(fixed, format: "vhdx", to: zeros, sourceFormat: "raw")
    try judge.assertHoles([fixed], data: 0, metadata: 256 << 10)
  }

  func testOddSizeIsRoundedToASectorAsQemuDoes() throws {
    let source = path("odd.raw")
    try qemuImgOK("create", "-q", "-f", "raw", source, "5000001")
    try qemuIO(source, "write -P 0x42 4999680 321")
    let (ours, _) = try judge.convertBoth(source, sourceFormat: "raw", to: "vhdx", name: "odd")
    try judge.assertCheckClean(ours, format: "vhdx")
    try judge.assertIdentical(ours, format: "vhdx", to: source, sourceFormat: "raw")
    try judge.assertSameVirtualSize(ours, path("odd.qemu.vhdx"), format: "vhdx")
    let back = path("odd.back.raw")
    XCTAssertEqual(try lacuna(["convert", "-O", "raw", ours, back], in: dir).status, 0)
    let original = try Data(contentsOf: URL(fileURLWithPath: source))
    let read = try Data(contentsOf: URL(fileURLWithPath: back))
    XCTAssertEqual(read.count, 5_000_192)
    XCTAssertEqual(read.prefix(original.count), original)
    XCTAssertTrue(read.dropFirst(original.count).allSatisfy { $0 == 0 })
  }

  func testRefusedOptionsLeaveNothing() throws {
    let (source, _) = try mixedSource()
    let cases: [([String], String)] = [
      (["-o", "block_size=3M"], "power of two"),
      (["-o", "block_size=512M"], "power of two"),
      (["-o", "subformat=streamOptimized"], "subformat"),
      (["-o", "block_state_zero=maybe"], "block_state_zero"),
      (["-o", "log_size=0"], "log_size"),
      (["-o", "cluster_size=64k"], "no option 'cluster_size'"),
      (["-c"], "compressed"),
    ]
    for (flags, expected) in cases {
      let output = path("refused.vhdx")
      let outcome = try lacuna(["convert", "-O", "vhdx"] + flags + [source, output], in: dir)
      XCTAssertNotEqual(outcome.status, 0, "\(flags)")
      XCTAssertTrue(outcome.stderr.contains(expected), "\(flags): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains("refused.vhdx"), outcome.stderr)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr)
      XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(flags) left the output")
    }
  }

  // MARK: - The engine's other ways in

  func testStreamReceiverWritesVHDX() throws {
    let (raw, data) = try mixedSource()
    let source = path("src.qcow2")
    try qemuImgOK("convert", "-f", "raw", "-O", "qcow2", raw, source)
    let binary = try lacunaBinary()
    let outcome = try runProgram(
      "/bin/sh", ["-c", "\"$0\" convert -O stream src.qcow2 - | \"$0\" convert -f stream -O vhdx - piped.vhdx", binary],
      in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let output = path("piped.vhdx")
    try judge.assertCheckClean(output, format: "vhdx")
    try judge.assertIdentical(output, format: "vhdx", to: raw, sourceFormat: "raw")
    try judge.assertHoles([output], data: data, metadata: 256 << 10)
    try vhdiinfo(output)
  }

  func testThreadCountsWriteTheSameBytes() throws {
    let (source, _) = try mixedSource()
    for (name, options) in [("dynamic", nil), ("fixed", "subformat=fixed"), ("small", "block_size=1M,block_state_zero=off")] {
      try judge.assertSameBytesForThreadCounts(
        source, to: "vhdx", options: options, name: name, mask: Self.maskRandomFields)
    }
  }

  func testRoundTripToRawIsIdentical() throws {
    let (source, _) = try mixedSource()
    // Ours, and qemu's own VHDX written again by lacuna.
    let qemuMade = path("qemu.vhdx")
    try qemuImgOK("convert", "-f", "raw", "-O", "vhdx", source, qemuMade)
    for (input, name) in [(source, "a"), (qemuMade, "b")] {
      let vhdx = path("\(name).vhdx")
      let back = path("\(name).raw")
      XCTAssertEqual(try lacuna(["convert", "-O", "vhdx", input, vhdx], in: dir).status, 0)
      XCTAssertEqual(try lacuna(["convert", "-f", "vhdx", "-O", "raw", vhdx, back], in: dir).status, 0)
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: back)), try Data(contentsOf: URL(fileURLWithPath: source)))
    }
  }

  func testLargeSparseDiskInBoundedMemory() throws {
    // 2 TiB in 1 MiB blocks: 2^21 blocks, a 16 MiB BAT, written a page at a time.
    let source = path("large.raw")
    try qemuImgOK("create", "-q", "-f", "raw", source, "2T")
    try qemuIO(source, "write -P 0x33 1T 1M", "write -P 0x44 2047G 64k")
    let output = path("large.vhdx")
    let (outcome, peak) = try lacunaMeasuringMemory(
      ["convert", "-O", "vhdx", "-o", "block_size=1M,block_state_zero=off", source, output])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertLessThan(peak, 150 << 10, "peak resident set in KiB")
    try judge.assertCheckClean(output, format: "vhdx")
    try judge.assertHoles([output], data: (1 << 20) + (64 << 10), metadata: 256 << 10)
    let reader = try openVHDX(output)
    XCTAssertEqual(try readBytes(reader, at: 1 << 40, count: 4), [0x33, 0x33, 0x33, 0x33])
    XCTAssertEqual(try readBytes(reader, at: (2047 << 30) + 65535, count: 2), [0x44, 0])
    let tebibyte: Int64 = 1 << 40
    let last: Int64 = 2047 << 30
    let expected: [Range<Int64>] = [tebibyte..<tebibyte + Self.mebibyte, last..<last + Self.mebibyte]
    let found: [Range<Int64>] = try reader.allExtents(in: 0..<reader.virtualSize).filter { $0.kind == .data }.map(\.range)
    XCTAssertEqual(found, expected)
  }

  // MARK: - Differencing

  /// base.vhdx (qemu's, from the mixed source) and top.qcow2 over it: data over the
  /// parent's data, a zeroed range, a whole zeroed block, 512 bytes alone in a block.
  func chain() throws -> (base: String, top: String) {
    let (raw, _) = try mixedSource()
    let base = path("base.vhdx")
    try qemuImgOK("convert", "-f", "raw", "-O", "vhdx", raw, base)
    let top = path("top.qcow2")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.vhdx", "-F", "vhdx", top)
    try qemuIO(
      top, "write -P 0x77 1M 4k", "write -z 21M 1M", "write -P 0x55 40M 2M", "write -z 50M 4M",
      "write -P 0x66 62M 512", "write -P 0x99 30M 1536")
    return (base, top)
  }

  /// The flattened disk of `image` through its chain, as lacuna reads it, in a raw file.
  func flattened(_ image: String) throws -> String {
    let output = path(UUID().uuidString + ".raw")
    let outcome = try lacuna(["convert", "-O", "raw", image, output], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    return output
  }

  func testDifferencingOutputOnAVHDXParent() throws {
    let (base, top) = try chain()
    let child = path("child.vhdx")
    let outcome = try lacuna(["convert", "-O", "vhdx", "-B", "base.vhdx", "-F", "vhdx", top, child], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    // qemu-img cannot open differencing VHDX: lacuna reads the chain back, qemu compares.
    try judge.assertIdentical(try flattened(child), format: "raw", to: top, sourceFormat: "qcow2")

    let reader = try openVHDX(child)
    let parent = try openVHDX(base)
    XCTAssertEqual(reader.backing?.name, "./base.vhdx")
    XCTAssertEqual(reader.parentLinkages, [parent.dataWriteGuid.lowercased()])
    XCTAssertNoThrow(try reader.checkBacking(parent))
    XCTAssertEqual(reader.metadata.blockSize, 2 << 20, "Hyper-V's block size for differencing disks")
    XCTAssertEqual(reader.metadata.page83Data, parent.metadata.page83Data)
    // States: 1M (4 KiB over the parent) partial; 21M zeroed in part of its block; 40M-42M
    // a whole block of data; 50M-54M two whole zero blocks; the rest the parent's.
    let layout = try layout(child, entries: 2049)
    let states = (0..<32).map { layout.bat[$0] & 7 }
    XCTAssertEqual(states[0], 7)
    XCTAssertEqual(states[10], 7)
    XCTAssertEqual(states[20], 6)
    XCTAssertEqual(states[25], 2)
    XCTAssertEqual(states[26], 2)
    XCTAssertEqual(states[15], 7)
    XCTAssertEqual(states[31], 7)
    XCTAssertEqual(states[1], 0)
    XCTAssertTrue(layout.bat[32..<2048].allSatisfy { $0 == 0 }, "entries past the disk's 32 blocks")
    XCTAssertEqual(layout.bat[2048] & 7, 6, "chunk ratio 2048 with 2 MiB blocks: entry 2048, chunk 0's sector bitmap, is present")
    let mib = Self.mebibyte
    let firstBlock: [Extent] = try reader.allExtents(in: 0..<2 * mib).map { Extent($0.range, $0.kind) }.merged()
    let expectedBlock: [Extent] = [
      Extent(0..<mib, .unallocated), Extent(mib..<mib + 4096, .data), Extent(mib + 4096..<2 * mib, .unallocated),
    ]
    XCTAssertEqual(firstBlock, expectedBlock)
    // Data from this layer only (4 KiB, 2 MiB, 512 B, 1.5 KiB): blocks are holes elsewhere.
    try judge.assertHoles([child], data: (2 << 20) + 4096 + 512 + 1536 + (1 << 20), metadata: 256 << 10)

    let info = try vhdiinfo(child)
    if !info.isEmpty {
      XCTAssertTrue(info.contains("Differential"), info)
      let parentInfo = try vhdiinfo(base)
      let identifier = parentInfo.split(separator: "\n").first { $0.contains("Identifier") }?.split(separator: ":").last
      let linkage = info.split(separator: "\n").first { $0.contains("Parent identifier") }?.split(separator: ":").last
      XCTAssertNotNil(identifier)
      XCTAssertEqual(identifier, linkage, "vhdiinfo: the child's parent identifier is the parent's")
    }
  }

  func testDifferencingAgainstABaseOutsideTheChain() throws {
    // The source is the flattened disk; -B base.vhdx stores what differs from the parent.
    let (base, top) = try chain()
    let flat = path("flat.raw")
    try qemuImgOK("convert", "-f", "qcow2", "-O", "raw", top, flat)
    let child = path("compared.vhdx")
    let outcome = try lacuna(["convert", "-O", "vhdx", "-B", "base.vhdx", flat, child], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try judge.assertIdentical(try flattened(child), format: "raw", to: flat, sourceFormat: "raw")
    XCTAssertEqual(try openVHDX(child).backing?.name, "./base.vhdx")
    // An absolute -B is recorded relative to the child.
    let absolute = path("absolute.vhdx")
    XCTAssertEqual(try lacuna(["convert", "-O", "vhdx", "-B", base, flat, absolute], in: dir).status, 0)
    XCTAssertEqual(try openVHDX(absolute).backing?.name, "./base.vhdx")
    try judge.assertIdentical(try flattened(absolute), format: "raw", to: flat, sourceFormat: "raw")
    // Thread counts: the same bytes but for the random fields.
    try judge.assertSameBytesForThreadCounts(
      top, to: "vhdx", name: "diff", extraFlags: ["-B", "base.vhdx", "-F", "vhdx"], mask: Self.maskRandomFields)
  }

  func testCreateDifferencingAndRefusals() throws {
    let (base, _) = try chain()
    let child = path("empty-child.vhdx")
    let outcome = try lacuna(["create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx", child], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try judge.assertIdentical(try flattened(child), format: "raw", to: base, sourceFormat: "vhdx")
    try vhdiinfo(child)

    let raw = path("plain.raw")
    try qemuImgOK("create", "-q", "-f", "raw", raw, "64M")
    let refusals: [([String], String)] = [
      (["-b", "plain.raw", "-F", "raw"], "needs a VHDX parent"),
      (["-b", "base.vhdx", "-F", "vhdx", "-o", "subformat=fixed"], "subformat=fixed"),
    ]
    for (flags, expected) in refusals {
      let output = path("refused.vhdx")
      let refused = try lacuna(["create", "-f", "vhdx"] + flags + [output], in: dir)
      XCTAssertNotEqual(refused.status, 0)
      XCTAssertTrue(refused.stderr.contains(expected), refused.stderr)
      XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
      XCTAssertFalse(FileManager.default.fileExists(atPath: output))
    }
    let resized = try lacuna(["create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx", path("small.vhdx"), "32M"], in: dir)
    XCTAssertNotEqual(resized.status, 0)
    XCTAssertTrue(resized.stderr.contains("parent's virtual size"), resized.stderr)
  }

  func testDifferencingOnADifferencingParent() throws {
    // base.vhdx <- mid.vhdx (lacuna create -b) <- child.vhdx, from a flattened disk with
    // a sub-sector-run change and a zeroed 4 KiB; the child's parent is in a folder above.
    let (base, _) = try chain()
    try FileManager.default.createDirectory(atPath: path("sub"), withIntermediateDirectories: true)
    let mid = path("sub/mid.vhdx")
    XCTAssertEqual(try lacuna(["create", "-f", "vhdx", "-b", "../base.vhdx", mid], in: dir).status, 0)
    let changed = path("changed.raw")
    try qemuImgOK("convert", "-f", "vhdx", "-O", "raw", base, changed)
    try qemuIO(changed, "write -P 0x31 3M 1k", "write -z 20M 4k", "write -P 0x32 63M 512")
    let child = path("grandchild.vhdx")
    let outcome = try lacuna(["convert", "-O", "vhdx", "-B", "sub/mid.vhdx", changed, child], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try judge.assertIdentical(try flattened(child), format: "raw", to: changed, sourceFormat: "raw")
    let reader = try openVHDX(child)
    XCTAssertEqual(reader.backing?.name, "./sub/mid.vhdx")
    XCTAssertNoThrow(try reader.checkBacking(try openVHDX(mid)))
    XCTAssertEqual(try openVHDX(mid).backing?.name, "../base.vhdx")
    try judge.assertHoles([child], data: 1024 + 512 + (1 << 20), metadata: 256 << 10)
    try vhdiinfo(child)
  }
}

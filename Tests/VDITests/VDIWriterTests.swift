import DiskImage
import Foundation
import TestSupport
@testable import VDI
import XCTest

/// `lacuna convert -O vdi` and `lacuna create -f vdi`, judged by qemu-img 7.2: content
/// (compare), soundness (check), virtual size and file size against qemu-img's own output,
/// holes, the header and map fields, the same bytes for any thread count, and the way back.
final class VDIWriterTests: QemuTestCase {
  private var judge: WriterJudge { WriterJudge(qemu: qemu, dir: dir) }

  /// The image and modification UUIDs (0x188 ..< 0x1a8): random by design.
  private static let randomFields = 0x188..<0x1A8

  private static func maskUUIDs(_ bytes: inout [UInt8]) {
    guard bytes.count >= randomFields.upperBound else { return }
    for i in randomFields { bytes[i] = 0 }
  }

  /// A sparse raw file of `size` bytes with the qemu-io writes given (`-P 0xab 1M 64k`).
  private func rawSource(_ name: String, size: Int64, writes: [String]) throws -> String {
    let source = path(name)
    XCTAssertTrue(FileManager.default.createFile(atPath: source, contents: nil))
    XCTAssertEqual(truncate(source, off_t(size)), 0)
    for write in writes {
      let outcome = try runProgram(which("qemu-io")!, ["-f", "raw", "-c", "write \(write)", source], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
    }
    return source
  }

  private func header(_ image: String) throws -> VDIHeader {
    let file = try ImageFile.openForReading(image)
    return try VDIHeader.read(from: file, fileSize: try file.size())
  }

  private func mapEntries(_ image: String) throws -> [UInt32] {
    let head = try header(image)
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
    return (0..<Int(head.blockCount)).map { i in
      let at = Int(head.mapOffset) + i * 4
      return UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8 | UInt32(bytes[at + 2]) << 16 | UInt32(bytes[at + 3]) << 24
    }
  }

  private func headerBytes(_ image: String) throws -> [UInt8] {
    var bytes = [UInt8](try FileHandle(forReadingFrom: URL(fileURLWithPath: image)).readData(ofLength: 512))
    Self.maskUUIDs(&bytes)
    return bytes
  }

  /// Every check of the judge on one conversion; returns both outputs.
  @discardableResult
  private func convertAndJudge(
    _ source: String, options: String? = nil, name: String, data: Int64,
    file: StaticString = #filePath, line: UInt = #line
  ) throws -> (ours: String, theirs: String) {
    let (ours, theirs) = try judge.convertBoth(
      source, sourceFormat: "raw", to: "vdi", options: options, name: name, file: file, line: line)
    try judge.assertIdentical(ours, format: "vdi", to: source, sourceFormat: "raw", file: file, line: line)
    try judge.assertCheckClean(ours, format: "vdi", file: file, line: line)
    try judge.assertSameVirtualSize(ours, theirs, format: "vdi", file: file, line: line)
    try judge.assertNoLarger([ours], than: [theirs], file: file, line: line)
    // Data runs may straddle host file-system blocks: one 4 KiB block of slack per run.
    try judge.assertHoles([ours], data: data, metadata: 64 << 10, file: file, line: line)
    // The header is qemu-img's but for the random UUIDs: same type, offsets, sizes, count
    // of allocated blocks.
    XCTAssertEqual(try headerBytes(ours), try headerBytes(theirs), "header of \(name) against qemu-img's", file: file, line: line)
    XCTAssertEqual(
      try WriterJudge.sizes([ours]).apparent, try WriterJudge.sizes([theirs]).apparent,
      "length of \(name) against qemu-img's", file: file, line: line)
    return (ours, theirs)
  }

  // MARK: - Dynamic and static

  /// A mostly-empty 64 MiB disk: a few writes, some inside one block, two across a block
  /// boundary (blocks 2-3 and 40-41), one of zeros (data to the file system, zeros to the
  /// engine), one in the last block.
  private func sparseSource() throws -> String {
    try rawSource(
      "sparse.raw", size: 64 << 20,
      writes: ["-P 0xab 0 4k", "-P 0xcd 1M 64k", "-P 0x11 3145216 1k", "-P 0 10M 1M", "-P 0x22 40M 2M", "-P 0x33 67043328 4k"])
  }

  func testDynamicMostlyEmptyDisk() throws {
    let source = try sparseSource()
    let (ours, theirs) = try convertAndJudge(source, name: "dynamic", data: 4096 + 65536 + 1024 + (2 << 20) + 4096 + 6 * 4096)
    let head = try header(ours)
    XCTAssertEqual(head.imageType, .dynamic)
    XCTAssertEqual(head.blocksAllocated, 7)
    XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, head.dataOffset + 7 << 20)
    // Data blocks in disk order; blocks that read zero are ZERO, not FREE (see the README).
    var expected = [UInt32](repeating: BlockMap.zeroValue, count: 64)
    for (index, block) in [0, 1, 2, 3, 40, 41, 63].enumerated() { expected[block] = UInt32(index) }
    XCTAssertEqual(try mapEntries(ours), expected)
    // qemu-img wrote every allocated block whole; we wrote only the data.
    XCTAssertLessThan(try WriterJudge.sizes([ours]).allocated, try WriterJudge.sizes([theirs]).allocated / 2)
    // The way back: lacuna reads what it wrote, to the same raw bytes.
    let back = path("dynamic.back.raw")
    let outcome = try lacuna(["convert", "-f", "vdi", "-O", "raw", ours, back], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: back)), try Data(contentsOf: URL(fileURLWithPath: source)))
  }

  func testStaticMostlyEmptyDisk() throws {
    let source = try sparseSource()
    let (ours, _) = try convertAndJudge(
      source, options: "static=on", name: "static", data: 4096 + 65536 + 1024 + (2 << 20) + 4096 + 6 * 4096)
    let head = try header(ours)
    XCTAssertEqual(head.imageType, .fixed)
    XCTAssertEqual(head.blocksAllocated, 64)
    XCTAssertEqual(try mapEntries(ours), (0..<64).map { UInt32($0) })
    XCTAssertEqual(try WriterJudge.sizes([ours]).apparent, head.dataOffset + 64 << 20)
    let back = path("static.back.raw")
    let outcome = try lacuna(["convert", "-O", "raw", ours, back], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: back)), try Data(contentsOf: URL(fileURLWithPath: source)))
  }

  func testFullDisk() throws {
    let source = try rawSource("full.raw", size: 64 << 20, writes: ["-P 0x5a 0 64M"])
    for (options, name) in [(nil, "full-dynamic"), ("static=on", "full-static")] as [(String?, String)] {
      let (ours, _) = try convertAndJudge(source, options: options, name: name, data: 64 << 20)
      XCTAssertEqual(try header(ours).blocksAllocated, 64, name)
      XCTAssertEqual(try mapEntries(ours), (0..<64).map { UInt32($0) }, name)
    }
  }

  /// Sizes that are not a multiple of 1 MiB (nor of 512): qemu records the size rounded
  /// up to 512 bytes, and the last block is whole in the file.
  func testAwkwardSizes() throws {
    for size: Int64 in [(1 << 20) + 512, (3 << 20) + 4096, (1 << 20) + 1, 1000, (5 << 20) - 512] {
      let lastSector = (size - 1) / 512 * 512
      let source = try rawSource(
        "odd-\(size).raw", size: size, writes: ["-P 0x77 0 512", "-P 0x99 \(lastSector) \(size - lastSector)"])
      for (options, label) in [(nil, "dynamic"), ("static=on", "static")] as [(String?, String)] {
        let (ours, _) = try convertAndJudge(source, options: options, name: "odd-\(size)-\(label)", data: 8192)
        XCTAssertEqual(try header(ours).diskSize, (size + 511) / 512 * 512, "\(size) \(label)")
      }
    }
  }

  func testEmptySource() throws {
    let source = try rawSource("empty.raw", size: 8 << 20, writes: [])
    let (ours, _) = try convertAndJudge(source, name: "empty", data: 0)
    XCTAssertEqual(try mapEntries(ours), [UInt32](repeating: BlockMap.zeroValue, count: 8))
  }

  // MARK: - create

  /// `lacuna create -f vdi` makes qemu-img's image byte for byte but for the UUIDs: every
  /// block FREE (or its own, static), nothing else in the file.
  func testCreateMatchesQemu() throws {
    for (options, size) in [([String](), "64M"), (["-o", "static=on"], "64M"), ([], "1000"), (["-o", "static=on"], "3145729")] {
      let name = "create-\(options.count)-\(size)"
      let ours = path(name + ".lacuna.vdi")
      let theirs = path(name + ".qemu.vdi")
      let outcome = try lacuna(["create", "-f", "vdi"] + options + [ours, size], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      let qemuOutcome = try runProgram(qemu, ["create", "-q", "-f", "vdi"] + options + [theirs, size], in: dir)
      XCTAssertEqual(qemuOutcome.status, 0, qemuOutcome.stderr)
      try judge.assertCheckClean(ours, format: "vdi")
      try judge.assertSameVirtualSize(ours, theirs, format: "vdi")
      var mine = [UInt8](try Data(contentsOf: URL(fileURLWithPath: ours)))
      var qemus = [UInt8](try Data(contentsOf: URL(fileURLWithPath: theirs)))
      Self.maskUUIDs(&mine)
      Self.maskUUIDs(&qemus)
      XCTAssertEqual(mine.count, qemus.count, name)
      XCTAssertTrue(mine == qemus, "\(name): not qemu-img's image (UUIDs aside)")
      XCTAssertLessThanOrEqual(try WriterJudge.sizes([ours]).allocated, 64 << 10, name)
      let head = try header(ours)
      XCTAssertFalse(head.imageUUID.isNull)
      XCTAssertFalse(head.modificationUUID.isNull)
      XCTAssertNotEqual(head.imageUUID, head.modificationUUID)
      XCTAssertEqual(head.imageUUID.bytes[7] >> 4, 4, "a version 4 UUID (GUID byte order)")
    }
  }

  // MARK: - Engine paths

  func testStreamReceiver() throws {
    let raw = try sparseSource()
    let qcow2 = path("stream-src.qcow2")
    try qemuImgOK("convert", "-f", "raw", "-O", "qcow2", raw, qcow2)
    let out = path("from-stream.vdi")
    let binary = try lacunaBinary()
    let outcome = try runProgram(
      "/bin/sh", ["-c", "'\(binary)' convert -O stream '\(qcow2)' - | '\(binary)' convert -f stream -O vdi - '\(out)'"], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try judge.assertIdentical(out, format: "vdi", to: raw, sourceFormat: "raw")
    try judge.assertCheckClean(out, format: "vdi")
    let direct = path("direct.vdi")
    XCTAssertEqual(try lacuna(["convert", "-O", "vdi", qcow2, direct], in: dir).status, 0)
    XCTAssertEqual(try headerBytes(out), try headerBytes(direct))
    XCTAssertEqual(try mapEntries(out), try mapEntries(direct))
  }

  func testSameBytesForThreadCounts() throws {
    let source = try sparseSource()
    try judge.assertSameBytesForThreadCounts(source, to: "vdi", name: "threads", extraFlags: ["-f", "raw"], mask: Self.maskUUIDs)
    try judge.assertSameBytesForThreadCounts(
      source, to: "vdi", options: "static=on", name: "threads-static", extraFlags: ["-f", "raw"], mask: Self.maskUUIDs)
  }

  /// Memory holds one window of the map, not the map: an empty 8 TiB disk (a 32 MiB map)
  /// converts in about the memory of an empty 1 MiB one.
  func testMemoryIsOneMapWindow() throws {
    var peaks: [Int] = []
    for (name, size) in [("tiny", Int64(1) << 20), ("huge", Int64(8) << 40)] {
      let source = path("\(name).raw")
      XCTAssertTrue(FileManager.default.createFile(atPath: source, contents: nil))
      guard truncate(source, off_t(size)) == 0 else { throw XCTSkip("the file system takes no 8 TiB sparse file") }
      let out = path("\(name).vdi")
      let (outcome, peak) = try lacunaMeasuringMemory(["convert", "-f", "raw", "-O", "vdi", source, out])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      peaks.append(peak)
    }
    try judge.assertCheckClean(path("huge.vdi"), format: "vdi")
    XCTAssertEqual(try header(path("huge.vdi")).blockCount, 8 << 20)
    XCTAssertLessThan(peaks[1] - peaks[0], 12 << 10, "peak \(peaks[1]) KiB against \(peaks[0]) KiB for a 32 MiB map")
  }

  // MARK: - Refusals

  func testRefusals() throws {
    let source = try rawSource("small.raw", size: 2 << 20, writes: ["-P 0x1 0 4k"])
    let cases: [([String], String)] = [
      (["convert", "-c", "-O", "vdi", source], "compressed"),
      (["convert", "-B", source, "-O", "vdi", source], "backing file"),
      (["convert", "-O", "vdi", "-o", "static=maybe", source], "static 'maybe'"),
      (["convert", "-O", "vdi", "-o", "preallocation=full", source], "preallocation=full"),
      (["convert", "-O", "vdi", "-o", "cluster_size=2M", source], "no option 'cluster_size'"),
      (["create", "-f", "vdi"], "larger than a VDI image can hold"),
    ]
    for (index, (arguments, phrase)) in cases.enumerated() {
      let out = path("refused-\(index).vdi")
      let tail = arguments.first == "create" ? [out, String(VDIWriter.largestDiskSize + 1)] : [out]
      let outcome = try lacuna(arguments + tail, in: dir)
      XCTAssertNotEqual(outcome.status, 0, "\(arguments) was accepted")
      XCTAssertTrue(outcome.stderr.contains(phrase), "\(arguments): \(outcome.stderr)")
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, "one line: \(outcome.stderr)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: out), "\(arguments) left \(out)")
    }
    // The largest size qemu allows is taken (its map of FREE entries alone is 2 GiB, so
    // the writer is made and abandoned, not finished).
    let target = try OutputFile(creatingBeside: path("largest.vdi"))
    defer { target.abandon() }
    XCTAssertNoThrow(try VDIWriter(target: target, virtualSize: VDIWriter.largestDiskSize, options: WriterOptions()))
  }

  // MARK: - VirtualBox

  /// The fields VirtualBox's own image (the corpus snapshot) shares with every VDI are the
  /// ones we write: version, sector size, block size, block extra, and a map and data
  /// offset VirtualBox accepts (its own are 1 MiB aligned; qemu's, and ours, 512).
  func testHeaderFieldsAgreeWithVirtualBox() throws {
    let unpacked = try unpackCorpusFile("bwlehrpool/image-default_snapshot.vdi.xz", into: dir)
    let theirs = try header(unpacked)
    let ours = path("vbox-size.vdi")
    XCTAssertEqual(try lacuna(["create", "-f", "vdi", ours, String(theirs.diskSize)], in: dir).status, 0)
    let mine = try header(ours)
    XCTAssertEqual(mine.version, theirs.version)
    XCTAssertEqual(mine.sectorSize, theirs.sectorSize)
    XCTAssertEqual(mine.blockSize, theirs.blockSize)
    XCTAssertEqual(mine.blockExtra, theirs.blockExtra)
    XCTAssertEqual(mine.blockCount, theirs.blockCount)
    XCTAssertEqual(mine.diskSize, theirs.diskSize)
    XCTAssertEqual(mine.flags, theirs.flags)
    XCTAssertGreaterThanOrEqual(mine.mapOffset, Int64(VDIHeader.fieldsOffset) + Int64(mine.headerSize))
    XCTAssertGreaterThanOrEqual(mine.dataOffset, mine.mapEnd)
    XCTAssertEqual(mine.dataOffset % 512, 0)
  }
}

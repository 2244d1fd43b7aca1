import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VMDK

/// `lacuna convert -O vmdk` and `lacuna create -f vmdk`, every subformat, judged by
/// qemu-img (compare, check, virtual size, file sizes against its own output), vmdkinfo,
/// lacuna's own reader, and the host's allocation (holes where the disk reads zero).
final class VMDKWriterTests: QemuTestCase {
  static let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]

  var judge: WriterJudge { WriterJudge(qemu: qemu, dir: dir) }

  /// A raw disk of `size` bytes with these qemu-io writes.
  private func makeRaw(_ name: String, size: String, writes: [String]) throws -> String {
    try qemuImgOK("create", "-q", "-f", "raw", path(name), size)
    try qemuIOWrites(format: "raw", path(name), writes)
    return path(name)
  }

  private func qemuIOWrites(format: String, _ image: String, _ writes: [String]) throws {
    guard !writes.isEmpty else { return }
    var arguments = ["-f", format]
    for write in writes { arguments += ["-c", write] }
    let outcome = try runProgram(try requireProgram("qemu-io"), arguments + [image], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
  }

  /// 24 MiB + 1.5 KiB (not a grain multiple): whole grains, parts of grains, grains across
  /// a grain-table boundary (32 MiB is one table; here several grains in one table), a
  /// zero-filled stretch that must become holes, and data in the last, partial grain.
  private func mixedSource() throws -> String {
    let source = try makeRaw(
      "src.raw", size: String(24 << 20 + 1536),
      writes: [
        "write -P 0x11 0 100k", "write -P 0x12 1M 4k", "write -P 0x13 3000k 7k", "write -z 5M 1M",
        "write -P 0x14 8M 2M", "write -P 0x15 20M 512", "write -P 0x16 25164800 1536",
      ])
    // 256 KiB of random-looking bytes (a fixed-seed xorshift), which do not compress: a
    // stream stores them in stored blocks.
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    let noise = (0..<(256 << 10)).map { _ -> UInt8 in
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return UInt8(truncatingIfNeeded: state >> 24)
    }
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
    try handle.seek(toOffset: 16 << 20)
    try handle.write(contentsOf: noise)
    try handle.close()
    return source
  }

  /// The files of the output `name` (the descriptor and its extent files) in the test's directory.
  private func files(of name: String) throws -> [String] {
    let stem = (name as NSString).deletingPathExtension
    return try FileManager.default.contentsOfDirectory(atPath: dir.path)
      .filter { $0 == name || ($0.hasPrefix(stem + "-") && $0.hasSuffix(".vmdk")) }.sorted().map(path)
  }

  private func descriptorText(_ image: String) throws -> String {
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)).prefix(512 * 21))
    let text = bytes.starts(with: VMDK.magic) ? Array(bytes[512...]) : bytes
    return String(decoding: text.prefix { $0 != 0 }, as: UTF8.self)
  }

  /// The descriptor lines that say what the disk is, with the CID and the file names left out.
  private func shape(_ text: String) -> [String] {
    text.split(separator: "\n").map(String.init).filter {
      $0.hasPrefix("ddb.") || $0.hasPrefix("createType") || $0.hasPrefix("version") || $0.hasPrefix("RW ")
    }.map { line in
      guard line.hasPrefix("RW "), let quote = line.firstIndex(of: "\"") else { return line }
      return String(line[..<quote]) + String(line.drop { $0 != "\"" }.dropFirst().drop { $0 != "\"" }.dropFirst())
    }
  }

  /// Every judge of an output, against the source and qemu-img's output of the same options.
  private func assertJudged(
    _ source: String, options: String, name: String, dataBytes: Int64, flags: [String] = [],
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let (ours, theirs) = try judge.convertBoth(
      source, sourceFormat: "raw", to: "vmdk", options: options, name: name, lacunaFlags: flags, file: file, line: line)
    try judge.assertIdentical(ours, format: "vmdk", to: source, sourceFormat: "raw", file: file, line: line)
    try judge.assertCheckClean(ours, format: "vmdk", file: file, line: line)
    try judge.assertSameVirtualSize(ours, theirs, format: "vmdk", file: file, line: line)
    let oursFiles = try files(of: (ours as NSString).lastPathComponent)
    let theirFiles = try files(of: (theirs as NSString).lastPathComponent)
    XCTAssertEqual(oursFiles.count, theirFiles.count, "\(options): files \(oursFiles) against \(theirFiles)", file: file, line: line)
    try judge.assertNoLarger(oursFiles, than: theirFiles, file: file, line: line)
    // Grain tables and directories take at most a few hundred KiB; the rest is data.
    try judge.assertHoles(oursFiles, data: dataBytes, metadata: 512 << 10, file: file, line: line)
    XCTAssertEqual(shape(try descriptorText(ours)), shape(try descriptorText(theirs)), "descriptor", file: file, line: line)
    let info = try runProgram(try requireProgram("vmdkinfo", skipping: "vmdkinfo is not installed (libvmdk-utils)"), [ours])
    XCTAssertEqual(info.status, 0, "vmdkinfo \(ours): \(info.stdout)\(info.stderr)", file: file, line: line)
    // lacuna reads back what it wrote.
    let back = path(name + ".back.raw")
    let outcome = try lacuna(["convert", "-O", "raw", ours, back], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr, file: file, line: line)
    try assertSameFile(back, source, name, file: file, line: line)
  }

  /// The two raw files are the same length and hold the same bytes (`qemu-img compare`
  /// skips their holes; `cmp` or Foundation would read 2 GiB of them).
  private func assertSameFile(_ one: String, _ other: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
    XCTAssertEqual(try WriterJudge.sizes([one]).apparent, try WriterJudge.sizes([other]).apparent, what, file: file, line: line)
    try judge.assertIdentical(one, format: "raw", to: other, sourceFormat: "raw", file: file, line: line)
  }

  func testEverySubformatAgainstQemu() throws {
    let source = try mixedSource()
    for subformat in Self.subformats {
      try assertJudged(source, options: "subformat=\(subformat)", name: subformat, dataBytes: 2600 << 10)
    }
  }

  func testAdapterTypesVersionsAndZeroedGrain() throws {
    let source = try mixedSource()
    for options in [
      "adapter_type=lsilogic", "adapter_type=buslogic", "adapter_type=legacyESX,subformat=monolithicFlat",
      "hwversion=10,toolsversion=1234", "compat6=on", "zeroed_grain=on", "zeroed_grain=on,subformat=streamOptimized",
      "adapter_type=ide,subformat=twoGbMaxExtentSparse",
    ] {
      try assertJudged(source, options: options, name: options.replacingOccurrences(of: ",", with: "_"), dataBytes: 2600 << 10)
    }
    let text = try descriptorText(path("adapter_type=lsilogic.lacuna.vmdk"))
    XCTAssertTrue(text.contains("ddb.adapterType = \"lsilogic\"") && text.contains("ddb.geometry.heads = \"255\""), text)
    let header = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("zeroed_grain=on.lacuna.vmdk"))).prefix(12))
    XCTAssertEqual(header[4], 2, "zeroed_grain=on makes a version 2 header")
    XCTAssertEqual(header[8] & 0x4, 0x4, "zeroed_grain=on sets flag 0x4")
  }

  func testRefusedOptions() throws {
    let source = try mixedSource()
    for (options, flags, message) in [
      ("compat6=on,hwversion=7", [String](), "compat6"),
      ("adapter_type=scsi", [], "adapter_type"),
      ("subformat=vmfs", [], "subformat"),
      ("zeroed_grain=on,subformat=monolithicFlat", [], "zeroed_grain"),
      ("subformat=twoGbMaxExtentFlat", ["-c"], "-c"),
      ("toolsversion=a\"b", [], "toolsversion"),
      ("preallocation=full", [], "preallocation"),
    ] {
      let outcome = try lacuna(["convert", "-O", "vmdk", "-o", options] + flags + [source, path("refused.vmdk")], in: dir)
      XCTAssertEqual(outcome.status, 2, "\(options): a usage error")
      XCTAssertTrue(outcome.stderr.contains(message), "\(options): \(outcome.stderr)")
      XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["src.raw"], options)
    }
  }

  /// qemu-img 7.2 takes `-c` for every sparse subformat: monolithicSparse and
  /// twoGbMaxExtentSparse store plain grains all the same, streamOptimized compresses as
  /// it always does. The flat subformats fail in qemu ("invalid cluster size") and are
  /// refused here (testRefusedOptions).
  func testCompressFlagAsQemu() throws {
    let source = try mixedSource()
    for subformat in ["monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized"] {
      try assertJudged(
        source, options: "subformat=\(subformat)", name: "c-\(subformat)", dataBytes: 2600 << 10, flags: ["-c"])
    }
    let plain = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("c-monolithicSparse.lacuna.vmdk"))).prefix(80))
    XCTAssertEqual(plain[77], 0, "monolithicSparse with -c stores plain grains, as qemu-img does")
  }

  func testSameBytesForAnyThreadCount() throws {
    // Several megabytes of data, so eight threads really share the work.
    let source = try makeRaw(
      "threads.raw", size: "40M",
      writes: ["write -P 0x31 0 9M", "write -P 0x32 12M 3M", "write -P 0x33 33M 1000k", "write -P 0x34 39M 512"])
    // The CID is random by design (as qemu's), and the embedded descriptor names the
    // output's own file, which differs between the two runs (`NAME.m1.vmdk`, `NAME.m8.vmdk`).
    func maskCIDAndName(_ bytes: inout [UInt8]) {
      for (pattern, from, count) in [("\nCID=", 5, 8), (".m1.vmdk\"", 1, 2), (".m8.vmdk\"", 1, 2)] {
        let key = Array(pattern.utf8)
        for index in 0..<max(0, min(bytes.count - key.count, 64 << 10)) where bytes[index..<index + key.count].elementsEqual(key) {
          for masked in index + from..<index + from + count { bytes[masked] = 0x30 }
        }
      }
    }
    for subformat in ["monolithicSparse", "streamOptimized"] {
      try judge.assertSameBytesForThreadCounts(
        source, to: "vmdk", options: "subformat=\(subformat)", name: subformat, mask: maskCIDAndName)
    }
  }

  /// A disk just over 2 GiB (sparse, a little data on each side of the cut and at the end):
  /// the split subformats make two extents, named and sized as qemu-img makes them.
  func testTwoGbMaxExtentSplitsAtTwoGiB() throws {
    let source = try makeRaw(
      "big.raw", size: String((2 << 30) + (3 << 20)),
      writes: ["write -P 0x41 1M 64k", "write -P 0x42 2047M 2M", "write -P 0x43 2050M 1M"])
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
      try assertJudged(source, options: "subformat=\(subformat)", name: subformat, dataBytes: 4 << 20)
      let extents = try files(of: "\(subformat).lacuna.vmdk").filter { !$0.hasSuffix(".lacuna.vmdk") }
      let letter = subformat.hasSuffix("Flat") ? "f" : "s"
      XCTAssertEqual(
        extents.map { ($0 as NSString).lastPathComponent },
        ["\(subformat).lacuna-\(letter)001.vmdk", "\(subformat).lacuna-\(letter)002.vmdk"])
    }
  }

  /// A delta disk: `-B parent.vmdk` stores only what differs from the parent, records the
  /// parent's CID and the name as given, and hides the parent where the source reads zero
  /// (a zeroed-grain entry with zeroed_grain=on, else a grain left a hole in the file).
  func testDeltaOverAVMDKParent() throws {
    let base = try makeRaw(
      "base.raw", size: "16M", writes: ["write -P 0x51 0 4M", "write -P 0x52 8M 2M", "write -P 0x53 12M 64k"])
    let top = path("top.raw")
    try FileManager.default.copyItem(atPath: base, toPath: top)
    try qemuIOWrites(format: "raw", top, ["write -P 0x61 1M 128k", "write -z 8M 1M", "write -P 0x62 14M 4k"])
    XCTAssertEqual(try lacuna(["convert", "-O", "vmdk", base, path("parent.vmdk")], in: dir).status, 0)
    let parentCID = try XCTUnwrap(
      try descriptorText(path("parent.vmdk")).split(separator: "\n").first { $0.hasPrefix("CID=") }?.dropFirst(4))
    for options in [
      "subformat=monolithicSparse", "subformat=monolithicSparse,zeroed_grain=on", "subformat=twoGbMaxExtentSparse",
      "subformat=streamOptimized", "subformat=streamOptimized,zeroed_grain=on",
    ] {
      let name = "delta-\(options.replacingOccurrences(of: ",", with: "_")).vmdk"
      let outcome = try lacuna(["convert", "-O", "vmdk", "-o", options, "-B", "parent.vmdk", "-F", "vmdk", top, path(name)], in: dir)
      XCTAssertEqual(outcome.status, 0, "\(options): \(outcome.stderr)")
      try judge.assertIdentical(path(name), format: "vmdk", to: top, sourceFormat: "raw")
      try judge.assertCheckClean(path(name), format: "vmdk")
      let text = try descriptorText(path(name))
      XCTAssertTrue(text.contains("parentCID=\(parentCID)\n"), text)
      XCTAssertTrue(text.contains("parentFileNameHint=\"parent.vmdk\"\n"), text)
      // Only what differs (132 KiB of data and the 1 MiB zeroed) is stored.
      try judge.assertHoles(try files(of: name), data: 256 << 10, metadata: 512 << 10)
      let info = try judge.info(path(name), format: "vmdk")
      XCTAssertEqual(info["backing-filename"] as? String, "parent.vmdk")
      let back = path(name + ".raw")
      XCTAssertEqual(try lacuna(["convert", "-O", "raw", path(name), back], in: dir).status, 0)
      try assertSameFile(back, top, options)
    }

    // Refused: a flat subformat, a parent that is not a VMDK, a parent of another size.
    try qemuImgOK("create", "-q", "-f", "qcow2", path("other.qcow2"), "16M")
    try qemuImgOK("create", "-q", "-f", "vmdk", path("small.vmdk"), "8M")
    for (arguments, message) in [
      (["-o", "subformat=monolithicFlat", "-B", "parent.vmdk"], "backing file"),
      (["-B", "other.qcow2"], "must be a VMDK"),
      (["-B", "other.qcow2", "-F", "qcow2"], "must be a VMDK"),
      (["-B", "small.vmdk"], "parent's size"),
    ] {
      let outcome = try lacuna(["convert", "-O", "vmdk"] + arguments + [top, path("refused.vmdk")], in: dir)
      XCTAssertEqual(outcome.status, 2, "\(arguments): a usage error")
      XCTAssertTrue(outcome.stderr.contains(message), "\(arguments): \(outcome.stderr)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: path("refused.vmdk")))
    }
  }

  func testCreateEverySubformat() throws {
    for subformat in Self.subformats {
      for (size, name) in [("64M", "\(subformat).vmdk"), ("5G", "\(subformat)-5g.vmdk")] {
        let outcome = try lacuna(["create", "-f", "vmdk", "-o", "subformat=\(subformat)", path(name), size], in: dir)
        XCTAssertEqual(outcome.status, 0, outcome.stderr)
        try judge.assertCheckClean(path(name), format: "vmdk")
        let expected = parseByteSize(size)!
        XCTAssertEqual(try judge.info(path(name), format: "vmdk")["virtual-size"] as? Int, Int(expected), name)
        try judge.assertIdentical(path(name), format: "vmdk", to: try zeroRaw(size), sourceFormat: "raw")
        try judge.assertHoles(try files(of: name), data: 0, metadata: 1 << 20)
      }
    }
    XCTAssertEqual(try files(of: "twoGbMaxExtentFlat-5g.vmdk").count, 4)
    // qemu-img makes a 0-byte VMDK it cannot open; lacuna refuses to make one.
    let empty = try lacuna(["create", "-f", "vmdk", path("empty.vmdk"), "0"], in: dir)
    XCTAssertEqual(empty.status, 2, empty.stderr)
    XCTAssertTrue(empty.stderr.contains("at least one sector"), empty.stderr)
    // An overlay on a VMDK, its size taken from the parent.
    let outcome = try lacuna(["create", "-f", "vmdk", "-b", "monolithicSparse.vmdk", "-F", "vmdk", path("overlay.vmdk")], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try judge.assertCheckClean(path("overlay.vmdk"), format: "vmdk")
    XCTAssertEqual(try judge.info(path("overlay.vmdk"), format: "vmdk")["backing-filename"] as? String, "monolithicSparse.vmdk")
  }

  private func zeroRaw(_ size: String) throws -> String {
    let name = path("zero-\(size).raw")
    if !FileManager.default.fileExists(atPath: name) { try qemuImgOK("create", "-q", "-f", "raw", name, size) }
    return name
  }

  /// `lacuna convert -O stream src - | lacuna convert -f stream -O vmdk ... - out.vmdk`.
  func testStreamReceiver() throws {
    let source = try mixedSource()
    let binary = try lacunaBinary()
    for subformat in ["streamOptimized", "monolithicSparse", "twoGbMaxExtentSparse"] {
      let output = path("received-\(subformat).vmdk")
      let command =
        "'\(binary)' convert -O stream '\(source)' - | '\(binary)' convert -f stream -O vmdk -o subformat=\(subformat) - '\(output)'"
      let outcome = try runProgram("/bin/sh", ["-c", command], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try judge.assertIdentical(output, format: "vmdk", to: source, sourceFormat: "raw")
      try judge.assertCheckClean(output, format: "vmdk")
    }
  }

  /// A qcow2 source whose L2 table points a cluster past its file, after the first extent:
  /// the conversion fails and leaves no file of any kind (no extent, no descriptor).
  func testFailedConversionLeavesNothing() throws {
    let raw = try makeRaw(
      "damaged.raw", size: String((2 << 30) + (4 << 20)),
      writes: ["write -P 0x71 0 1M", "write -P 0x72 2049M 64k", "write -P 0x73 2050M 64k"])
    let source = path("damaged.qcow2")
    try qemuImgOK("convert", "-f", "raw", "-O", "qcow2", raw, source)
    try FileManager.default.removeItem(atPath: raw)
    var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: source)))
    func bigEndian(_ offset: Int) -> UInt64 { bytes[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) } }
    // The L2 table of the second GiB-sized stretch (512 MiB per table with 64 KiB
    // clusters): entry for the cluster at 2050 MiB, pointed far past the end of the file.
    let l1 = Int(bigEndian(40))
    let l2 = Int(bigEndian(l1 + 8 * 4) & 0x00ff_ffff_ffff_fe00)
    XCTAssertNotEqual(l2, 0)
    let entry = l2 + 8 * Int(((2050 << 20) - (2048 << 20)) / 65536)
    XCTAssertNotEqual(bigEndian(entry), 0)
    let corrupt = UInt64(1) << 63 | UInt64(1) << 40
    for index in 0..<8 { bytes[entry + index] = UInt8(truncatingIfNeeded: corrupt >> (8 * (7 - index))) }
    try Data(bytes).write(to: URL(fileURLWithPath: source))

    for subformat in Self.subformats {
      let outcome = try lacuna(["convert", "-O", "vmdk", "-o", "subformat=\(subformat)", source, path("out.vmdk")], in: dir)
      XCTAssertEqual(outcome.status, 1, "\(subformat): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains("damaged.qcow2"), outcome.stderr)
      XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["damaged.qcow2"], subformat)
    }
  }

  /// Several files cannot go where only one can be written.
  func testMultiFileRefusedWithoutCompanions() throws {
    let target = try OutputFile(creatingBeside: path("alone.vmdk"))
    defer { target.abandon() }
    for subformat in ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
      XCTAssertThrowsError(
        try VMDK.format.create!(target, 1 << 20, WriterOptions(options: ["subformat": subformat]))
      ) { error in
        XCTAssertTrue("\(error)".contains("several files"), "\(error)")
      }
    }
  }

  /// The descriptor cannot be committed after the extent files were: they are removed
  /// (`removeCommitted`), so nothing is left of the output.
  func testFailureAfterExtentsCommittedRemovesThem() throws {
    let main = try FailingCommit(OutputFile(creatingBeside: path("late.vmdk")))
    let companions = TestCompanions(directory: dir.path, outputName: "late.vmdk")
    let writer = try VMDK.format.create!(
      main, 3 << 30, WriterOptions(options: ["subformat": "twoGbMaxExtentSparse"], companions: companions))
    let data = [UInt8](repeating: 0x5a, count: 65536)
    try data.withUnsafeBytes {
      try writer.write($0, at: 1 << 20)
      try writer.write($0, at: 2 << 30)
    }
    XCTAssertThrowsError(try writer.finish()) { XCTAssertTrue("\($0)".contains("refused for the test"), "\($0)") }
    XCTAssertEqual(companions.committed, 2, "both extents were committed before the descriptor")
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
  }

  /// A 1 TiB disk with a few megabytes of data: memory stays far below anything
  /// proportional to the disk, and the file is no larger than qemu-img's (whose tables for
  /// the whole disk are placed, as holes, at the front).
  func testHugeSparseDiskInBoundedMemory() throws {
    let source = try makeRaw("huge.raw", size: "1T", writes: ["write -P 0x81 0 1M", "write -P 0x82 700G 2M", "write -P 0x83 1023G 64k"])
    for subformat in ["monolithicSparse", "streamOptimized"] {
      let ours = path("huge-\(subformat).vmdk")
      let (outcome, peak) = try lacunaMeasuringMemory(["convert", "-t", "unsafe", "-O", "vmdk", "-o", "subformat=\(subformat)", source, ours])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertLessThan(peak, 200 << 10, "\(subformat): peak resident set \(peak) KiB")
      let theirs = path("huge-\(subformat).qemu.vmdk")
      try qemuImgOK("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(subformat)", source, theirs)
      try judge.assertNoLarger([ours], than: [theirs])
      try judge.assertCheckClean(ours, format: "vmdk")
    }
  }
}

/// A target that refuses to be committed: the last step of a VMDK output fails.
private final class FailingCommit: ByteTarget {
  let inner: OutputFile
  init(_ inner: OutputFile) { self.inner = inner }
  var name: String { inner.name }
  var isSequential: Bool { false }
  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws { try inner.write(bytes, at: offset) }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int { try inner.read(into: buffer, at: offset) }
  func size() throws -> Int64 { try inner.size() }
  func truncate(to size: Int64) throws { try inner.truncate(to: size) }
  func allocate(_ range: Range<Int64>) throws { try inner.allocate(range) }
  func punchHole(_ range: Range<Int64>) throws -> Bool { try inner.punchHole(range) }
  func flush() throws { try inner.flush() }
  func commit() throws { throw ImageError.invalid(path: name, "commit refused for the test") }
  func abandon() { inner.abandon() }
}

/// Companion files made beside the output, as the engine's `OutputCompanions` makes them.
private final class TestCompanions: CompanionTargets {
  let directory: String
  let outputName: String
  private var made: [OutputFile] = []
  init(directory: String, outputName: String) {
    self.directory = directory
    self.outputName = outputName
  }
  var committed: Int { made.filter(\.isCommitted).count }
  func create(named name: String) throws -> ByteTarget {
    let file = try OutputFile(creatingBeside: directory + "/" + name)
    file.synchronizes = false
    made.append(file)
    return file
  }
  func removeCommitted() { for file in made where file.isCommitted { unlink(file.finalPath) } }
}

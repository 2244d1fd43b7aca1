import Foundation
import TestSupport
import XCTest

/// `lacuna check` judged by `qemu-img check` on the same files: text, JSON fields, findings
/// and exit status, on clean images of every kind qemu-img makes and on copies damaged by hand.
final class CheckTests: QemuTestCase {
  /// Writes a 64 MiB image with data in several places (cluster-crossing, partial, far).
  private func makeImage(_ name: String, options: String? = nil, size: String = "64M") throws {
    if let options {
      try qemuImgOK("create", "-f", "qcow2", "-o", options, name, size)
    } else {
      try qemuImgOK("create", "-f", "qcow2", name, size)
    }
    try qemuIO(
      path(name), "write -P 1 0 1M", "write -P 2 5M 64k", "write -P 3 3M 130k", "write -P 4 40M 3k",
      "write -P 5 1M 512")
  }

  /// Runs both checks in the test's directory (so `filename` is the same relative name) and
  /// insists on the same standard output, findings, and exit status; returns qemu's JSON.
  @discardableResult
  private func assertSameAsQemu(
    _ name: String, file: StaticString = #filePath, line: UInt = #line
  ) throws -> [String: Any] {
    var json: [String: Any] = [:]
    for output in ["human", "json"] {
      let theirs = try qemuImg("check", "--output=\(output)", name)
      let ours = try lacuna(["check", "--output=\(output)", name], in: dir)
      XCTAssertEqual(ours.status, theirs.status, "\(name) \(output): \(ours.stderr)", file: file, line: line)
      XCTAssertEqual(ours.stdout, theirs.stdout, "\(name) \(output)", file: file, line: line)
      XCTAssertEqual(
        findings(ours.stderr, prefix: "lacuna: "), findings(theirs.stderr, prefix: "qemu-img: "), "\(name) \(output)",
        file: file, line: line)
      // A check that stops prints no summary, in either form.
      if output == "json" && !theirs.stdout.isEmpty {
        let mine = try XCTUnwrap(try parseJSON(ours.stdout) as? [String: Any], file: file, line: line)
        json = try XCTUnwrap(try parseJSON(theirs.stdout) as? [String: Any], file: file, line: line)
        XCTAssertEqual(Set(mine.keys), Set(json.keys), name, file: file, line: line)
        for (key, value) in json {
          XCTAssertEqual("\(mine[key] ?? "missing")", "\(value)", "\(name): \(key)", file: file, line: line)
        }
      }
    }
    return json
  }

  private func findings(_ text: String, prefix: String) -> [String] {
    text.split(separator: "\n").map { $0.hasPrefix(prefix) ? "*" + $0.dropFirst(prefix.count) : String($0) }
  }

  private func integer(_ json: [String: Any], _ key: String) -> Int64 {
    (json[key] as? NSNumber)?.int64Value ?? 0
  }

  func testCleanImagesAgreeWithQemuImg() throws {
    try makeImage("v2.qcow2", options: "compat=0.10")
    try makeImage("v3.qcow2")
    try makeImage("c512.qcow2", options: "cluster_size=512")
    try makeImage("c4k.qcow2", options: "cluster_size=4k")
    try makeImage("c2m.qcow2", options: "cluster_size=2M")
    try makeImage("ext.qcow2", options: "extended_l2=on")
    try makeImage("rb1.qcow2", options: "refcount_bits=1")
    try makeImage("rb64.qcow2", options: "refcount_bits=64")
    try qemuImgOK("convert", "-c", "-O", "qcow2", "v3.qcow2", "zlib.qcow2")
    try qemuImgOK("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4k", "v3.qcow2", "zstd.qcow2")
    try qemuImgOK("create", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "top.qcow2")
    try qemuIO(path("top.qcow2"), "write -P 9 2M 64k", "write -z 5M 64k")
    try FileManager.default.copyItem(atPath: path("v3.qcow2"), toPath: path("snap.qcow2"))
    try qemuImgOK("snapshot", "-c", "one", "snap.qcow2")
    try qemuIO(path("snap.qcow2"), "write -P 7 0 128k", "write -P 7 50M 64k")
    try qemuImgOK("snapshot", "-c", "two", "snap.qcow2")
    try qemuIO(path("snap.qcow2"), "write -P 8 64k 64k")
    try qemuImgOK("bitmap", "--add", "snap.qcow2", "dirty")
    try FileManager.default.copyItem(atPath: path("v3.qcow2"), toPath: path("bitmap.qcow2"))
    try qemuImgOK("bitmap", "--add", "bitmap.qcow2", "b0")
    try qemuImgOK("bitmap", "--add", "-g", "512k", "bitmap.qcow2", "b1")
    // The enabled bitmaps record this write: their tables get data clusters.
    try qemuIO(path("bitmap.qcow2"), "write -P 8 64k 64k")

    for name in [
      "v2.qcow2", "v3.qcow2", "c512.qcow2", "c4k.qcow2", "c2m.qcow2", "ext.qcow2", "rb1.qcow2", "rb64.qcow2",
      "zlib.qcow2", "zstd.qcow2", "top.qcow2", "snap.qcow2", "bitmap.qcow2",
    ] {
      let json = try assertSameAsQemu(name)
      XCTAssertEqual(integer(json, "corruptions") + integer(json, "leaks"), 0, name)
      XCTAssertGreaterThan(integer(json, "allocated-clusters"), 0, name)
    }
    let zlib = try assertSameAsQemu("zlib.qcow2")
    XCTAssertGreaterThan(integer(zlib, "compressed-clusters"), 0)
  }

  // MARK: - Damage

  private func uint64(_ name: String, at offset: UInt64) throws -> UInt64 {
    let handle = try XCTUnwrap(FileHandle(forReadingAtPath: path(name)))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    let bytes = try XCTUnwrap(try handle.read(upToCount: 8))
    return bytes.reduce(0) { $0 << 8 | UInt64($1) }
  }

  private func write(_ name: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: path(name)))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data(bytes))
  }

  private func bigEndian(_ value: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) } }

  /// The places a damaging edit needs: the first L2 table and the first refcount block
  /// (64 KiB clusters, 16-bit refcounts, as qemu-img makes them by default).
  private struct Layout {
    var l2: UInt64
    var refcountBlock: UInt64
    func l2Entry(_ index: UInt64) -> UInt64 { l2 + 8 * index }
    func refcount(_ cluster: UInt64) -> UInt64 { refcountBlock + 2 * cluster }
  }

  private func layout(_ name: String) throws -> Layout {
    let l1 = try uint64(name, at: 40)
    let refcountTable = try uint64(name, at: 48)
    return Layout(
      l2: try uint64(name, at: l1) & 0x00ff_ffff_ffff_fe00, refcountBlock: try uint64(name, at: refcountTable))
  }

  private func damaged(_ name: String, from original: String, _ edit: (Layout) throws -> Void) throws -> String {
    try FileManager.default.copyItem(atPath: path(original), toPath: path(name))
    try edit(try layout(name))
    return name
  }

  func testDamagedImagesGetQemuImgsVerdict() throws {
    try makeImage("clean.qcow2")
    let size = UInt64(try FileManager.default.attributesOfItem(atPath: path("clean.qcow2"))[.size] as! Int)
    let cluster: UInt64 = 65536
    // Entry 16 maps 1 MiB (written), entry 0 maps 0.
    let cases: [(name: String, corruptions: Int64, leaks: Int64, edit: (Layout) throws -> Void)] = [
      ("leak.qcow2", 0, 1, { try self.write("leak.qcow2", at: $0.refcount(0), [0, 2]) }),
      // Refcount 0 under a data cluster: the refcount error and its copied bit.
      ("low.qcow2", 2, 0, { layout in
        let data = try self.uint64("low.qcow2", at: layout.l2Entry(16)) & 0x00ff_ffff_ffff_fe00
        try self.write("low.qcow2", at: layout.refcount(data / cluster), [0, 0])
      }),
      // Not counted (past the end), its copied bit against refcount 0; the old cluster leaks.
      ("past-end.qcow2", 2, 1, {
        try self.write("past-end.qcow2", at: $0.l2Entry(16), self.bigEndian(1 << 63 | (size / cluster + 5) * cluster))
      }),
      // Two entries share a cluster (referenced twice, counted once); the other is leaked.
      ("overlap.qcow2", 1, 1, { layout in
        let entry = try self.uint64("overlap.qcow2", at: layout.l2Entry(0))
        try self.write("overlap.qcow2", at: layout.l2Entry(16), self.bigEndian(entry))
      }),
      ("copied-clear.qcow2", 1, 0, { layout in
        let entry = try self.uint64("copied-clear.qcow2", at: layout.l2Entry(16))
        try self.write("copied-clear.qcow2", at: layout.l2Entry(16), self.bigEndian(entry & ~(1 << 63)))
      }),
      ("copied-set.qcow2", 1, 1, { layout in
        // Refcount 2 on a cluster referenced once: a leak, and the copied bit is now wrong.
        let entry = try self.uint64("copied-set.qcow2", at: layout.l2Entry(16))
        try self.write("copied-set.qcow2", at: layout.refcount((entry & 0x00ff_ffff_ffff_fe00) / cluster), [0, 2])
      }),
      // Misaligned: counted over the two clusters it straddles, the second without a refcount.
      ("misaligned.qcow2", 2, 0, { layout in
        let entry = try self.uint64("misaligned.qcow2", at: layout.l2Entry(16))
        try self.write("misaligned.qcow2", at: layout.l2Entry(16), self.bigEndian(entry + 0x200))
      }),
    ]
    for (name, corruptions, leaks, edit) in cases {
      _ = try damaged(name, from: "clean.qcow2", edit)
      let json = try assertSameAsQemu(name)
      XCTAssertEqual(integer(json, "corruptions"), corruptions, name)
      XCTAssertEqual(integer(json, "leaks"), leaks, name)
    }
    // The leak alone exits 3; the copied-set case has a leak too, but corruptions win (2).
    XCTAssertEqual(try lacuna(["check", "leak.qcow2"], in: dir).status, 3)
    XCTAssertEqual(try lacuna(["check", "copied-set.qcow2"], in: dir).status, 2)
  }

  func testDamagedSnapshotAndCompressedImagesAgree() throws {
    try makeImage("base.qcow2")
    try qemuImgOK("snapshot", "-c", "one", "base.qcow2")
    try qemuIO(path("base.qcow2"), "write -P 7 0 128k")
    // Cluster 16's data is shared by the snapshot: refcount 2. Lower it to 1.
    let name = try damaged("shared.qcow2", from: "base.qcow2") { layout in
      let entry = try self.uint64("shared.qcow2", at: layout.l2Entry(16))
      XCTAssertEqual(entry >> 63, 0, "a shared cluster has no copied bit")
      try self.write("shared.qcow2", at: layout.refcount((entry & 0x00ff_ffff_ffff_fe00) / 65536), [0, 1])
    }
    let json = try assertSameAsQemu(name)
    XCTAssertEqual(integer(json, "corruptions"), 2)

    try qemuImgOK("convert", "-c", "-O", "qcow2", "base.qcow2", "z.qcow2")
    let compressed = try damaged("z-copied.qcow2", from: "z.qcow2") { layout in
      let entry = try self.uint64("z-copied.qcow2", at: layout.l2Entry(0))
      try self.write("z-copied.qcow2", at: layout.l2Entry(0), self.bigEndian(entry | 1 << 63))
    }
    XCTAssertEqual(integer(try assertSameAsQemu(compressed), "corruptions"), 1)
  }

  /// Damage that stops qemu's check (exit 1, "Check failed", no summary) or leaves it
  /// unable to read refcounts (internal errors, exit 1 after the summary).
  func testChecksThatCannotFinishAgree() throws {
    try makeImage("clean.qcow2")
    // The snapshot table's offset is checked even with no snapshots.
    try FileManager.default.copyItem(atPath: path("clean.qcow2"), toPath: path("snapshot-offset.qcow2"))
    try write("snapshot-offset.qcow2", at: 64, bigEndian(0x10200))
    try assertSameAsQemu("snapshot-offset.qcow2")
    let stopped = try lacuna(["check", "snapshot-offset.qcow2"], in: dir)
    XCTAssertEqual(stopped.status, 1)
    XCTAssertEqual(stopped.stdout, "")
    XCTAssertTrue(stopped.stderr.contains("Check failed: Invalid argument"), stopped.stderr)

    // A refcount block 512 bytes off its cluster: every refcount it holds is unreadable.
    let name = try damaged("refblock.qcow2", from: "clean.qcow2") { layout in
      let table = try self.uint64("refblock.qcow2", at: 48)
      try self.write("refblock.qcow2", at: table, self.bigEndian(layout.refcountBlock + 0x200))
    }
    let json = try assertSameAsQemu(name)
    XCTAssertGreaterThan(integer(json, "check-errors"), 0)
    XCTAssertEqual(try lacuna(["check", name], in: dir).status, 1)
  }

  func testCheckNeverChangesTheImage() throws {
    try makeImage("leak.qcow2")
    try write("leak.qcow2", at: try layout("leak.qcow2").refcount(0), [0, 3])
    let before = try Data(contentsOf: dir.appendingPathComponent("leak.qcow2"))
    let modified = try FileManager.default.attributesOfItem(atPath: path("leak.qcow2"))[.modificationDate] as? Date
    for output in ["human", "json"] {
      XCTAssertEqual(try lacuna(["check", "--output=\(output)", "leak.qcow2"], in: dir).status, 3)
    }
    XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("leak.qcow2")), before)
    XCTAssertEqual(
      try FileManager.default.attributesOfItem(atPath: path("leak.qcow2"))[.modificationDate] as? Date, modified)
    // Repair is not offered; the message says what to do instead.
    let repair = try lacuna(["check", "-r", "leaks", "leak.qcow2"], in: dir)
    XCTAssertNotEqual(repair.status, 0)
    XCTAssertTrue(repair.stderr.contains("lacuna convert"), repair.stderr)
    XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("leak.qcow2")), before)
  }

  /// The repair the help offers: a converted copy has exact refcounts and the same disk.
  func testConvertWritesARepairedCopy() throws {
    try makeImage("low.qcow2")
    let layout = try layout("low.qcow2")
    let entry = try uint64("low.qcow2", at: layout.l2Entry(16))
    try write("low.qcow2", at: layout.refcount((entry & 0x00ff_ffff_ffff_fe00) / 65536), [0, 0])
    XCTAssertEqual(try lacuna(["check", "low.qcow2"], in: dir).status, 2)
    let converted = try lacuna(["convert", "-O", "qcow2", "low.qcow2", "fixed.qcow2"], in: dir)
    XCTAssertEqual(converted.status, 0, converted.stderr)
    let json = try assertSameAsQemu("fixed.qcow2")
    XCTAssertEqual(integer(json, "corruptions") + integer(json, "leaks"), 0)
    XCTAssertEqual(try qemuImg("compare", "low.qcow2", "fixed.qcow2").status, 0)
  }

  /// A 2 EiB disk with three clusters: the counters follow the file (about 20 clusters),
  /// and the 32 MiB L1 table is walked through its holes.
  func testHugeVirtualSizeChecksInLittleMemory() throws {
    try qemuImgOK("create", "-f", "qcow2", "-o", "cluster_size=2M", "huge.qcow2", "2E")
    try qemuIO(path("huge.qcow2"), "write -P 1 0 4k", "write -P 2 1E 64k", "write -P 3 2047P 4k")
    let json = try assertSameAsQemu("huge.qcow2")
    XCTAssertEqual(integer(json, "allocated-clusters"), 3)
    let baseline = try lacunaMeasuringMemory(["--version"]).peakKiB
    let measured = try lacunaMeasuringMemory(["check", path("huge.qcow2")])
    XCTAssertEqual(measured.outcome.status, 0, measured.outcome.stderr)
    XCTAssertLessThan(measured.peakKiB - baseline, 16 << 10, "peak \(measured.peakKiB) KiB, baseline \(baseline) KiB")
  }

  /// VDI: the block map's entries must be inside the image, unique, and as many as the
  /// header says (qemu's whole VDI check).
  func testVDIAgreesWithQemuImg() throws {
    try qemuImgOK("create", "-f", "vdi", "disk.vdi", "8M")
    try qemuIO(path("disk.vdi"), "write -P 1 0 3M")
    try assertSameAsQemu("disk.vdi")
    let mapOffset = try littleEndian32("disk.vdi", at: 0x154)
    for (name, offset, value) in [
      ("shared.vdi", mapOffset + 20, UInt32(0)), ("too-large.vdi", mapOffset + 20, 100), ("count.vdi", 0x184, 1),
    ] {
      try FileManager.default.copyItem(atPath: path("disk.vdi"), toPath: path(name))
      try write(name, at: UInt64(offset), (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) })
      let json = try assertSameAsQemu(name)
      XCTAssertGreaterThan(integer(json, "corruptions"), 0, name)
    }
  }

  private func littleEndian32(_ name: String, at offset: UInt64) throws -> UInt32 {
    let handle = try XCTUnwrap(FileHandle(forReadingAtPath: path(name)))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    return try XCTUnwrap(try handle.read(upToCount: 4)).reversed().reduce(0) { $0 << 8 | UInt32($1) }
  }

  func testFormatsWithoutCheckSayItAsQemuImgDoes() throws {
    try qemuImgOK("create", "-f", "raw", "disk.img", "1M")
    try qemuImgOK("create", "-f", "vpc", "disk.vhd", "1M")
    for name in ["disk.img", "disk.vhd"] {
      let theirs = try qemuImg("check", name)
      let ours = try lacuna(["check", name], in: dir)
      XCTAssertEqual(ours.status, theirs.status, name)
      XCTAssertEqual(ours.status, 63, name)
      XCTAssertEqual(findings(ours.stderr, prefix: "lacuna: "), findings(theirs.stderr, prefix: "qemu-img: "), name)
    }
  }
}

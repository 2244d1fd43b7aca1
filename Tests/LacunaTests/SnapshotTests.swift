import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// Internal qcow2 snapshots made by `qemu-img snapshot -c` between qemu-io writes: listed
/// by `info` and converted by `convert -l`/`-s`, judged against qemu-img 7.2.
final class SnapshotTests: QemuTestCase {
  override func setUpWithError() throws {
    try super.setUpWithError()
    // Dates print in local time; both programs inherit this.
    setenv("TZ", "UTC", 1)
  }

  /// 64 MiB with snapshot 1 "first" (0x11 at 0, 1 MiB), 2 "second" (0x22 over 512k-1.5M,
  /// a zeroed cluster), then resized to 100 MiB: 3 "third with space" (0x33 at 80M); the
  /// active state then differs from all three (0x44 at 0).
  func makeImage() throws -> String {
    try qemuImgOK("create", "-q", "-f", "qcow2", "snap.qcow2", "64M")
    try qemuIO("snap.qcow2", "write -P 0x11 0 1M")
    try qemuImgOK("snapshot", "-c", "first", "snap.qcow2")
    try qemuIO("snap.qcow2", "write -P 0x22 512k 1M", "write -z 0 64k")
    try qemuImgOK("snapshot", "-c", "second", "snap.qcow2")
    try qemuImgOK("resize", "-q", "snap.qcow2", "100M")
    try qemuIO("snap.qcow2", "write -P 0x33 80M 1M")
    try qemuImgOK("snapshot", "-c", "third with space", "snap.qcow2")
    try qemuIO("snap.qcow2", "write -P 0x44 0 64k")
    return "snap.qcow2"
  }

  func testInfoListsSnapshotsAsQemuImg() throws {
    let image = try makeImage()
    let human = try lacuna("info", image, in: dir)
    XCTAssertEqual(human.status, 0, human.stderr)
    XCTAssertEqual(human.stdout, try qemuImgOK("info", image))
    XCTAssertTrue(human.stdout.contains("Snapshot list:\nID        TAG               VM SIZE"))
    let json = try lacuna("info", "--output=json", image, in: dir)
    XCTAssertEqual(json.status, 0, json.stderr)
    XCTAssertEqual(json.stdout, try qemuImgOK("info", "--output=json", image))
    XCTAssertTrue(json.stdout.contains("\"name\": \"third with space\""))
  }

  /// An image left dirty (lazy refcounts, qemu-io killed) with a snapshot, on a backing
  /// file: the lines around the snapshot list stay in qemu-img's order.
  func testDirtyOverlayWithSnapshotPrintsAsQemuImg() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "base.qcow2", "16M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "base.qcow2", "-F", "qcow2", "dirty.qcow2")
    try qemuImgOK("snapshot", "-c", "before", "dirty.qcow2")
    _ = try runProgram(which("qemu-io")!, ["-c", "write -P 0x5 0 64k", "-c", "sigraise 9", "dirty.qcow2"], in: dir)
    let human = try lacuna("info", "dirty.qcow2", in: dir)
    XCTAssertEqual(human.status, 0, human.stderr)
    let theirs = try qemuImgOK("info", "dirty.qcow2")
    XCTAssertTrue(theirs.contains("cleanly shut down: no"), "qemu-io did not leave the image dirty: \(theirs)")
    XCTAssertEqual(human.stdout, theirs)
    let json = try lacuna("info", "--output=json", "dirty.qcow2", in: dir)
    XCTAssertEqual(json.stdout, try qemuImgOK("info", "--output=json", "dirty.qcow2"))
  }

  /// Entries qemu-img does not make today: without icount (an older qemu), without any
  /// extra data (disk size and 64-bit VM state absent), with a 5 GiB VM state and a VM
  /// clock of 100 hours; `info` must still print what qemu-img prints.
  func testInfoOfHandMadeEntriesMatchesQemuImg() throws {
    let image = try makeImage()
    var patched = try PatchableImage(bytes: [UInt8](Data(contentsOf: URL(fileURLWithPath: path(image)))))
    let (l1Offset, l1Size) = firstSnapshotL1(patched)
    let disk: UInt64 = 64 << 20
    let entries = [
      SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "1", name: "old-entry", clock: 3_725_500_000_000,
                    extra: be(1000) + be(disk)),
      SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "7", name: "big state", clock: 59_999_000_000,
                    extra: be(5 << 30) + be(disk) + be(42)),
      SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "8", name: "no icount", clock: 360_000_000_000_000,
                    extra: be(123_456_789) + be(disk) + be(UInt64.max)),
      SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "9", name: "v2-style", vmState32: 1023, clock: 1, extra: []),
    ]
    installTable(entries, in: &patched)
    try Data(patched.bytes).write(to: URL(fileURLWithPath: path("made.qcow2")))
    let human = try lacuna("info", "made.qcow2", in: dir)
    XCTAssertEqual(human.status, 0, human.stderr)
    XCTAssertEqual(human.stdout, try qemuImgOK("info", "made.qcow2"))
    let json = try lacuna("info", "--output=json", "made.qcow2", in: dir)
    XCTAssertEqual(json.status, 0, json.stderr)
    XCTAssertEqual(json.stdout, try qemuImgOK("info", "--output=json", "made.qcow2"))
    // The entry without a disk size has the image's size (100 MiB), as qemu reads it.
    XCTAssertEqual(try lacuna("convert", "-O", "raw", "-l", "9", "made.qcow2", "nine.raw", in: dir).status, 0)
    XCTAssertEqual(fileSize(path("nine.raw")), 100 << 20)
  }

  /// Every way of naming a snapshot converts the same disk qemu-img converts; the output
  /// has the snapshot's own size (qemu-img 7.2 pads it to the current size, with zeros that
  /// `compare` accepts), and the active state is left as it was.
  func testConvertSnapshotLikeQemuImg() throws {
    let image = try makeImage()
    let before = try Data(contentsOf: URL(fileURLWithPath: path(image)))
    let cases: [(ours: [String], theirs: [String], size: Int64)] = [
      (["-l", "snapshot.name=first"], ["-l", "snapshot.name=first"], 64 << 20),
      (["-l", "snapshot.id=2"], ["-l", "snapshot.id=2"], 64 << 20),
      (["-l", "third with space"], ["-l", "third with space"], 100 << 20),
      (["-l", "1"], ["-l", "1"], 64 << 20),
      (["-l", "snapshot.id=2,snapshot.name=second"], ["-l", "snapshot.id=2,snapshot.name=second"], 64 << 20),
      (["-s", "second"], ["-l", "second"], 64 << 20),
      (["-l", "snapshot.name=first", "-l", "snapshot.id=3"], ["-l", "snapshot.id=3"], 100 << 20),
    ]
    for (index, item) in cases.enumerated() {
      let theirs = "theirs\(index).raw"
      _ = try runProgram(qemu, ["convert", "-O", "raw"] + item.theirs + [image, theirs], in: dir)
      for format in ["raw", "qcow2"] {
        let ours = "ours\(index).\(format)"
        let outcome = try lacuna(["convert", "-O", format] + item.ours + [image, ours], in: dir)
        XCTAssertEqual(outcome.status, 0, "\(item.ours): \(outcome.stderr)")
        let compared = try qemuImg("compare", "-f", "raw", "-F", format, theirs, ours)
        XCTAssertEqual(compared.status, 0, "\(item.ours) -O \(format): \(compared.stdout) \(compared.stderr)")
        let info = try qemuImgOK("info", "--output=json", ours)
        XCTAssertTrue(info.contains("\"virtual-size\": \(item.size),"), "\(item.ours): \(info)")
      }
    }
    // The three snapshots and the active state are four different disks.
    XCTAssertFalse(try sameContent(path("ours0.raw"), path("ours1.raw")))
    XCTAssertTrue(try sameContent(path("ours0.raw"), path("ours3.raw")))
    try qemuImgOK("convert", "-O", "raw", image, "active-theirs.raw")
    XCTAssertEqual(try lacuna("convert", "-O", "raw", image, "active.raw", in: dir).status, 0)
    XCTAssertTrue(try sameContent(path("active.raw"), path("active-theirs.raw")))
    XCTAssertFalse(try sameContent(path("active.raw"), path("ours2.raw")))
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path(image))), before, "the image was changed")
  }

  /// A snapshot of an overlay reads what it does not hold from the backing file.
  func testSnapshotOfAnOverlayReadsThroughItsBackingFile() throws {
    try qemuImgOK("create", "-q", "-f", "qcow2", "base.qcow2", "32M")
    try qemuIO("base.qcow2", "write -P 0x41 0 2M", "write -P 0x42 30M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    try qemuIO("top.qcow2", "write -P 0x51 1M 64k", "write -z 30M 64k")
    try qemuImgOK("snapshot", "-c", "overlay", "top.qcow2")
    try qemuIO("top.qcow2", "write -P 0x61 0 4M")
    try qemuImgOK("convert", "-O", "raw", "-l", "overlay", "top.qcow2", "theirs.raw")
    let outcome = try lacuna("convert", "-O", "raw", "-l", "overlay", "top.qcow2", "ours.raw", in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    XCTAssertTrue(try sameContent(path("ours.raw"), path("theirs.raw")))
    // The backing file's bytes are there, under the snapshot's own.
    let base = try qemuImg("compare", "-f", "raw", "-F", "qcow2", "ours.raw", "base.qcow2")
    XCTAssertEqual(base.status, 1, "the snapshot differs from its base only where it wrote")
    try qemuImgOK("convert", "-O", "raw", "top.qcow2", "active.raw")
    XCTAssertFalse(try sameContent(path("ours.raw"), path("active.raw")))
    // -B of the base keeps the snapshot's own clusters only, still reading correctly.
    let rebased = try lacuna(
      "convert", "-O", "qcow2", "-l", "overlay", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "small.qcow2", in: dir)
    XCTAssertEqual(rebased.status, 0, rebased.stderr)
    XCTAssertEqual(try qemuImg("compare", "-f", "raw", "-F", "qcow2", "theirs.raw", "small.qcow2").status, 0)
  }

  func testUnknownSnapshotIsRefusedAsQemuImgRefusesIt() throws {
    let image = try makeImage()
    try qemuImgOK("create", "-q", "-f", "raw", "plain.raw", "1M")
    for (arguments, source) in [
      (["-l", "nosuch"], image), (["-l", "snapshot.name=nosuch"], image), (["-l", "snapshot.id=9"], image),
      (["-l", "snapshot.id=1,snapshot.name=second"], image), (["-l", "first"], "plain.raw"),
    ] {
      let theirs = try runProgram(qemu, ["convert", "-O", "raw"] + arguments + [source, "theirs.raw"], in: dir)
      let ours = try lacuna(["convert", "-O", "raw"] + arguments + [source, "ours.raw"], in: dir)
      XCTAssertEqual(ours.status, theirs.status, "\(arguments): \(ours.stderr)")
      XCTAssertEqual(ours.status, 1)
      let lines = ours.stderr.split(separator: "\n")
      XCTAssertEqual(lines.count, 1, ours.stderr)
      XCTAssertTrue(ours.stderr.contains(source), ours.stderr)
      let asked = arguments[1].split(separator: "=").last.map(String.init)!
      XCTAssertTrue(ours.stderr.contains("'\(asked)'"), ours.stderr)
      XCTAssertFalse(FileManager.default.fileExists(atPath: path("ours.raw")))
    }
    // A malformed -l is a usage error.
    XCTAssertEqual(try lacuna("convert", "-O", "raw", "-l", "snapshot.size=1", image, "ours.raw", in: dir).status, 2)
    XCTAssertEqual(try lacuna("convert", "-O", "raw", "-l", "1", "-s", "1", image, "ours.raw", in: dir).status, 2)
  }

  /// Damage anywhere in the table stops `info` and `convert` with one line naming the image.
  func testDamagedSnapshotTablesAreRefused() throws {
    let image = try makeImage()
    let original = try PatchableImage(bytes: [UInt8](Data(contentsOf: URL(fileURLWithPath: path(image)))))
    let (l1Offset, l1Size) = firstSnapshotL1(original)
    let good = SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "1", name: "good", extra: be(0) + be(64 << 20) + be(0))
    let fileEnd = UInt64(original.bytes.count + 65535) / 65536 * 65536
    var damaged: [(String, PatchableImage, String)] = []

    var copy = original
    copy.set(UInt64(fileEnd + (1 << 20)), at: 64)
    damaged.append(("table offset past the end", copy, "past the end of the file"))

    copy = original
    copy.set(UInt32(70_000), at: 60)
    damaged.append(("more snapshots than qemu allows", copy, "more than the limit"))

    copy = original
    installTable([good], in: &copy)
    copy.set(UInt32(20_000), at: 60)  // 20000 entries would fit by their fixed parts, not in fact
    damaged.append(("huge count", copy, "past the end of the file"))

    copy = original
    var longName = good
    longName.nameLengthOverride = 65535
    installTable([good, longName], in: &copy)
    damaged.append(("name length beyond the table", copy, "would end past the end of the file"))

    copy = original
    var lost = good
    lost.l1Offset = fileEnd + (16 << 20)
    installTable([good, lost], in: &copy)
    damaged.append(("L1 table past the end", copy, "past the end of the file"))

    copy = original
    var unaligned = good
    unaligned.l1Offset += 512
    installTable([unaligned], in: &copy)
    damaged.append(("L1 table not aligned", copy, "not aligned to the cluster size"))

    copy = original
    var hugeL1 = good
    hugeL1.l1Size = 5 << 20
    installTable([hugeL1], in: &copy)
    damaged.append(("L1 table beyond 32 MiB", copy, "larger than the 32 MiB limit"))

    copy = original
    var smallL1 = good
    smallL1.extra = be(0) + be(UInt64(1) << 40) + be(0)
    installTable([smallL1], in: &copy)
    damaged.append(("L1 table too small for the disk size", copy, "needs"))

    copy = original
    var bigExtra = good
    bigExtra.extra = be(0) + be(64 << 20) + [UInt8](repeating: 0, count: 1100)
    installTable([bigExtra], in: &copy)
    damaged.append(("extra data beyond 1 KiB", copy, "extra data"))

    for (what, image, expected) in damaged {
      let name = "damaged-\(what.replacingOccurrences(of: " ", with: "-")).qcow2"
      try Data(image.bytes).write(to: URL(fileURLWithPath: path(name)))
      for arguments in [["info", name], ["convert", "-O", "raw", name, "out.raw"], ["convert", "-l", "good", "-O", "raw", name, "out.raw"]] {
        let outcome = try lacuna(arguments, in: dir)
        XCTAssertEqual(outcome.status, 1, "\(what): \(arguments): \(outcome.stderr)")
        XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, "\(what): \(outcome.stderr)")
        XCTAssertTrue(outcome.stderr.contains(name), "\(what): \(outcome.stderr)")
        XCTAssertTrue(outcome.stderr.contains(expected), "\(what): expected '\(expected)' in \(outcome.stderr)")
      }
    }
  }

  /// Listing reads the table only: a snapshot whose L1 table holds garbage is listed, the
  /// active state and the other snapshots convert, and converting that one is refused.
  func testSnapshotL1TablesAreReadOnlyWhenConverted() throws {
    let image = try makeImage()
    var patched = try PatchableImage(bytes: [UInt8](Data(contentsOf: URL(fileURLWithPath: path(image)))))
    let (l1Offset, l1Size) = firstSnapshotL1(patched)
    let garbage = (patched.bytes.count + 65535) / 65536 * 65536
    patched.replace(at: garbage, with: [UInt8](repeating: 0xff, count: 65536))
    let extra = be(0) + be(64 << 20) + be(0)
    installTable(
      [
        SnapshotEntry(l1Offset: l1Offset, l1Size: l1Size, id: "1", name: "good", extra: extra),
        SnapshotEntry(l1Offset: UInt64(garbage), l1Size: 1, id: "2", name: "bad", extra: extra),
      ], in: &patched)
    try Data(patched.bytes).write(to: URL(fileURLWithPath: path("garbage.qcow2")))
    let info = try lacuna("info", "garbage.qcow2", in: dir)
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains("2         bad"), info.stdout)
    XCTAssertEqual(try lacuna("convert", "-O", "raw", "garbage.qcow2", "active.raw", in: dir).status, 0)
    XCTAssertEqual(try lacuna("convert", "-O", "raw", "-l", "good", "garbage.qcow2", "good.raw", in: dir).status, 0)
    let bad = try lacuna("convert", "-O", "raw", "-l", "bad", "garbage.qcow2", "bad.raw", in: dir)
    XCTAssertEqual(bad.status, 1)
    XCTAssertTrue(bad.stderr.contains("garbage.qcow2: L1 entry 0 has reserved bits set"), bad.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("bad.raw")))
  }

  // MARK: - Making snapshot tables by hand (docs/interop/qcow2.txt, "Snapshot table")

  struct SnapshotEntry {
    var l1Offset: UInt64
    var l1Size: UInt32
    var id: String
    var name: String
    var date: UInt32 = 1_700_000_000
    var dateNanoseconds: UInt32 = 123_456_789
    var vmState32: UInt32 = 0
    var clock: UInt64 = 0
    var extra: [UInt8]
    /// A name_size that differs from the name's length (damage).
    var nameLengthOverride: UInt16?

    init(l1Offset: UInt64, l1Size: UInt32, id: String, name: String, vmState32: UInt32 = 0, clock: UInt64 = 0, extra: [UInt8]) {
      self.l1Offset = l1Offset
      self.l1Size = l1Size
      self.id = id
      self.name = name
      self.vmState32 = vmState32
      self.clock = clock
      self.extra = extra
    }

    var bytes: [UInt8] {
      var out = be(l1Offset) + be(l1Size) + be(UInt16(id.utf8.count)) + be(nameLengthOverride ?? UInt16(name.utf8.count))
      out += be(date) + be(dateNanoseconds) + be(clock) + be(vmState32) + be(UInt32(extra.count))
      out += extra + Array(id.utf8) + Array(name.utf8)
      return out + [UInt8](repeating: 0, count: (8 - out.count % 8) % 8)
    }
  }

  /// The L1 table of the image's first snapshot (header bytes 64-71 point at the table).
  func firstSnapshotL1(_ image: PatchableImage) -> (UInt64, UInt32) {
    let table = Int(image.uint64(at: 64))
    return (image.uint64(at: table), image.uint32(at: table + 8))
  }

  /// Writes `entries` as a new table in a fresh cluster at the end of the image, with the
  /// file ending one cluster later, and points the header at it.
  func installTable(_ entries: [SnapshotEntry], in image: inout PatchableImage) {
    let offset = (image.bytes.count + 65535) / 65536 * 65536
    let table = entries.flatMap(\.bytes)
    image.replace(at: offset, with: table + [UInt8](repeating: 0, count: (65536 - table.count % 65536) % 65536))
    image.set(UInt32(entries.count), at: 60)
    image.set(UInt64(offset), at: 64)
  }
}

/// `value` as big-endian bytes.
private func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
  (0..<MemoryLayout<T>.size).reversed().map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
}

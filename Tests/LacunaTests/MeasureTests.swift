import Foundation
import TestSupport
import XCTest

/// `lacuna measure` against the real output of `lacuna convert` with the same options, and
/// against qemu-img measure where qemu-img measures (qcow2, raw).
final class MeasureTests: QemuTestCase {
  /// Every format lacuna writes, with each option that changes the output's length.
  static let optionSets: [(format: String, options: [String])] = [
    ("raw", []), ("raw", ["-o", "preallocation=full"]), ("raw", ["-o", "preallocation=falloc"]),
    ("qcow2", []), ("qcow2", ["-o", "cluster_size=4k"]), ("qcow2", ["-o", "cluster_size=2M"]),
    ("qcow2", ["-o", "refcount_bits=1"]), ("qcow2", ["-o", "refcount_bits=64,cluster_size=512"]),
    ("qcow2", ["-o", "compat=0.10"]), ("qcow2", ["-o", "preallocation=metadata"]),
    ("qcow2", ["-c"]), ("qcow2", ["-c", "-o", "compression_type=zstd"]), ("qcow2", ["-c", "-o", "cluster_size=4k"]),
    ("vmdk", []), ("vmdk", ["-o", "subformat=monolithicFlat"]), ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"]), ("vmdk", ["-o", "subformat=streamOptimized"]),
    ("vmdk", ["-c"]),
    ("vhdx", []), ("vhdx", ["-o", "subformat=fixed"]), ("vhdx", ["-o", "block_size=1M"]),
    ("vhdx", ["-o", "log_size=8M"]), ("vhdx", ["-o", "block_state_zero=off"]),
    ("vdi", []), ("vdi", ["-o", "static=on"]),
    ("vpc", []), ("vpc", ["-o", "subformat=fixed"]), ("vpc", ["-o", "force_size=on"]),
    ("vpc", ["-o", "subformat=fixed,force_size=on"]),
    ("stream", []),
  ]

  /// A mostly empty 64 MiB disk as a two-layer chain: data at a few offsets, a zero cluster
  /// written over data, a cluster of written zeros, 1 MiB of random bytes, and text that
  /// compresses.
  func makeChain() throws -> String {
    try qemuImgOK("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    try qemuIO("base.qcow2", "write -P 0xab 0 64k", "write -P 0x11 5M 300k", "write -P 0 20M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    try patternBytes(1 << 20, seed: 7).withUnsafeBytes {
      try Data($0).write(to: dir.appendingPathComponent("random.bin"))
    }
    try qemuIO("top.qcow2", "write -P 0x22 33M 4k", "write -z 5M 64k", "write -P 0x33 63M 1M", "write -s random.bin 40M 1M")
    return "top.qcow2"
  }

  /// The total length of the files in a directory: an output and its companions.
  static func lengthOfFiles(in directory: String) throws -> Int64 {
    try FileManager.default.contentsOfDirectory(atPath: directory).reduce(0) {
      $0 + fileSize(directory + "/" + $1)
    }
  }

  struct Sizes: Equatable {
    var required: Int64
    var fullyAllocated: Int64
  }

  func measured(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> Sizes {
    try Self.measured(arguments, in: dir, file: file, line: line)
  }

  static func measured(_ arguments: [String], in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws -> Sizes {
    let outcome = try lacuna(["measure", "--output=json"] + arguments, in: dir)
    XCTAssertEqual(outcome.status, 0, "measure \(arguments): \(outcome.stderr)", file: file, line: line)
    let json = try XCTUnwrap(try parseJSON(outcome.stdout) as? [String: Any], outcome.stdout, file: file, line: line)
    return Sizes(
      required: try XCTUnwrap((json["required"] as? NSNumber)?.int64Value, file: file, line: line),
      fullyAllocated: try XCTUnwrap((json["fully-allocated"] as? NSNumber)?.int64Value, file: file, line: line))
  }

  /// qemu-img measure's numbers, or nil where it does not measure the format.
  func qemuMeasured(_ arguments: [String]) throws -> Sizes? { try Self.qemuMeasured(arguments, qemu: qemu, in: dir) }

  static func qemuMeasured(_ arguments: [String], qemu: String, in dir: URL) throws -> Sizes? {
    let outcome = try runProgram(qemu, ["measure", "--output=json"] + arguments, in: dir)
    guard outcome.status == 0, let json = try parseJSON(outcome.stdout) as? [String: Any] else { return nil }
    return Sizes(
      required: (json["required"] as? NSNumber)?.int64Value ?? -1,
      fullyAllocated: (json["fully-allocated"] as? NSNumber)?.int64Value ?? -1)
  }

  /// Converts into a directory of its own, so the output's companions are counted too.
  func convertedLength(_ arguments: [String], source: String, format: String, name: String) throws -> Int64 {
    try Self.convertedLength(arguments, source: source, format: format, name: name, in: dir)
  }

  static func convertedLength(
    _ arguments: [String], source: String, format: String, name: String, in dir: URL
  ) throws -> Int64 {
    let out = dir.appendingPathComponent("out-\(name)").path
    try? FileManager.default.removeItem(atPath: out)
    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
    let outcome = try lacuna(["convert", "-O", format] + arguments + [source, out + "/disk.\(format)"], in: dir)
    XCTAssertEqual(outcome.status, 0, "convert \(arguments): \(outcome.stderr)")
    return try Self.lengthOfFiles(in: out)
  }

  func testRequiredIsTheLengthConvertWritesForEveryFormatAndOption() throws {
    let source = try makeChain()
    for (index, set) in Self.optionSets.enumerated() {
      let ours = try measured(["-O", set.format] + set.options + [source])
      let real = try convertedLength(set.options, source: source, format: set.format, name: "\(index)")
      let qemuOptions = set.options.filter { $0 != "-c" }
      let theirs = try qemuMeasured(["-O", set.format] + qemuOptions + [source])
      print(
        "measure -O \(set.format) \(set.options.joined(separator: " ")): required \(ours.required) "
          + "(convert wrote \(real)), fully-allocated \(ours.fullyAllocated); "
          + (theirs.map { "qemu-img: required \($0.required), fully-allocated \($0.fullyAllocated)" }
            ?? "qemu-img does not measure \(set.format)"))
      if set.options.contains("-c") {
        XCTAssertGreaterThanOrEqual(ours.required, real, "\(set)")
      }
      XCTAssertEqual(ours.required, real, "\(set)")
      if let theirs, set.format == "raw" || set.format == "qcow2" {
        XCTAssertEqual(ours.fullyAllocated, theirs.fullyAllocated, "\(set): fully-allocated against qemu-img")
        if set.format == "raw" { XCTAssertEqual(ours.required, theirs.required, "\(set): raw against qemu-img") }
      }
    }
  }

  /// Text and JSON as qemu-img prints them: the same lines, the same keys in the same order,
  /// with the bitmaps entry exactly where qemu-img gives one.
  func testOutputMatchesQemuImgsShape() throws {
    let source = try makeChain()
    try qemuImgOK("convert", "-O", "raw", source, "flat.raw")
    let cases: [[String]] = [
      ["-O", "qcow2", source], ["-O", "qcow2", "-o", "compat=0.10", source], ["-O", "qcow2", "-f", "raw", "flat.raw"],
      ["-O", "qcow2", "--size", "1G"], ["-O", "raw", source], [source],
    ]
    for arguments in cases {
      for output in ["human", "json"] {
        let ours = try lacuna(["measure", "--output=\(output)"] + arguments, in: dir)
        let theirs = try runProgram(qemu, ["measure", "--output=\(output)"] + arguments, in: dir)
        XCTAssertEqual(ours.status, 0, ours.stderr)
        func shape(_ text: String) -> [String] {
          text.split(separator: "\n").map { line in String(line.prefix(while: { $0 != ":" })) }
        }
        XCTAssertEqual(shape(ours.stdout), shape(theirs.stdout), "\(arguments) \(output):\n\(ours.stdout)\n\(theirs.stdout)")
      }
    }
    let json = try XCTUnwrap(try parseJSON(try lacuna(["measure", "--output=json", "-O", "qcow2", source], in: dir).stdout) as? [String: Any])
    XCTAssertEqual(Set(json.keys), ["bitmaps", "required", "fully-allocated"])
  }

  /// A multi-file VMDK's descriptor records names made from the output's: --name makes
  /// the count exact for any name. A stream source (a file, or standard input) is measured
  /// as convert reads it, from start to end.
  func testNamesAndStreamSources() throws {
    let source = try makeChain()
    let name = "a-much-longer-name-than-disk.vmdk"
    let options = ["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"]
    let named = try measured(options + ["--name", name, source])
    let unnamed = try measured(options + [source])
    let out = path("named")
    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
    XCTAssertEqual(try lacuna(["convert"] + options + [source, out + "/" + name], in: dir).status, 0)
    XCTAssertEqual(named.required, try Self.lengthOfFiles(in: out))
    XCTAssertGreaterThan(named.required, unnamed.required)

    XCTAssertEqual(try lacuna(["convert", "-O", "stream", source, "disk.stream"], in: dir).status, 0)
    let fromStream = try measured(["-O", "qcow2", "disk.stream"])
    let real = try convertedLength([], source: "disk.stream", format: "qcow2", name: "stream")
    XCTAssertEqual(fromStream.required, real)
    let piped = try runProgram(
      "/bin/sh", ["-c", "\(try lacunaBinary()) measure --output=json -O qcow2 - < disk.stream"], in: dir)
    XCTAssertEqual(piped.status, 0, piped.stderr)
    XCTAssertTrue(piped.stdout.contains("\"required\": \(real)"), piped.stdout)
  }

  func testErrors() throws {
    let source = try makeChain()
    // The last field: qemu-img refuses the same input (it exits 1 for every failure).
    let cases: [(arguments: [String], status: Int32, message: String, qemuFails: Bool)] = [
      ([], 2, "Either --size N or one filename", true),
      (["--size", "1G", source], 2, "cannot be used together", true),
      (["--size", "1x"], 2, "Invalid image size", true),
      (["-O", "nonsense", "--size", "1G"], 2, "nonsense", true),
      (["-O", "qcow2", "-o", "bogus=1", "--size", "1G"], 2, "bogus", true),
      (["-O", "qcow2", "missing.qcow2"], 1, "missing.qcow2", true),
      (["-O", "qcow2", "-o", "backing_file=top.qcow2", "--size", "1G"], 2, "backing", false),
      (["-O", "raw", "-c", source], 2, "compress", false),
    ]
    for test in cases {
      let outcome = try lacuna(["measure"] + test.arguments, in: dir)
      XCTAssertEqual(outcome.status, test.status, "\(test.arguments): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains(test.message), "\(test.arguments): \(outcome.stderr)")
      XCTAssertEqual(outcome.stdout, "", "\(test.arguments)")
      if test.qemuFails {
        let theirs = try runProgram(qemu, ["measure"] + test.arguments, in: dir)
        XCTAssertNotEqual(theirs.status, 0, "qemu-img \(test.arguments)")
      }
    }
  }
}

private func ftruncate_path(_ path: String, _ size: Int64) -> Int32 {
  FileManager.default.createFile(atPath: path, contents: nil)
  return truncate(path, off_t(size))
}

/// `lacuna measure`'s fully allocated sizes and `--size`, against convert of random data,
/// convert of an empty disk, and qemu-img.
final class MeasureSizeTests: QemuTestCase {
  typealias Sizes = MeasureTests.Sizes

  func measured(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> Sizes {
    try MeasureTests.measured(arguments, in: dir, file: file, line: line)
  }

  func qemuMeasured(_ arguments: [String]) throws -> Sizes? {
    try MeasureTests.qemuMeasured(arguments, qemu: qemu, in: dir)
  }

  func convertedLength(_ arguments: [String], source: String, format: String, name: String) throws -> Int64 {
    try MeasureTests.convertedLength(arguments, source: source, format: format, name: name, in: dir)
  }

  /// fully-allocated is the length of the output of a disk of incompressible data: the
  /// same whether measured with --size or from such a disk, and what convert writes of it.
  func testFullyAllocatedIsTheLengthOfAnAllDataDisk() throws {
    let size = 2 << 20 + 12288  // not a multiple of any cluster, block or grain size
    // Random bytes: no codec shrinks them, so compressed output is as long as plain.
    var generator = SystemRandomNumberGenerator()
    let random = (0..<size / 8).map { _ in generator.next() as UInt64 }
    try random.withUnsafeBytes { try Data($0).write(to: dir.appendingPathComponent("full.raw")) }
    // A fixed VHD of a size asked for exactly (force_size) must be whole MiB (Azure's rule).
    for (index, set) in MeasureTests.optionSets.enumerated() where !set.options.contains("subformat=fixed,force_size=on") {
      let bySize = try measured(["-O", set.format] + set.options + ["--size", "\(size)"])
      let bySource = try measured(["-O", set.format, "-f", "raw"] + set.options + ["full.raw"])
      let real = try convertedLength(["-f", "raw"] + set.options, source: "full.raw", format: set.format, name: "\(index)")
      XCTAssertEqual(bySize.fullyAllocated, real, "\(set): fully-allocated against convert of random data")
      XCTAssertEqual(bySource.fullyAllocated, real, "\(set)")
      XCTAssertEqual(bySource.required, real, "\(set): required of an all-data disk")
    }
  }

  /// The writers that say their fully allocated length from their options (qcow2, VDI,
  /// stream, VMDK but streamOptimized) against convert of random data at sizes on and beside their boundaries.
  func testFullyAllocatedLengthsAtBoundaries() throws {
    let cases: [(arguments: [String], sizes: [Int])] = [
      (["-O", "qcow2", "-o", "cluster_size=512"], [0, 1, 512, 513, 32769, 65536 + 512]),
      (["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"], [262144, 262145]),
      (["-O", "vdi"], [0, 1, 1 << 20, (1 << 20) + 1]),
      (["-O", "stream"], [0, 1, 4 << 20, (4 << 20) + 1]),
      (["-O", "vmdk"], [1, 65536, 65537, (32 << 20) + 512]),
      (["-O", "vmdk", "-o", "subformat=monolithicFlat"], [1, 513]),
      (["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], [1, 65537]),
      (["-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"], [1, 513]),  // VMDK refuses an empty disk
    ]
    var generator = SystemRandomNumberGenerator()
    for test in cases {
      for size in test.sizes {
        // No byte is zero: a last partial cluster of one zero byte would not be data.
        let random = (0..<(size + 7) / 8).map { _ in generator.next() as UInt64 | 0x0101_0101_0101_0101 }
        try random.withUnsafeBytes { try Data($0.prefix(size)).write(to: dir.appendingPathComponent("r.raw")) }
        let ours = try measured(test.arguments + ["--size", "\(size)"])
        let real = try convertedLength(
          ["-f", "raw"] + test.arguments.dropFirst(2), source: "r.raw", format: test.arguments[1], name: "b")
        XCTAssertEqual(ours.fullyAllocated, real, "\(test.arguments) size \(size)")
      }
    }
  }

  /// --size measures an empty disk: what convert writes from a sparse source of that size.
  func testSizeMeasuresAnEmptyDisk() throws {
    let size: Int64 = 40 << 20
    XCTAssertEqual(ftruncate_path(path("empty.raw"), size), 0)
    for (index, set) in MeasureTests.optionSets.enumerated() {
      let ours = try measured(["-O", set.format] + set.options + ["--size", "40M"])
      let real = try convertedLength(["-f", "raw"] + set.options, source: "empty.raw", format: set.format, name: "\(index)")
      XCTAssertEqual(ours.required, real, "\(set)")
    }
    // qemu-img's fully-allocated is exact for qcow2 and raw; ours must agree.
    for arguments in [["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"], ["-O", "raw"], ["-O", "qcow2", "-o", "cluster_size=2M"]] {
      let ours = try measured(arguments + ["--size", "5G"])
      let theirs = try XCTUnwrap(try qemuMeasured(arguments + ["--size", "5G"]))
      XCTAssertEqual(ours.fullyAllocated, theirs.fullyAllocated, "\(arguments)")
      print("measure \(arguments) --size 5G: ours \(ours), qemu-img \(theirs)")
    }
  }

  /// A disk of 16 TiB is measured quickly and without memory growing with it . These writers say their
  /// fully allocated length from their options; VHDX is run over the whole disk, block by
  /// block (2 s in a release build, more here), and VDI's writer makes a 64 MiB block map
  /// for an empty disk of 16 TiB (seconds in a debug build): neither is timed here.
  func testLargeSizeStaysSmall() throws {
    // VMDK holds at most 2 TiB.
    for arguments in [
      ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=2M"], ["-O", "raw"], ["-O", "stream"],
      ["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "--size", "2T"],
    ] {
      let started = Date()
      let sized = arguments.contains("--size") ? arguments : arguments + ["--size", "16T"]
      let (outcome, peak) = try lacunaMeasuringMemory(["measure"] + sized)
      let seconds = Date().timeIntervalSince(started)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      XCTAssertLessThan(peak, 200 << 10, "\(arguments): peak \(peak) KiB")
      XCTAssertLessThan(seconds, 20, "\(arguments)")
      let theirs = try runProgram(qemu, ["measure"] + sized)
      if theirs.status == 0 {
        XCTAssertEqual(
          outcome.stdout.split(separator: "\n").last, theirs.stdout.split(separator: "\n").last, "\(arguments)")
      }
      print("measure \(sized): \(outcome.stdout.split(separator: "\n")) peak \(peak) KiB, \(seconds) s; qemu-img: \(theirs.stdout.split(separator: "\n"))")
    }
  }
}

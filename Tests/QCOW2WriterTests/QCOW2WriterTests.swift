import Convert
import DiskImage
import Foundation
import Raw
import XCTest

@testable import QCOW2

final class QCOW2WriterTests: WriterTestCase {
  func testDefaultOutputIsCleanSameAndSparse() throws {
    let source = try mixedSource()
    let output = path("out.qcow2")
    try convert(source, to: output)
    try assertClean(output)
    try assertSameContent(source, output)
    try assertAllocation(output, source: source, clusterSize: 65536)
    let info = try qemuImg(["info", output]).output
    XCTAssertTrue(info.contains("compat: 1.1"), info)
    XCTAssertTrue(info.contains("cluster_size: 65536"), info)
    XCTAssertTrue(info.contains("refcount bits: 16"), info)
    // The zero parts of partly written clusters are holes: the file takes less room than
    // its data clusters would if they were filled.
    let dataClusters = try nonZeroClusters(of: source, clusterSize: 65536).count
    XCTAssertLessThan(try allocatedSize(output), Int64(dataClusters) * 65536)
  }

  func testEveryClusterSize() throws {
    let source = try mixedSource()
    for size in ["512", "4k", "65536", "2M"] {
      let output = path("out-\(size).qcow2")
      try convert(source, to: output, options: WriterOptions(options: ["cluster_size": size]))
      try assertClean(output)
      try assertSameContent(source, output)
      let bytes = Int(try XCTUnwrap(parseByteSize(size)))
      try assertAllocation(output, source: source, clusterSize: bytes)
    }
  }

  func testCompatV2() throws {
    let source = try mixedSource()
    let output = path("v2.qcow2")
    try convert(source, to: output, options: WriterOptions(options: ["compat": "0.10"]))
    try assertClean(output)
    try assertSameContent(source, output)
    try assertAllocation(output, source: source, clusterSize: 65536)
    XCTAssertTrue(try qemuImg(["info", output]).output.contains("compat: 0.10"))
  }

  func testRefcountWidths() throws {
    let source = try mixedSource()
    for bits in ["1", "8", "64"] {
      let output = path("refcount-\(bits).qcow2")
      try convert(source, to: output, options: WriterOptions(options: ["refcount_bits": bits, "cluster_size": "4k"]))
      try assertClean(output)
      try assertSameContent(source, output)
      XCTAssertTrue(try qemuImg(["info", output]).output.contains("refcount bits: \(bits)"))
    }
  }

  func testCompressedZlibAndZstd() throws {
    let source = try mixedSource()
    for type in ["zlib", "zstd"] {
      for clusterSize in ["512", "65536"] {
        let output = path("c-\(type)-\(clusterSize).qcow2")
        try convert(
          source, to: output,
          options: WriterOptions(options: ["compression_type": type, "cluster_size": clusterSize], compress: true),
          threads: 4)
        try assertClean(output)
        try assertSameContent(source, output)
        let info = try qemuImg(["info", output]).output
        XCTAssertTrue(info.contains("compression type: \(type)"), info)
        try assertAllocation(
          output, source: source, clusterSize: Int(parseByteSize(clusterSize)!))
      }
    }
  }

  func testCompressedWithNarrowRefcountsStaysConsistent() throws {
    // 1-bit refcounts: no two compressed clusters may share a host cluster.
    let source = try mixedSource()
    let output = path("c-rc1.qcow2")
    try convert(
      source, to: output,
      options: WriterOptions(options: ["refcount_bits": "1", "cluster_size": "4k"], compress: true))
    try assertClean(output)
    try assertSameContent(source, output)
  }

  func testCompressedV2() throws {
    let source = try mixedSource()
    let output = path("c-v2.qcow2")
    try convert(source, to: output, options: WriterOptions(options: ["compat": "0.10"], compress: true))
    try assertClean(output)
    try assertSameContent(source, output)
  }

  func testThreadCountDoesNotChangeTheBytes() throws {
    let source = try mixedSource()
    for (name, options) in [
      ("plain", WriterOptions()),
      ("zlib", WriterOptions(compress: true)),
      ("zstd-4k", WriterOptions(options: ["compression_type": "zstd", "cluster_size": "4k"], compress: true)),
    ] {
      let one = path("\(name)-1.qcow2")
      let eight = path("\(name)-8.qcow2")
      try convert(source, to: one, options: options, threads: 1)
      try convert(source, to: eight, options: options, threads: 8)
      let a = try Data(contentsOf: URL(fileURLWithPath: one))
      let b = try Data(contentsOf: URL(fileURLWithPath: eight))
      XCTAssertEqual(a.count, b.count, name)
      XCTAssertTrue(a == b, "\(name): 1 and 8 threads wrote different files")
    }
  }

  func testHugeVirtualDiskWithLittleDataIsFastAndSmall() throws {
    // ext4 caps a file at 16 TiB less a block; the source is as large as it allows.
    let size: Int64 = (16 << 40) - 65536
    let source = try makeSource(
      "huge.raw", size: size,
      pieces: [
        (0, .random(1 << 20)),
        (5 << 40 + 777, .text(1 << 20)),
        (size - (1 << 20), .random(1 << 20)),
      ])
    let output = path("huge.qcow2")
    let started = Date()
    try convert(source, to: output)
    let elapsed = Date().timeIntervalSince(started)
    print("16 TiB disk, 3 MiB of data: converted in \(elapsed) s, file \(try fileSize(output)) bytes")
    XCTAssertLessThan(elapsed, 2, "16 TiB with 3 MiB of data took \(elapsed) s")
    XCTAssertLessThan(try fileSize(output), 8 << 20)
    try assertClean(output)
    let info = try qemuImg(["info", "--output=json", output]).output
    XCTAssertTrue(info.contains("\"virtual-size\": \(size)"), info)
    try assertSameContent(source, output)
  }

  func testBackingRecordedAndZeroClusters() throws {
    let qemuIO = try tool("qemu-io")
    let base = try mixedSource("base.raw", size: 4 << 20)
    let overlay = path("overlay.qcow2")
    var result = try qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay])
    XCTAssertEqual(result.status, 0, result.output)
    result = try run(
      qemuIO,
      [
        "-f", "qcow2",
        "-c", "write -P 0x22 65536 131072",
        "-c", "write -z 1048576 1048576",  // zeros over the base's data: must stay zeros
        "-c", "write -P 0x33 3145728 4096",
        overlay,
      ])
    XCTAssertEqual(result.status, 0, result.output)

    // The overlay alone, its backing left to the output's own backing file.
    let top = try QCOW2.format.open(ImageFile.openForReading(overlay))
    let chain = Chain(layers: [top, try Raw.format.open(ImageFile.openForReading(base))])
    for compat in ["1.1", "0.10"] {
      let output = path("out-\(compat).qcow2")
      try convert(
        chain, to: output,
        options: WriterOptions(options: ["compat": compat], backing: BackingReference(name: base, format: "raw")),
        stopDepth: 1)
      try assertClean(output)
      try assertSameContent(overlay, output, formats: ("qcow2", "qcow2"))
      let info = try qemuImg(["info", output]).output
      XCTAssertTrue(info.contains("backing file: \(base)"), info)
      XCTAssertTrue(info.contains("backing file format: raw"), info)
      // Nothing of the base was copied: only the overlay's own clusters are in the output.
      let entries = try map(output)
      let ours = entries.filter { $0.depth == 0 }
      let ownData = ours.filter(\.data).reduce(Int64(0)) { $0 + $1.length }
      XCTAssertEqual(ownData, compat == "1.1" ? 131072 + 65536 : 131072 + 65536 + 1048576)
      let zeros = ours.filter { $0.zero && !$0.data }.reduce(Int64(0)) { $0 + $1.length }
      if compat == "1.1" { XCTAssertEqual(zeros, 1048576) }
    }
  }

  func testBackingWithoutFormatAndCompression() throws {
    let base = try mixedSource("base.raw", size: 2 << 20)
    let source = try mixedSource("top.raw", size: 2 << 20)
    let output = path("c-backed.qcow2")
    // A full copy that still names a backing file (no format recorded).
    try convert(source, to: output, options: WriterOptions(backing: BackingReference(name: base, format: nil), compress: true))
    let info = try qemuImg(["info", output]).output
    XCTAssertTrue(info.contains("backing file: \(base)"), info)
    XCTAssertFalse(info.contains("backing file format"), info)
    let (status, check) = try qemuImg(["check", "-o", "backing.driver=raw", output])
    _ = status
    XCTAssertFalse(check.contains("ERROR"), check)
  }

  func testEmptyAndTinyDisks() throws {
    for size: Int64 in [0, 1, 511, 65537] {
      let source = try makeSource("s\(size).raw", size: size, pieces: size > 0 ? [(size - 1, .random(1))] : [])
      let output = path("s\(size).qcow2")
      try convert(source, to: output)
      try assertClean(output)
      try assertSameContent(source, output)
    }
  }

  func testPreallocationMetadata() throws {
    let source = try mixedSource()
    let output = path("prealloc.qcow2")
    try convert(source, to: output, options: WriterOptions(options: ["preallocation": "metadata"]))
    try assertClean(output)
    try assertSameContent(source, output)
    // Every cluster is allocated, yet the file stays sparse.
    XCTAssertTrue(try map(output).allSatisfy { $0.offset != nil || $0.data })
    XCTAssertLessThan(try allocatedSize(output), 8 << 20)
  }

  func testOptionsAreCheckedAndUnknownOnesRefused() throws {
    let destination = path("refused.qcow2")
    let refused: [WriterOptions] = [
      WriterOptions(options: ["bogus": "1"]),
      WriterOptions(options: ["compat": "2.0"]),
      WriterOptions(options: ["cluster_size": "3000"]),
      WriterOptions(options: ["cluster_size": "256"]),
      WriterOptions(options: ["cluster_size": "4M"]),
      WriterOptions(options: ["refcount_bits": "12"]),
      WriterOptions(options: ["refcount_bits": "8", "compat": "0.10"]),
      WriterOptions(options: ["compression_type": "zstd", "compat": "0.10"]),
      WriterOptions(options: ["compression_type": "lz4"]),
      WriterOptions(options: ["preallocation": "full"]),
      WriterOptions(options: ["preallocation": "metadata"], compress: true),
      WriterOptions(options: ["lazy_refcounts": "on"]),
      WriterOptions(options: ["cluster_size": "512"], backing: BackingReference(name: String(repeating: "b", count: 600), format: "raw")),
    ]
    for options in refused {
      let output = try OutputFile(creatingBeside: destination)
      defer { output.abandon() }
      XCTAssertThrowsError(try QCOW2Writer.create(target: output, virtualSize: 1 << 30, options: options)) { error in
        guard case ImageError.usage = error else { return XCTFail("\(options.options): \(error)") }
      }
    }
    // A 16 TiB disk with 512-byte clusters needs a 4 GiB L1 table: refused, as qemu does.
    let output = try OutputFile(creatingBeside: destination)
    defer { output.abandon() }
    XCTAssertThrowsError(
      try QCOW2Writer.create(target: output, virtualSize: 16 << 40, options: WriterOptions(options: ["cluster_size": "512"])))
    XCTAssertFalse(FileManager.default.fileExists(atPath: destination))
  }

  func testSettingsAcceptQemuSpellings() throws {
    let settings = try QCOW2Writer.Settings(
      WriterOptions(options: ["compat": "v3", "cluster_size": "2M", "refcount_bits": "32", "compression_type": "zstd"]),
      path: "x")
    XCTAssertEqual(settings.clusterBits, 21)
    XCTAssertEqual(settings.refcountOrder, 5)
    XCTAssertEqual(settings.compressionType, .zstd)
    XCTAssertEqual(parseByteSize("64k"), 65536)
    XCTAssertEqual(parseByteSize("512"), 512)
    XCTAssertNil(parseByteSize("k"))
    XCTAssertNil(parseByteSize("-1"))
  }

  func testRefcountStructuresCountThemselves() {
    // 64 KiB clusters, 16-bit refcounts: one block counts 32768 clusters.
    var layout = QCOW2Writer.MetadataLayout.compute(base: 32765, l1Entries: 1, clusterSize: 65536, refcountBits: 16)
    XCTAssertEqual(layout.totalClusters, 32768)
    XCTAssertEqual(layout.refcountBlocks, 1)
    // One cluster more and the block must count a second block.
    layout = QCOW2Writer.MetadataLayout.compute(base: 32766, l1Entries: 1, clusterSize: 65536, refcountBits: 16)
    XCTAssertEqual(layout.refcountBlocks, 2)
    XCTAssertEqual(layout.totalClusters, 32770)
    // 64-bit refcounts: 8192 a block; 32767 + b clusters need b = 5.
    layout = QCOW2Writer.MetadataLayout.compute(base: 32765, l1Entries: 1, clusterSize: 65536, refcountBits: 64)
    XCTAssertEqual(layout.refcountBlocks, 5)
    // 512-byte clusters, 64-bit refcounts: 64 entries a block, 64 blocks a table cluster.
    layout = QCOW2Writer.MetadataLayout.compute(base: 10_000, l1Entries: 100, clusterSize: 512, refcountBits: 64)
    let covered = layout.refcountBlocks * 64
    XCTAssertGreaterThanOrEqual(covered, layout.totalClusters)
    XCTAssertLessThan(covered - 64, layout.totalClusters)
    XCTAssertGreaterThanOrEqual(layout.refcountTableClusters * 64, layout.refcountBlocks)
  }

  func testRefcountPacking() {
    var block = QCOW2Writer.refcountBlockOfOnes(clusterSize: 512, refcountBits: 2)
    QCOW2Writer.storeRefcount(3, entry: 5, bits: 2, in: &block)
    XCTAssertEqual(block[1], 0b0101_1101)
    block = QCOW2Writer.refcountBlockOfOnes(clusterSize: 512, refcountBits: 16)
    XCTAssertEqual(Array(block.prefix(4)), [0, 1, 0, 1])
    QCOW2Writer.storeRefcount(0x1234, entry: 1, bits: 16, in: &block)
    XCTAssertEqual(Array(block.prefix(4)), [0, 1, 0x12, 0x34])
  }
}

final class QCOW2WriterEdgeTests: WriterTestCase {
  /// A write that comes back to an L2 table already written out (the engine never does
  /// this with its unit sizes, but the writer must stay right if it does).
  func testTableWrittenOutEarlyIsReadBackAndRewritten() throws {
    let destination = path("reload.qcow2")
    let output = try OutputFile(creatingBeside: destination)
    let size: Int64 = 256 << 20
    let writer = try QCOW2Writer.create(target: output, virtualSize: size, options: WriterOptions(options: ["cluster_size": "4k"]))
    let a = [UInt8](repeating: 0xaa, count: 4096)
    let b = [UInt8](repeating: 0xbb, count: 1000)
    let c = [UInt8](repeating: 0xcc, count: 4096)
    try a.withUnsafeBytes { try writer.write($0, at: 0) }
    try c.withUnsafeBytes { try writer.write($0, at: 200 << 20) }  // table 0 is written out here
    try b.withUnsafeBytes { try writer.write($0, at: 8192 + 17) }  // and read back here
    try writer.finish()
    try assertClean(destination)
    let qemuIO = try tool("qemu-io")
    let result = try run(
      qemuIO,
      [
        "-f", "qcow2", "-c", "read -P 0xaa 0 4096", "-c", "read -P 0 4096 4113", "-c", "read -P 0xbb 8209 1000",
        "-c", "read -P 0xcc 209715200 4096", destination,
      ])
    XCTAssertEqual(result.status, 0, result.output)
    XCTAssertFalse(result.output.contains("Pattern verification failed"), result.output)
  }

  /// The header is written last: until `finish()`, the temporary file holds data and tables
  /// but no qcow2 magic, so a crash mid-way leaves nothing any tool would open as an image.
  func testHeaderIsWrittenLast() throws {
    let destination = path("order.qcow2")
    let output = try OutputFile(creatingBeside: destination)
    let writer = try QCOW2Writer.create(
      target: output, virtualSize: 64 << 20, options: WriterOptions(options: ["cluster_size": "4k"]))
    let data = [UInt8](repeating: 0x5a, count: 8192)
    try data.withUnsafeBytes { try writer.write($0, at: 0) }
    try data.withUnsafeBytes { try writer.write($0, at: 40 << 20) }  // the first L2 table goes out early
    let before = try ImageFile.openForReading(output.temporaryPath)
    XCTAssertGreaterThan(try before.size(), 8192, "data is already in the file")
    var head = [UInt8](repeating: 0xff, count: 4)
    _ = try head.withUnsafeMutableBytes { try before.read(into: $0, at: 0) }
    XCTAssertEqual(head, [0, 0, 0, 0], "no magic before finish()")
    try writer.finish()
    let after = try ImageFile.openForReading(destination)
    _ = try head.withUnsafeMutableBytes { try after.read(into: $0, at: 0) }
    XCTAssertEqual(head, [0x51, 0x46, 0x49, 0xfb])
    try assertClean(destination)
  }

  /// lacuna's own reader reads back what the writer wrote, compressed or not.
  func testOwnReaderReadsItBack() throws {
    let source = try mixedSource()
    let expected = try [UInt8](Data(contentsOf: URL(fileURLWithPath: source)))
    for (name, options) in [
      ("plain", WriterOptions(options: ["cluster_size": "4k"])),
      ("zstd", WriterOptions(options: ["compression_type": "zstd"], compress: true)),
      ("zlib-v2", WriterOptions(options: ["compat": "0.10", "cluster_size": "512"], compress: true)),
    ] {
      let output = path("\(name).qcow2")
      try convert(source, to: output, options: options)
      let reader = try QCOW2.format.open(ImageFile.openForReading(output))
      XCTAssertEqual(reader.virtualSize, (Int64(expected.count) + 511) / 512 * 512, name)
      var actual = [UInt8](repeating: 0xee, count: expected.count)
      try actual.withUnsafeMutableBytes { try reader.read(into: $0, at: 0) }
      XCTAssertTrue(actual == expected, "\(name): read back differs")
    }
  }

  /// `-c` output within 2% of qemu-img's for the same 64 MiB mixed disk.
  func testCompressedSizeComparableToQemu() throws {
    var pieces: [(Int64, Piece)] = []
    var generator = SplitMix64(state: 7)
    var offset: Int64 = 0
    let size: Int64 = 64 << 20
    while offset < size {
      let length = Int64(4096 + Int(generator.next() % (512 << 10)))
      let piece: Piece
      switch generator.next() % 5 {
      case 0: piece = .random(Int(length))
      case 1, 2: piece = .text(Int(length))
      case 3: piece = .zeros(Int(length))
      default: piece = .text(0)  // a hole
      }
      pieces.append((offset + Int64(generator.next() % 512), piece))
      offset += length + 512
    }
    let source = try makeSource("mixed64.raw", size: size, pieces: pieces, seed: 9)
    for type in ["zlib", "zstd"] {
      let ours = path("ours-\(type).qcow2")
      let theirs = path("qemu-\(type).qcow2")
      try convert(source, to: ours, options: WriterOptions(options: ["compression_type": type], compress: true), threads: 4)
      let result = try qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=\(type)", source, theirs])
      XCTAssertEqual(result.status, 0, result.output)
      try assertClean(ours)
      try assertSameContent(source, ours)
      let (oursSize, qemuSize) = (try fileSize(ours), try fileSize(theirs))
      let (oursDisk, qemuDisk) = (try allocatedSize(ours), try allocatedSize(theirs))
      print("compressed \(type): lacuna \(oursSize) bytes (\(oursDisk) on disk), qemu-img \(qemuSize) bytes (\(qemuDisk) on disk)")
      XCTAssertLessThanOrEqual(Double(oursSize), Double(qemuSize) * 1.02, type)
    }
  }
}

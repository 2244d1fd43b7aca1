import Convert
import DiskImage
import Foundation
import QCOW2
import Raw
import Stream
import TestSupport
import XCTest

/// Every reader, on images qemu-img and qemu-io make, held to the one contract
/// (`assertReaderConforms`), with qemu-img's map of the layer alone and its content as the
/// truth. A new format adds its images here and gets the same checks.
final class ReaderConformanceTests: QemuTestCase {
  /// qemu-img's account of the image at `path` alone: its map (depth 0 data and zeros;
  /// what this layer does not hold, `present: false` or answered by a deeper layer, is
  /// `unallocated`) and its flattened content. `size` clips both: qemu-img rounds a raw
  /// file's size up to 512 bytes, lacuna keeps it exact.
  func truth(_ path: String, format: String, size: Int64? = nil) throws -> LayerTruth {
    let json = try qemuImgOK("map", "--output=json", "-f", format, path)
    guard let entries = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] else {
      throw XCTSkip("qemu-img map printed no JSON list")
    }
    var map: [Extent] = []
    for entry in entries {
      let start = (entry["start"] as! NSNumber).int64Value
      let length = (entry["length"] as! NSNumber).int64Value
      let depth = (entry["depth"] as! NSNumber).intValue
      let data = entry["data"] as! Bool
      let present = entry["present"] as! Bool
      let range = start..<min(start + length, size ?? Int64.max)
      guard !range.isEmpty else { continue }
      map.append(Extent(range, depth > 0 || !present ? .unallocated : data ? .data : .zero))
    }
    let flat = self.path("truth-\(UUID().uuidString).raw")
    try qemuImgOK("convert", "-f", format, "-O", "raw", path, flat)
    defer { try? FileManager.default.removeItem(atPath: flat) }
    var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: flat)))
    if let size { bytes.removeLast(bytes.count - Int(size)) }
    return LayerTruth(map: map, bytes: bytes)
  }

  func open(_ path: String, _ format: ImageFormat) throws -> ImageReader {
    try format.open(ImageFile.openForReading(path))
  }

  func check(
    _ name: String, format: ImageFormat, size: Int64? = nil, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let image = path(name)
    try assertReaderConforms(
      try open(image, format), truth: try truth(image, format: format.name, size: size), name, file: file, line: line)
  }

  /// Data at odd offsets, a run of written zeros, holes.
  func makeRaw(_ name: String, size: Int64 = 16 << 20) throws {
    try qemuImgOK("create", "-f", "raw", path(name), "\(size)")
    try qemuIO(
      path(name), "write -P 0x5a 0 4096", "write -P 0x17 1048576 3000000", "write -P 0 \(size / 2) 65536",
      "write -P 0xee \(size - 512) 512")
  }

  func testRaw() throws {
    try makeRaw("sparse.img")
    try check("sparse.img", format: Raw.format)
  }

  /// A size that is not a multiple of 512, data in its last partial sector.
  func testRawOfAnOddSize() throws {
    let size: Int64 = (5 << 20) + 777
    try makeRaw("odd.img", size: 5 << 20)
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path("odd.img")))
    try handle.truncate(atOffset: UInt64(size))
    try handle.seek(toOffset: UInt64(size) - 300)
    try handle.write(contentsOf: Data(repeating: 0x3c, count: 300))
    try handle.close()
    try check("odd.img", format: Raw.format, size: size)
  }

  func makeQcow2(_ name: String, options: String, size: String = "24M") throws {
    try qemuImgOK("create", "-f", "qcow2", "-o", options, path(name), size)
    try qemuIO(
      path(name), "write -P 0x11 0 1M", "write -P 0x22 1536k 100k", "write -z 4M 1M", "write -P 0x33 8M 64k",
      "write -P 0 9M 128k", "discard 8M 64k", "write -P 0x44 20M 4k", "write -P 0x55 23M 1M")
  }

  /// Versions 3 and 2, the smallest useful and the largest cluster size.
  func testQcow2VersionsAndClusterSizes() throws {
    for (name, options) in [
      ("v3.qcow2", "compat=1.1"), ("v2.qcow2", "compat=0.10"), ("small.qcow2", "cluster_size=4096"),
      ("large.qcow2", "cluster_size=2M"),
    ] {
      try makeQcow2(name, options: options)
      try check(name, format: QCOW2.format)
    }
  }

  func testQcow2ExtendedL2() throws {
    try makeQcow2("ext.qcow2", options: "extended_l2=on,cluster_size=128k")
    try check("ext.qcow2", format: QCOW2.format)
  }

  func testQcow2Compressed() throws {
    try makeRaw("plain.img")
    for type in ["zlib", "zstd"] {
      try qemuImgOK("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", path("plain.img"), path("\(type).qcow2"))
      try check("\(type).qcow2", format: QCOW2.format)
    }
  }

  /// The overlay alone: what it leaves to its backing file is `unallocated`, and reads as zeros.
  func testQcow2OverlayAlone() throws {
    try makeQcow2("base.qcow2", options: "compat=1.1")
    try qemuImgOK("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path("top.qcow2"))
    try qemuIO(path("top.qcow2"), "write -P 0x66 512k 1M", "write -z 20M 64k", "write -P 0x77 12M 8k")
    try check("top.qcow2", format: QCOW2.format)
  }

  /// The stream, a sequential reader: pieces in order, within the limits asked, the bytes
  /// of the disk it was made from.
  func testStream() throws {
    try makeRaw("disk.img")
    let source = try Resolver(registry: FormatRegistry(formats: [], fallback: Raw.format)).openChain(path("disk.img"), format: "raw")
    let output = try OutputFile(creatingBeside: path("disk.stream"))
    let writer = try SparseStreamWriter(output: output, virtualSize: source.virtualSize, options: WriterOptions())
    try Converter(chain: source, writer: writer).run()
    let file = try ImageFile.openForReading(path("disk.stream"))
    let reader = try StreamReceiver(input: SequentialInput(source: file))
    try assertSequentialReaderConforms(reader, truth: [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("disk.img")))))
  }
}

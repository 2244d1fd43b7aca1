import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// qemu-img's account of a VDI (it reads dynamic and fixed images with 1 MiB blocks), in
/// the shapes our reader answers in.
enum VDIJudge {
  /// Runs a qemu tool; returns its standard output, fails the test on a non-zero exit.
  @discardableResult
  static func run(_ tool: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> Data {
    Data(try QemuTools.run(tool, arguments, file: file, line: line).utf8)
  }

  /// The virtual disk as `qemu-img convert -O raw` writes it.
  static func rawContent(of path: String, in directory: URL) throws -> [UInt8] {
    try QemuTools.rawContent(of: path, format: "vdi", in: directory)
  }

  /// `qemu-img map --output=json` as extents with host offsets. qemu also asks the host file
  /// system and calls a data block over a hole `"zero": true, "data": true`; we answer for
  /// the format only, so those count as data.
  static func map(of path: String) throws -> [Extent] {
    let json = try JSONSerialization.jsonObject(with: run("qemu-img", ["map", "-f", "vdi", "--output=json", path]))
    var result: [Extent] = []
    for entry in json as! [[String: Any]] {
      let start = (entry["start"] as! NSNumber).int64Value
      let length = (entry["length"] as! NSNumber).int64Value
      let kind: ExtentKind =
        !(entry["present"] as! Bool) ? .unallocated : (entry["data"] as! Bool) ? .data : .zero
      let offset = kind == .data ? (entry["offset"] as? NSNumber)?.int64Value : nil
      result.appendMerging(Extent(start..<start + length, kind, hostOffset: offset))
    }
    return result
  }

  /// `qemu-img info --output=json`, parsed.
  static func info(of path: String) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: run("qemu-img", ["info", "--output=json", path])) as! [String: Any]
  }
}

/// Opens a VDI as a trusted image: a differencing one finds its parent around it.
func openVDI(_ path: String) throws -> ImageReader {
  try VDIReader(source: ImageFile.openForReading(path))
}

/// Every extent of the disk, merged.
func wholeMap(_ reader: ImageReader) throws -> [Extent] {
  try reader.allExtents(in: 0..<reader.virtualSize)
}

/// A VDI written out field by field, as qemu-img writes one (text, version 1.1, header size
/// 0x180, map at 0x200, data after it), for tests that change one field.
struct HandMadeVDI {
  var bytes: [UInt8]

  /// - Parameters:
  ///   - blockSize: bytes per block.
  ///   - map: the block map entries (0xffffffff free, 0xfffffffe zero, else a data block).
  ///   - blocks: the data blocks' contents, in allocation order (each `blockSize` bytes).
  init(
    type: UInt32 = 1, diskSize: Int64? = nil, blockSize: Int = 4096, map: [UInt32], blocks: [[UInt8]] = []
  ) {
    let mapBytes = (map.count * 4 + 511) / 512 * 512
    let dataOffset = 0x200 + mapBytes
    bytes = [UInt8](repeating: 0, count: dataOffset + blocks.count * blockSize)
    let text = Array("<<< QEMU VM Virtual Disk Image >>>\n".utf8)
    bytes.replaceSubrange(0..<text.count, with: text)
    set(UInt32(0xBEDA_107F), at: 0x40)  // signature
    set(UInt32(0x0001_0001), at: 0x44)  // version 1.1
    set(UInt32(0x180), at: 0x48)  // header size
    set(type, at: 0x4C)  // image type
    set(UInt32(0x200), at: 0x154)  // block map offset
    set(UInt32(dataOffset), at: 0x158)  // data offset
    set(UInt32(512), at: 0x168)  // sector size
    set(UInt64(diskSize ?? Int64(map.count * blockSize)), at: 0x170)  // disk size
    set(UInt32(blockSize), at: 0x178)  // block size
    set(UInt32(map.count), at: 0x180)  // blocks
    set(UInt32(blocks.count), at: 0x184)  // blocks allocated
    for i in 0..<16 { bytes[0x188 + i] = UInt8(i + 1) }  // image UUID
    for i in 0..<16 { bytes[0x198 + i] = UInt8(i + 0x21) }  // modification UUID
    for (i, entry) in map.enumerated() { set(entry, at: 0x200 + 4 * i) }
    for (i, block) in blocks.enumerated() {
      bytes.replaceSubrange(dataOffset + i * blockSize..<dataOffset + i * blockSize + block.count, with: block)
    }
  }

  mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    for i in 0..<MemoryLayout<T>.size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
  }

  func source(_ name: String = "hand.vdi") -> MemorySource { MemorySource(name: name, bytes: bytes) }

  func write(to path: String) throws { try Data(bytes).write(to: URL(fileURLWithPath: path)) }
}

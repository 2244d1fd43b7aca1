import DiskImage
import Foundation

/// Builds VHD files byte by byte, field by field, so tests can make images qemu-img cannot
/// (differencing disks, partial sector bitmaps) and damage one field at a time.
struct VHDBuilder {
  enum DiskType: UInt32 { case fixed = 2, dynamic = 3, differencing = 4 }

  var diskType: DiskType = .dynamic
  /// The footer's current size; with creator `win ` it is the virtual size.
  var size: Int64 = 4 << 20
  var creator = "win "
  var cylinders: UInt16 = 0
  var heads: UInt8 = 0
  var sectorsPerTrack: UInt8 = 0
  var blockSize: UInt32 = 1 << 20
  /// Entries in the BAT; nil: exactly enough for the size.
  var maxTableEntries: UInt32?
  /// Allocated blocks: index, bitmap (nil: all ones) and the data bytes of the block.
  var blocks: [(index: Int, bitmap: [UInt8]?, data: [UInt8])] = []
  /// Parent locators: platform code and text (UTF-16LE for W2ru/W2ku, UTF-8 for MacX).
  var locators: [(code: String, text: String)] = []
  var parentName = ""
  /// The parent's unique id recorded in the dynamic header (bytes 40-55); a pattern when nil.
  var parentUniqueID: [UInt8]?

  var entries: Int { Int(maxTableEntries ?? UInt32((size + Int64(blockSize) - 1) / Int64(blockSize))) }
  var bitmapSize: Int { ((Int(blockSize) / 512 + 7) / 8 + 511) / 512 * 512 }
  static let headerOffset = 512
  static let tableOffset = 1536
  var tableBytes: Int { (entries * 4 + 511) / 512 * 512 }

  /// The 512-byte footer, checksum filled in.
  func footer(dataOffset: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 512)
    bytes.replaceSubrange(0..<8, with: Array("conectix".utf8))
    BigEndianWriter.store(UInt32(2), at: 8, in: &bytes)  // features: reserved bit
    BigEndianWriter.store(UInt32(0x0001_0000), at: 12, in: &bytes)  // format version
    BigEndianWriter.store(dataOffset, at: 16, in: &bytes)
    bytes.replaceSubrange(28..<32, with: Array(creator.utf8.prefix(4)))
    BigEndianWriter.store(UInt32(0x000a_0000), at: 32, in: &bytes)  // creator version
    bytes.replaceSubrange(36..<40, with: Array("Wi2k".utf8))
    BigEndianWriter.store(UInt64(size), at: 40, in: &bytes)  // original size
    BigEndianWriter.store(UInt64(size), at: 48, in: &bytes)  // current size
    BigEndianWriter.store(cylinders, at: 56, in: &bytes)
    bytes[58] = heads
    bytes[59] = sectorsPerTrack
    BigEndianWriter.store(diskType.rawValue, at: 60, in: &bytes)
    for index in 68..<84 { bytes[index] = UInt8(index) }  // unique id
    Self.fillChecksum(&bytes, at: 64)
    return bytes
  }

  static func fillChecksum(_ bytes: inout [UInt8], at offset: Int) {
    BigEndianWriter.store(UInt32(0), at: offset, in: &bytes)
    let sum = bytes.reduce(UInt32(0)) { $0 &+ UInt32($1) }
    BigEndianWriter.store(~sum, at: offset, in: &bytes)
  }

  /// The whole file.
  func build() -> [UInt8] {
    if diskType == .fixed {
      return [UInt8](repeating: 0x5a, count: Int(size)) + footer(dataOffset: UInt64.max)
    }
    var file = footer(dataOffset: UInt64(Self.headerOffset))
    var header = [UInt8](repeating: 0, count: 1024)
    header.replaceSubrange(0..<8, with: Array("cxsparse".utf8))
    BigEndianWriter.store(UInt64.max, at: 8, in: &header)  // data offset: unused
    BigEndianWriter.store(UInt64(Self.tableOffset), at: 16, in: &header)
    BigEndianWriter.store(UInt32(0x0001_0000), at: 24, in: &header)  // header version
    BigEndianWriter.store(UInt32(entries), at: 28, in: &header)
    BigEndianWriter.store(blockSize, at: 32, in: &header)
    header.replaceSubrange(40..<56, with: parentUniqueID ?? (40..<56).map { UInt8($0) })  // parent unique id
    for (index, unit) in parentName.utf16.prefix(256).enumerated() {
      BigEndianWriter.store(unit, at: 64 + 2 * index, in: &header)
    }
    var table = [UInt8](repeating: 0xff, count: tableBytes)
    var tail: [UInt8] = []
    var next = Self.tableOffset + tableBytes
    for block in blocks {
      BigEndianWriter.store(UInt32(next / 512), at: block.index * 4, in: &table)
      tail += block.bitmap ?? [UInt8](repeating: 0xff, count: bitmapSize)
      tail += block.data + [UInt8](repeating: 0, count: Int(blockSize) - block.data.count)
      next += bitmapSize + Int(blockSize)
    }
    for (index, locator) in locators.enumerated() {
      let data: [UInt8] =
        locator.code == "MacX"
        ? Array(locator.text.utf8) : locator.text.utf16.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }
      let padded = data + [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
      let base = 576 + 24 * index
      header.replaceSubrange(base..<base + 4, with: Array(locator.code.utf8))
      BigEndianWriter.store(UInt32(padded.count), at: base + 4, in: &header)
      BigEndianWriter.store(UInt32(data.count), at: base + 8, in: &header)
      BigEndianWriter.store(UInt64(next), at: base + 16, in: &header)
      tail += padded
      next += padded.count
    }
    Self.fillChecksum(&header, at: 36)
    file += header + table + tail + footer(dataOffset: UInt64(Self.headerOffset))
    return file
  }
}

/// Writes `bytes` to `path`.
func write(_ bytes: [UInt8], to path: String) throws {
  try Data(bytes).write(to: URL(fileURLWithPath: path))
}

import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// qemu-img as the judge of what a VMDK holds: its map, its content and its info.
enum QemuJudge {
  /// Runs a qemu tool; returns its standard output, fails the test on a non-zero exit.
  @discardableResult
  static func run(_ tool: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
    try QemuTools.run(tool, arguments, file: file, line: line)
  }

  /// The virtual disk as qemu-img reads it.
  static func rawContent(of path: String, in directory: URL) throws -> [UInt8] {
    try QemuTools.rawContent(of: path, format: "vmdk", in: directory)
  }

  typealias MapEntry = QemuMapEntry

  /// qemu-img's map, with data over host-file holes counted as data: qemu also asks the
  /// file system, we answer for the format only. `holesAsZero`: for flat extents, which
  /// answer from their file's holes as a raw file does, a hole qemu calls data and zero
  /// ("data": true, "zero": true) is counted as zero.
  static func map(of path: String, holesAsZero: Bool = false) throws -> [MapEntry] {
    let text = try run("qemu-img", ["map", "-f", "vmdk", "--output=json", path])
    var result: [MapEntry] = []
    for var entry in try QemuTools.mapEntries(text) {
      if holesAsZero, entry.data, entry.zero { entry.data = false }
      if entry.data { entry.zero = false }
      if var last = result.last, last.present == entry.present, last.zero == entry.zero, last.data == entry.data,
        last.start + last.length == entry.start,
        (last.offset == nil && entry.offset == nil) || (last.offset.map { $0 + last.length } == entry.offset)
      {
        last.length += entry.length
        result[result.count - 1] = last
      } else {
        result.append(entry)
      }
    }
    return result
  }

  /// The same map as `LayerTruth` for `assertReaderConforms`.
  static func truth(of path: String, in directory: URL) throws -> LayerTruth {
    let map = try map(of: path).map { entry in
      Extent(
        entry.start..<entry.start + entry.length, entry.data ? .data : entry.present ? .zero : .unallocated,
        hostOffset: entry.offset)
    }
    return LayerTruth(map: map, bytes: try rawContent(of: path, in: directory))
  }
}

/// Our extents in the shape of qemu-img map's JSON entries.
func mapEntries(_ extents: [Extent]) -> [QemuJudge.MapEntry] {
  extents.map { extent in
    QemuJudge.MapEntry(
      start: extent.range.lowerBound, length: extent.length, present: extent.kind != .unallocated,
      zero: extent.kind != .data, data: extent.kind == .data, offset: extent.hostOffset)
  }
}

func openVMDK(_ path: String) throws -> ImageReader {
  try VMDK.format.open(ImageFile.openForReading(path))
}

/// Compares the whole disk, read by `reader` in pieces, with the raw file at `rawPath`
/// (qemu-img's conversion), without holding either in memory.
func assertSameContent(
  _ reader: ImageReader, rawPath: String, _ label: String, file: StaticString = #filePath, line: UInt = #line
) throws {
  let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: rawPath))
  defer { try? handle.close() }
  let rawSize = try handle.seekToEnd()
  try handle.seek(toOffset: 0)
  XCTAssertEqual(UInt64(reader.virtualSize), rawSize, "\(label): virtual size", file: file, line: line)
  let chunk = 4 << 20
  var buffer = [UInt8](repeating: 0, count: chunk)
  var offset: Int64 = 0
  while offset < reader.virtualSize {
    let count = Int(min(Int64(chunk), reader.virtualSize - offset))
    try buffer.withUnsafeMutableBytes {
      try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset)
    }
    let expected = try handle.read(upToCount: count) ?? Data()
    let same =
      expected.count == count
      && expected.withUnsafeBytes { want in buffer.withUnsafeBytes { memcmp(want.baseAddress!, $0.baseAddress!, count) == 0 } }
    guard same else {
      return XCTFail("\(label): bytes differ from qemu-img's in \(offset)..<\(offset + Int64(count))", file: file, line: line)
    }
    offset += Int64(count)
  }
}

/// A VMDK sparse file in memory whose little-endian fields a test changes before writing it
/// out. Offsets follow the sparse extent header (README.md in Formats/VMDK).
struct PatchableVMDK {
  var bytes: [UInt8]

  init(path: String) throws { bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

  func uint32(at offset: Int) -> UInt32 {
    bytes[offset..<offset + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) }
  }

  func uint64(at offset: Int) -> UInt64 {
    bytes[offset..<offset + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
  }

  mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    let width = MemoryLayout<T>.size
    if offset + width > bytes.count { bytes += [UInt8](repeating: 0, count: offset + width - bytes.count) }
    for index in 0..<width { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
  }

  var capacity: UInt64 { uint64(at: 12) }
  var grainSectors: Int { Int(uint64(at: 20)) }
  var gdOffset: Int { Int(uint64(at: 56)) * 512 }

  /// Where the grain-table entry of the grain holding `virtualOffset` sits in the file.
  func tableEntryOffset(virtualOffset: Int) -> Int {
    let grainBytes = grainSectors * 512
    let grain = virtualOffset / grainBytes
    let table = Int(uint32(at: gdOffset + 4 * (grain / 512)))
    precondition(table != 0, "no grain table there")
    return table * 512 + 4 * (grain % 512)
  }

  func tableEntry(virtualOffset: Int) -> UInt32 { uint32(at: tableEntryOffset(virtualOffset: virtualOffset)) }

  mutating func setTableEntry(virtualOffset: Int, _ value: UInt32) {
    set(value, at: tableEntryOffset(virtualOffset: virtualOffset))
  }

  /// Replaces the embedded descriptor's text (NUL padded to its reserved sectors).
  mutating func setDescriptor(_ text: String) {
    let start = Int(uint64(at: 28)) * 512
    let length = Int(uint64(at: 36)) * 512
    var data = [UInt8](text.utf8)
    precondition(data.count <= length)
    data += [UInt8](repeating: 0, count: length - data.count)
    bytes.replaceSubrange(start..<start + length, with: data)
  }

  var descriptorText: String {
    let start = Int(uint64(at: 28)) * 512
    let length = Int(uint64(at: 36)) * 512
    return String(decoding: bytes[start..<start + length].prefix { $0 != 0 }, as: UTF8.self)
  }

  /// Appends `data` at the next sector boundary; returns its sector.
  mutating func append(_ data: [UInt8]) -> Int {
    bytes += [UInt8](repeating: 0, count: (512 - bytes.count % 512) % 512)
    let sector = bytes.count / 512
    bytes += data
    bytes += [UInt8](repeating: 0, count: (512 - bytes.count % 512) % 512)
    return sector
  }

  func write(to path: String) throws { try Data(bytes).write(to: URL(fileURLWithPath: path)) }
}

extension QemuTestCase {
  /// Runs qemu-io on `image` opened as `format` (never probed: a raw image probed would
  /// refuse writes to its first sector) and insists the commands succeed.
  func qemuIO(format: String, _ image: String, _ commands: [String], file: StaticString = #filePath, line: UInt = #line)
    throws
  {
    let arguments = ["-f", format] + commands.flatMap { ["-c", $0] } + [image]
    let outcome = try runProgram(try requireProgram("qemu-io"), arguments, in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr, file: file, line: line)
    XCTAssertFalse(outcome.stdout.contains("error"), outcome.stdout, file: file, line: line)
  }
}

/// Opens extent files beside the descriptor, as the Resolver does for trusted images (its
/// refusals are tested through the binary): enough to read a descriptor's disk in a test.
struct BesideTheDescriptor: CompanionOpener {
  func openCompanion(_ name: String, heldBy referrer: ByteSource, what: String) throws -> ByteSource {
    let directory = URL(fileURLWithPath: referrer.name).deletingLastPathComponent()
    return try ImageFile.openForReading(name.hasPrefix("/") ? name : directory.appendingPathComponent(name).path)
  }

  func checkMaySearch(heldBy referrer: ByteSource, for what: String) throws {}
}

/// Opens a VMDK of any kind, its extent files beside it.
func openVMDKWithExtents(_ path: String) throws -> ImageReader {
  try VMDK.format.open(ImageFile.openForReading(path), companions: BesideTheDescriptor())
}

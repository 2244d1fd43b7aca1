import DiskImage
import Foundation
import QCOW2
import TestSupport
import XCTest

/// Runs qemu-img and qemu-io, the judges of what an image holds. Tests that need them skip
/// with a message when they are not installed.
enum Qemu {
  static func require(_ name: String = "qemu-img") throws -> String {
    if which(name) == nil { print("skipping: \(name) is not installed") }
    return try requireProgram(name)
  }

  /// Runs a qemu tool; returns its standard output, fails the test on a non-zero exit.
  @discardableResult
  static func run(_ tool: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> Data {
    Data(try QemuTools.run(tool, arguments, file: file, line: line).utf8)
  }

  /// A qemu image spec that opens `path` as qcow2 without its backing file, so qemu
  /// answers for this layer alone, as our reader does.
  static func layerOnly(_ path: String) -> String {
    let absolute = URL(fileURLWithPath: path).path
    return #"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"\#(absolute)"}}"#
  }

  /// The virtual disk of one layer as qemu-img reads it (unallocated reads as zeros).
  static func rawContent(of path: String, in directory: URL) throws -> [UInt8] {
    try QemuTools.rawContent(of: layerOnly(path), format: nil, in: directory)
  }

  typealias MapEntry = QemuMapEntry

  /// qemu-img's map of one layer, with data over host-file holes counted as data (below).
  /// qemu-img map also asks the host file system: a data cluster whose host bytes are a hole
  /// is `"zero": true, "data": true`, as the reader answers it (`isHostHole`).
  static func map(of path: String) throws -> [MapEntry] {
    try QemuTools.mapEntries(String(decoding: try run("qemu-img", ["map", "--output=json", layerOnly(path)]), as: UTF8.self))
  }

  /// `qemu-img info --output=json`, parsed, and the raw text (for key order).
  static func info(of path: String) throws -> (object: [String: Any], text: String) {
    let data = try run("qemu-img", ["info", "--output=json", path])
    return (try JSONSerialization.jsonObject(with: data) as! [String: Any], String(decoding: data, as: UTF8.self))
  }
}

/// Our extents in the shape of qemu-img map's JSON entries.
func mapEntries(_ extents: [Extent]) -> [Qemu.MapEntry] {
  extents.map { extent in
    Qemu.MapEntry(
      start: extent.range.lowerBound, length: extent.length, present: extent.kind != .unallocated,
      zero: extent.kind != .data, data: extent.kind == .data || extent.isHostHole, offset: extent.hostOffset)
  }
}

func openQCOW2(_ path: String) throws -> ImageReader {
  try QCOW2.format.open(ImageFile.openForReading(path))
}


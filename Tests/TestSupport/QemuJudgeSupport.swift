import Foundation
import XCTest

/// One entry of `qemu-img map --output=json`.
public struct QemuMapEntry: Equatable, CustomStringConvertible {
  public var start: Int64
  public var length: Int64
  public var present: Bool
  public var zero: Bool
  public var data: Bool
  public var offset: Int64?

  public init(start: Int64, length: Int64, present: Bool, zero: Bool, data: Bool, offset: Int64?) {
    self.start = start
    self.length = length
    self.present = present
    self.zero = zero
    self.data = data
    self.offset = offset
  }

  public var description: String {
    "{\(start)+\(length) present=\(present) zero=\(zero) data=\(data)" + (offset.map { " offset=\($0)" } ?? "") + "}"
  }
}

/// qemu-img and qemu-io run as the judges of what an image holds, for the format tests.
public enum QemuTools {
  /// Runs a qemu tool; returns its standard output, fails the test on a non-zero exit.
  @discardableResult
  public static func run(
    _ tool: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line
  ) throws -> String {
    let outcome = try runProgram(try requireProgram(tool), arguments)
    guard outcome.status == 0 else {
      XCTFail("\(tool) \(arguments.joined(separator: " ")) failed: \(outcome.stderr)", file: file, line: line)
      throw CocoaError(.fileReadUnknown)
    }
    return outcome.stdout
  }

  /// The virtual disk of `image` (a path or a json: spec) as `qemu-img convert -O raw`
  /// writes it, read with `format` when given.
  public static func rawContent(of image: String, format: String?, in directory: URL) throws -> [UInt8] {
    let output = directory.appendingPathComponent(UUID().uuidString + ".raw").path
    try run("qemu-img", ["convert"] + (format.map { ["-f", $0] } ?? []) + ["-O", "raw", image, output])
    defer { try? FileManager.default.removeItem(atPath: output) }
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
  }

  /// The entries of `qemu-img map --output=json` text.
  public static func mapEntries(_ json: String) throws -> [QemuMapEntry] {
    let objects = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]])
    return objects.map { object in
      QemuMapEntry(
        start: (object["start"] as! NSNumber).int64Value, length: (object["length"] as! NSNumber).int64Value,
        present: object["present"] as! Bool, zero: object["zero"] as! Bool, data: object["data"] as! Bool,
        offset: (object["offset"] as? NSNumber)?.int64Value)
    }
  }
}

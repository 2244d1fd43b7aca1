import DiskImage
import Foundation
import XCTest

/// Reads the whole virtual disk in pieces of `chunk` bytes (0xEE where a read left a gap).
public func readAll(_ reader: ImageReader, chunk: Int = 1 << 20) throws -> [UInt8] {
  var bytes = [UInt8](repeating: 0xEE, count: Int(reader.virtualSize))
  var offset = 0
  while offset < bytes.count {
    let count = min(chunk, bytes.count - offset)
    try bytes.withUnsafeMutableBytes { buffer in
      try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<offset + count]), at: Int64(offset))
    }
    offset += count
  }
  return bytes
}

/// Asserts `body` throws an ImageError whose one-line description contains `expected`;
/// returns that description (nil when there was none) for further checks.
@discardableResult
public func assertImageError(
  _ expected: String, file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void
) -> String? {
  do {
    try body()
    XCTFail("expected an error containing '\(expected)', got none", file: file, line: line)
  } catch let error as ImageError {
    let text = error.description
    XCTAssertFalse(text.contains("\n"), "multi-line message: \(text)", file: file, line: line)
    XCTAssertTrue(text.contains(expected), "'\(text)' does not contain '\(expected)'", file: file, line: line)
    return text
  } catch {
    XCTFail("expected ImageError, got \(type(of: error)): \(error)", file: file, line: line)
  }
  return nil
}

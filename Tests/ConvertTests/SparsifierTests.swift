import DiskImage
import Foundation
import QCOW2
import Raw
import TestSupport
import XCTest

@testable import Convert

/// `Sparsifier` directly: holes punched over zero blocks in place, content and size kept,
/// images of other formats never opened for writing.
final class SparsifierTests: XCTestCase {
  let registry = FormatRegistry(formats: [QCOW2.format], fallback: Raw.format)

  func allocated(_ path: String) throws -> Int64 {
    try ImageFile.openForReading(path).allocatedSize() ?? 0
  }

  func testZeroBlocksBecomeHolesAndTheContentStays() throws {
    let dir = try temporaryDirectory(self)
    let path = dir.appendingPathComponent("disk.img").path
    // 8 MiB written in full: 1 MiB of data, 3 MiB of zeros, 1 MiB of data, 3 MiB of zeros,
    // and an odd size with a zero tail.
    var bytes = [UInt8](repeating: 0, count: (8 << 20) + 100)
    for index in 0..<(1 << 20) { bytes[index] = UInt8(truncatingIfNeeded: index % 253 + 1) }
    for index in (4 << 20)..<(5 << 20) { bytes[index] = 0x42 }
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    let before = try allocated(path)
    XCTAssertGreaterThanOrEqual(before, 8 << 20)

    let sparsifier = try Sparsifier.open(path, format: nil, blockSize: 4096, registry: registry)
    let statistics = try sparsifier.run()
    try sparsifier.file.closeChecked()
    XCTAssertEqual(statistics.bytesScanned, Int64(bytes.count))
    XCTAssertEqual(statistics.holesPunched, 2)
    XCTAssertEqual(statistics.bytesPunched, Int64(6 << 20) + 100)
    XCTAssertEqual(statistics.allocatedBefore, before)
    XCTAssertLessThanOrEqual(try allocated(path), (2 << 20) + 8192)
    XCTAssertEqual([UInt8](try Data(contentsOf: URL(fileURLWithPath: path))), bytes)

    // A second run finds nothing left to punch and reads only the data extents.
    let again = try Sparsifier.open(path, format: "raw", blockSize: 4096, registry: registry).run()
    XCTAssertEqual(again.holesPunched, 0)
    XCTAssertLessThanOrEqual(again.bytesScanned, (2 << 20) + 8192)
  }

  func testAnImageOfAnotherFormatIsRefusedUnopenedForWriting() throws {
    let dir = try temporaryDirectory(self)
    let path = dir.appendingPathComponent("disk.qcow2").path
    var header = QCOW2.magic + [UInt8](repeating: 0, count: 508)
    header[7] = 3
    try Data(header).write(to: URL(fileURLWithPath: path))
    let original = try Data(contentsOf: URL(fileURLWithPath: path))
    XCTAssertThrowsError(try Sparsifier.open(path, format: nil, blockSize: 4096, registry: registry)) { error in
      XCTAssertTrue("\(error)".contains("is a qcow2 image"), "\(error)")
      XCTAssertTrue("\(error)".contains("lacuna convert -O qcow2"), "\(error)")
    }
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), original)
    XCTAssertThrowsError(try Sparsifier.open(dir.path, format: nil, blockSize: 4096, registry: registry))
  }
}

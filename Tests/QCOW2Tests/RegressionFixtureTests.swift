import DiskImage
import Foundation
import TestSupport
import XCTest

/// Inputs that once crashed the reader (found by script/fuzz, or made by hand beside such a
/// finding), kept in Fixtures/regressions/: each must now open and read, or be refused with
/// a one-line ImageError naming the file. The end-to-end twin is
/// Tests/LacunaTests/HostileRegressionTests.swift.
final class RegressionFixtureTests: XCTestCase {
  func testEveryRegressionFixtureOpensOrIsRefused() throws {
    let directory = fixturesDirectory.appendingPathComponent("regressions")
    let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
      .filter { $0.hasSuffix(".qcow2") }.sorted()
    XCTAssertFalse(names.isEmpty, "no regression fixtures found in \(directory.path)")
    for name in names {
      let path = directory.appendingPathComponent(name).path
      do {
        let reader = try openQCOW2(path)
        // The same walk as the fuzz target: the map and the data of the first 64 MiB.
        let end = min(reader.virtualSize, 64 << 20)
        let extents = try reader.allExtents(in: 0..<end)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        for extent in extents where extent.kind == .data {
          var offset = extent.range.lowerBound
          while offset < extent.range.upperBound {
            let count = Int(min(Int64(buffer.count), extent.range.upperBound - offset))
            try buffer.withUnsafeMutableBytes {
              try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset)
            }
            offset += Int64(count)
          }
        }
        print("regression \(name): opens, \(extents.count) extents")
      } catch let error as ImageError {
        XCTAssertFalse(error.description.contains("\n"), "\(name): \(error)")
        XCTAssertTrue(error.description.hasPrefix(path + ": "), "\(name): \(error)")
        print("regression \(name): refused: \(error)")
      }
    }
  }
}

import DiskImage
import Foundation
import TestSupport
import XCTest

/// Real images with a few bytes changed at random (a fixed seed, so failures repeat): the
/// reader must answer or throw a one-line ImageError, never trap or hang.
final class MutationTests: XCTestCase {
  private struct XorShift {
    var state: UInt64
    mutating func next() -> UInt64 {
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return state
    }
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
  }

  func testRandomByteChangesNeverCrash() throws {
    let directory = try temporaryDirectory(self)
    var random = XorShift(state: 0x2545_F491_4F6C_DD1D)
    var opened = 0
    var refused = 0
    for name in [
      "v2.qcow2", "cluster-512.qcow2", "zero-clusters.qcow2", "compressed-zlib.qcow2", "compressed-zstd.qcow2",
      "extended-l2.qcow2", "snapshot.qcow2", "chain-top.qcow2", "bitmap.qcow2",
    ] {
      let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fixturePath(name))))
      for round in 0..<80 {
        var bytes = original
        // Mostly the metadata near the start (header, tables), sometimes anywhere.
        let span = round % 4 == 0 ? bytes.count : min(bytes.count, 8192)
        for _ in 0...random.below(4) {
          let index = random.below(span)
          bytes[index] = round % 3 == 0 ? UInt8(truncatingIfNeeded: random.next()) : bytes[index] ^ (1 << UInt8(random.below(8)))
        }
        if round % 10 == 9 { bytes.removeLast(random.below(bytes.count)) }
        let path = directory.appendingPathComponent("\(name)-\(round)").path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        do {
          let reader = try openQCOW2(path)
          // A changed size can make a disk too large to read whole; map it, read a little.
          _ = try reader.allExtents(in: 0..<reader.virtualSize)
          var buffer = [UInt8](repeating: 0, count: Int(min(reader.virtualSize, 1 << 20)))
          try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 0) }
          opened += 1
        } catch let error as ImageError {
          XCTAssertFalse(error.description.contains("\n"), error.description)
          refused += 1
        }
        try FileManager.default.removeItem(atPath: path)
      }
    }
    print("mutation test: \(opened) images read, \(refused) refused")
    XCTAssertGreaterThan(refused, 0)
  }
}

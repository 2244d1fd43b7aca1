import DiskImage
import Foundation
import QCOW2
import TestSupport
import XCTest

/// Every qcow2 fixture, read by us and by qemu-img, byte for byte and extent for extent.
final class FixtureTests: XCTestCase {
  static let qcow2Fixtures = [
    "v2.qcow2", "v3-64k.qcow2", "cluster-512.qcow2", "zero-clusters.qcow2", "compressed-zlib.qcow2",
    "compressed-zstd.qcow2", "convert-c.qcow2", "extended-l2.qcow2", "lazy-refcounts.qcow2", "dirty.qcow2",
    "snapshot.qcow2", "chain-base.qcow2", "chain-top.qcow2", "raw-backed.qcow2", "short-base.qcow2",
    "short-backed.qcow2", "bitmap.qcow2",
  ]

  func testContentMatchesQemu() throws {
    let directory = try temporaryDirectory(self)
    for name in Self.qcow2Fixtures {
      let path = fixturePath(name)
      let expected = try Qemu.rawContent(of: path, in: directory)
      let reader = try openQCOW2(path)
      XCTAssertEqual(reader.virtualSize, Int64(expected.count), name)
      // Whole-MiB pieces, and odd pieces that start and end inside clusters and subclusters.
      XCTAssertTrue(try readAll(reader) == expected, "\(name): content differs from qemu-img")
      XCTAssertTrue(try readAll(reader, chunk: 3000) == expected, "\(name): content differs in 3000-byte reads")
    }
  }

  func testExtentsMatchQemuMap() throws {
    for name in Self.qcow2Fixtures {
      let path = fixturePath(name)
      let reader = try openQCOW2(path)
      let ours = mapEntries(try reader.allExtents(in: 0..<reader.virtualSize))
      let theirs = try Qemu.map(of: path)
      XCTAssertEqual(ours, theirs, "\(name)\nours:   \(ours)\nqemu:   \(theirs)")
    }
  }

  func testExtentsAnswerForAnyStartingPoint() throws {
    let reader = try openQCOW2(fixturePath("extended-l2.qcow2"))
    let whole = try reader.allExtents(in: 0..<reader.virtualSize)
    for start in stride(from: Int64(0), to: reader.virtualSize, by: 1500) {
      let answer = try reader.extents(in: start..<reader.virtualSize)
      XCTAssertEqual(answer.first?.range.lowerBound, start)
      let covering = try XCTUnwrap(whole.first { $0.range.contains(start) })
      XCTAssertEqual(answer.first?.kind, covering.kind, "at \(start)")
    }
  }

  func testInfoMatchesQemu() throws {
    for name in Self.qcow2Fixtures {
      let path = fixturePath(name)
      let reader = try openQCOW2(path)
      let (info, text) = try Qemu.info(of: path)
      XCTAssertEqual(reader.formatName, "qcow2")
      XCTAssertEqual(Int64(reader.clusterSize ?? 0), (info["cluster-size"] as! NSNumber).int64Value, name)
      XCTAssertEqual(reader.isDirty, info["dirty-flag"] as? Bool ?? false, name)
      XCTAssertEqual(reader.backing?.name, info["backing-filename"] as? String, name)
      XCTAssertEqual(reader.backing?.format, info["backing-filename-format"] as? String, name)
      let specific = (info["format-specific"] as! [String: Any])["data"] as! [String: Any]
      XCTAssertEqual(reader.formatSpecific.map(\.0), dataKeysInOrder(text), "\(name): keys or their order")
      for (key, value) in reader.formatSpecific {
        XCTAssertTrue(matches(value, specific[key]), "\(name): \(key) is \(value), qemu says \(String(describing: specific[key]))")
      }
    }
  }

  func testBackingReferencesAreRecordedAsWritten() throws {
    XCTAssertEqual(try openQCOW2(fixturePath("chain-top.qcow2")).backing, BackingReference(name: "chain-base.qcow2", format: "qcow2"))
    XCTAssertEqual(try openQCOW2(fixturePath("raw-backed.qcow2")).backing, BackingReference(name: "raw-sparse.img", format: "raw"))
    XCTAssertNil(try openQCOW2(fixturePath("v3-64k.qcow2")).backing)
  }

  func testDirtyAndCleanImages() throws {
    XCTAssertTrue(try openQCOW2(fixturePath("dirty.qcow2")).isDirty)
    XCTAssertFalse(try openQCOW2(fixturePath("lazy-refcounts.qcow2")).isDirty)
    XCTAssertEqual(try openQCOW2(fixturePath("dirty.qcow2")).warnings, [])
  }

  func testProbeAndRawIsNotClaimed() throws {
    let qcow2Header = try ImageFile.openForReading(fixturePath("v2.qcow2")).readBytes(count: 4, at: 0, what: "magic")
    XCTAssertTrue(QCOW2.format.probe(qcow2Header))
    let rawHeader = try ImageFile.openForReading(fixturePath("raw-sparse.img")).readBytes(count: 4, at: 0, what: "magic")
    XCTAssertFalse(QCOW2.format.probe(rawHeader))
    assertImageError("not a qcow2 image") { _ = try openQCOW2(fixturePath("raw-sparse.img")) }
  }

  func testConcurrentReadsAgree() throws {
    for name in ["compressed-zstd.qcow2", "compressed-zlib.qcow2", "extended-l2.qcow2", "cluster-512.qcow2"] {
      let reader = try openQCOW2(fixturePath(name))
      let expected = try readAll(reader)
      let size = Int(reader.virtualSize)
      let failures = Counter()
      DispatchQueue.concurrentPerform(iterations: 8) { worker in
        var buffer = [UInt8](repeating: 0, count: 4096 + worker * 512)
        for round in 0..<40 {
          let offset = ((round * 7919 + worker * 104_729) * 512) % (size - buffer.count)
          do {
            try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: Int64(offset)) }
            if buffer[...] != expected[offset..<offset + buffer.count] { failures.add() }
            _ = try reader.extents(in: Int64(offset)..<reader.virtualSize)
          } catch {
            failures.add()
          }
        }
      }
      XCTAssertEqual(failures.value, 0, name)
    }
  }

  /// The keys of `format-specific.data` in the order qemu-img printed them.
  private func dataKeysInOrder(_ text: String) -> [String] {
    guard let data = text.range(of: "\"data\": {") else { return [] }
    var keys: [String] = []
    for line in text[data.upperBound...].split(separator: "\n") {
      if line.hasPrefix("        }") { break }
      // Keys of the data object sit at 12 spaces; deeper ones belong to nested values.
      if line.hasPrefix("            \""), !line.hasPrefix("             ") {
        let key = line.dropFirst(13).prefix { $0 != "\"" }
        keys.append(String(key))
      }
    }
    return keys
  }

  private func matches(_ value: InfoValue, _ json: Any?) -> Bool {
    switch value {
    case .string(let string): return json as? String == string
    case .integer(let integer): return (json as? NSNumber)?.int64Value == integer && !(json is Bool)
    case .bool(let bool): return json as? Bool == bool
    case .array(let values):
      guard let array = json as? [Any], array.count == values.count else { return false }
      return zip(values, array).allSatisfy { matches($0, $1) }
    case .object(let fields):
      guard let object = json as? [String: Any], object.count == fields.count else { return false }
      return fields.allSatisfy { matches($0.1, object[$0.0]) }
    }
  }
}

final class Counter: @unchecked Sendable {
  private let lock = NSLock()
  private var count = 0
  func add() { lock.lock(); count += 1; lock.unlock() }
  var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}

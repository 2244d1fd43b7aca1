import Convert
import DiskImage
import Foundation
import Raw
import TestSupport
import XCTest

@testable import Stream

#if canImport(Glibc)
  import Glibc
#endif

/// Writer → bytes → receiver, in process, and hand-made streams the receiver must refuse.
final class StreamReceiverTests: XCTestCase {
  var directory: URL!

  override func setUpWithError() throws {
    directory = try temporaryDirectory(self)
  }

  /// Drives a SparseStreamWriter with `calls` and returns the stream's bytes.
  func makeStream(size: Int64, _ calls: [(Range<Int64>, [UInt8]?)]) throws -> [UInt8] {
    let path = directory.appendingPathComponent("s.stream").path
    let output = try OutputFile(creatingBeside: path)
    let writer = try SparseStreamWriter(output: output, virtualSize: size, options: WriterOptions())
    for (range, data) in calls {
      if let data { try data.withUnsafeBytes { try writer.write($0, at: range.lowerBound) } } else {
        try writer.writeZeroes(range)
      }
    }
    try writer.finish()
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
  }

  /// Feeds `stream` from a file to a receiver, through the engine, into a RecordingWriter.
  func receive(_ stream: [UInt8], sparseSize: Int = 4096, granularity: Int = 1) throws -> RecordingWriter {
    let path = directory.appendingPathComponent("in.stream").path
    try Data(stream).write(to: URL(fileURLWithPath: path))
    let file = try ImageFile.openForReading(path)
    defer { file.close() }
    let receiver = try StreamReceiver(input: SequentialInput(descriptor: file.descriptor, name: "in.stream"))
    let writer = RecordingWriter(size: Int(receiver.virtualSize), granularity: granularity)
    var options = ConvertOptions()
    options.sparseSize = sparseSize
    options.unitSize = 64 << 10
    do {
      try Converter(input: .sequential(receiver), writer: writer, options: options).run()
    } catch {
      XCTAssertEqual(writer.calls.last, .abandon, "a failed receive abandons the writer")
      XCTAssertFalse(writer.calls.contains(.finish))
      throw error
    }
    return writer
  }

  func testWriterCoalescesAndTheRecordsSayWhatTheCallsSaid() throws {
    let a = patternBytes(5000, seed: 1)
    let b = patternBytes(3000, seed: 2)
    let stream = try makeStream(
      size: 20000, [(0..<5000, a), (5000..<8000, b), (8000..<9000, nil), (9000..<12000, nil), (12000..<20000, [UInt8](repeating: 0, count: 8000))])
    // Headers and payloads, byte by byte: magic, SIZE, one DATA of both writes, one ZERO of
    // both zero ranges, the zero-filled write as DATA, DONE.
    var expected = Array("LACUNA-STREAM 1\n".utf8)
    expected += Array("SIZE 00000000000000020000\n".utf8)
    expected += Array("DATA 00000000000000008000\n".utf8) + a + b
    expected += Array("ZERO 00000000000000004000\n".utf8)
    expected += Array("DATA 00000000000000008000\n".utf8) + [UInt8](repeating: 0, count: 8000)
    var checksum = DiskChecksum()
    (a + b + [UInt8](repeating: 0, count: 12000)).withUnsafeBytes { checksum.update($0) }
    expected += StreamRecord.done(checksum.value).encoded
    XCTAssertEqual(stream.count, expected.count)
    XCTAssertTrue(stream == expected)

    // The receiver drops the zero blocks the second DATA record carried (-S 4k, aligned to
    // the disk), and merges them with the ZERO record.
    let writer = try receive(stream)
    XCTAssertTrue(writer.bytes == a + b + [UInt8](repeating: 0, count: 12000))
    XCTAssertEqual(writer.calls, [.write(0..<8000, zero: false), .zeroes(8000..<20000), .finish])
  }

  func testLargeWritesSplitIntoRecordsOfAtMostFourMiB() throws {
    let size = 9 << 20 + 123
    let data = patternBytes(size, seed: 9)
    let stream = try makeStream(size: Int64(size), [(0..<Int64(size), data)])
    XCTAssertEqual(stream.count, 16 + 26 + 3 * 26 + size + 26)
    let writer = try receive(stream, sparseSize: 0)
    XCTAssertTrue(writer.bytes == data)
  }

  func testEmptyDisk() throws {
    let stream = try makeStream(size: 0, [])
    XCTAssertEqual(String(decoding: stream, as: UTF8.self), "LACUNA-STREAM 1\nSIZE 00000000000000000000\nDONE 00000000000000000000\n")
    XCTAssertEqual(try receive(stream).calls, [.finish])
  }

  func testHolesOverWholeUnitsPassStraightThrough() throws {
    let data = patternBytes(4096, seed: 4)
    let stream = try makeStream(size: 1 << 30, [(0..<(1 << 30) - 4096, nil), ((1 << 30) - 4096..<(1 << 30), data)])
    XCTAssertEqual(stream.count, 16 + 26 * 4 + 4096, "a 1 GiB hole is one 26-byte record")
    let writer = try receive(stream)
    XCTAssertEqual(
      writer.calls, [.zeroes(0..<(1 << 30) - 4096), .write((1 << 30) - 4096..<(1 << 30), zero: false), .finish])
  }

  // MARK: - Refusals. The valid stream below is written out field by field; each test
  // changes one thing.

  func validStream() -> [UInt8] {
    let payload = patternBytes(100, seed: 5)
    var checksum = DiskChecksum()
    checksum.updateZeros(50)
    payload.withUnsafeBytes { checksum.update($0) }
    checksum.updateZeros(10)
    var bytes: [UInt8] = []
    bytes += Array("LACUNA-STREAM 1\n".utf8)  // magic and version
    bytes += Array("SIZE 00000000000000000160\n".utf8)  // 160-byte disk
    bytes += Array("ZERO 00000000000000000050\n".utf8)  // 0..<50 zero
    bytes += Array("DATA 00000000000000000100\n".utf8) + payload  // 50..<150
    bytes += Array("ZERO 00000000000000000010\n".utf8)  // 150..<160 zero
    bytes += StreamRecord.done(checksum.value).encoded  // the CRC-32 of the 160 bytes
    return bytes
  }

  func assertRefused(_ stream: [UInt8], _ message: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertThrowsError(try receive(stream), file: file, line: line) { error in
      let text = String(describing: error)
      XCTAssertTrue(text.contains(message), "\(text) does not say \(message)", file: file, line: line)
      XCTAssertTrue(text.hasPrefix("in.stream: "), "names the input: \(text)", file: file, line: line)
    }
  }

  func testTheValidStreamIsAccepted() throws {
    let writer = try receive(validStream(), sparseSize: 0)
    XCTAssertTrue(Array(writer.bytes[50..<150]) == patternBytes(100, seed: 5))
  }

  func testACutStreamIsRefusedAtEveryLength() {
    let stream = validStream()
    for length in 0..<stream.count {
      XCTAssertThrowsError(try receive(Array(stream[0..<length])), "cut at \(length)") { error in
        XCTAssertTrue(
          String(describing: error).contains("cut short") || String(describing: error).contains("empty")
            || String(describing: error).contains("not a lacuna stream"), "\(error)")
      }
    }
  }

  func testDamageIsRefused() {
    var stream = validStream()
    stream[16 + 26 * 3 + 10] ^= 0x01  // a bit of the payload
    assertRefused(stream, "checksum mismatch")

    stream = validStream()
    stream[0] = UInt8(ascii: "X")
    assertRefused(stream, "not a lacuna stream")

    stream = validStream()
    stream[14] = UInt8(ascii: "2")
    assertRefused(stream, "stream version")

    stream = validStream()
    stream[16 + 26 + 3] = UInt8(ascii: "X")  // ZERO -> ZERX
    assertRefused(stream, "expected a record kind")

    stream = validStream()
    stream[16 + 26 + 10] = UInt8(ascii: " ")  // a digit becomes a space
    assertRefused(stream, "bad record header")

    stream = validStream()
    stream[16 + 24] = UInt8(ascii: "9")  // SIZE 169: the records end early
    assertRefused(stream, "DONE record at stream offset")

    stream = validStream()
    stream[16 + 26 + 24] = UInt8(ascii: "9")  // ZERO 59 then DATA 100 overruns 160
    assertRefused(stream, "run past the virtual size")

    stream = validStream()
    stream.replaceSubrange(42..<68, with: Array("ZERO 00000000000000000000\n".utf8))
    assertRefused(stream, "covers 0 bytes")

    stream = validStream()
    stream.replaceSubrange(16..<42, with: Array("DATA 00000000000000000160\n".utf8))
    assertRefused(stream, "the second line must be SIZE")

    assertRefused(validStream() + [0x0a], "bytes follow the DONE record")
  }
}

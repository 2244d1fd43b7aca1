import CZlib
import DiskImage
import XCTest

@testable import Stream

/// The record syntax and the checksum, without files.
final class StreamRecordTests: XCTestCase {
  func testRecordsEncodeAsFixedLines() {
    XCTAssertEqual(String(decoding: StreamRecord.data(65536).encoded, as: UTF8.self), "DATA 00000000000000065536\n")
    XCTAssertEqual(String(decoding: StreamRecord.zero(1).encoded, as: UTF8.self), "ZERO 00000000000000000001\n")
    XCTAssertEqual(String(decoding: StreamRecord.size(Int64.max).encoded, as: UTF8.self), "SIZE 09223372036854775807\n")
    XCTAssertEqual(String(decoding: StreamRecord.done(0xFFFF_FFFF).encoded, as: UTF8.self), "DONE 00000000004294967295\n")
    for record in [StreamRecord.size(0), .data(1), .zero(1 << 40), .done(12345)] {
      XCTAssertEqual(record.encoded.withUnsafeBytes { StreamRecord.decode($0) }, .success(record))
    }
  }

  func testDecodingIsStrict() {
    func decode(_ text: String) -> Result<StreamRecord, StreamRecord.DecodeFailure> {
      Array(text.utf8).withUnsafeBytes { StreamRecord.decode($0) }
    }
    XCTAssertEqual(decode("DATA 00000000000000000010\n"), .success(.data(10)))
    for bad in [
      "DATA 00000000000000000010\r",  // not a newline
      "DATA  0000000000000000010\n",  // a space among the digits
      "DATA +0000000000000000010\n",  // a sign
      "data 00000000000000000010\n",  // lower case kind
      "HOLE 00000000000000000010\n",  // unknown kind
      "DATA:00000000000000000010\n",  // not a space
      "DATA 0000000000000000001a\n",  // not a digit
      "DATA 99999999999999999999\n",  // over 2^63-1
      "DONE 00000000004294967296\n",  // over 2^32-1
    ] {
      guard case .failure = decode(bad) else { return XCTFail("accepted \(bad.debugDescription)") }
    }
    guard case .failure = Array("DATA 0000000000000000001\n".utf8).withUnsafeBytes({ StreamRecord.decode($0) }) else {
      return XCTFail("accepted a 25-byte header")
    }
  }

  /// Data pieces folded in any order, with the zeros between them never touched, give the
  /// CRC-32 zlib computes over the whole disk in order.
  func testScatteredPiecesGiveTheDiskChecksum() {
    let size = 1 << 20 | 777
    var disk = [UInt8](repeating: 0, count: size)
    let pieces: [Range<Int>] = [0..<1, 4096..<70_000, 300_000..<300_001, 512_000..<600_000, size - 5000..<size]
    for (index, piece) in pieces.enumerated() {
      disk.replaceSubrange(piece, with: patternBytes(piece.count, seed: UInt64(40 + index)))
    }
    let direct = disk.withUnsafeBytes { UInt32(crc32_z(0, $0.baseAddress!.assumingMemoryBound(to: Bytef.self), $0.count)) }
    for order in [Array(pieces.indices), pieces.indices.reversed(), [2, 4, 0, 3, 1]] {
      let scattered = ScatteredDiskChecksum(diskSize: Int64(size))
      for index in order {
        disk.withUnsafeBytes { bytes in
          scattered.add(UnsafeRawBufferPointer(rebasing: bytes[pieces[index]]), at: Int64(pieces[index].lowerBound))
        }
      }
      XCTAssertEqual(scattered.value, direct, "order \(order)")
      XCTAssertEqual(scattered.dataBytes, Int64(pieces.reduce(0) { $0 + $1.count }))
    }
    XCTAssertEqual(ScatteredDiskChecksum(diskSize: 0).value, 0, "the CRC-32 of nothing")
    var zeros = DiskChecksum()
    zeros.updateZeros(Int64(size))
    XCTAssertEqual(ScatteredDiskChecksum(diskSize: Int64(size)).value, zeros.value, "a disk of zeros")
  }

  /// Folding zeros in arithmetically gives what zlib computes over real zero bytes.
  func testZeroRunsFoldIntoTheChecksum() {
    let data = patternBytes(10_000, seed: 3)
    for zeros in [0, 1, 7, 512, 4096, 65_537, 3 << 20] {
      var folded = DiskChecksum()
      data.withUnsafeBytes { folded.update($0) }
      folded.updateZeros(Int64(zeros))
      data.withUnsafeBytes { folded.update(UnsafeRawBufferPointer(rebasing: $0[0..<100])) }

      let whole = data + [UInt8](repeating: 0, count: zeros) + data[0..<100]
      let direct = whole.withUnsafeBytes { UInt32(crc32_z(0, $0.baseAddress!.assumingMemoryBound(to: Bytef.self), $0.count)) }
      XCTAssertEqual(folded.value, direct, "\(zeros) zeros")
    }
    var onlyZeros = DiskChecksum()
    onlyZeros.updateZeros(1 << 20)
    let zeros = [UInt8](repeating: 0, count: 1 << 20)
    XCTAssertEqual(onlyZeros.value, zeros.withUnsafeBytes { UInt32(crc32_z(0, $0.baseAddress!.assumingMemoryBound(to: Bytef.self), $0.count)) })
    XCTAssertEqual(DiskChecksum().value, 0, "the CRC-32 of nothing")
  }
}

/// Deterministic bytes that contain no zero block.
func patternBytes(_ count: Int, seed: UInt64) -> [UInt8] {
  var state = seed &* 6364136223846793005 &+ 1442695040888963407
  return (0..<count).map { _ in
    state = state &* 6364136223846793005 &+ 1442695040888963407
    return UInt8(truncatingIfNeeded: state >> 33) | 1
  }
}

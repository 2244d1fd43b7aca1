import DiskImage
import XCTest

final class ExtentTests: XCTestCase {
  func testAppendMergingJoinsTouchingExtentsOfOneKind() {
    var extents: [Extent] = []
    extents.appendMerging(Extent(0..<10, .data, hostOffset: 100))
    extents.appendMerging(Extent(10..<20, .data, hostOffset: 110))
    extents.appendMerging(Extent(20..<30, .data, hostOffset: 500))  // host offset jumps
    extents.appendMerging(Extent(30..<40, .zero))
    extents.appendMerging(Extent(40..<50, .zero))
    extents.appendMerging(Extent(50..<50, .unallocated))  // empty: dropped
    extents.appendMerging(Extent(50..<60, .unallocated))
    XCTAssertEqual(
      extents,
      [
        Extent(0..<20, .data, hostOffset: 100), Extent(20..<30, .data, hostOffset: 500),
        Extent(30..<50, .zero), Extent(50..<60, .unallocated),
      ])
  }

  func testMergeNeedsMatchingOffsetPresence() {
    XCTAssertFalse(Extent(0..<10, .zero, hostOffset: 0).canMerge(with: Extent(10..<20, .zero)))
    XCTAssertFalse(Extent(0..<10, .zero).canMerge(with: Extent(11..<20, .zero)))
    XCTAssertTrue(Extent(0..<10, .zero).canMerge(with: Extent(10..<20, .zero)))
  }

  func testSampledEntropySeparatesRandomFromCompressibleData() {
    var generator = SystemRandomNumberGenerator()
    let random = (0..<65536).map { _ in UInt8.random(in: 0...255, using: &generator) }
    let text = Array(String(repeating: "the block cluster sector image disk 0 1 2\n", count: 1600).utf8.prefix(65536))
    // Random except for a zero stretch at the very end: the last sample ends there.
    var randomThenZeros = random
    for index in 64512..<65536 { randomThenZeros[index] = 0 }
    func entropy(_ bytes: [UInt8]) -> Double {
      bytes.withUnsafeBytes { byteEntropy($0, samples: 8, sampleSize: 1024) }
    }
    XCTAssertGreaterThan(entropy(random), 7.9)
    XCTAssertLessThan(entropy(text), 5)
    XCTAssertLessThan(entropy(randomThenZeros), 7.9)
    // Short input: every byte counts, as in the unsampled form.
    let short = Array(random.prefix(4096))
    XCTAssertEqual(
      short.withUnsafeBytes { byteEntropy($0, samples: 8, sampleSize: 1024) },
      short.withUnsafeBytes { byteEntropy($0) })
    XCTAssertEqual([UInt8]().withUnsafeBytes { byteEntropy($0, samples: 8, sampleSize: 1024) }, 0)
  }

  func testIsAllZero() {
    for length in [0, 1, 15, 16, 17, 4096, 65537] {
      var bytes = [UInt8](repeating: 0, count: length)
      XCTAssertTrue(bytes.withUnsafeBytes(isAllZero), "\(length) zeros")
      for position in Set([0, length / 2, length - 1]) where length > 0 {
        bytes[position] = 1
        XCTAssertFalse(bytes.withUnsafeBytes(isAllZero), "non-zero at \(position) of \(length)")
        bytes[position] = 0
      }
    }
  }

  /// Every position of a non-zero byte, for lengths around the 256-byte steps of the
  /// vector scan and its byte tail, from starts that are not aligned: each bit alone.
  func testIsAllZeroFindsAnyByteAtAnyAlignment() {
    var storage = [UInt8](repeating: 0, count: 1100)
    for start in [0, 1, 31] {
      for length in [255, 256, 257, 511, 512, 700, 1024] {
        storage.withUnsafeBytes { whole in
          XCTAssertTrue(isAllZero(UnsafeRawBufferPointer(rebasing: whole[start..<start + length])))
        }
        for position in 0..<length {
          for bit in [0, 7] where position % 64 == 0 || bit == 0 {
            storage[start + position] = 1 << bit
            let zero = storage.withUnsafeBytes { isAllZero(UnsafeRawBufferPointer(rebasing: $0[start..<start + length])) }
            XCTAssertFalse(zero, "non-zero \(1 << bit) at \(position) of \(length) from \(start)")
            storage[start + position] = 0
          }
        }
      }
    }
  }

  func testZeroRunsAlignToTheDiskNotTheBuffer() {
    // A buffer for disk range 1000..<13288 (12288 bytes), blocks of 4096 aligned to the disk:
    // 1000..<4096 (partial), 4096..<8192, 8192..<12288, 12288..<13288 (partial).
    var bytes = [UInt8](repeating: 0, count: 12288)
    bytes[8192 - 1000 + 5] = 7  // inside block 8192..<12288
    let runs = bytes.withUnsafeBytes { zeroRuns($0, at: 1000, blockSize: 4096) }
    XCTAssertEqual(runs.map(\.range), [1000..<8192, 8192..<12288, 12288..<13288])
    XCTAssertEqual(runs.map(\.isZero), [true, false, true])
  }

  /// The runs found a run at a time (in C) against a block-by-block reference, on a buffer
  /// that starts and ends inside blocks, with the non-zero byte of a data block at its
  /// first byte, its last, or in between.
  func testZeroRunsAgreeWithABlockByBlockScan() {
    let block = 4096
    var bytes = [UInt8](repeating: 0, count: 40 * block + 123)
    let offset: Int64 = 1000
    var seed: UInt64 = 12345
    for index in 0..<40 where index % 3 != 1 && index % 7 != 3 {
      seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      let blockStart = index * block - Int(offset % Int64(block))
      let position = blockStart + [0, block - 1, Int(seed >> 33) % block][index % 3]
      if position >= 0 && position < bytes.count { bytes[position] = UInt8(truncatingIfNeeded: seed >> 56) | 1 }
    }
    var expected: [(range: Range<Int64>, isZero: Bool)] = []
    var position = offset
    let end = offset + Int64(bytes.count)
    while position < end {
      let next = nextBoundary(after: position, step: Int64(block), limit: end)
      let zero = bytes[Int(position - offset)..<Int(next - offset)].allSatisfy { $0 == 0 }
      if let last = expected.last, last.isZero == zero {
        expected[expected.count - 1].range = last.range.lowerBound..<next
      } else {
        expected.append((position..<next, zero))
      }
      position = next
    }
    let runs = bytes.withUnsafeBytes { zeroRuns($0, at: offset, blockSize: block) }
    XCTAssertGreaterThan(expected.count, 10)
    XCTAssertEqual(runs.map(\.range), expected.map(\.range))
    XCTAssertEqual(runs.map(\.isZero), expected.map(\.isZero))
  }

  func testZeroRunsWithBlockSizeZeroIsAllData() {
    let bytes = [UInt8](repeating: 0, count: 8192)
    let runs = bytes.withUnsafeBytes { zeroRuns($0, at: 0, blockSize: 0) }
    XCTAssertEqual(runs.count, 1)
    XCTAssertEqual(runs[0].range, 0..<8192)
    XCTAssertFalse(runs[0].isZero)
  }

  func testBigEndianReaderAndWriter() {
    var writer = BigEndianWriter()
    writer.append(UInt32(0x5146_49fb))
    writer.append(UInt64(0x0102_0304_0506_0708))
    writer.append(UInt16(0xabcd))
    let reader = BigEndianReader(writer.bytes)
    XCTAssertEqual(reader.uint32(at: 0), 0x5146_49fb)
    XCTAssertEqual(reader.uint64(at: 4), 0x0102_0304_0506_0708)
    XCTAssertEqual(reader.uint16(at: 12), 0xabcd)
    XCTAssertNil(reader.uint32(at: 12), "runs short: nil, not a crash")
    XCTAssertNil(reader.uint8(at: -1))
    var bytes = [UInt8](repeating: 0, count: 8)
    BigEndianWriter.store(UInt32(0xdead_beef), at: 2, in: &bytes)
    XCTAssertEqual(bytes, [0, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0])
  }

  func testErrorsAreOneLineNamingTheFile() {
    let error = ImageError.invalid(path: "base.qcow2", "L2 table at 0x50000 is past the end of the file")
    XCTAssertEqual(error.description, "base.qcow2: L2 table at 0x50000 is past the end of the file")
    let system = ImageError.system(path: "x.img", operation: "open", errno: 2)
    XCTAssertEqual(system.description, "x.img: open: No such file or directory")
  }
}

/// Errors are one line whatever an image puts in them.
final class ErrorTests: XCTestCase {
  func testControlCharactersFromAnImageAreEscaped() {
    let error = ImageError.unsupported(path: "x.qcow2", "unknown incompatible feature bit 9 (evil\nname\u{1b}[31m) set")
    XCTAssertEqual(error.description, "x.qcow2: unknown incompatible feature bit 9 (evil\\nname\\u{1b}[31m) set")
    XCTAssertFalse(error.description.contains("\n"))
    XCTAssertEqual(ImageError.invalid(path: "plain.img", "fine").description, "plain.img: fine")
  }
}

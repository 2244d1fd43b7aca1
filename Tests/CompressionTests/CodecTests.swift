import Compression
import XCTest

final class CodecTests: XCTestCase {
  /// A cluster that compresses well but is not trivial: a repeating counter with a pattern.
  private func sampleCluster(size: Int = 65536) -> [UInt8] {
    (0..<size).map { UInt8(truncatingIfNeeded: ($0 / 7) ^ ($0 % 13)) }
  }

  /// Pseudo-random bytes that do not compress (a fixed-seed xorshift, so runs repeat).
  private func incompressible(size: Int) -> [UInt8] {
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    return (0..<size).map { _ in
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return UInt8(truncatingIfNeeded: state)
    }
  }

  func testRoundTripBothTypes() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      XCTAssertEqual(codec.type, type)
      for size in [512, 4096, 65536, 2 << 20] {
        let cluster = sampleCluster(size: size)
        let compressed = try XCTUnwrap(try codec.compress(cluster), "\(type) \(size)")
        XCTAssertLessThan(compressed.count, cluster.count)
        XCTAssertEqual(try codec.decompress(compressed, outputSize: size), cluster, "\(type) \(size)")
      }
    }
  }

  func testOneContextServesManyCalls() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      for round in 0..<20 {
        let cluster = [UInt8](repeating: UInt8(round), count: 4096) + sampleCluster(size: 4096)
        let compressed = try XCTUnwrap(try codec.compress(cluster))
        XCTAssertEqual(try codec.decompress(compressed, outputSize: cluster.count), cluster)
      }
    }
  }

  func testIncompressibleInputGivesNil() throws {
    for type in CompressionType.allCases {
      XCTAssertNil(try makeCodec(type).compress(incompressible(size: 65536)), "\(type)")
    }
  }

  func testZlibIsRawDeflateWithSmallWindow() throws {
    let compressed = try XCTUnwrap(try ZlibCodec().compress(sampleCluster()))
    // A zlib-wrapped stream would start with 0x78; raw deflate has no header. The first
    // block header of a final fixed/dynamic block has its low bits set accordingly.
    XCTAssertNotEqual(compressed.first, 0x78)
  }

  func testZstdFrameMagic() throws {
    let compressed = try XCTUnwrap(try ZstdCodec().compress(sampleCluster()))
    XCTAssertEqual(Array(compressed.prefix(4)), [0x28, 0xB5, 0x2F, 0xFD])
  }

  func testBombIsRejected() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      // 1 MiB of zeros compresses to almost nothing; asked for one 64 KiB cluster it must stop.
      let bomb = try XCTUnwrap(try codec.compress([UInt8](repeating: 0, count: 1 << 20)))
      XCTAssertThrowsError(try codec.decompress(bomb, outputSize: 65536), "\(type)") { error in
        XCTAssertTrue("\(error)".contains("expands past"), "\(type): \(error)")
      }
      // Exactly one byte too many is caught as well.
      let oneMore = try XCTUnwrap(try codec.compress([UInt8](repeating: 0, count: 4097)))
      XCTAssertThrowsError(try codec.decompress(oneMore, outputSize: 4096), "\(type)")
    }
  }

  func testShortOutputIsRejected() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      let compressed = try XCTUnwrap(try codec.compress(sampleCluster(size: 4096)))
      XCTAssertThrowsError(try codec.decompress(compressed, outputSize: 8192), "\(type)") { error in
        XCTAssertFalse("\(error)".contains("\n"))
      }
    }
  }

  func testTruncatedInputIsRejected() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      let cluster = incompressible(size: 2048) + [UInt8](repeating: 1, count: 63488)
      let compressed = try XCTUnwrap(try codec.compress(cluster))
      let cut = Array(compressed.prefix(compressed.count / 2))
      XCTAssertThrowsError(try codec.decompress(cut, outputSize: cluster.count), "\(type)")
    }
  }

  func testTrailingGarbageAfterTheStreamIsIgnored() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      let cluster = sampleCluster()
      let compressed = try XCTUnwrap(try codec.compress(cluster))
      // Up to a sector of whatever follows in the host file: another cluster's bytes.
      for garbage in [[UInt8](repeating: 0, count: 511), incompressible(size: 300), [0x28, 0xB5, 0x2F, 0xFD]] {
        XCTAssertEqual(try codec.decompress(compressed + garbage, outputSize: cluster.count), cluster, "\(type)")
      }
    }
  }

  func testGarbageInputIsAnErrorNotACrash() throws {
    for type in CompressionType.allCases {
      let codec = try makeCodec(type)
      XCTAssertThrowsError(try codec.decompress(incompressible(size: 1000), outputSize: 65536), "\(type)")
      XCTAssertThrowsError(try codec.decompress([], outputSize: 512), "\(type)")
      // The codec is still usable after an error.
      let cluster = sampleCluster(size: 4096)
      XCTAssertEqual(try codec.decompress(try XCTUnwrap(try codec.compress(cluster)), outputSize: 4096), cluster)
    }
  }
}

import Compression
import XCTest

/// The zlib-wrapped deflater VMDK grains use: `compress()`'s stream (header `78 9C`),
/// inflated back by `ZlibStreamInflater`, the same bytes from a reused context, and
/// incompressible input still fits in `bound`.
final class ZlibStreamDeflaterTests: XCTestCase {
  private func deflated(_ input: [UInt8], with deflater: ZlibStreamDeflater) throws -> [UInt8] {
    var output = [UInt8](repeating: 0, count: deflater.bound(input.count))
    let length = try input.withUnsafeBytes { source in
      try output.withUnsafeMutableBytes { try deflater.deflate(source, into: $0) }
    }
    return Array(output[..<length])
  }

  private func inflated(_ stream: [UInt8], size: Int) throws -> [UInt8] {
    var output = [UInt8](repeating: 0, count: size)
    let produced = try stream.withUnsafeBytes { source in
      try output.withUnsafeMutableBytes { try ZlibStreamInflater().inflate(source, into: $0) }
    }
    XCTAssertEqual(produced, size)
    return output
  }

  func testRoundTripAndHeader() throws {
    let deflater = try ZlibStreamDeflater()
    let text = (0..<65536).map { UInt8(truncatingIfNeeded: ($0 / 7) ^ ($0 % 13)) }
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    let noise = (0..<65536).map { _ -> UInt8 in
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return UInt8(truncatingIfNeeded: state)
    }
    for input in [text, noise, [UInt8](repeating: 0, count: 65536), [0x42]] {
      let stream = try deflated(input, with: deflater)
      XCTAssertEqual(Array(stream.prefix(2)), [0x78, 0x9c], "zlib header at the default level")
      XCTAssertEqual(try inflated(stream, size: input.count), input)
      XCTAssertEqual(try deflated(input, with: deflater), stream, "a reused context gives the same bytes")
    }
    XCTAssertLessThan(try deflated(text, with: deflater).count, 16384)
  }

  func testTooLittleRoomIsRefused() throws {
    let deflater = try ZlibStreamDeflater()
    var output = [UInt8](repeating: 0, count: 16)
    let input = [UInt8](repeating: 1, count: 4096)
    XCTAssertThrowsError(
      try input.withUnsafeBytes { source in try output.withUnsafeMutableBytes { try deflater.deflate(source, into: $0) } })
  }
}

import DiskImage
import Foundation
import QCOW2
import Raw
import Stream
import TestSupport
import XCTest

@testable import Convert

/// The policy the engine holds for every front end: what a request may ask, decided
/// before anything is written, and nothing left at the destination when it is refused.
final class ConversionTests: XCTestCase {
  let resolver = Resolver(
    registry: FormatRegistry(formats: [QCOW2.format, SparseStream.format], fallback: Raw.format))
  var dir: URL!

  override func setUpWithError() throws { dir = try temporaryDirectory(self) }

  func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  func makeRaw(_ name: String, bytes: [UInt8]) throws {
    try Data(bytes).write(to: URL(fileURLWithPath: path(name)))
  }

  func assertRefused(_ request: ConversionRequest, _ message: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertThrowsError(try Conversion.open(request, resolver: resolver), file: file, line: line) { error in
      XCTAssertTrue("\(error)".contains(message), "\(error) does not say \(message)", file: file, line: line)
    }
    let left = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
    XCTAssertFalse(left.contains { $0.contains(".lacuna-") }, "left \(left)", file: file, line: line)
  }

  func testRefusalsComeBeforeAnyOutput() throws {
    try makeRaw("in.img", bytes: [UInt8](repeating: 1, count: 65536))
    var request = ConversionRequest(source: path("in.img"), destination: path("in.img"))
    assertRefused(request, "the output is the same file as an input")

    request = ConversionRequest(source: path("in.img"), destination: path("out.img"), outputFormat: "vmdk")
    assertRefused(request, "unknown format 'vmdk'")

    request = ConversionRequest(source: path("in.img"), destination: path("out.img"))
    request.backing = "in.img"
    assertRefused(request, "raw images cannot record a backing file (that needs -O qcow2)")

    request = ConversionRequest(source: path("in.img"), destination: "-", outputFormat: "qcow2")
    assertRefused(request, "only -O stream can be written to standard output")

    request = ConversionRequest(source: "-", destination: path("out.img"))
    request.sourceFormat = "qcow2"
    assertRefused(request, "standard input can only be read as a format read from start to end (-f stream)")
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("out.img")))
  }

  /// `-B` naming a layer of the chain stores what lies above it; naming any other image
  /// compares; both are decided by the engine from the files' identities.
  func testBackingIsALayerOrACompareBase() throws {
    try makeRaw("base.img", bytes: [UInt8](repeating: 3, count: 65536))
    try makeRaw("other.img", bytes: [UInt8](repeating: 3, count: 65536))
    var request = ConversionRequest(source: path("base.img"), destination: path("out.qcow2"), outputFormat: "qcow2")
    request.backing = "other.img"
    request.backingFormat = "raw"
    let compared = try Conversion.open(request, resolver: resolver)
    let statistics = try compared.run()
    XCTAssertEqual(statistics.backingBytes, 65536, "the same bytes as the compared base: all left to it")

    request.backing = "base.img"
    let layered = try Conversion.open(request, resolver: resolver)
    XCTAssertEqual(try layered.run().backingBytes, 65536, "the source is the backing file: nothing to store")
    let reader = try resolver.openImage(path("out.qcow2"), format: nil)
    XCTAssertEqual(reader.backing, BackingReference(name: "base.img", format: "raw"))
  }

  /// A stream file is read from start to end through the same engine, whatever the output.
  func testAStreamSourceIsSequential() throws {
    var bytes = [UInt8](repeating: 0, count: 1 << 20)
    for index in 4096..<12288 { bytes[index] = 0x5a }
    try makeRaw("disk.img", bytes: bytes)
    let send = ConversionRequest(source: path("disk.img"), destination: path("disk.stream"), outputFormat: "stream")
    try Conversion.open(send, resolver: resolver).run()
    let receive = ConversionRequest(source: path("disk.stream"), destination: path("back.img"))
    let conversion = try Conversion.open(receive, resolver: resolver)
    XCTAssertTrue(conversion.isSequential)
    let statistics = try conversion.run()
    XCTAssertEqual(statistics.bytesWritten, 8192)
    XCTAssertEqual(statistics.sourceBytes, Int64(try Data(contentsOf: URL(fileURLWithPath: path("disk.stream"))).count))
    XCTAssertEqual([UInt8](try Data(contentsOf: URL(fileURLWithPath: path("back.img")))), bytes)

    var withBacking = receive
    withBacking.destination = path("x.qcow2")
    withBacking.outputFormat = "qcow2"
    withBacking.backing = "disk.img"
    assertRefused(withBacking, "-B and --source-backing-format do not apply")
  }
}

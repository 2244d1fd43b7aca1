import DiskImage
import TestSupport
import XCTest

@testable import Convert

/// The engine against in-memory layers and a writer that records its calls: each test
/// states the exact list of data and zero writes expected, as libnbd's copy-sparse test
/// does, without touching a disk.
final class EngineCallTests: XCTestCase {
  static let size = 64 << 10

  /// A 64 KiB disk: 0..<4096 zero bytes stored as data, 4096..<8192 data, a hole to
  /// 40960, data to the end.
  func disk() -> (bytes: [UInt8], map: [Extent]) {
    var bytes = [UInt8](repeating: 0, count: Self.size)
    for index in 4096..<8192 { bytes[index] = UInt8(truncatingIfNeeded: index % 251 + 1) }
    for index in 40960..<Self.size { bytes[index] = UInt8(truncatingIfNeeded: index % 241 + 1) }
    return (bytes, [Extent(0..<8192, .data), Extent(8192..<40960, .zero), Extent(40960..<Int64(Self.size), .data)])
  }

  func options(threads: Int = 2, sparseSize: Int = 4096, backing: OutputBacking = .none) -> ConvertOptions {
    var options = ConvertOptions()
    options.threads = threads
    options.sparseSize = sparseSize
    options.unitSize = 16 << 10
    options.backing = backing
    return options
  }

  func run(_ input: ConversionInput, granularity: Int = 1, options: ConvertOptions) throws -> RecordingWriter {
    let writer = RecordingWriter(size: Int(input.virtualSize), granularity: granularity)
    try Converter(input: input, writer: writer, options: options).run()
    return writer
  }

  func testHolesAndZeroBlocksBecomeZeroWritesAndDataIsWrittenOnce() throws {
    let (bytes, map) = disk()
    var previous: [RecordingWriter.Call]?
    for threads in [1, 2, 5] {
      let layer = MemoryReader(map: map, bytes: bytes)
      let writer = try run(.chain(Chain(layers: [layer])), options: options(threads: threads))
      XCTAssertEqual(
        writer.calls,
        [
          .zeroes(0..<4096), .write(4096..<8192, zero: false), .zeroes(8192..<40960),
          .write(40960..<49152, zero: false), .write(49152..<65536, zero: false), .finish,
        ], "threads \(threads)")
      XCTAssertEqual(writer.bytes, bytes)
      // The hole is never read; each data byte is read once.
      XCTAssertEqual(layer.reads.sorted { $0.lowerBound < $1.lowerBound }, [0..<8192, 40960..<49152, 49152..<65536])
      if let previous { XCTAssertEqual(writer.calls, previous, "the same calls whatever the thread count") }
      previous = writer.calls
    }
  }

  func testSparseSizeZeroWritesEveryByte() throws {
    let (bytes, map) = disk()
    let writer = try run(.chain(Chain(layers: [MemoryReader(map: map, bytes: bytes)])), options: options(sparseSize: 0))
    XCTAssertEqual(
      writer.calls,
      [
        .write(0..<16384, zero: false), .write(16384..<32768, zero: true), .write(32768..<49152, zero: false),
        .write(49152..<65536, zero: false), .finish,
      ])
    XCTAssertEqual(writer.bytes, bytes)
  }

  /// A layer answers for itself; what it leaves unallocated comes from the one below, and
  /// only the layer that answers is read.
  func testAChainIsReadLayerByLayer() throws {
    let base = MemoryReader(name: "base", bytes: [UInt8](repeating: 7, count: Self.size), dataRanges: [0..<Int64(Self.size)])
    var topBytes = [UInt8](repeating: 0, count: Self.size)
    for index in 32768..<49152 { topBytes[index] = 9 }
    let top = MemoryReader(
      name: "top",
      map: [Extent(0..<32768, .unallocated), Extent(32768..<49152, .data), Extent(49152..<65536, .zero)],
      bytes: topBytes, backing: BackingReference(name: "base", format: "memory"))
    let chain = Chain(layers: [top, base])
    let writer = try run(.chain(chain), options: options())
    XCTAssertEqual(
      writer.calls,
      [
        .write(0..<16384, zero: false), .write(16384..<32768, zero: false), .write(32768..<49152, zero: false),
        .zeroes(49152..<65536), .finish,
      ])
    XCTAssertEqual(base.reads.sorted { $0.lowerBound < $1.lowerBound }, [0..<16384, 16384..<32768])
    XCTAssertEqual(top.reads, [32768..<49152])

    // -B naming the base: only what the top holds is written; the base is never read.
    let delta = MemoryReader(name: "base", bytes: [UInt8](repeating: 7, count: Self.size), dataRanges: [0..<Int64(Self.size)])
    let overTheBase = try run(.chain(Chain(layers: [top, delta])), options: options(backing: .chainLayer(1)))
    XCTAssertEqual(overTheBase.calls, [.write(32768..<49152, zero: false), .zeroes(49152..<65536), .finish])
    XCTAssertEqual(delta.reads, [])

    // With clusters of 64 KiB a cluster cannot be half the base's: the base's part of it is
    // read through the chain and stored.
    let clustered = try run(.chain(Chain(layers: [top, delta])), granularity: 65536, options: options(backing: .chainLayer(1)))
    XCTAssertEqual(clustered.calls, [.write(0..<49152, zero: false), .zeroes(49152..<65536), .finish])
    XCTAssertEqual(delta.reads, [0..<32768])
  }

  /// -B naming an image that is not a layer: granules that read the same in it are left to
  /// it, the rest is stored.
  func testAComparedBaseKeepsOnlyWhatDiffers() throws {
    let (bytes, map) = disk()
    var other = bytes
    for index in 40960..<45056 { other[index] ^= 0xff }
    let base = Chain(layers: [MemoryReader(name: "other", bytes: other, dataRanges: [0..<Int64(Self.size)])])
    let writer = try run(
      .chain(Chain(layers: [MemoryReader(map: map, bytes: bytes)])), granularity: 4096,
      options: options(backing: .compared(base)))
    XCTAssertEqual(writer.calls, [.write(40960..<45056, zero: false), .finish])
  }

  func testAFailingReadAbandonsTheOutput() throws {
    let (bytes, map) = disk()
    let layer = MemoryReader(map: map, bytes: bytes)
    layer.failingRange = 50000..<50001
    let writer = RecordingWriter(size: Self.size)
    XCTAssertThrowsError(try Converter(chain: Chain(layers: [layer]), writer: writer, options: options()).run()) { error in
      XCTAssertTrue("\(error)".hasPrefix("memory: read"), "\(error)")
    }
    XCTAssertEqual(writer.calls.last, .abandon)
    XCTAssertFalse(writer.calls.contains(.finish))
  }

  /// A sequential source goes through the same engine and gives the same calls as the
  /// same disk read at random.
  func testASequentialSourceGivesTheSameCalls() throws {
    let (bytes, map) = disk()
    let random = try run(.chain(Chain(layers: [MemoryReader(map: map, bytes: bytes)])), options: options())
    for threads in [1, 3] {
      let reader = MemorySequentialReader(pieces: map, bytes: bytes)
      let writer = try run(.sequential(reader), options: options(threads: threads))
      XCTAssertEqual(writer.calls, random.calls)
      XCTAssertTrue(reader.finished, "the engine checks the end of a sequential source")
    }
    // Zeros over whole units cost one call; the data after them lands where it belongs.
    let big = 1 << 22
    var tail = [UInt8](repeating: 0, count: big)
    for index in (big - 4096)..<big { tail[index] = 1 }
    let reader = MemorySequentialReader(
      pieces: [Extent(0..<Int64(big - 4096), .zero), Extent(Int64(big - 4096)..<Int64(big), .data)], bytes: tail)
    let writer = try run(.sequential(reader), options: options())
    XCTAssertEqual(writer.calls, [.zeroes(0..<Int64(big - 4096)), .write(Int64(big - 4096)..<Int64(big), zero: false), .finish])
  }
}

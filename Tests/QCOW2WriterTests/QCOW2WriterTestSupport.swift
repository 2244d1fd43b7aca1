import Convert
import DiskImage
import Foundation
import QCOW2
import Raw
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// A small deterministic generator, so every run makes the same source files.
struct SplitMix64 {
  var state: UInt64
  mutating func next() -> UInt64 {
    state &+= 0x9e37_79b9_7f4a_7c15
    var z = state
    z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
    z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
    return z ^ (z >> 31)
  }
  mutating func bytes(_ count: Int) -> [UInt8] {
    var result = [UInt8]()
    result.reserveCapacity(count + 8)
    while result.count < count {
      let value = next()
      for i in 0..<8 { result.append(UInt8(truncatingIfNeeded: value >> (i * 8))) }
    }
    return Array(result.prefix(count))
  }
}

/// What a piece of a synthetic source holds.
enum Piece {
  case random(Int)
  case text(Int)
  /// Zero bytes written into the file (data to the file system, zeros to the engine).
  case zeros(Int)
}

class WriterTestCase: XCTestCase {
  var directory = ""

  override func setUpWithError() throws {
    directory = try temporaryDirectory(self).path
  }

  func path(_ name: String) -> String { directory + "/" + name }

  /// The path of a qemu tool, or a skip when it is not installed.
  func tool(_ name: String) throws -> String {
    try requireProgram(name, skipping: "\(name) is not installed; this test needs it as the judge")
  }

  /// Runs a program; returns its exit status and its standard output followed by its errors.
  @discardableResult
  func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let outcome = try runProgram(executable, arguments)
    return (outcome.status, outcome.stdout + outcome.stderr)
  }

  @discardableResult
  func qemuImg(_ arguments: [String]) throws -> (status: Int32, output: String) {
    try run(try tool("qemu-img"), arguments)
  }

  /// Writes `pieces` at their offsets into a new sparse file of `size` bytes.
  func makeSource(_ name: String, size: Int64, pieces: [(Int64, Piece)], seed: UInt64 = 1) throws -> String {
    let path = self.path(name)
    let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o644)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    var generator = SplitMix64(state: seed)
    let text = Array(
      "The quick brown fox jumps over the lazy dog; qcow2 clusters hold this text well. 0123456789\n".utf8)
    for (offset, piece) in pieces {
      let bytes: [UInt8]
      switch piece {
      case .random(let count): bytes = generator.bytes(count)
      case .text(let count): bytes = (0..<count).map { text[($0 + Int(offset)) % text.count] }
      case .zeros(let count): bytes = [UInt8](repeating: 0, count: count)
      }
      let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
      XCTAssertEqual(written, bytes.count)
    }
    XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
    return path
  }

  /// The standard mixed source: random, text and written-zero blocks, holes, odd offsets,
  /// and a size that is not a multiple of any cluster size.
  func mixedSource(_ name: String = "source.raw", size: Int64 = (8 << 20) + 1234) throws -> String {
    try makeSource(
      name, size: size,
      pieces: [
        (0, .random(4096)),
        (4096 + 100, .text(10_000)),
        (65536, .zeros(65536)),
        (200_000, .random(1)),
        ((1 << 20) + 513, .random(70_000)),
        ((2 << 20) - 4096, .zeros(8192)),
        (3 << 20, .text(1 << 20)),
        ((4 << 20) + 65536 * 3, .random(3 * 65536)),
        ((5 << 20) - 7, .random(3)),
        ((6 << 20) + 12345, .text(300_000)),
        (size - 100, .random(100)),
      ])
  }

  /// Converts the raw file at `source` to qcow2 at `destination` through the engine.
  @discardableResult
  func convert(
    _ source: String, to destination: String, options: WriterOptions = WriterOptions(), threads: Int = 2
  ) throws -> ConvertStatistics {
    let chain = Chain(layers: [try Raw.format.open(ImageFile.openForReading(source))])
    return try convert(chain, to: destination, options: options, threads: threads)
  }

  @discardableResult
  func convert(
    _ chain: Chain, to destination: String, options: WriterOptions, threads: Int = 2, stopDepth: Int? = nil
  ) throws -> ConvertStatistics {
    let output = try OutputFile(creatingBeside: destination)
    let writer = try QCOW2Writer.create(target: output, virtualSize: chain.virtualSize, options: options)
    var convertOptions = ConvertOptions()
    convertOptions.threads = threads
    convertOptions.backing = stopDepth.map { .chainLayer($0) } ?? .none
    return try Converter(chain: chain, writer: writer, options: convertOptions).run()
  }

  /// `qemu-img check` finds nothing: no errors, no leaks.
  func assertClean(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let (status, output) = try qemuImg(["check", image])
    XCTAssertEqual(status, 0, "qemu-img check \(image): \(output)", file: file, line: line)
    XCTAssertTrue(output.contains("No errors were found"), output, file: file, line: line)
    XCTAssertFalse(output.contains("leaked"), output, file: file, line: line)
  }

  /// `qemu-img compare` says the two images read the same.
  func assertSameContent(
    _ a: String, _ b: String, formats: (String, String) = ("raw", "qcow2"), file: StaticString = #filePath,
    line: UInt = #line
  ) throws {
    let (status, output) = try qemuImg(["compare", "-f", formats.0, "-F", formats.1, a, b])
    XCTAssertEqual(status, 0, "qemu-img compare \(a) \(b): \(output)", file: file, line: line)
  }

  struct MapEntry: Decodable {
    var start: Int64
    var length: Int64
    var depth: Int
    var zero: Bool
    var data: Bool
    var offset: Int64?
  }

  func map(_ image: String) throws -> [MapEntry] {
    let (status, output) = try qemuImg(["map", "--output=json", "-f", "qcow2", image])
    XCTAssertEqual(status, 0, output)
    return try JSONDecoder().decode([MapEntry].self, from: Data(output.utf8))
  }

  /// The clusters of a raw file that the engine hands over as data: those that share a
  /// 4 KiB block (its zero-detection size) with a non-zero byte.
  func nonZeroClusters(of source: String, clusterSize: Int, blockSize: Int = 4096) throws -> Set<Int64> {
    let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: source)))
    var result = Set<Int64>()
    var block = 0
    while block * blockSize < bytes.count {
      let end = min(bytes.count, (block + 1) * blockSize)
      if bytes[(block * blockSize)..<end].contains(where: { $0 != 0 }) {
        var cluster = block * blockSize / clusterSize
        while cluster * clusterSize < end {
          result.insert(Int64(cluster))
          cluster += 1
        }
      }
      block += 1
    }
    return result
  }

  /// Exactly the clusters that hold non-zero bytes are allocated as data in the output:
  /// holes and zero blocks of the source cost nothing.
  func assertAllocation(
    _ image: String, source: String, clusterSize: Int, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let expected = try nonZeroClusters(of: source, clusterSize: clusterSize)
    var found = Set<Int64>()
    for entry in try map(image) where entry.data {
      var cluster = entry.start / Int64(clusterSize)
      while cluster * Int64(clusterSize) < entry.start + entry.length {
        found.insert(cluster)
        cluster += 1
      }
    }
    XCTAssertEqual(found.count, expected.count, "data clusters in the map", file: file, line: line)
    XCTAssertEqual(found.subtracting(expected).sorted().prefix(10), [], "data over zeros", file: file, line: line)
    XCTAssertEqual(expected.subtracting(found).sorted().prefix(10), [], "data missing", file: file, line: line)
  }

  func fileSize(_ path: String) throws -> Int64 {
    (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.int64Value ?? -1
  }

  func allocatedSize(_ path: String) throws -> Int64 {
    var info = stat()
    XCTAssertEqual(stat(path, &info), 0)
    return Int64(info.st_blocks) * 512
  }
}

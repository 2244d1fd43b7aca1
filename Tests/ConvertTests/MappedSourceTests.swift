import DiskImage
import Foundation
import Raw
import TestSupport
import XCTest

@testable import Convert

#if canImport(Glibc)
  import Glibc
#endif

/// Data the writer may take from the source file by the kernel is checked for zeros where
/// it lies mapped. A source truncated by another process under the conversion would make
/// those reads fault (SIGBUS); the conversion must end in an error naming the source
/// instead, and leave no output behind.
final class MappedSourceTests: XCTestCase {
  /// A raw file of `size` bytes whose every 4 KiB block holds non-zero bytes.
  func makeDataFile(_ path: String, size: Int) throws {
    var bytes = [UInt8](repeating: 0, count: size)
    for index in stride(from: 0, to: size, by: 512) { bytes[index] = UInt8(truncatingIfNeeded: index / 512 % 255 + 1) }
    XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
  }

  func testMappedBytesOfATruncatedFileAreAnErrorNotACrash() throws {
    let directory = try temporaryDirectory(self)
    let path = directory.appendingPathComponent("src.raw").path
    try makeDataFile(path, size: 1 << 20)
    let file = try ImageFile.openForReading(path)
    let mapping = try XCTUnwrap(FileMapping(file: file))
    let whole = try XCTUnwrap(try mapping.zeroRuns(0..<(1 << 20), at: 0, blockSize: 4096))
    XCTAssertEqual(whole.runs.map(\.range), [0..<(1 << 20)])
    XCTAssertEqual(whole.runs.map(\.isZero), [false])
    XCTAssertEqual(truncate(path, 0), 0)
    XCTAssertThrowsError(try mapping.zeroRuns(4096..<(1 << 20), at: 4096, blockSize: 4096)) { error in
      XCTAssertTrue("\(error)".contains("src.raw"), "\(error)")
      XCTAssertTrue("\(error)".contains("truncated"), "\(error)")
    }
    // The thread goes on: a later read of a valid buffer is checked as before.
    let zeros = [UInt8](repeating: 0, count: 8192)
    XCTAssertEqual(zeros.withUnsafeBytes { zeroRuns($0, at: 0, blockSize: 4096) }.map(\.isZero), [true])
  }

  /// A writer that prepares units reads each as one buffer: the mapping stands for the
  /// unit only when all its data lies in one mapped file at one shift from the disk.
  func testWholeUnitMappingNeedsOneFileAtOneShift() throws {
    let directory = try temporaryDirectory(self)
    let path = directory.appendingPathComponent("src.raw").path
    try makeDataFile(path, size: 1 << 20)
    let mapping = try XCTUnwrap(FileMapping(file: ImageFile.openForReading(path)))
    typealias Segment = Converter.Segment
    let k = Int64(64 << 10)
    let plain: [Segment] = [
      Segment(range: 0..<k, source: .layer(0), hostOffset: 4096), Segment(range: k..<2 * k, source: .zero),
      Segment(range: 2 * k..<3 * k, source: .layer(0), hostOffset: 2 * k + 4096),
    ]
    let whole = try XCTUnwrap(Converter.wholeUnitMapping(plain, mappings: [mapping]))
    XCTAssertEqual(whole.count, Int(3 * k))
    XCTAssertEqual(whole.baseAddress, mapping.window(4096..<3 * k + 4096)?.baseAddress)
    var moved = plain
    moved[2].hostOffset = 5 * k
    XCTAssertNil(Converter.wholeUnitMapping(moved, mappings: [mapping]), "two shifts")
    var filled = plain
    filled[1].source = .zeroFilled
    XCTAssertNil(Converter.wholeUnitMapping(filled, mappings: [mapping]), "zeros written as data are not in the file")
    XCTAssertNil(Converter.wholeUnitMapping(plain, mappings: [nil]), "no mapping")
    var past = plain
    past[2] = Segment(range: 2 * k..<(1 << 20), source: .layer(0), hostOffset: 2 * k + 4096)
    XCTAssertNil(Converter.wholeUnitMapping(past, mappings: [mapping]), "past the end of the file")
  }

  /// The whole engine: the source shrinks to nothing after the first unit is written,
  /// while later units are still to be scanned through the mapping (`--copy-mode=copy`
  /// maps the source on any file system), and, with `auto`, written from it (ext4, tmpfs:
  /// the write from lost pages fails with EFAULT) or cloned from the file.
  func testSourceTruncatedDuringConversionFailsAndLeavesNoOutput() throws {
    for mode in [CopyMode.copy, .auto] { try checkTruncationDuringConversion(mode) }
  }

  func checkTruncationDuringConversion(_ mode: CopyMode) throws {
    let directory = try temporaryDirectory(self)
    let path = directory.appendingPathComponent("src.raw").path
    let output = directory.appendingPathComponent("out.raw").path
    try makeDataFile(path, size: 64 << 20)  // 32 units of 2 MiB: more than the pipeline holds
    let reader = try RawReader(source: ImageFile.openForReading(path))
    let writer = try RawWriter(
      target: OutputFile(creatingBeside: output), virtualSize: reader.virtualSize, options: WriterOptions())
    var options = ConvertOptions()
    options.copyMode = mode
    options.unitSize = 2 << 20
    var truncated = false
    options.progress = { _, _ in
      if !truncated {
        truncated = true
        XCTAssertEqual(truncate(path, 0), 0)
      }
    }
    XCTAssertThrowsError(try Converter(chain: Chain(layers: [reader]), writer: writer, options: options).run()) {
      error in
      XCTAssertTrue("\(error)".contains("src.raw"), "\(mode): \(error)")
    }
    XCTAssertTrue(truncated)
    XCTAssertFalse(FileManager.default.fileExists(atPath: output))
    let left = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0 != "src.raw" }
    XCTAssertEqual(left, [], "no temporary file left")
  }
}

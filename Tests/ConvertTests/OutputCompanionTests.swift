import DiskImage
import Foundation
import Raw
import TestSupport
import XCTest

@testable import Convert

/// The seam for outputs made of several files (a VMDK descriptor and its extents): a test
/// format, "pair", written as `PAIR NAME-data` in the output and the disk's bytes in the
/// companion file `NAME-data`, made through `WriterOptions.companions`.
final class OutputCompanionTests: XCTestCase {
  /// Writes the disk into one companion and the pair line into the output; commits the
  /// companion first, as a real multi-file writer must.
  final class PairWriter: ImageWriter {
    let output: ByteTarget
    let companion: ByteTarget
    let companions: CompanionTargets
    let dataName: String
    var failAtFinish = false
    var granularity: Int { 1 }
    init(output: ByteTarget, options: WriterOptions) throws {
      self.output = output
      companions = try XCTUnwrap(options.companions)
      dataName = companions.outputName + "-data"
      companion = try companions.create(named: dataName)
      failAtFinish = options.options["fail"] == "on"
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws { try companion.write(bytes, at: offset) }
    func writeZeroes(_ range: Range<Int64>) throws {}
    func finish() throws {
      do {
        try companion.commit()
        if failAtFinish { throw ImageError.invalid(path: output.name, "failing on purpose") }
        let line = Array("PAIR \(dataName)\n".utf8)
        try line.withUnsafeBytes { try output.write($0, at: 0) }
        try output.commit()
      } catch {
        abandon()
        throw error
      }
    }
    func abandon() {
      companion.abandon()
      companions.removeCommitted()
      output.abandon()
    }
  }

  static let pair = ImageFormat(
    name: "pair", probeLength: 5, probe: { $0.starts(with: Array("PAIR ".utf8)) },
    create: { target, _, options in try PairWriter(output: target, options: options) })
  let resolver = Resolver(registry: FormatRegistry(formats: [OutputCompanionTests.pair], fallback: Raw.format))
  var dir: URL!

  override func setUpWithError() throws { dir = try temporaryDirectory(self) }
  func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  private func convert(_ source: String, to output: String, options: [String: String] = [:]) throws {
    var request = ConversionRequest(source: source, destination: output, outputFormat: "pair")
    request.sourceFormat = "raw"
    request.writerOptions.options = options
    try Conversion.open(request, resolver: resolver).run()
  }

  private func names() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() }

  func testCompanionsAppearBesideTheOutputWithIt() throws {
    try Data(repeating: 9, count: 8192).write(to: URL(fileURLWithPath: path("src.raw")))
    try convert(path("src.raw"), to: path("out.pair"))
    XCTAssertEqual(try names(), ["out.pair", "out.pair-data", "src.raw"])
    XCTAssertEqual(try String(contentsOfFile: path("out.pair"), encoding: .utf8), "PAIR out.pair-data\n")
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path("out.pair-data"))), Data(repeating: 9, count: 8192))
  }

  func testAFailureAfterACompanionWasCommittedLeavesNothing() throws {
    try Data(repeating: 9, count: 8192).write(to: URL(fileURLWithPath: path("src.raw")))
    XCTAssertThrowsError(try convert(path("src.raw"), to: path("out.pair"), options: ["fail": "on"]))
    XCTAssertEqual(try names(), ["src.raw"])
  }

  /// A companion name that is an input of the conversion would destroy it mid-read.
  func testACompanionThatIsAnInputIsRefusedBeforeAnyWork() throws {
    try Data(repeating: 9, count: 8192).write(to: URL(fileURLWithPath: path("out.pair-data")))
    XCTAssertThrowsError(try convert(path("out.pair-data"), to: path("out.pair"))) { error in
      XCTAssertEqual(
        "\(error)",
        "\(path("out.pair-data")): is an input of this conversion, and \(path("out.pair")) would replace it; refusing to overwrite it")
    }
    XCTAssertEqual(try names(), ["out.pair-data"])
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path("out.pair-data"))), Data(repeating: 9, count: 8192))
  }

  func testCompanionNamesStayInTheOutputsDirectory() throws {
    let companions = try OutputCompanions(destination: path("x.pair"), inputs: [], synchronizes: false)
    XCTAssertEqual(companions.outputName, "x.pair")
    for bad in ["", "../escape", "a/b", ".", "..", "x.pair"] {
      XCTAssertThrowsError(try companions.create(named: bad), bad)
    }
    try FileManager.default.createDirectory(atPath: path("adir"), withIntermediateDirectories: false)
    XCTAssertThrowsError(try companions.create(named: "adir")) { error in
      XCTAssertTrue("\(error)".contains("directory"), "\(error)")
    }
    let made = try companions.create(named: "x-1")
    made.abandon()
    XCTAssertThrowsError(try companions.create(named: "x-1"), "the same companion twice")
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("x-1")))
  }
}

import Foundation
import LacunaKit
import XCTest

/// LacunaKit through its public API only, judged by qemu-img.
final class LacunaKitTests: XCTestCase {
  private var dir: URL!

  override func setUpWithError() throws {
    dir = FileManager.default.temporaryDirectory.appendingPathComponent("lacunakit-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
  }

  override func tearDownWithError() throws {
    try? FileManager.default.removeItem(at: dir)
  }

  private func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  /// Runs a program, returning its standard output; fails the test on a non-zero exit.
  @discardableResult
  private func run(_ program: String, _ arguments: [String]) throws -> String {
    guard let found = ["/usr/bin", "/bin", "/usr/local/bin"].map({ $0 + "/" + program })
      .first(where: { FileManager.default.isExecutableFile(atPath: $0) })
    else { throw XCTSkip("\(program) is not installed") }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: found)
    process.arguments = arguments
    let output = Pipe()
    process.standardOutput = output
    try process.run()
    let data = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    XCTAssertEqual(process.terminationStatus, 0, "\(program) \(arguments)")
    return String(decoding: data, as: UTF8.self)
  }

  /// base.qcow2 (64 MiB, data at 1 MiB and 40 MiB) under top.qcow2 (data at 8 MiB, a zero at 40 MiB).
  private func makeChain() throws -> String {
    try run("qemu-img", ["create", "-q", "-f", "qcow2", path("base.qcow2"), "64M"])
    try run("qemu-io", ["-c", "write -P 0xab 1M 2M", "-c", "write -P 0xcd 40M 1M", path("base.qcow2")])
    try run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path("top.qcow2")])
    try run("qemu-io", ["-c", "write -P 0xef 8M 64k", "-c", "write -z 40M 64k", path("top.qcow2")])
    return path("top.qcow2")
  }

  func testFormatsAndVersion() {
    XCTAssertTrue(LacunaKit.version.split(separator: ".").count == 3)
    for name in ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"] {
      XCTAssertTrue(LacunaKit.formats.contains(name), name)
      XCTAssertTrue(LacunaKit.writableFormats.contains(name), name)
    }
  }

  func testOpenAChainAndMapItAsQemuImgDoes() throws {
    let top = try makeChain()
    let image = try DiskImageChain.open(top)
    XCTAssertEqual(image.format, "qcow2")
    XCTAssertEqual(image.virtualSize, 64 << 20)
    XCTAssertEqual(image.layers.map { URL(fileURLWithPath: $0).lastPathComponent }, ["top.qcow2", "base.qcow2"])

    // qemu-img's map, with neighbours that read the same way merged (as MapEntry merges them).
    let json = try run("qemu-img", ["map", "--output=json", top])
    let objects = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
    var expected: [MapEntry] = []
    for object in objects {
      let entry = MapEntry(
        start: (object["start"] as! NSNumber).int64Value, length: (object["length"] as! NSNumber).int64Value,
        depth: (object["depth"] as! NSNumber).intValue, isPresent: object["present"] as? Bool ?? true,
        isData: object["data"] as! Bool, isZero: object["zero"] as! Bool)
      if let last = expected.last, last.depth == entry.depth, last.isData == entry.isData, last.isZero == entry.isZero,
        last.isPresent == entry.isPresent
      {
        expected[expected.count - 1].length += entry.length
      } else {
        expected.append(entry)
      }
    }
    XCTAssertEqual(try image.map(), expected)
    let dataBytes: Int64 = try image.map().filter { $0.isData }.reduce(0) { $0 + $1.length }
    // 2 MiB at 1 MiB, 64 KiB at 8 MiB, and 1 MiB at 40 MiB less the 64 KiB zeroed above it.
    let written: Int64 = (2 << 20) + (64 << 10) + (1 << 20) - (64 << 10)
    XCTAssertEqual(dataBytes, written)
  }

  func testConvertWithProgress() throws {
    let top = try makeChain()
    var options = ConversionOptions(outputFormat: "vmdk")
    options.formatOptions = ["subformat": "streamOptimized"]
    let conversion = try ImageConversion(source: top, destination: path("out.vmdk"), options: options)
    var reports: [ConversionProgress] = []
    let result = try conversion.run { reports.append($0) }
    XCTAssertEqual(result.virtualSize, 64 << 20)
    XCTAssertEqual(reports.last, ConversionProgress(bytesDone: 64 << 20, bytesTotal: 64 << 20))
    XCTAssertEqual(reports.map(\.bytesDone), reports.map(\.bytesDone).sorted())
    try run("qemu-img", ["compare", "-q", top, path("out.vmdk")])
  }

  func testCancelLeavesNothing() throws {
    // 32 MiB of data: several units, so the conversion is cancelled before it ends.
    try run("qemu-img", ["create", "-q", "-f", "qcow2", path("full.qcow2"), "32M"])
    try run("qemu-io", ["-c", "write -P 0x5a 0 32M", path("full.qcow2")])
    var options = ConversionOptions(outputFormat: "raw")
    options.threads = 1
    let conversion = try ImageConversion(source: path("full.qcow2"), destination: path("out.img"), options: options)
    var calls = 0
    XCTAssertThrowsError(
      try conversion.run { progress in
        calls += 1
        if progress.bytesDone < progress.bytesTotal { conversion.cancel() }
      }
    ) { error in
      XCTAssertTrue((error as? LacunaError)?.isCancellation == true, "\(error)")
    }
    XCTAssertEqual(calls, 1)
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("out.img")))
    let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0 != "full.qcow2" }
    XCTAssertEqual(left, [], "a cancelled conversion leaves no temporary file")
  }

  func testErrorsNameTheImage() {
    XCTAssertThrowsError(try DiskImageChain.open(path("missing.qcow2"))) { error in
      XCTAssertTrue("\(error)".contains("missing.qcow2"), "\(error)")
    }
  }
}

import Foundation
import TestSupport
import XCTest

/// What a person sees: `--version`, value names in `--help`, and `-p` on a terminal.
final class ReadableOutputTests: XCTestCase {
  private var dir: URL!

  override func setUpWithError() throws {
    dir = FileManager.default.temporaryDirectory.appendingPathComponent("lacuna-readable-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
  }

  override func tearDownWithError() throws {
    try? FileManager.default.removeItem(at: dir)
  }

  /// The upstream version of an installed Debian package ("1:1.2.13.dfsg-1" -> "1.2.13").
  private func packageVersion(_ package: String) throws -> String {
    let query = try requireProgram("dpkg-query", skipping: "needs dpkg-query to learn the libraries' versions")
    let outcome = try runProgram(query, ["-W", "-f=${Version}", package])
    guard outcome.status == 0, !outcome.stdout.isEmpty else { throw XCTSkip("\(package) is not installed") }
    var version = Substring(outcome.stdout)
    if let colon = version.firstIndex(of: ":") { version = version[version.index(after: colon)...] }
    return String(version.prefix { $0.isNumber || $0 == "." }).trimmingCharacters(in: CharacterSet(charactersIn: "."))
  }

  func testVersionNamesFormatsAndTheLibrariesFoundAtRunTime() throws {
    let outcome = try lacuna("--version")
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let lines = outcome.stdout.split(separator: "\n").map(String.init)
    XCTAssertTrue(lines.first?.hasPrefix("lacuna version 0.") == true, outcome.stdout)
    let writable = lines.first { $0.hasPrefix("Formats (read and write): ") } ?? ""
    for name in ["raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx"] {
      XCTAssertTrue(writable.split(separator: " ").contains(Substring(name)), "\(name) missing: \(outcome.stdout)")
    }
    // The versions the libraries report match the packages installed (dpkg's word, not lacuna's).
    let zlib = try packageVersion("zlib1g")
    let zstd = try packageVersion("libzstd1")
    XCTAssertTrue(lines.contains("Compression: zlib \(zlib), zstd \(zstd)"), outcome.stdout)
    let nbd = try packageVersion("libnbd0")
    XCTAssertTrue(lines.contains("NBD: libnbd \(nbd)"), outcome.stdout)
  }

  func testHelpNamesValuesInEveryVerb() throws {
    let verbs = ["convert", "create", "info", "map", "sparsify", "stream-receiver"]
    var texts: [String: String] = [:]
    for verb in [nil] + verbs.map(Optional.some) {
      let outcome = try lacuna(verb.map { [$0, "--help"] } ?? ["--help"])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      texts[verb ?? ""] = outcome.stdout
      // No value is named by a single letter ("-f <f>", "-O <O>").
      let single = try NSRegularExpression(pattern: "<[A-Za-z]>")
      let range = NSRange(outcome.stdout.startIndex..., in: outcome.stdout)
      XCTAssertNil(single.firstMatch(in: outcome.stdout, range: range), "\(verb ?? "lacuna"): \(outcome.stdout)")
    }
    let convert = texts["convert"] ?? ""
    for shown in [
      "-f <format>", "-O <output-format>", "-o <options>", "-m <threads>", "-B <backing-file>",
      "-F <backing-format>", "-S <size>", "-t <cache>", "-l <snapshot>", "--progress <bar|json>",
    ] {
      XCTAssertTrue(convert.contains(shown), "convert --help lacks \(shown):\n\(convert)")
    }
    XCTAssertTrue(texts["create"]?.contains("-b <backing-file>") == true, texts["create"] ?? "")
    XCTAssertTrue(texts["map"]?.contains("--start-offset <offset>") == true, texts["map"] ?? "")
    XCTAssertTrue(texts["info"]?.contains("--output <human|json>") == true, texts["info"] ?? "")
    XCTAssertTrue(texts["sparsify"]?.contains("-S <size>") == true, texts["sparsify"] ?? "")
  }

  /// A raw image with `megabytes` MiB of data, for a conversion that takes a moment.
  private func makeSource(megabytes: Int) throws -> String {
    let source = dir.appendingPathComponent("source.img").path
    let chunk = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) | 1 })
    FileManager.default.createFile(atPath: source, contents: nil)
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
    for _ in 0..<megabytes { handle.write(chunk) }
    try handle.close()
    return source
  }

  func testProgressOnATerminalIsABarRedrawnInPlace() throws {
    let script = try requireProgram("script", skipping: "needs util-linux script for a pseudo-terminal")
    let source = try makeSource(megabytes: 256)
    let output = dir.appendingPathComponent("out.qcow2").path
    // script runs the command on a pseudo-terminal and copies what it draws to its own output.
    let command = [try lacunaBinary(), "convert", "-p", "-m", "1", "-O", "qcow2", source, output]
      .map { "'\($0)'" }.joined(separator: " ")
    let outcome = try runProgram(script, ["-qfec", "stty cols 100; " + command, "/dev/null"])
    XCTAssertEqual(outcome.status, 0, outcome.stderr + outcome.stdout)
    let text = outcome.stdout.replacingOccurrences(of: "\r\n", with: "\n")
    let draws = text.components(separatedBy: "\r[").count - 1
    XCTAssertGreaterThanOrEqual(draws, 2, "the bar is drawn and redrawn in place: \(text.debugDescription)")
    XCTAssertTrue(text.hasSuffix("\n"), "the bar's line ends: \(text.debugDescription)")
    XCTAssertFalse(text.contains("/100%)"), "qemu-img's form is for non-terminals: \(text.debugDescription)")
    let last = text.components(separatedBy: "\r").last ?? ""
    XCTAssertTrue(last.hasPrefix("[" + String(repeating: "=", count: 10)), last.debugDescription)
    XCTAssertTrue(last.contains(" 100%  256 MiB / 256 MiB  "), last.debugDescription)
    XCTAssertTrue(last.contains("/s  in 0:"), last.debugDescription)
    // Lines drawn before the end say the rate and the time left.
    let earlier = text.components(separatedBy: "\r").dropLast().filter { $0.hasPrefix("[") }
    if let first = earlier.first(where: { !$0.contains(" 100%") }) {
      XCTAssertTrue(first.contains(" / 256 MiB  "), first.debugDescription)
      XCTAssertTrue(first.contains(" left") || first.contains("--/s"), first.debugDescription)
    }
  }

  func testProgressElsewhereKeepsQemuImgsForm() throws {
    let source = try makeSource(megabytes: 8)
    let output = dir.appendingPathComponent("out.img").path
    let outcome = try lacuna("convert", "-p", "-O", "raw", source, output)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let form = try NSRegularExpression(pattern: "^(    \\(\\d{1,3}\\.\\d\\d/100%\\)\\r)+\\n$")
    let range = NSRange(outcome.stdout.startIndex..., in: outcome.stdout)
    XCTAssertNotNil(form.firstMatch(in: outcome.stdout, range: range), outcome.stdout.debugDescription)
    XCTAssertTrue(outcome.stdout.contains("    (100.00/100%)\r\n"), outcome.stdout.debugDescription)
    XCTAssertFalse(outcome.stdout.contains("\u{1B}"), outcome.stdout.debugDescription)
  }
}

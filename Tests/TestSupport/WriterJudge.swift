import Foundation
import XCTest

/// Judges an image lacuna wrote against qemu-img: its content (`qemu-img compare` with the
/// source), soundness (`qemu-img check` where qemu checks the format), virtual size and file
/// size against qemu-img's own conversion with the same options, and the holes it left.
/// One copy of these checks for every writer's tests.
public struct WriterJudge {
  public let qemu: String
  public let dir: URL

  public init(qemu: String, dir: URL) {
    self.qemu = qemu
    self.dir = dir
  }

  public func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  /// Converts `source` with lacuna and with qemu-img to `-O format -o options`, into
  /// `NAME.lacuna.EXT` and `NAME.qemu.EXT`; returns both paths. `lacunaFlags` go to lacuna
  /// only (`-m 1`, `-t unsafe`); `sourceFormat` is given to both as `-f`.
  public func convertBoth(
    _ source: String, sourceFormat: String? = nil, to format: String, options: String? = nil,
    name: String, ext: String? = nil, lacunaFlags: [String] = [],
    file: StaticString = #filePath, line: UInt = #line
  ) throws -> (ours: String, theirs: String) {
    let suffix = ext ?? format
    let ours = path("\(name).lacuna.\(suffix)")
    let theirs = path("\(name).qemu.\(suffix)")
    var common: [String] = []
    if let sourceFormat { common += ["-f", sourceFormat] }
    common += ["-O", format]
    if let options { common += ["-o", options] }
    let mine = try lacuna(["convert"] + lacunaFlags + common + [source, ours], in: dir)
    XCTAssertEqual(mine.status, 0, "lacuna convert \(common) \(source): \(mine.stderr)", file: file, line: line)
    let qemuOutcome = try runProgram(qemu, ["convert"] + common + [source, theirs], in: dir)
    XCTAssertEqual(qemuOutcome.status, 0, "qemu-img convert \(common): \(qemuOutcome.stderr)", file: file, line: line)
    return (ours, theirs)
  }

  /// `qemu-img compare` says `image` (read as `format`) holds the same disk as `source`.
  public func assertIdentical(
    _ image: String, format: String, to source: String, sourceFormat: String? = nil,
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    var arguments = ["compare"]
    if let sourceFormat { arguments += ["-f", sourceFormat] }
    arguments += ["-F", format, source, image]
    let outcome = try runProgram(qemu, arguments, in: dir)
    XCTAssertEqual(outcome.status, 0, "qemu-img \(arguments.joined(separator: " ")): \(outcome.stdout)\(outcome.stderr)", file: file, line: line)
  }

  /// `qemu-img check` finds no errors and no leaks in `image`. Formats qemu-img does not
  /// check (raw, vpc) pass without a word.
  public func assertCheckClean(_ image: String, format: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let outcome = try runProgram(qemu, ["check", "-f", format, image], in: dir)
    if outcome.stderr.contains("does not support checks") { return }
    XCTAssertEqual(outcome.status, 0, "qemu-img check \(image): \(outcome.stdout)\(outcome.stderr)", file: file, line: line)
  }

  /// `qemu-img info --output=json` of `image`, parsed.
  public func info(_ image: String, format: String) throws -> [String: Any] {
    let outcome = try runProgram(qemu, ["info", "--output=json", "-f", format, image], in: dir)
    guard outcome.status == 0,
      let object = try JSONSerialization.jsonObject(with: Data(outcome.stdout.utf8)) as? [String: Any]
    else {
      throw NSError(domain: "lacuna-tests", code: 1, userInfo: [NSLocalizedDescriptionKey: "qemu-img info \(image): \(outcome.stderr)"])
    }
    return object
  }

  /// The same virtual size as qemu-img's own output records.
  public func assertSameVirtualSize(
    _ ours: String, _ theirs: String, format: String, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let mine = try info(ours, format: format)["virtual-size"] as? Int
    let qemus = try info(theirs, format: format)["virtual-size"] as? Int
    XCTAssertNotNil(mine, file: file, line: line)
    XCTAssertEqual(mine, qemus, "virtual size of \(ours) against qemu-img's", file: file, line: line)
  }

  /// The files' length (apparent size) and the storage they take on the host, summed.
  public static func sizes(_ paths: [String]) throws -> (apparent: Int64, allocated: Int64) {
    var apparent: Int64 = 0
    var allocated: Int64 = 0
    for path in paths {
      var info = stat()
      guard stat(path, &info) == 0 else {
        throw NSError(domain: "lacuna-tests", code: 1, userInfo: [NSLocalizedDescriptionKey: "stat \(path): errno \(errno)"])
      }
      apparent += Int64(info.st_size)
      allocated += Int64(info.st_blocks) * 512
    }
    return (apparent, allocated)
  }

  /// Our files (all of an output's files) are no larger than qemu-img's, in length and on
  /// the host, than 2% over (plus `slack` bytes for metadata on tiny images).
  public func assertNoLarger(
    _ ours: [String], than theirs: [String], slack: Int64 = 64 << 10,
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let mine = try WriterJudge.sizes(ours)
    let qemus = try WriterJudge.sizes(theirs)
    XCTAssertLessThanOrEqual(
      mine.apparent, qemus.apparent + qemus.apparent / 50 + slack,
      "length of \(ours) against qemu-img's \(theirs)", file: file, line: line)
    XCTAssertLessThanOrEqual(
      mine.allocated, qemus.allocated + qemus.allocated / 50 + slack,
      "storage of \(ours) against qemu-img's \(theirs)", file: file, line: line)
  }

  /// The output takes no more host storage than `data` bytes plus `metadata`: where the
  /// disk reads zero, the file has holes.
  public func assertHoles(
    _ paths: [String], data: Int64, metadata: Int64, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let allocated = try WriterJudge.sizes(paths).allocated
    XCTAssertLessThanOrEqual(
      allocated, data + metadata, "\(paths) take \(allocated) bytes on the host for \(data) bytes of data",
      file: file, line: line)
  }

  /// Converts `source` with `-m 1` and `-m 8` and insists on the same bytes, after `mask`
  /// has blanked the fields that are random by design (UUIDs) in both.
  public func assertSameBytesForThreadCounts(
    _ source: String, to format: String, options: String? = nil, name: String, extraFlags: [String] = [],
    mask: (inout [UInt8]) -> Void = { _ in }, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    var outputs: [[UInt8]] = []
    for threads in ["1", "8"] {
      let out = path("\(name).m\(threads).\(format)")
      var arguments = ["convert", "-m", threads, "-O", format]
      if let options { arguments += ["-o", options] }
      let outcome = try lacuna(arguments + extraFlags + [source, out], in: dir)
      XCTAssertEqual(outcome.status, 0, outcome.stderr, file: file, line: line)
      var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
      mask(&bytes)
      outputs.append(bytes)
    }
    XCTAssertEqual(outputs[0].count, outputs[1].count, "lengths with -m 1 and -m 8", file: file, line: line)
    XCTAssertTrue(outputs[0] == outputs[1], "\(name): different bytes with -m 1 and -m 8", file: file, line: line)
  }
}

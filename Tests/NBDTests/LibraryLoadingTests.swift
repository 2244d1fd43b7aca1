import Foundation
import TestSupport
import XCTest

/// libnbd is loaded when an NBD URI (or `--version`) asks for it, not at every start: linked,
/// it brought 15 more libraries and their constructors into every conversion (2 ms of
/// start-up, a third of lacuna's fixed cost). Without it, NBD is refused by name and files
/// convert as before.
final class LibraryLoadingTests: XCTestCase {
  /// Runs lacuna with `LD_DEBUG=files`, which lists every library the loader maps (at start
  /// and by dlopen) on standard error.
  private func librariesLoaded(_ arguments: [String]) throws -> (outcome: Outcome, libnbd: Bool) {
    let outcome = try runProgram("/usr/bin/env", ["LD_DEBUG=files", try lacunaBinary()] + arguments)
    return (outcome, outcome.stderr.contains("file=libnbd.so.0"))
  }

  /// A 4 MiB raw with 64 KiB of data at 1 MiB.
  private func makeRaw(in directory: URL) throws -> String {
    let source = directory.appendingPathComponent("src.raw").path
    XCTAssertTrue(FileManager.default.createFile(atPath: source, contents: nil))
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
    try handle.truncate(atOffset: 4 << 20)
    try handle.seek(toOffset: 1 << 20)
    handle.write(Data(repeating: 0xab, count: 64 << 10))
    try handle.close()
    return source
  }

  func testFilesConvertWithoutLoadingLibnbd() throws {
    let directory = try temporaryDirectory(self)
    let source = try makeRaw(in: directory)
    let output = directory.appendingPathComponent("out.qcow2").path

    // The check can fail: --version asks libnbd its version, so it loads it.
    let version = try librariesLoaded(["--version"])
    XCTAssertEqual(version.outcome.status, 0, version.outcome.stderr)
    XCTAssertTrue(version.libnbd, "LD_DEBUG=files shows no libnbd for --version")
    XCTAssertTrue(version.outcome.stdout.contains("NBD: libnbd 1."), version.outcome.stdout)
    // So does --version given after a verb, which the argument parser answers.
    let late = try runProgram(try lacunaBinary(), ["info", "--version", source])
    XCTAssertEqual(late.stdout, version.outcome.stdout)

    for arguments in [["convert", "-O", "qcow2", source, output], ["info", output], ["compare", source, output],
      ["map", "--output=json", source], ["--help"]]
    {
      let run = try librariesLoaded(arguments)
      XCTAssertEqual(run.outcome.status, 0, "\(arguments): \(run.outcome.stderr.suffix(2000))")
      XCTAssertFalse(run.libnbd, "lacuna \(arguments.joined(separator: " ")) loaded libnbd")
    }
    let readelf = try requireProgram("readelf", skipping: "readelf (binutils) is not installed")
    let dynamic = try runProgram(readelf, ["-d", try lacunaBinary()])
    XCTAssertEqual(dynamic.status, 0, dynamic.stderr)
    XCTAssertFalse(dynamic.stdout.contains("libnbd"), "the binary links libnbd:\n\(dynamic.stdout)")
  }

  /// Where libnbd cannot be loaded (hidden by a bind mount of /dev/null in a mount namespace
  /// of the lacuna process only, gone when it exits): an NBD URI is refused in one line
  /// naming the URI and the library, files still convert, --version says so.
  func testWithoutLibnbdNBDIsRefusedByNameAndFilesStillConvert() throws {
    guard getuid() == 0, let unshare = which("unshare") else {
      throw XCTSkip("hiding libnbd needs root and unshare (a private mount namespace)")
    }
    let ldconfig = try runProgram("/sbin/ldconfig", ["-p"])
    guard let line = ldconfig.stdout.split(separator: "\n").first(where: { $0.contains("libnbd.so.0 ") }),
      let arrow = line.range(of: "=> ")
    else { throw XCTSkip("ldconfig -p lists no libnbd.so.0") }
    let library = URL(fileURLWithPath: String(line[arrow.upperBound...])).resolvingSymlinksInPath().path

    let directory = try temporaryDirectory(self)
    let source = try makeRaw(in: directory)
    func hidden(_ arguments: [String]) throws -> Outcome {
      let script = "mount --bind /dev/null \"$0\" || exit 97; exec \"$@\""
      let outcome = try runProgram(
        unshare, ["--mount", "--propagation", "private", "sh", "-c", script, library, try lacunaBinary()] + arguments)
      if outcome.status == 97 { throw XCTSkip("mount --bind refused in a new mount namespace: \(outcome.stderr)") }
      return outcome
    }

    let output = directory.appendingPathComponent("out.raw").path
    let socket = directory.appendingPathComponent("none.sock").path
    let uri = "nbd+unix:///?socket=\(socket)"
    let refused = try hidden(["convert", "-O", "raw", uri, output])
    XCTAssertEqual(refused.status, 1, refused.stderr)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertTrue(refused.stderr.contains(uri), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("libnbd"), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("libnbd0"), refused.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: output))

    let target = try hidden(["convert", "-O", "raw", source, uri])
    XCTAssertEqual(target.status, 1, target.stderr)
    XCTAssertTrue(target.stderr.contains("libnbd0"), target.stderr)

    let converted = try hidden(["convert", "-O", "raw", source, output])
    XCTAssertEqual(converted.status, 0, converted.stderr)
    XCTAssertEqual(
      try Data(contentsOf: URL(fileURLWithPath: output)), try Data(contentsOf: URL(fileURLWithPath: source)))

    let version = try hidden(["--version"])
    XCTAssertEqual(version.status, 0, version.stderr)
    XCTAssertTrue(version.stdout.contains("NBD: libnbd (unavailable)"), version.stdout)
  }
}

import Foundation
import XCTest

/// The built `lacuna` binary, beside the test bundle (`swift build` puts both in one folder).
public func lacunaBinary() throws -> String {
  if let path = ProcessInfo.processInfo.environment["LACUNA_BIN"] { return path }
  var directory = Bundle.main.bundleURL
  for _ in 0..<3 {
    let candidate = directory.appendingPathComponent("lacuna").path
    if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    directory = directory.deletingLastPathComponent()
  }
  throw XCTSkip("the lacuna binary is not built; run `swift build` first (script/test does)")
}

/// Runs lacuna with these arguments.
@discardableResult
public func lacuna(_ arguments: String..., in directory: URL? = nil) throws -> Outcome {
  try runProgram(try lacunaBinary(), arguments, in: directory)
}

/// Runs lacuna with these arguments, given as a list.
@discardableResult
public func lacuna(_ arguments: [String], in directory: URL? = nil) throws -> Outcome {
  try runProgram(try lacunaBinary(), arguments, in: directory)
}

/// Runs lacuna and reports, with its outcome, the most memory it held at once (its peak
/// resident set in KiB), as GNU time measures it. The test process cannot ask wait4 itself:
/// a child it starts (posix_spawn's vfork, or fork) counts the test's own memory until it
/// execs, while GNU time is a small process that forks lacuna. Skips where it is missing
/// (script/bootstrap installs Debian's `time`).
public func lacunaMeasuringMemory(_ arguments: [String]) throws -> (outcome: Outcome, peakKiB: Int) {
  let time = "/usr/bin/time"
  guard FileManager.default.isExecutableFile(atPath: time) else {
    throw XCTSkip("GNU time is not installed (apt-get install time); skipping a memory measurement")
  }
  let report = FileManager.default.temporaryDirectory.appendingPathComponent("lacuna-peak-\(UUID().uuidString)").path
  defer { try? FileManager.default.removeItem(atPath: report) }
  let outcome = try runProgram(time, ["-f", "%M", "-o", report, try lacunaBinary()] + arguments)
  let text = try String(contentsOfFile: report, encoding: .utf8)
  // GNU time writes "Command exited with non-zero status N" first when it did.
  guard let peak = text.split(separator: "\n").last.flatMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) else {
    throw NSError(domain: "lacuna-tests", code: 1, userInfo: [NSLocalizedDescriptionKey: "GNU time wrote: \(text)"])
  }
  return (outcome, peak)
}

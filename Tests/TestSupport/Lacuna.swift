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

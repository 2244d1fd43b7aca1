import Foundation
import XCTest

/// A test that makes images with qemu-img and qemu-io in a temporary directory and judges
/// lacuna's results with them. Skips, saying why, where qemu-utils is not installed.
open class QemuTestCase: XCTestCase {
  public var dir: URL!
  public var qemu: String!

  open override func setUpWithError() throws {
    qemu = try requireQemuImg()
    guard which("qemu-io") != nil else { throw XCTSkip("qemu-io is not installed (apt-get install qemu-utils)") }
    dir = try temporaryDirectory(self)
  }

  public func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  /// Runs qemu-img in the test's directory.
  @discardableResult
  public func qemuImg(_ arguments: String...) throws -> Outcome {
    try runProgram(qemu, arguments, in: dir)
  }

  /// Runs qemu-img, insists it succeeds, and returns what it printed.
  @discardableResult
  public func qemuImgOK(_ arguments: String..., file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let outcome = try runProgram(qemu, arguments, in: dir)
    XCTAssertEqual(
      outcome.status, 0, "qemu-img \(arguments.joined(separator: " ")): \(outcome.stderr)", file: file, line: line)
    return outcome.stdout
  }

  /// Runs qemu-io commands on an image and insists they succeed.
  public func qemuIO(_ image: String, _ commands: String..., file: StaticString = #filePath, line: UInt = #line) throws {
    var arguments: [String] = []
    for command in commands { arguments += ["-c", command] }
    let outcome = try runProgram(which("qemu-io")!, arguments + [image], in: dir)
    XCTAssertEqual(outcome.status, 0, outcome.stderr, file: file, line: line)
    XCTAssertFalse(outcome.stdout.contains("error"), outcome.stdout, file: file, line: line)
  }
}

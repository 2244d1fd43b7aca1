import Foundation
import TestSupport
import XCTest

/// lacuna started in unusual surroundings, as a service or a script may start it.
final class SurroundingsTests: XCTestCase {
  /// With standard input and output closed, the first files lacuna opens would take
  /// descriptors 0 and 1, and the progress lines would be written into the output image.
  func testClosedStandardDescriptorsAreNotTakenByImages() throws {
    let dir = try temporaryDirectory(self)
    let source = dir.appendingPathComponent("src.img").path
    var bytes = [UInt8](repeating: 0, count: 1 << 20)
    for index in 0..<(64 << 10) { bytes[index] = UInt8(truncatingIfNeeded: index % 255 + 1) }
    try Data(bytes).write(to: URL(fileURLWithPath: source))
    let binary = try lacunaBinary()
    for closing in ["<&- >&-", ">&-", "<&- >&- 2>&-"] {
      let output = dir.appendingPathComponent("out.img").path
      try? FileManager.default.removeItem(atPath: output)
      let script = "exec \"$0\" convert --progress=json -O raw \"$1\" \"$2\" \(closing)"
      let outcome = try runProgram("/bin/sh", ["-c", script, binary, source, output])
      XCTAssertEqual(outcome.status, 0, "\(closing): \(outcome.stderr)")
      XCTAssertEqual([UInt8](try Data(contentsOf: URL(fileURLWithPath: output))), bytes, "\(closing): the output is the source")
    }
  }
}

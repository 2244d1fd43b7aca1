import Foundation
import TestSupport
import XCTest

/// Every input in Fixtures/regressions/ (inputs that once crashed the reader) converted by
/// the built binary: a clean refusal or a conversion that qemu-img agrees with, never a
/// crash or a hang, and nothing left behind on failure.
final class HostileRegressionTests: XCTestCase {
  func testRegressionFixturesConvertOrAreRefused() throws {
    let directory = fixturesDirectory.appendingPathComponent("regressions")
    let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
      .filter { $0.hasSuffix(".qcow2") }.sorted()
    XCTAssertFalse(names.isEmpty)
    for name in names {
      let work = try temporaryDirectory(self)
      let input = directory.appendingPathComponent(name).path
      let before = try Data(contentsOf: URL(fileURLWithPath: input))
      let output = work.appendingPathComponent("out.raw").path
      let (outcome, timedOut) = try runLacunaBounded(["convert", "-f", "qcow2", "-O", "raw", input, output], seconds: 30)
      let context = "\(name): \(outcome.stderr)"
      XCTAssertFalse(timedOut, "hung: " + context)
      XCTAssertNil(outcome.signal, "crashed: " + context)
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: input)), before, context)
      if outcome.status == 0 {
        // qemu-img is stricter about offsets of empty tables (it refuses them); where it
        // reads the image, it must read what we read.
        if let qemu = which("qemu-img") {
          let judged = work.appendingPathComponent("qemu.raw").path
          if try runProgram(qemu, ["convert", "-f", "qcow2", "-O", "raw", input, judged]).status == 0 {
            XCTAssertTrue(try sameContent(output, judged), "differs from qemu-img: " + context)
          }
        }
      } else {
        XCTAssertEqual(outcome.status, 1, context)
        XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, context)
        XCTAssertTrue(outcome.stderr.contains(name), context)
        XCTAssertEqual(listing(work), [], context)
      }
      print("regression \(name): \(outcome.status == 0 ? "converted" : outcome.stderr.trimmingCharacters(in: .newlines))")
    }
  }
}

import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// `-n` and block devices: the destination is written in place, its zero ranges made zero
/// (or skipped with `--target-is-zero`), never resized, never replaced.
final class InPlaceTests: QemuTestCase {
  /// A 16 MiB qcow2 with data, a zero cluster over data, and holes; and its content.
  func makeSource() throws -> [UInt8] {
    try qemuImgOK("create", "-f", "qcow2", path("src.qcow2"), "16M")
    try qemuIO(path("src.qcow2"), "write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -z 512k 64k", "write -P 0x33 15M 1M")
    try qemuImgOK("convert", "-O", "raw", path("src.qcow2"), path("truth.raw"))
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("truth.raw"))))
  }

  func fill(_ name: String, size: Int, byte: UInt8) throws {
    try Data(repeating: byte, count: size).write(to: URL(fileURLWithPath: path(name)))
  }

  func contents(_ name: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path(name)))) }

  func testAnExistingFileIsWrittenInPlace() throws {
    let truth = try makeSource()
    try fill("target.bin", size: 20 << 20, byte: 0xff)
    let outcome = try lacuna(["convert", "-n", "-O", "raw", path("src.qcow2"), path("target.bin")])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    let written = try contents("target.bin")
    XCTAssertEqual(written.count, 20 << 20, "never resized")
    XCTAssertTrue(written[0..<truth.count].elementsEqual(truth), "the disk, its zero ranges made zero")
    XCTAssertTrue(written[truth.count...].allSatisfy { $0 == 0xff }, "the tail past the disk is left alone")
    XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: dir.path).contains { $0.contains(".lacuna-") })

    // --target-is-zero: zero ranges are skipped (here the target lies: they stay 0xff).
    try fill("lied.bin", size: 16 << 20, byte: 0xff)
    XCTAssertEqual(try lacuna(["convert", "-n", "--target-is-zero", "-O", "raw", path("src.qcow2"), path("lied.bin")]).status, 0)
    let skipped = try contents("lied.bin")
    XCTAssertTrue(skipped[0..<(1 << 20)].elementsEqual(truth[0..<(1 << 20)]) == false, "the zero cluster was skipped")
    XCTAssertTrue(skipped[(2 << 20)..<(3 << 20)].allSatisfy { $0 == 0xff }, "a hole was not written")
    XCTAssertTrue(skipped[(5 << 20)..<(5 << 20) + 65536].allSatisfy { $0 == 0x22 }, "data was written")
  }

  func testWhatCannotBeWrittenInPlaceIsRefusedUntouched() throws {
    _ = try makeSource()
    try fill("small.bin", size: 1 << 20, byte: 0xab)
    try fill("big.bin", size: 16 << 20, byte: 0xab)
    for (arguments, message) in [
      (["-n", "-O", "raw", path("src.qcow2"), path("small.bin")], "smaller than the 16777216 bytes of the disk"),
      (["-n", "-O", "qcow2", path("src.qcow2"), path("big.bin")], "qcow2 images cannot be written in place"),
      (["-n", "-O", "raw", path("src.qcow2"), path("absent.bin")], "does not exist; -n writes into an existing"),
      (["--target-is-zero", "-O", "raw", path("src.qcow2"), path("new.bin")], "--target-is-zero needs -n"),
    ] {
      let outcome = try lacuna(["convert"] + arguments)
      XCTAssertEqual(outcome.status, 2, "\(arguments): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains(message), outcome.stderr)
    }
    XCTAssertTrue(try contents("small.bin").allSatisfy { $0 == 0xab })
    XCTAssertTrue(try contents("big.bin").allSatisfy { $0 == 0xab })
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("absent.bin")))
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("new.bin")))
  }

  /// A block device as the destination is written in place (BLKZEROOUT for its zero
  /// ranges), not replaced by a file. Needs root and a loop device; skips where refused.
  func testABlockDeviceDestinationIsWrittenInPlace() throws {
    let truth = try makeSource()
    guard getuid() == 0, let losetup = which("losetup") else { throw XCTSkip("needs root and losetup for a loop device") }
    try fill("device.bin", size: 16 << 20, byte: 0xee)
    let attach = try runProgram(losetup, ["--find", "--show", path("device.bin")])
    guard attach.status == 0 else { throw XCTSkip("losetup refused: \(attach.stderr)") }
    let device = attach.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    defer { _ = try? runProgram(losetup, ["-d", device]) }
    let outcome = try lacuna(["convert", "-O", "raw", path("src.qcow2"), device])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    var info = stat()
    XCTAssertEqual(stat(device, &info), 0)
    XCTAssertEqual(info.st_mode & S_IFMT, S_IFBLK, "the device is still a device")
    let compare = try qemuImg("compare", "-f", "qcow2", "-F", "raw", path("src.qcow2"), device)
    XCTAssertEqual(compare.status, 0, compare.stdout + compare.stderr)
    _ = try runProgram(losetup, ["-d", device])
    XCTAssertTrue(try contents("device.bin").elementsEqual(truth))
  }
}

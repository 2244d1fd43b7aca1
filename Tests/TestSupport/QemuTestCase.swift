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

extension QemuTestCase {
  /// Mounts a fresh file system of `kind` ("xfs" or "btrfs") made in a sparse loop file;
  /// unmounted (which frees the loop device) when the test ends, pass or fail.
  public func mountScratch(_ kind: String) throws -> String {
    guard getuid() == 0 else { throw XCTSkip("making \(kind) in a loop file needs root") }
    let package = ["xfs": "xfsprogs", "btrfs": "btrfs-progs"][kind] ?? "e2fsprogs"
    let mkfs = try requireProgram("mkfs.\(kind)", skipping: "mkfs.\(kind) is not installed (apt-get install \(package))")
    let image = path("\(kind).fs")
    XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
    XCTAssertEqual(truncate(image, 512 << 20), 0)
    let made = try runProgram(
      mkfs, kind == "xfs" ? ["-q", "-m", "reflink=1", image] : kind == "ext4" ? ["-q", "-F", image] : ["-q", image])
    guard made.status == 0 else { throw XCTSkip("mkfs.\(kind) failed: \(made.stderr)") }
    let mountPoint = path("\(kind)-mnt")
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    let mounted = try runProgram("/bin/mount", ["-o", "loop", image, mountPoint])
    guard mounted.status == 0 else {
      throw XCTSkip("the kernel refuses a loop mount of \(kind): \(mounted.stderr)")
    }
    addTeardownBlock {
      if (try? runProgram("/bin/umount", [mountPoint]))?.status != 0 {
        _ = try? runProgram("/bin/umount", ["-l", mountPoint])
      }
    }
    return mountPoint
  }
}

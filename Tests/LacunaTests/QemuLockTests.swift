import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// qemu's image locks, both ways: lacuna refuses an image a VM (here qemu-io) is writing,
/// and while lacuna reads an image, qemu cannot start writing it.
final class QemuLockTests: QemuTestCase {
  /// Starts qemu-io holding `image` with `options` (read-write by default) until killed.
  func hold(_ image: String, _ options: [String] = []) throws -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: which("qemu-io")!)
    process.arguments = options + ["-c", "sleep 60000", image]
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    // Wait until its locks are there: /proc/locks names the file's inode.
    var info = stat()
    stat(image, &info)
    let inode = ":\(info.st_ino) "
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
      if let locks = try? String(contentsOfFile: "/proc/locks", encoding: .utf8), locks.contains(inode) { break }
      usleep(10_000)
    }
    return process
  }

  func release(_ process: Process) {
    process.terminate()
    process.waitUntilExit()
  }

  func testAnImageAVMIsWritingIsRefusedUnlessForced() throws {
    try qemuImgOK("create", "-f", "qcow2", path("vm.qcow2"), "4M")
    try qemuIO(path("vm.qcow2"), "write -P 0x42 0 64k")
    let holder = try hold(path("vm.qcow2"))
    defer { release(holder) }
    for arguments in [
      ["convert", "-O", "raw", path("vm.qcow2"), path("out.img")], ["info", path("vm.qcow2")],
      ["map", path("vm.qcow2")],
    ] {
      let outcome = try lacuna(arguments)
      XCTAssertEqual(outcome.status, 1, "\(arguments[0]): \(outcome.stderr)")
      XCTAssertTrue(outcome.stderr.contains("vm.qcow2: in use: another process holds a write lock"), outcome.stderr)
    }
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("out.img")))
    let forced = try lacuna(["convert", "-U", "-O", "raw", path("vm.qcow2"), path("out.img")])
    XCTAssertEqual(forced.status, 0, forced.stderr)
    release(holder)
    XCTAssertEqual(try lacuna(["convert", "-O", "raw", path("vm.qcow2"), path("out2.img")]).status, 0)
  }

  func testSparsifyHoldsWhatAWriterHolds() throws {
    try qemuImgOK("create", "-f", "raw", path("disk.img"), "4M")
    let reader = try hold(path("disk.img"), ["-f", "raw"])
    defer { release(reader) }
    let outcome = try lacuna(["sparsify", path("disk.img")])
    XCTAssertEqual(outcome.status, 1, outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("disk.img: in use"), outcome.stderr)
    release(reader)
    XCTAssertEqual(try lacuna(["sparsify", path("disk.img")]).status, 0)
  }

  /// While lacuna reads an image, a VM cannot start writing it.
  func testWhileLacunaReadsQemuCannotWrite() throws {
    let source = path("src.img")
    let fd = open(source, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
    let block = [UInt8](repeating: 0x3a, count: 1 << 20)
    for i in 0..<512 { _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(i) << 20) } }
    close(fd)
    let conversion = Process()
    conversion.executableURL = URL(fileURLWithPath: try lacunaBinary())
    conversion.arguments = ["convert", "-m", "1", "-S", "0", "-O", "raw", source, path("dst.img")]
    try conversion.run()
    defer {
      conversion.terminate()
      conversion.waitUntilExit()
    }
    waitUntilWriting(conversion, in: dir.path)
    let write = try runProgram(which("qemu-io")!, ["-f", "raw", "-c", "write 0 512", source])
    XCTAssertTrue(conversion.isRunning, "the conversion ended before qemu-io tried; the test needs a slower input")
    XCTAssertNotEqual(write.status, 0, "qemu-io wrote into an image lacuna was reading")
    XCTAssertTrue((write.stdout + write.stderr).contains("lock"), write.stdout + write.stderr)
  }
}

import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// Writes that fail and processes that die: the destination gets a complete image or
/// nothing, the temporary file goes away (except after SIGKILL, which nothing can catch),
/// and the exit status says what happened.
final class FaultTests: XCTestCase {
  var work: URL!
  var source: String!
  var destinationDirectory: URL!

  override func setUpWithError() throws {
    work = try temporaryDirectory(self)
    destinationDirectory = work.appendingPathComponent("out")
    try FileManager.default.createDirectory(at: destinationDirectory, withIntermediateDirectories: true)
    source = work.appendingPathComponent("src.img").path
  }

  func destination(_ name: String) -> String { destinationDirectory.appendingPathComponent(name).path }

  /// A raw source of `mebibytes` of incompressible data, one hole every fourth MiB.
  func makeSource(mebibytes: Int) throws {
    let fd = open(source, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
    defer { close(fd) }
    let block = patternBytes(1 << 20, seed: 66)
    for index in 0..<mebibytes where index % 4 != 3 {
      _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(index) << 20) }
    }
    XCTAssertEqual(ftruncate(fd, off_t(mebibytes) << 20), 0)
  }

  func assertRefusedCleanly(
    _ outcome: Outcome, timedOut: Bool, mentioning fragment: String, file: StaticString = #filePath, line: UInt = #line
  ) {
    XCTAssertFalse(timedOut, "hung: \(outcome.stderr)", file: file, line: line)
    XCTAssertNil(outcome.signal, "killed by signal \(outcome.signal ?? 0): \(outcome.stderr)", file: file, line: line)
    XCTAssertEqual(outcome.status, 1, outcome.stderr, file: file, line: line)
    XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr, file: file, line: line)
    XCTAssertTrue(outcome.stderr.contains(fragment), "expected '\(fragment)': \(outcome.stderr)", file: file, line: line)
    XCTAssertEqual(listing(destinationDirectory), [], "left behind", file: file, line: line)
  }

  // MARK: Writes that fail

  /// `ulimit -f` makes a write past the limit fail with EFBIG (lacuna ignores SIGXFSZ).
  func testFileSizeLimit() throws {
    try makeSource(mebibytes: 8)
    for arguments in [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-c"], ["-O", "raw", "-S", "0"]] {
      // dash counts -f in 512-byte blocks: 2048 blocks is 1 MiB.
      let (outcome, timedOut) = try runLacunaBounded(
        ["convert"] + arguments + [source, destination("out.img")], seconds: 60, shellPrefix: "ulimit -f 2048; ")
      print("ulimit -f, \(arguments.joined(separator: " ")): \(outcome.stderr)", terminator: "")
      assertRefusedCleanly(outcome, timedOut: timedOut, mentioning: "File too large")
      XCTAssertTrue(outcome.stderr.contains("out.img"), outcome.stderr)
    }
  }

  /// A 2 MiB tmpfs fills up: ENOSPC. Needs root (or a user namespace); skipped otherwise.
  func testFullFileSystem() throws {
    let mountPoint = work.appendingPathComponent("small").path
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    let mount = try runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=2m", "tmpfs", mountPoint])
    guard mount.status == 0 else {
      throw XCTSkip("cannot mount a small tmpfs here (\(mount.stderr.trimmingCharacters(in: .whitespacesAndNewlines))); skipping the full-disk case")
    }
    addTeardownBlock { _ = try? runProgram("/bin/umount", ["-l", mountPoint]) }
    destinationDirectory = URL(fileURLWithPath: mountPoint)
    try makeSource(mebibytes: 8)
    for arguments in [["-O", "raw"], ["-O", "qcow2"], ["-O", "raw", "-o", "preallocation=falloc"]] {
      let (outcome, timedOut) = try runLacunaBounded(["convert"] + arguments + [source, destination("out.img")], seconds: 60)
      print("2 MiB tmpfs, \(arguments.joined(separator: " ")): \(outcome.stderr)", terminator: "")
      assertRefusedCleanly(outcome, timedOut: timedOut, mentioning: "No space left on device")
    }
    // A conversion that fits still works there.
    try makeSource(mebibytes: 1)
    let (fits, _) = try runLacunaBounded(["convert", "-O", "qcow2", source, destination("out.img")])
    XCTAssertEqual(fits.status, 0, fits.stderr)
    XCTAssertEqual(listing(destinationDirectory), ["out.img"])
  }

  /// A file replaced on a nearly full file system: the old image keeps its room until the
  /// new one is complete, so both must fit. The error says so and names -n, the old file
  /// is untouched, and -n then writes into it. Needs root for the tmpfs; skipped otherwise.
  func testReplacingAFileThatWouldNotFitBesideItSaysSo() throws {
    let mountPoint = work.appendingPathComponent("small").path
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
    let mount = try runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=6m", "tmpfs", mountPoint])
    guard mount.status == 0 else {
      throw XCTSkip("cannot mount a small tmpfs here (\(mount.stderr.trimmingCharacters(in: .whitespacesAndNewlines))); skipping")
    }
    addTeardownBlock { _ = try? runProgram("/bin/umount", ["-l", mountPoint]) }
    destinationDirectory = URL(fileURLWithPath: mountPoint)
    try makeSource(mebibytes: 4)  // 3 MiB of data, a hole in the last MiB
    let old = destination("disk.img")
    let oldBytes = Data(patternBytes(4 << 20, seed: 5))
    try oldBytes.write(to: URL(fileURLWithPath: old))
    for format in ["raw", "qcow2"] {
      let (outcome, timedOut) = try runLacunaBounded(["convert", "-O", format, source, old], seconds: 60)
      print("replacing on a full tmpfs, -O \(format): \(outcome.stderr)", terminator: "")
      XCTAssertFalse(timedOut)
      XCTAssertEqual(outcome.status, 1, outcome.stderr)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains("No space left on device"), outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains("no room for both"), outcome.stderr)
      XCTAssertTrue(outcome.stderr.contains("-n"), outcome.stderr)
      XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: old)) == oldBytes, "the old image changed")
      XCTAssertEqual(listing(destinationDirectory), ["disk.img"])
    }
    // A new file that fits gets no such advice: a plain full disk is only "No space left".
    let (fresh, _) = try runLacunaBounded(["convert", "-O", "raw", "-S", "0", source, destination("new.img")], seconds: 60)
    XCTAssertEqual(fresh.status, 1, fresh.stderr)
    XCTAssertFalse(fresh.stderr.contains("no room for both"), fresh.stderr)
    XCTAssertEqual(listing(destinationDirectory), ["disk.img"])
    // -n writes into the old file in place, needing no more room.
    let (inPlace, _) = try runLacunaBounded(["convert", "-n", "-O", "raw", source, old], seconds: 60)
    XCTAssertEqual(inPlace.status, 0, inPlace.stderr)
    XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: old)) == Data(contentsOf: URL(fileURLWithPath: source)))
  }

  /// fsync and close that fail (injected with LD_PRELOAD, for regular files opened for
  /// writing only): a non-zero exit and no output.
  func testFailingFsyncAndClose() throws {
    let library = try faultInjectionLibrary()
    try makeSource(mebibytes: 2)
    for (fault, expected) in [("fsync", "fsync: Input/output error"), ("close", "close: Input/output error")] {
      for format in ["raw", "qcow2"] {
        let (outcome, timedOut) = try runLacunaBounded(
          ["convert", "-O", format, source, destination("out.img")],
          environment: ["LD_PRELOAD": library, "LACUNA_FAULT": fault])
        print("failing \(fault), -O \(format): \(outcome.stderr)", terminator: "")
        assertRefusedCleanly(outcome, timedOut: timedOut, mentioning: expected)
      }
    }
    // The directory's fsync comes after the rename: the output is complete, but the exit
    // status still says its durability is not known.
    let (outcome, _) = try runLacunaBounded(
      ["convert", "-O", "raw", source, destination("out.img")],
      environment: ["LD_PRELOAD": library, "LACUNA_FAULT": "fsync-directory"])
    print("failing directory fsync: \(outcome.stderr)", terminator: "")
    XCTAssertEqual(outcome.status, 1, outcome.stderr)
    XCTAssertTrue(outcome.stderr.contains("fsync the directory"), outcome.stderr)
  }

  /// SIGTERM while the finished output is linked or renamed into place: the signal is held
  /// until the output is there, and then the work it would have stopped is done, so the
  /// exit status is 0 and the destination holds the complete image (never a failure with
  /// an output in place). Unnamed temporary file (linkat) and named one (rename), a new
  /// destination and one replaced.
  func testASignalDuringTheFinalLinkWaitsForIt() throws {
    let library = try faultInjectionLibrary()
    try makeSource(mebibytes: 2)
    let expected = work.appendingPathComponent("expected.qcow2").path
    XCTAssertEqual(try runProgram(try lacunaBinary(), ["convert", "-O", "qcow2", source, expected]).status, 0)
    let expectedBytes = try Data(contentsOf: URL(fileURLWithPath: expected))
    for named in [false, true] {
      for replacing in [false, true] {
        if replacing { try Data("old".utf8).write(to: URL(fileURLWithPath: destination("out.qcow2"))) }
        var environment = ["LD_PRELOAD": library, "LACUNA_FAULT": "term-in-link"]
        if named { environment["LACUNA_TEMPORARY_FILE"] = "named" }
        let (outcome, timedOut) = try runLacunaBounded(
          ["convert", "-O", "qcow2", source, destination("out.qcow2")], environment: environment)
        XCTAssertFalse(timedOut)
        XCTAssertNil(outcome.signal, "named \(named), replacing \(replacing): died of the signal with the output in place")
        XCTAssertEqual(outcome.status, 0, "named \(named), replacing \(replacing): \(outcome.stderr)")
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: destination("out.qcow2"))) == expectedBytes)
        XCTAssertEqual(listing(destinationDirectory), ["out.qcow2"], "named \(named), replacing \(replacing)")
        try FileManager.default.removeItem(atPath: destination("out.qcow2"))
      }
    }
  }

  /// A tiny preload library whose fsync or close fails with EIO when LACUNA_FAULT says so.
  func faultInjectionLibrary() throws -> String {
    guard let compiler = which("clang") ?? which("cc") ?? which("gcc") else {
      throw XCTSkip("no C compiler to build the fault-injection library")
    }
    let sourcePath = work.appendingPathComponent("fault.c").path
    let libraryPath = work.appendingPathComponent("libfault.so").path
    try """
      #define _GNU_SOURCE
      #include <dlfcn.h>
      #include <errno.h>
      #include <signal.h>
      #include <fcntl.h>
      #include <stdlib.h>
      #include <string.h>
      #include <sys/stat.h>

      static int wants(const char *fault) {
        const char *value = getenv("LACUNA_FAULT");
        return value && strcmp(value, fault) == 0;
      }

      static int writable_regular_file(int fd) {
        struct stat info;
        int flags = fcntl(fd, F_GETFL);
        return fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && flags >= 0 && (flags & O_ACCMODE) != O_RDONLY;
      }

      int fsync(int fd) {
        static int (*real)(int);
        if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
        struct stat info;
        if (wants("fsync") && writable_regular_file(fd)) { errno = EIO; return -1; }
        if (wants("fsync-directory") && fstat(fd, &info) == 0 && S_ISDIR(info.st_mode)) { errno = EIO; return -1; }
        return real(fd);
      }

      int close(int fd) {
        static int (*real)(int);
        if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "close");
        if (wants("close") && writable_regular_file(fd)) {
          real(fd);  /* Linux frees the descriptor even when close reports an error. */
          errno = EIO;
          return -1;
        }
        return real(fd);
      }

      /* A terminating signal that lands while the output is put in place. */
      int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags) {
        static int (*real)(int, const char *, int, const char *, int);
        if (!real) real = (int (*)(int, const char *, int, const char *, int))dlsym(RTLD_NEXT, "linkat");
        if (wants("term-in-link")) raise(SIGTERM);
        return real(olddirfd, oldpath, newdirfd, newpath, flags);
      }

      int rename(const char *oldpath, const char *newpath) {
        static int (*real)(const char *, const char *);
        if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
        if (wants("term-in-link")) raise(SIGTERM);
        return real(oldpath, newpath);
      }
      """.write(toFile: sourcePath, atomically: true, encoding: .utf8)
    let build = try runProgram(compiler, ["-shared", "-fPIC", "-O1", "-o", libraryPath, sourcePath, "-ldl"])
    guard build.status == 0 else { throw XCTSkip("cannot build the fault-injection library: \(build.stderr)") }
    return libraryPath
  }

  // MARK: Signals

  /// SIGTERM and SIGINT in the middle of a qcow2 conversion (the raw case is in
  /// ConvertRawTests): the temporary file is removed, nothing appears at the destination.
  func testInterruptedQcow2ConversionLeavesNothing() throws {
    try makeSource(mebibytes: 96)
    for signal in [SIGTERM, SIGINT] {
      let process = Process()
      process.executableURL = URL(fileURLWithPath: try lacunaBinary())
      // Compressing incompressible data on one thread is slow: time to interrupt it.
      process.arguments = ["convert", "-m", "1", "-c", "-O", "qcow2", source, destination("dst.qcow2")]
      try process.run()
      waitUntilWriting(process, in: destinationDirectory.path)
      usleep(100_000)
      kill(process.processIdentifier, signal)
      process.waitUntilExit()
      XCTAssertEqual(
        process.terminationReason, .uncaughtSignal, "the conversion finished before the signal; the test needs a slower input")
      XCTAssertEqual(listing(destinationDirectory), [], "signal \(signal) left files behind")
    }
  }

  /// SIGKILL at random moments: nothing can clean up, but the destination's name only ever
  /// holds a complete image. With an unnamed temporary file (O_TMPFILE, as here on ext4 or
  /// tmpfs) nothing at all is left; with the named one that other file systems get, a
  /// leftover is a dot-file named `.NAME.lacuna-XXXXXX`.
  func testKilledAtRandomMomentsNeverLeavesAPartialImage() throws {
    try makeSource(mebibytes: 24)
    let expected = work.appendingPathComponent("expected.qcow2").path
    let binary = try lacunaBinary()
    // The time a whole conversion takes sets the range of the random delays.
    let started = Date()
    let full = try runProgram(binary, ["convert", "-m", "2", "-O", "qcow2", source, expected])
    XCTAssertEqual(full.status, 0, full.stderr)
    let duration = Date().timeIntervalSince(started)
    let expectedBytes = try Data(contentsOf: URL(fileURLWithPath: expected))
    var generator = SystemRandomNumberGenerator()
    var completed = 0
    var leftovers = [false: 0, true: 0]
    for run in 0..<60 {
      let named = run % 2 == 1
      let process = Process()
      process.executableURL = URL(fileURLWithPath: binary)
      process.arguments = ["convert", "-m", "2", "-O", "qcow2", source, destination("dst.qcow2")]
      if named { process.environment = ProcessInfo.processInfo.environment.merging(["LACUNA_TEMPORARY_FILE": "named"]) { $1 } }
      process.standardError = FileHandle.nullDevice
      try process.run()
      usleep(UInt32(Double.random(in: 0...(duration * 1.1), using: &generator) * 1_000_000))
      kill(process.processIdentifier, SIGKILL)
      process.waitUntilExit()
      let names = listing(destinationDirectory)
      for name in names where name != "dst.qcow2" {
        XCTAssertTrue(named, "run \(run): an unnamed temporary file left \(name)")
        XCTAssertTrue(
          name.hasPrefix(".dst.qcow2.lacuna-") && name.count == ".dst.qcow2.lacuna-".count + 6,
          "run \(run): unexpected leftover \(name)")
        leftovers[named]! += 1
      }
      XCTAssertLessThanOrEqual(names.count, 1, "run \(run): \(names)")
      if names.contains("dst.qcow2") {
        completed += 1
        // Output is byte-identical for any run, so a complete image equals the reference.
        XCTAssertTrue(
          try Data(contentsOf: URL(fileURLWithPath: destination("dst.qcow2"))) == expectedBytes,
          "run \(run): the image at the destination's name is not complete")
      }
      for name in names { try FileManager.default.removeItem(atPath: destination(name)) }
    }
    print("SIGKILL at random moments (conversion \(String(format: "%.3f", duration)) s): 60 runs, \(completed) completed, \(leftovers[false]!) unnamed and \(leftovers[true]!) named temporary files left")
  }
}

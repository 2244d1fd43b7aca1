import Foundation
import XCTest

/// What a run of a command printed and how it ended.
public struct Outcome {
  public var status: Int32
  public var stdout: String
  public var stderr: String
  /// The signal that ended the process, if one did.
  public var signal: Int32?

  public init(status: Int32, stdout: String, stderr: String, signal: Int32?) {
    self.status = status
    self.stdout = stdout
    self.stderr = stderr
    self.signal = signal
  }
}

/// Starts a configured process with its output and errors piped, calls `started` once it
/// runs, reads both pipes and waits for it to end.
public func runToCompletion(_ process: Process, started: (Process) -> Void = { _ in }) throws -> Outcome {
  let out = Pipe()
  let err = Pipe()
  process.standardOutput = out
  process.standardError = err
  try process.run()
  started(process)
  // Read both pipes before waiting, so a chatty child never blocks on a full pipe.
  final class Box: @unchecked Sendable { var data = Data() }
  let stdoutBox = Box()
  let group = DispatchGroup()
  group.enter()
  DispatchQueue.global().async {
    stdoutBox.data = out.fileHandleForReading.readDataToEndOfFile()
    group.leave()
  }
  let stderrData = err.fileHandleForReading.readDataToEndOfFile()
  group.wait()
  let stdoutData = stdoutBox.data
  process.waitUntilExit()
  let signaled = process.terminationReason == .uncaughtSignal
  return Outcome(
    status: process.terminationStatus, stdout: String(decoding: stdoutData, as: UTF8.self),
    stderr: String(decoding: stderrData, as: UTF8.self), signal: signaled ? process.terminationStatus : nil)
}

/// Runs a program to completion and collects its output.
@discardableResult
public func runProgram(_ executable: String, _ arguments: [String], in directory: URL? = nil) throws -> Outcome {
  let process = Process()
  process.executableURL = URL(fileURLWithPath: executable)
  process.arguments = arguments
  if let directory { process.currentDirectoryURL = directory }
  return try runToCompletion(process)
}

/// The path of a program on PATH, or nil.
public func which(_ name: String) -> String? {
  for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
    let candidate = "\(directory)/\(name)"
    if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
  }
  return nil
}

/// The path of a program on PATH, or a skip with `message` (by default, that it is missing).
public func requireProgram(_ name: String, skipping message: String? = nil) throws -> String {
  guard let path = which(name) else { throw XCTSkip(message ?? "\(name) is not installed") }
  return path
}

/// qemu-img's path, or a skip saying it is missing (CI installs it, so there it runs).
public func requireQemuImg() throws -> String {
  try requireProgram(
    "qemu-img", skipping: "qemu-img is not installed (apt-get install qemu-utils); skipping the comparison with it")
}

/// Waits (up to `seconds`) until the running `process` is writing its output in
/// `directory`: a named temporary file (`.NAME.lacuna-XXXXXX`) is there, or the process
/// holds an unnamed one (O_TMPFILE: `/proc/PID/fd` shows `DIRECTORY/#INODE (deleted)`).
/// Returns whether it saw either.
@discardableResult
public func waitUntilWriting(_ process: Process, in directory: String, seconds: Double = 20) -> Bool {
  let deadline = Date().addingTimeInterval(seconds)
  let fdDirectory = "/proc/\(process.processIdentifier)/fd"
  let resolved = URL(fileURLWithPath: directory).resolvingSymlinksInPath().path
  while Date() < deadline && process.isRunning {
    if ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).contains(where: { $0.contains(".lacuna-") }) {
      return true
    }
    for fd in (try? FileManager.default.contentsOfDirectory(atPath: fdDirectory)) ?? [] {
      guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: fdDirectory + "/" + fd) else { continue }
      if (target.hasPrefix(directory + "/#") || target.hasPrefix(resolved + "/#")) && target.hasSuffix("(deleted)") {
        return true
      }
    }
    usleep(2000)
  }
  return false
}

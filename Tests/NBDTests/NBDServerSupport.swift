import Foundation
import TestSupport
import XCTest

/// An NBD server a test started (qemu-nbd or nbdkit), stopped when the test ends, whatever
/// happens in it.
final class NBDServer {
  let process: Process
  /// The URI lacuna and qemu-img connect to.
  let uri: String

  private init(process: Process, uri: String) {
    self.process = process
    self.uri = uri
  }

  /// Starts `program` with `arguments` and waits until `socket` exists (a Unix socket) or
  /// `port` accepts connections; stops it in the test's teardown.
  static func start(
    _ test: XCTestCase, program: String, arguments: [String], uri: String, socket: String? = nil, port: Int? = nil
  ) throws -> NBDServer {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: program)
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    let server = NBDServer(process: process, uri: uri)
    test.addTeardownBlock { server.stop() }
    let deadline = Date().addingTimeInterval(20)
    while Date() < deadline {
      guard process.isRunning else { throw XCTSkip("\(program) exited at once (\(arguments.joined(separator: " ")))") }
      if let socket, FileManager.default.fileExists(atPath: socket) { return server }
      if let port, NBDServer.accepts(port: port) { return server }
      usleep(10_000)
    }
    server.stop()
    throw NSError(domain: "lacuna-tests", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(program) did not start"])
  }

  /// Ends the server at once (SIGKILL), as a crash or a cut network would.
  func kill() {
    if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
    process.waitUntilExit()
  }

  func stop() {
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
  }

  static func accepts(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
  }

  /// A TCP port on 127.0.0.1 that nothing listens on now.
  static func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    _ = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return Int(UInt16(bigEndian: address.sin_port))
  }
}

/// qemu-nbd's and nbdkit's paths, or a skip saying which is missing.
func requireNBDTools() throws -> (qemuNBD: String, nbdkit: String) {
  (
    try requireProgram("qemu-nbd", skipping: "qemu-nbd is not installed (apt-get install qemu-utils)"),
    try requireProgram("nbdkit", skipping: "nbdkit is not installed (apt-get install nbdkit; script/bootstrap does)")
  )
}

import Foundation
import TestSupport
import XCTest

/// lacuna against NBD servers the tests start: qemu-nbd and nbdkit on Unix sockets in the
/// test's directory, and one qemu-nbd on 127.0.0.1 for the TCP form. Every conversion is
/// judged with qemu-img compare, and the allocation with qemu-img map and the files'
/// storage; what lacuna asked the server is read from nbdkit's log filter.
final class NBDConversionTests: QemuTestCase {
  var qemuNBD: String!
  var nbdkit: String!

  override func setUpWithError() throws {
    try super.setUpWithError()
    (qemuNBD, nbdkit) = try requireNBDTools()
  }

  /// A 64 MiB qcow2 with 2 MiB of data at 1 MiB and 64 KiB at 40 MiB.
  private func makeSource(_ name: String = "src.qcow2") throws -> String {
    try qemuImgOK("create", "-q", "-f", "qcow2", path(name), "64M")
    try qemuIO(path(name), "write -P 0xab 1M 2M", "write -P 0xcd 40M 64k")
    return path(name)
  }

  private func socketURI(_ socket: String, export: String = "") -> String { "nbd+unix:///\(export)?socket=\(socket)" }

  /// Starts nbdkit in the foreground on a Unix socket, its requests logged to `log`.
  private func startNbdkit(_ arguments: [String], socket: String, log: String? = nil) throws -> NBDServer {
    var all = ["-f", "-U", socket]
    if log != nil { all += ["--filter=log"] }
    all += arguments
    if let log { all += ["logfile=\(log)"] }
    return try NBDServer.start(self, program: nbdkit, arguments: all, uri: socketURI(socket), socket: socket)
  }

  /// The requests of one kind in an nbdkit log: (offset, count) of each.
  /// `skipping` the log's first bytes (what an earlier conversion asked).
  private func requests(_ kind: String, in log: String, skipping: Int = 0) throws -> [(offset: Int64, count: Int64)] {
    let text = String(decoding: try Data(contentsOf: URL(fileURLWithPath: log)).dropFirst(skipping), as: UTF8.self)
    var result: [(Int64, Int64)] = []
    for line in text.split(separator: "\n") where line.contains(" \(kind) ") && !line.contains("return") {
      func field(_ name: String) -> Int64? {
        guard let range = line.range(of: "\(name)=") else { return nil }
        let value = line[range.upperBound...].prefix { !$0.isWhitespace }
        return value.hasPrefix("0x") ? Int64(value.dropFirst(2), radix: 16) : Int64(value)
      }
      if let offset = field("offset"), let count = field("count") { result.append((offset, count)) }
    }
    return result
  }

  /// Waits (up to 60 s) until the log shows a request of `kind` past offset `after`: the
  /// transfer is under way, whatever the machine's load.
  private func waitForRequest(_ kind: String, in log: String, after: Int64) throws {
    let deadline = Date().addingTimeInterval(60)
    while Date() < deadline {
      if FileManager.default.fileExists(atPath: log), try requests(kind, in: log).contains(where: { $0.offset >= after && $0.count >= 65536 }) {
        return
      }
      usleep(20_000)
    }
    XCTFail("no \(kind) request past \(after) in 60 s")
  }

  final class Result: @unchecked Sendable { var outcome: Outcome? }

  /// Runs `process` on another thread; the semaphore is signalled when it has ended.
  private func inBackground(_ process: Process) -> (DispatchSemaphore, Result) {
    let done = DispatchSemaphore(value: 0)
    let result = Result()
    DispatchQueue.global().async {
      result.outcome = try? runToCompletion(process)
      done.signal()
    }
    return (done, result)
  }

  private func storage(_ path: String) throws -> Int64 { try WriterJudge.sizes([path]).allocated }

  func testAQcow2ServedByQemuNbdConvertsSparselyToQcow2AndRaw() throws {
    let source = try makeSource()
    let socket = path("q.sock")
    let server = try NBDServer.start(
      self, program: qemuNBD, arguments: ["-r", "-t", "-e", "8", "-f", "qcow2", "-k", socket, source],
      uri: socketURI(socket), socket: socket)
    for format in ["qcow2", "raw"] {
      let out = path("out.\(format)")
      let outcome = try lacuna("convert", "-O", format, server.uri, out)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try qemuImgOK("compare", "-F", format, source, out)
      // Only the 2 MiB + 64 KiB of data take storage: the export's holes stayed holes.
      XCTAssertLessThanOrEqual(try storage(out), (2 << 20) + (64 << 10) + (512 << 10), format)
    }
    let map = try lacuna("map", "--output=json", server.uri)
    XCTAssertEqual(map.status, 0, map.stderr)
    XCTAssertTrue(map.stdout.contains("\"start\": 1048576, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), map.stdout)
  }

  /// The ranges of a `map --output=json` (lacuna's or qemu-img's) where `key` is `value`,
  /// neighbours merged.
  private func mapRanges(_ json: String, _ key: String, _ value: Bool) throws -> [Range<Int64>] {
    let entries = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]])
    var result: [Range<Int64>] = []
    for entry in entries where (entry[key] as? Bool) == value {
      let start = Int64(try XCTUnwrap(entry["start"] as? Int))
      let range = start..<start + Int64(try XCTUnwrap(entry["length"] as? Int))
      if let last = result.last, last.upperBound == range.lowerBound {
        result[result.count - 1] = last.lowerBound..<range.upperBound
      } else {
        result.append(range)
      }
    }
    return result
  }

  /// qemu-nbd -A answers qemu:allocation-depth: the ranges no layer of its chain holds are
  /// "present": false in lacuna's map of the export, just where qemu-img map of the chain
  /// itself says so (qemu-img map of the export says present everywhere), and a conversion
  /// of the export never reads them. Without -A, every range is present.
  func testAllocationDepthMarksWhatNoLayerHolds() throws {
    let base = path("base.qcow2")
    let top = path("top.qcow2")
    try qemuImgOK("create", "-q", "-f", "qcow2", base, "16M")
    try qemuIO(base, "write -P 1 0 4M", "write -P 3 12M 1M")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    try qemuIO(top, "write -P 2 2M 4M", "write -z 8M 1M")
    let local = try qemuImgOK("map", "--output=json", top)
    for depth in [true, false] {
      let socket = path("d\(depth).sock")
      let server = try NBDServer.start(
        self, program: qemuNBD, arguments: (depth ? ["-A"] : []) + ["-r", "-t", "-f", "qcow2", "-k", socket, top],
        uri: socketURI(socket), socket: socket)
      let map = try lacuna("map", "--output=json", server.uri)
      XCTAssertEqual(map.status, 0, map.stderr)
      if depth {
        XCTAssertEqual(try mapRanges(map.stdout, "present", false), try mapRanges(local, "present", false), map.stdout)
        XCTAssertEqual(try mapRanges(map.stdout, "present", false), [6 << 20..<8 << 20, 9 << 20..<12 << 20, 13 << 20..<16 << 20])
      } else {
        XCTAssertEqual(try mapRanges(map.stdout, "present", false), [], map.stdout)
      }
      XCTAssertEqual(try mapRanges(map.stdout, "data", true), try mapRanges(local, "data", true), map.stdout)
      let out = path("d\(depth).qcow2")
      let outcome = try lacuna("convert", "-O", "qcow2", server.uri, out)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try qemuImgOK("compare", top, out)
      XCTAssertEqual(try mapRanges(try qemuImgOK("map", "--output=json", out), "data", true), [0..<6 << 20, 12 << 20..<13 << 20])
      server.stop()
    }
  }

  /// nbdkit's file plugin serves a qcow2 file as plain bytes: lacuna probes the export's
  /// content as it probes a file's, and reads the qcow2 inside over the network. The
  /// export's holes are never read.
  func testAQcow2FileServedAsBytesIsReadAsQcow2() throws {
    let source = try makeSource()
    let socket = path("k.sock")
    let log = path("reads.log")
    let server = try startNbdkit(["file", "file=\(source)"], socket: socket, log: log)
    let out = path("out.raw")
    let outcome = try lacuna("convert", "-O", "raw", server.uri, out)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try qemuImgOK("compare", "-f", "qcow2", "-F", "raw", source, out)
    let info = try lacuna("info", server.uri)
    XCTAssertTrue(info.stdout.contains("file format: qcow2"), info.stdout)
    // What was read: the header, tables and the clusters that hold data, not the file.
    let read = try requests("Read", in: log).reduce(0) { $0 + $1.count }
    let fileSize = Int64(try FileManager.default.attributesOfItem(atPath: source)[.size] as! UInt64)
    XCTAssertGreaterThan(read, 0)
    XCTAssertLessThanOrEqual(read, fileSize, "read more than the qcow2 file holds")
    // -f raw copies the export's bytes as they are: the qcow2 file itself.
    let bytes = path("bytes.raw")
    XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", server.uri, bytes).status, 0)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: bytes)), try Data(contentsOf: URL(fileURLWithPath: source)))
  }

  func testTheTCPForm() throws {
    let source = try makeSource()
    let port = NBDServer.freePort()
    let uri = "nbd://127.0.0.1:\(port)/disk"
    _ = try NBDServer.start(
      self, program: qemuNBD,
      arguments: ["-r", "-t", "-e", "8", "-f", "qcow2", "-b", "127.0.0.1", "-p", "\(port)", "-x", "disk", source],
      uri: uri, port: port)
    let out = path("tcp.qcow2")
    let outcome = try lacuna("convert", "-O", "qcow2", uri, out)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try qemuImgOK("compare", source, out)
  }

  /// An export is written in place: data as writes, zero ranges as NBD_CMD_WRITE_ZEROES
  /// (which qemu-nbd turns into holes with --discard=unmap), never written zeros.
  func testWritingIntoAnExportMakesZerosHoles() throws {
    let source = try makeSource()
    let target = path("target.raw")
    try qemuImgOK("create", "-q", "-f", "raw", target, "64M")
    try qemuIO(target, "write -P 0x55 0 64M")  // old content everywhere
    let socket = path("w.sock")
    let server = try NBDServer.start(
      self, program: qemuNBD, arguments: ["-t", "--discard=unmap", "-f", "raw", "-k", socket, target],
      uri: socketURI(socket), socket: socket)
    let outcome = try lacuna("convert", "-O", "raw", source, server.uri)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    server.stop()
    try qemuImgOK("compare", "-F", "raw", source, target)
    XCTAssertLessThanOrEqual(try storage(target), (2 << 20) + (64 << 10) + (1 << 20), "zero ranges were not punched")
    let map = try qemuImgOK("map", "--output=json", "-f", "raw", target)
    XCTAssertTrue(map.contains("\"data\": false"), map)
  }

  /// Memory stays bounded however the data lies in the units: a source whose every 2 MiB
  /// unit is allocated but holds only 64 KiB of non-zero bytes, written to a slow server
  /// (nbdkit's delay filter), so that requests pile up in flight. Each 64 KiB request
  /// kept its whole unit alive, and up to 64 were kept per connection: the previous build
  /// peaked at 541 MiB here. Now such small runs are copied, and the memory the requests
  /// in flight keep is counted by the buffers they hold.
  func testRequestsInFlightHoldBoundedMemoryWhateverPartOfAUnitIsData() throws {
    let source = path("sparse-data.raw")
    let fd = open(source, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    XCTAssertGreaterThanOrEqual(fd, 0)
    var unit = [UInt8](repeating: 0, count: 2 << 20)
    for index in 0..<256 {
      for i in 0..<(64 << 10) { unit[i] = UInt8(truncatingIfNeeded: index &* 31 &+ i &* 7 | 1) }
      XCTAssertEqual(pwrite(fd, unit, unit.count, off_t(index) * off_t(unit.count)), unit.count)
    }
    close(fd)
    let socket = path("slow.sock")
    let server = try startNbdkit(["--filter=delay", "memory", "size=512M", "delay-write=2ms"], socket: socket)
    let baseline = try lacunaMeasuringMemory(["--version"]).peakKiB
    let (outcome, peak) = try lacunaMeasuringMemory(["convert", "-f", "raw", "-O", "raw", source, server.uri])
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try qemuImgOK("compare", "-f", "raw", "-F", "raw", source, server.uri)
    // Units in the pipeline (about 20 MiB with 2 threads) and 16 MiB kept in flight.
    XCTAssertLessThan(peak - baseline, 48 << 10, "peak \(peak) KiB, --version \(baseline) KiB")
  }

  /// The zero requests in an nbdkit log, and whether each asked for a fast zero.
  private func zeroRequests(in log: String, skipping: Int) throws -> [(offset: Int64, count: Int64, fast: Bool)] {
    let text = String(decoding: try Data(contentsOf: URL(fileURLWithPath: log)).dropFirst(skipping), as: UTF8.self)
    let fast = text.split(separator: "\n").filter { $0.contains(" Zero ") && !$0.contains("return") }.map {
      $0.contains("fast=1")
    }
    return zip(try requests("Zero", in: log, skipping: skipping), fast).map { ($0.0.offset, $0.0.count, $0.1) }
  }

  /// nbdkit's log shows what lacuna sent into an export holding old bytes: the data as
  /// writes; where the server offers fast zero (the memory plugin), one fast zero over the
  /// whole export first and no zero request after it; where fast zero is refused (the
  /// nozero filter's fastzeromode=slow) or not offered (the file plugin), each zero range
  /// once as a plain zero request; with --target-is-zero no zero request at all. The export
  /// then equals the source every time, and a file behind it holds only the data.
  func testZeroRangesAreOneFastZeroOrZeroRequestsOrSkipped() throws {
    let source = try makeSource()
    let old = path("old.raw")
    try qemuImgOK("create", "-q", "-f", "raw", old, "64M")
    try qemuIO(old, "write -P 0x55 0 64M")  // old content everywhere
    let dataBytes: Int64 = (2 << 20) + (64 << 10)
    for (name, filters, targetIsZero) in [
      ("fast", [String](), false), ("slow", ["--filter=nozero"], false), ("none", ["--filter=nozero"], false),
      ("given", [], true),
    ] {
      let socket = path("m-\(name).sock")
      let log = path("m-\(name).log")
      let target = path("m-\(name).raw")
      if targetIsZero {
        try qemuImgOK("create", "-q", "-f", "raw", target, "64M")
      } else {
        try FileManager.default.copyItem(atPath: old, toPath: target)
      }
      var arguments = name == "fast" ? ["memory", "size=64M"] : filters + ["file", target]
      if !filters.isEmpty { arguments += ["zeromode=plugin", "fastzeromode=\(name)"] }
      let server = try startNbdkit(arguments, socket: socket, log: log)
      var skipping = 0
      if name == "fast" {  // old content into the memory plugin first
        XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", old, server.uri).status, 0)
        skipping = try Data(contentsOf: URL(fileURLWithPath: log)).count
      }
      let outcome = try lacuna(["convert"] + (targetIsZero ? ["--target-is-zero"] : []) + ["-O", "raw", source, server.uri])
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try qemuImgOK("compare", "-F", "raw", source, server.uri)
      server.stop()
      if name != "fast" {
        try qemuImgOK("compare", "-F", "raw", source, target)
        XCTAssertLessThanOrEqual(try storage(target), dataBytes + (1 << 20), "\(name): zeros were not made holes")
      }
      let written = try requests("Write", in: log, skipping: skipping).reduce(0) { $0 + $1.count }
      XCTAssertEqual(written, dataBytes, "\(name): bytes written")
      let zeros = try zeroRequests(in: log, skipping: skipping)
      switch name {
      case "fast":
        XCTAssertEqual(zeros.map(\.count).reduce(0, +), 64 << 20, "\(name): \(zeros)")
        XCTAssertTrue(zeros.allSatisfy(\.fast), "\(name): \(zeros)")
      case "slow":
        // The refused fast zero, then the zero ranges.
        XCTAssertEqual(zeros.filter(\.fast).map(\.count).reduce(0, +), 64 << 20, "\(name): \(zeros)")
        XCTAssertEqual(zeros.filter { !$0.fast }.map(\.count).reduce(0, +), (64 << 20) - dataBytes, "\(name): \(zeros)")
      case "none":
        XCTAssertFalse(zeros.contains(where: \.fast), "\(name): \(zeros)")
        XCTAssertEqual(zeros.map(\.count).reduce(0, +), (64 << 20) - dataBytes, "\(name): \(zeros)")
      default:
        XCTAssertTrue(zeros.isEmpty, "\(name): \(zeros)")
      }
    }
  }

  func testAnExportShorterThanTheDiskIsRefusedBeforeAnyWrite() throws {
    let source = try makeSource()
    let socket = path("s.sock")
    let log = path("s.log")
    let server = try startNbdkit(["memory", "size=32M"], socket: socket, log: log)
    let outcome = try lacuna("convert", "-O", "raw", source, server.uri)
    XCTAssertNotEqual(outcome.status, 0)
    XCTAssertEqual(
      outcome.stderr,
      "lacuna: \(server.uri): the export is 33554432 bytes, smaller than the 67108864 bytes of the disk; nothing was written\n")
    server.stop()
    XCTAssertTrue(try requests("Write", in: log).isEmpty)
  }

  /// Any format goes into an export: a qcow2 image is written into it as into a new file
  /// (the export zeroed first), and qemu-img reads and checks it there. A conversion that
  /// fails before writing (a bad option) leaves the export as it was.
  func testAQcow2ImageIsWrittenIntoAnExport() throws {
    let source = try makeSource()
    let old = path("old.raw")
    try qemuImgOK("create", "-q", "-f", "raw", old, "128M")
    try qemuIO(old, "write -P 0x77 0 128M")
    // Zeroed with one fast zero, and where the server refuses fast zeros, with plain ones.
    for (name, filters) in [("t", [String]()), ("slow", ["--filter=nozero"])] {
      let server = try startNbdkit(
        filters + ["memory", "size=128M"] + (filters.isEmpty ? [] : ["zeromode=plugin", "fastzeromode=slow"]),
        socket: path("\(name).sock"))
      XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", old, server.uri).status, 0)
      let refused = try lacuna("convert", "-O", "qcow2", "-o", "cluster_size=7", source, server.uri)
      XCTAssertNotEqual(refused.status, 0)
      try qemuImgOK("compare", "-f", "raw", "-F", "raw", old, server.uri)  // untouched
      let outcome = try lacuna("convert", "-O", "qcow2", source, server.uri)
      XCTAssertEqual(outcome.status, 0, outcome.stderr)
      try qemuImgOK("compare", "-F", "qcow2", source, server.uri)
      try qemuImgOK("check", "-f", "qcow2", server.uri)
      server.stop()
    }
  }

  /// No server, an unknown export, TLS the server does not offer, a server that never
  /// answers: one line naming the URI, a non-zero exit, and no hang.
  func testConnectionProblemsAreOneLineNamingTheURI() throws {
    let source = try makeSource()
    let missing = socketURI(path("none.sock"))
    let none = try lacuna("convert", "-O", "raw", missing, path("x.raw"))
    XCTAssertNotEqual(none.status, 0)
    XCTAssertTrue(none.stderr.hasPrefix("lacuna: \(missing): cannot connect: "), none.stderr)
    XCTAssertEqual(none.stderr.filter { $0 == "\n" }.count, 1, none.stderr)

    let socket = path("x.sock")
    _ = try NBDServer.start(
      self, program: qemuNBD, arguments: ["-r", "-t", "-f", "qcow2", "-x", "disk", "-k", socket, source],
      uri: socketURI(socket, export: "disk"), socket: socket)
    let unknown = socketURI(socket, export: "other")
    let wrongExport = try lacuna("info", unknown)
    XCTAssertNotEqual(wrongExport.status, 0)
    XCTAssertTrue(wrongExport.stderr.hasPrefix("lacuna: \(unknown): cannot connect: "), wrongExport.stderr)

    let tls = "nbds+unix:///disk?socket=\(socket)"
    let noTLS = try lacuna("info", tls)
    XCTAssertNotEqual(noTLS.status, 0)
    XCTAssertTrue(noTLS.stderr.hasPrefix("lacuna: \(tls): cannot connect: "), noTLS.stderr)
    XCTAssertTrue(noTLS.stderr.lowercased().contains("tls"), noTLS.stderr)

    // A socket that takes connections and never answers.
    let silent = path("silent.sock")
    let listener = Process()
    listener.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
    listener.arguments = [
      "-c", "import socket,time,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(5); time.sleep(60)", silent,
    ]
    try listener.run()
    addTeardownBlock { listener.terminate(); listener.waitUntilExit() }
    while !FileManager.default.fileExists(atPath: silent) { usleep(10_000) }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: try lacunaBinary())
    process.arguments = ["info", socketURI(silent)]
    process.environment = ProcessInfo.processInfo.environment.merging(["LACUNA_NBD_TIMEOUT": "1"]) { $1 }
    let started = Date()
    let hung = try runToCompletion(process)
    XCTAssertNotEqual(hung.status, 0)
    XCTAssertLessThan(Date().timeIntervalSince(started), 10)
    XCTAssertEqual(hung.stderr, "lacuna: \(socketURI(silent)): cannot connect: no answer from the server in 1 s\n")
  }

  /// The server going away in the middle: reading, nothing is left at the destination;
  /// writing, the error says how far the export was written.
  func testAServerKilledMidTransferIsAnErrorNotAHang() throws {
    let big = path("big.raw")
    try qemuImgOK("create", "-q", "-f", "raw", big, "256M")
    try qemuIO(big, "write -P 0x11 0 256M")
    // Reading from a slow server that is killed.
    let socket = path("r.sock")
    let readLog = path("r.log")
    let reader = try startNbdkit(["--filter=delay", "file", "file=\(big)", "rdelay=100ms"], socket: socket, log: readLog)
    let out = path("out.raw")
    let convert = Process()
    convert.executableURL = URL(fileURLWithPath: try lacunaBinary())
    convert.arguments = ["convert", "-O", "raw", reader.uri, out]
    let (done, result) = inBackground(convert)
    try waitForRequest("Read", in: readLog, after: 4096)
    reader.kill()
    XCTAssertEqual(done.wait(timeout: .now() + 60), .success, "lacuna hung after the server died")
    let outcome = try XCTUnwrap(result.outcome)
    XCTAssertNotEqual(outcome.status, 0)
    XCTAssertTrue(outcome.stderr.hasPrefix("lacuna: \(reader.uri): "), outcome.stderr)
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix("out") }, [])

    // Writing to a slow server that is killed.
    let wsocket = path("w.sock")
    let writeLog = path("w.log")
    let writer = try startNbdkit(["--filter=delay", "memory", "size=256M", "wdelay=100ms"], socket: wsocket, log: writeLog)
    let send = Process()
    send.executableURL = URL(fileURLWithPath: try lacunaBinary())
    send.arguments = ["convert", "-f", "raw", "-O", "raw", big, writer.uri]
    let (finished, sending) = inBackground(send)
    try waitForRequest("Write", in: writeLog, after: 0)
    writer.kill()
    XCTAssertEqual(finished.wait(timeout: .now() + 60), .success, "lacuna hung after the server died")
    let sent = try XCTUnwrap(sending.outcome)
    XCTAssertNotEqual(sent.status, 0)
    XCTAssertTrue(sent.stderr.hasPrefix("lacuna: \(writer.uri): "), sent.stderr)
    XCTAssertTrue(sent.stderr.contains("the export was written up to 0x"), sent.stderr)
    print("killed while reading: \(outcome.stderr)killed while writing: \(sent.stderr)")
  }

  /// Requests stay within the server's advertised maximum; with multi-conn, reads use
  /// several connections; a server without block status or write-zeroes still gets the
  /// right disk (everything read; zeros written).
  func testServerLimitsAndMissingFeatures() throws {
    let data = path("data.raw")
    try qemuImgOK("create", "-q", "-f", "raw", data, "16M")
    try qemuIO(data, "write -P 0x42 0 8M", "write -P 0x43 12M 1M")
    let log = path("limits.log")
    let socket = path("l.sock")
    let server = try startNbdkit(
      ["--filter=blocksize-policy", "file", "file=\(data)", "blocksize-maximum=65536"], socket: socket, log: log)
    let out = path("limits.raw")
    let outcome = try lacuna("convert", "-m", "4", "-O", "raw", server.uri, out)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    server.stop()
    try qemuImgOK("compare", "-f", "raw", "-F", "raw", data, out)
    let reads = try requests("Read", in: log)
    // The data, and the first and last bytes that probing looks at.
    let read = reads.reduce(0) { $0 + $1.count }
    XCTAssertTrue((9 << 20)...((9 << 20) + (64 << 10)) ~= read, "read \(read) bytes, not only the data")
    XCTAssertLessThanOrEqual(reads.map(\.count).max() ?? 0, 65536, "a read beyond the server's maximum")
    let text = try String(contentsOfFile: log, encoding: .utf8)
    let connections = Set(text.split(separator: "\n").filter { $0.contains(" Read ") }.compactMap { line in
      line.split(separator: " ").first { $0.hasPrefix("connection=") }
    })
    XCTAssertGreaterThan(connections.count, 1, "reads on one connection although the server offers multi-conn")

    // No block status, no write-zeroes: the disk is still right.
    let plain = try startNbdkit(["--filter=noextents", "--filter=nozero", "memory", "size=16M"], socket: path("p.sock"))
    let old = path("old.raw")
    try qemuImgOK("create", "-q", "-f", "raw", old, "16M")
    try qemuIO(old, "write -P 0x77 0 16M")
    XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", old, plain.uri).status, 0)  // old content first
    let copied = try lacuna("convert", "-O", "raw", data, plain.uri)
    XCTAssertEqual(copied.status, 0, copied.stderr)
    try qemuImgOK("compare", "-f", "raw", "-F", "raw", data, plain.uri)
    let back = path("back.raw")
    XCTAssertEqual(try lacuna("convert", "-f", "raw", "-O", "raw", plain.uri, back).status, 0)
    try qemuImgOK("compare", "-f", "raw", "-F", "raw", data, back)
  }

  /// nbds:// with a pre-shared key: the export is read over TLS; the same server refuses a
  /// plain connection, in one line.
  func testTLSWithAPreSharedKey() throws {
    let source = try makeSource()
    let psk = path("psk.txt")
    let key = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    try Data("alice:\(key)\n".utf8).write(to: URL(fileURLWithPath: psk))
    chmod(psk, 0o600)
    let socket = path("tls.sock")
    _ = try startNbdkit(["--tls=require", "--tls-psk=\(psk)", "file", "file=\(source)"], socket: socket)
    let secure = "nbds+unix://alice@/?socket=\(socket)&tls-psk-file=\(psk)"
    let out = path("tls.raw")
    let outcome = try lacuna("convert", "-O", "raw", secure, out)
    XCTAssertEqual(outcome.status, 0, outcome.stderr)
    try qemuImgOK("compare", "-F", "raw", source, out)
    let plain = socketURI(socket)
    let refused = try lacuna("info", plain)
    XCTAssertNotEqual(refused.status, 0)
    XCTAssertTrue(refused.stderr.hasPrefix("lacuna: \(plain): cannot connect: "), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("TLS"), refused.stderr)
  }
}

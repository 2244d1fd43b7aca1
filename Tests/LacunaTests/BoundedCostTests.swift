import Foundation
import TestSupport
import XCTest

/// What lacuna holds follows what it visits, never the size of a table or of the disk
/// (issue 13, point 7). Peak memory is the child's own, from wait4.
final class BoundedCostTests: QemuTestCase {
  /// 64 layers of a 2 PiB disk, each with a 32 MiB L1 table that is a hole on disk: the
  /// whole L1 tables, read at open, took 2.1 GB. Windows of them keep map and convert far
  /// under 256 MiB, and the answer is still right.
  func testAChainOf64HugeSparseL1TablesStaysSmall() throws {
    var previous: String?
    for index in 0..<64 {
      let name = path("layer\(index).qcow2")
      var arguments = ["create", "-q", "-f", "qcow2"]
      if let previous { arguments += ["-b", previous, "-F", "qcow2"] }
      let created = try lacuna(arguments + [name, "2P"])
      XCTAssertEqual(created.status, 0, created.stderr)
      previous = name
    }
    let top = path("layer63.qcow2")
    // lacuna writes the zero parts of a new L1 table as holes, as a sparse L1 is meant here.
    XCTAssertLessThan(allocatedBytes(top), 1 << 20, "the 32 MiB L1 table should be a hole")
    // qemu would open the layers below (reading each L1 table whole), so each layer is
    // written with its backing turned off.
    func layerAlone(_ index: Int) -> String {
      let file = path("layer\(index).qcow2")
      return #"json:{"driver":"qcow2","file":{"driver":"file","filename":"\#(file)"},"backing":null}"#
    }
    try qemuIO(layerAlone(0), "write -P 9 0 64k")
    try qemuIO(layerAlone(31), "write -P 5 1T 64k")
    try qemuIO(layerAlone(63), "write -P 7 1P 64k")

    let (map, mapPeak) = try lacunaMeasuringMemory(["map", "--output=json", top])
    XCTAssertEqual(map.status, 0, map.stderr)
    let data = try mapEntries(map.stdout).filter { $0["data"] == 1 }
    XCTAssertEqual(data.map { $0["start"]! }, [0, 1 << 40, 1 << 50])
    XCTAssertEqual(data.map { $0["depth"]! }, [63, 32, 0])
    XCTAssertLessThan(mapPeak, 256 << 10, "map held \(mapPeak) KiB")

    let output = path("flat.qcow2")
    let (convert, convertPeak) = try lacunaMeasuringMemory(["convert", "-O", "qcow2", top, output])
    XCTAssertEqual(convert.status, 0, convert.stderr)
    XCTAssertLessThan(convertPeak, 256 << 10, "convert held \(convertPeak) KiB")
    // qemu would read all 64 tables whole to compare; the flat copy is checked on its own.
    try qemuIO(output, "read -P 9 0 64k", "read -P 5 1T 64k", "read -P 7 1P 64k", "read -P 0 64k 1M")
    // qemu-img map would walk 4 million L1 entries (most of a minute); check counts the
    // allocated clusters: the three written, nothing else.
    let check = try qemuImgOK("check", output)
    XCTAssertTrue(check.contains("No errors"), check)
    XCTAssertTrue(check.contains("3/34359738368 = 0.00% allocated"), check)
  }

  /// A 1 GiB qcow2 with 512-byte clusters whose L2 entries alternate zero and unallocated:
  /// two million map entries. map prints them as it goes, byte for byte as qemu-img does,
  /// in under 64 MiB.
  func testTwoMillionExtentsMapInBoundedMemory() throws {
    let image = path("striped.qcow2")
    try qemuImgOK("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "1G")
    try stripeZeroClusters(image)

    let qemuMap = try runProgram(qemu, ["map", "--output=json", image])
    XCTAssertEqual(qemuMap.status, 0, qemuMap.stderr)
    XCTAssertEqual(qemuMap.stdout.utf8.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }, 2 << 20)
    let (map, peak) = try lacunaMeasuringMemory(["map", "--output=json", image])
    XCTAssertEqual(map.status, 0, map.stderr)
    XCTAssertTrue(map.stdout == qemuMap.stdout, "map --output=json differs from qemu-img's")
    XCTAssertLessThan(peak, 64 << 10, "map held \(peak) KiB")
  }

  /// Points every L1 entry of an empty qcow2 (512-byte clusters) at a new L2 table whose
  /// even entries are zero clusters and odd ones unallocated. Refcounts are left alone:
  /// readers do not use them.
  private func stripeZeroClusters(_ image: String) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: image))
    defer { try? handle.close() }
    try handle.seek(toOffset: 36)
    let header = try handle.read(upToCount: 12)!
    let l1Size = header.prefix(4).reduce(0) { $0 << 8 | Int($1) }
    let l1Offset = header.suffix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    let end = (try handle.seekToEnd() + 511) / 512 * 512

    func bigEndian(_ value: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) } }
    let table = (0..<64).flatMap { bigEndian($0 % 2 == 0 ? 1 : 0) }
    try handle.seek(toOffset: end)
    try handle.write(contentsOf: Data((0..<l1Size).flatMap { _ in table }))
    try handle.seek(toOffset: l1Offset)
    try handle.write(contentsOf: Data((0..<l1Size).flatMap { bigEndian((end + UInt64($0) * 512) | 1 << 63) }))
  }
}

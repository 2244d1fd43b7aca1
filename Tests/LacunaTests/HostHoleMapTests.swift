import Foundation
import TestSupport
import XCTest

/// A qcow2 data cluster whose host bytes were punched out of the file (`fallocate -p`)
/// reads as zeros: `map` says so as qemu-img map does (zero and data), and a conversion
/// neither reads it nor stores it.
final class HostHoleMapTests: QemuTestCase {
  func testAPunchedDataClusterIsZeroInTheMapAndAHoleInTheOutput() throws {
    try requireProgram("fallocate", skipping: "fallocate (util-linux) is missing")
    let image = path("punched.qcow2")
    try qemuImgOK("create", "-q", "-f", "qcow2", image, "8M")
    try qemuIO(image, "write -P 0x5a 0 2M", "write -P 0x33 4M 64k")
    let before = try lacuna("map", "--output=json", image)
    XCTAssertFalse(before.stdout.contains("\"zero\": true, \"data\": true"), before.stdout)
    // The host offset of virtual 1 MiB, from qemu-img map, then punch 256 KiB there.
    let map = try qemuImgOK("map", "--output=json", image)
    let offset = try XCTUnwrap(
      map.split(separator: "\n").first { $0.contains("\"start\": 0,") }?
        .split(separator: ",").first { $0.contains("\"offset\"") }?
        .split(separator: ":").last.flatMap { Int64($0.trimmingCharacters(in: CharacterSet(charactersIn: " }]"))) })
    let punch = try runProgram(
      "/usr/bin/fallocate", ["-p", "-o", "\(offset + (1 << 20))", "-l", "\(256 << 10)", image])
    guard punch.status == 0 else { throw XCTSkip("this file system cannot punch holes: \(punch.stderr)") }

    let ours = try lacuna("map", "--output=json", image)
    XCTAssertEqual(ours.status, 0, ours.stderr)
    XCTAssertEqual(ours.stdout, try qemuImgOK("map", "--output=json", image))
    XCTAssertTrue(ours.stdout.contains("\"start\": 1048576, \"length\": 262144, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": true"), ours.stdout)

    for format in ["raw", "qcow2"] {
      let out = path("out.\(format)")
      XCTAssertEqual(try lacuna("convert", "-O", format, image, out).status, 0)
      try qemuImgOK("compare", "-F", format, image, out)
      // 2 MiB - 256 KiB + 64 KiB of data stored, plus qcow2 metadata.
      XCTAssertLessThanOrEqual(
        try WriterJudge.sizes([out]).allocated, (2 << 20) - (256 << 10) + (64 << 10) + (512 << 10), format)
    }
    let outMap = try qemuImgOK("map", "--output=json", "-f", "raw", path("out.raw"))
    XCTAssertTrue(outMap.contains("\"start\": 1048576, \"length\": 262144, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), outMap)
  }
}

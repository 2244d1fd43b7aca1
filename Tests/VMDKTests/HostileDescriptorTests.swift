import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// Hostile and damaged descriptor files: each is refused through the binary with exit 1,
/// one line naming the descriptor, and no output left behind.
final class HostileDescriptorTests: QemuTestCase {
  /// A monolithicFlat disk of 1 MiB (`flat.vmdk` + `flat-flat.vmdk`) to borrow from.
  override func setUpWithError() throws {
    try super.setUpWithError()
    try qemuImgOK("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path("flat.vmdk"), "1M")
    try qemuIO(format: "vmdk", path("flat.vmdk"), ["write -P 0x51 0 64k"])
  }

  private func descriptor(_ extentLines: String, createType: String = "monolithicFlat") -> String {
    """
    # Disk DescriptorFile
    version=1
    CID=0badc0de
    parentCID=ffffffff
    createType="\(createType)"

    # Extent description
    \(extentLines)

    # The Disk Data Base
    #DDB
    ddb.adapterType = "ide"

    """
  }

  /// Writes `text` as `name` and checks that `verb` (with `options`) refuses it: exit 1,
  /// one stderr line naming the descriptor and containing `expected`, no output file.
  private func assertRefused(
    _ text: String, as name: String, _ expected: String, verbs: [[String]] = [["convert", "-O", "raw"]],
    options: [String] = [], file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let image = path(name)
    if !FileManager.default.fileExists(atPath: image) {
      try text.write(toFile: image, atomically: false, encoding: .utf8)
    }
    for verb in verbs {
      let output = path(name + ".out")
      let arguments = verb + options + [image] + (verb[0] == "convert" ? [output] : [])
      let outcome = try lacuna(arguments)
      let label = "\(verb[0]) \(name)"
      XCTAssertEqual(outcome.status, 1, "\(label): \(outcome.stderr)", file: file, line: line)
      XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, "\(label): \(outcome.stderr)", file: file, line: line)
      XCTAssertTrue(outcome.stderr.contains(image + ":"), "\(label): \(outcome.stderr)", file: file, line: line)
      XCTAssertTrue(outcome.stderr.contains(expected), "\(label): \(outcome.stderr)", file: file, line: line)
      XCTAssertNil(outcome.signal, file: file, line: line)
      XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(label): an output was left", file: file, line: line)
    }
  }

  private let everyVerb = [["convert", "-O", "raw"], ["info"], ["map", "--output=json"]]

  /// The classic attack: an uploaded descriptor naming /etc/shadow as its extent. With
  /// --untrusted nothing but the descriptor is opened, whether it names the file by an
  /// absolute path or by climbing out of its directory.
  func testUntrustedDescriptorOpensNoExtent() throws {
    try assertRefused(
      descriptor("RW 8 FLAT \"../../../../../../../../etc/shadow\" 0"), as: "shadow.vmdk", "untrusted image may not",
      verbs: everyVerb, options: ["--untrusted"])
    try assertRefused(
      descriptor("RW 8 FLAT \"/etc/shadow\" 0"), as: "shadow-absolute.vmdk", "absolute", verbs: everyVerb,
      options: ["--untrusted"])
    // Even a good descriptor's extent is not opened for an untrusted image.
    try assertRefused("", as: "flat.vmdk", "untrusted image may not", verbs: everyVerb, options: ["--untrusted"])
  }

  func testAbsoluteExtentPathIsRefused() throws {
    try assertRefused(
      descriptor("RW 2048 FLAT \"\(path("flat-flat.vmdk"))\" 0"), as: "absolute.vmdk",
      "absolute; extent files are named relative to the descriptor", verbs: everyVerb)
  }

  func testFIFOExtentIsRefused() throws {
    XCTAssertEqual(mkfifo(path("fifo"), 0o600), 0)
    try assertRefused(descriptor("RW 8 FLAT \"fifo\" 0"), as: "fifo.vmdk", "FIFO", verbs: everyVerb)
  }

  func testMissingExtentFile() throws {
    try assertRefused(
      descriptor("RW 2048 FLAT \"nowhere-flat.vmdk\" 0"), as: "missing.vmdk", "No such file or directory", verbs: everyVerb)
  }

  func testDescriptorNamingItself() throws {
    try assertRefused(descriptor("RW 1 FLAT \"self.vmdk\" 0"), as: "self.vmdk", "names itself", verbs: everyVerb)
  }

  func testExtentsNotAddingUpToTheCapacity() throws {
    try qemuImgOK("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", path("split.vmdk"), "1M")
    let text = try String(contentsOfFile: path("split.vmdk"), encoding: .utf8)
      .replacingOccurrences(of: "RW 2048 SPARSE", with: "RW 4096 SPARSE")
    try assertRefused(text, as: "wrong-sum.vmdk", "has 4096 sectors, but its extent file")
  }

  func testAbsurdExtentCounts() throws {
    try assertRefused(
      descriptor(String(repeating: "RW 1 ZERO\n", count: 5000)), as: "many.vmdk", "more than 1024 extents", verbs: everyVerb)
    try assertRefused(descriptor("RW 18446744073709551615 ZERO\nRW 9 ZERO"), as: "huge.vmdk", "absurd")
    try assertRefused(descriptor(""), as: "none.vmdk", "names no extent")
    var big = Data(descriptor("RW 1 ZERO").utf8)
    big += Data(repeating: 0x23, count: 2 << 20)
    try big.write(to: URL(fileURLWithPath: path("big.vmdk")))
    try assertRefused("", as: "big.vmdk", "more than 1048576")
  }

  func testExtentFileShorterThanItsExtent() throws {
    try assertRefused(
      descriptor("RW 4096 FLAT \"flat-flat.vmdk\" 0"), as: "short.vmdk", "shorter than extent 1", verbs: everyVerb)
    try assertRefused(descriptor("RW 2048 FLAT \"flat-flat.vmdk\" 1"), as: "offset.vmdk", "flat-flat.vmdk")
    // A sparse extent cut short: its own metadata says so, and the error names both files.
    try qemuImgOK("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", path("cut.vmdk"), "1M")
    try qemuIO(format: "vmdk", path("cut.vmdk"), ["write -P 0x61 512k 64k"])
    let extent = try FileHandle(forWritingTo: URL(fileURLWithPath: path("cut-s001.vmdk")))
    try extent.truncate(atOffset: try extent.seekToEnd() - 32768)
    try extent.close()
    try assertRefused("", as: "cut.vmdk", "extent file \(path("cut-s001.vmdk"))")
  }

  func testUnsupportedExtentTypes() throws {
    try assertRefused(descriptor("RW 8 VMFSSPARSE \"x-delta.vmdk\""), as: "cowd.vmdk", "VMFSSPARSE")
    try assertRefused(descriptor("RW 8 VMFSRDM \"x-rdm.vmdk\""), as: "rdm.vmdk", "VMFSRDM")
    try assertRefused(descriptor("NOACCESS 8 ZERO"), as: "noaccess.vmdk", "NOACCESS")
    try assertRefused(descriptor("RW 8 ZERO", createType: "fullDevice"), as: "device.vmdk", "device")
    try assertRefused(descriptor("RW 8 FLAT \"flat-flat.vmdk\" 0 extra"), as: "extra.vmdk", "more fields")
  }

  /// The extent files are inputs: writing the output over one is refused and leaves it be.
  func testConvertOntoItsOwnExtentIsRefused() throws {
    let before = try Data(contentsOf: URL(fileURLWithPath: path("flat-flat.vmdk")))
    let outcome = try lacuna(["convert", "-O", "raw", path("flat.vmdk"), path("flat-flat.vmdk")])
    XCTAssertNotEqual(outcome.status, 0, outcome.stderr)
    XCTAssertEqual(outcome.stderr.split(separator: "\n").count, 1, outcome.stderr)
    XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: path("flat-flat.vmdk"))) == before, "the extent was changed")
  }

  /// A delta disk whose parent has another CID: exit 1, naming the child.
  func testDeltaWithTheWrongParent() throws {
    try qemuImgOK("create", "-q", "-f", "vmdk", path("base.vmdk"), "1M")
    try qemuImgOK("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", path("child.vmdk"))
    try qemuImgOK("create", "-q", "-f", "vmdk", path("other.vmdk"), "1M")
    try FileManager.default.removeItem(atPath: path("base.vmdk"))
    try FileManager.default.copyItem(atPath: path("other.vmdk"), toPath: path("base.vmdk"))
    try assertRefused("", as: "child.vmdk", "parentCID")
  }
}

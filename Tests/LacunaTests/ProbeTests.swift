import Foundation
import TestSupport
import XCTest

/// Probing never takes a container for a raw disk (issue 14, point 1): a file that is
/// recognisably another format, an encrypted volume, a compressed file or an archive is
/// read as that format when lacuna reads it (vpc, vmdk, vdi, vhdx), and otherwise refused by name (exit 1, one
/// line, no output), with `-f raw` as the way to copy its bytes on purpose.
final class ProbeTests: QemuTestCase {
  func testContainersAreNeverReadAsRaw() throws {
    var cases: [(file: String, format: String?, phrase: String)] = []
    func make(_ name: String, _ arguments: [String], format: String?, phrase: String) throws {
      let made = try runProgram(qemu, arguments + [path(name), "1M"])
      guard made.status == 0 else {
        print("qemu-img cannot make \(name) here (\(made.stderr)); skipping that case")
        return
      }
      cases.append((name, format, phrase))
    }
    try make("disk.vhdx", ["create", "-q", "-f", "vhdx"], format: "vhdx", phrase: "a VHDX image")
    try make("disk.vdi", ["create", "-q", "-f", "vdi"], format: "vdi", phrase: "a VDI (VirtualBox) image")
    try make("disk.qed", ["create", "-q", "-f", "qed"], format: nil, phrase: "a QED image")
    try make("disk.hdd", ["create", "-q", "-f", "parallels"], format: nil, phrase: "a Parallels image")
    try make(
      "disk.luks", ["create", "-q", "-f", "luks", "--object", "secret,id=s,data=x", "-o", "key-secret=s"],
      format: nil, phrase: "a LUKS encrypted volume")
    try make("dynamic.vhd", ["create", "-q", "-f", "vpc"], format: "vpc", phrase: "a VHD image")
    // qemu-img itself probes a fixed VHD as raw: only its footer, at the end, tells.
    try make("fixed.vhd", ["create", "-q", "-f", "vpc", "-o", "subformat=fixed"], format: "vpc", phrase: "a fixed VHD image")
    try make("sparse.vmdk", ["create", "-q", "-f", "vmdk"], format: "vmdk", phrase: "a VMDK image")
    // A descriptor file with its extent beside it is a VMDK of its own.
    try make(
      "descriptor.vmdk", ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat"], format: "vmdk",
      phrase: "a VMDK descriptor")

    // What a download leaves: compressed files and archives of a raw disk.
    let raw = path("disk.img")
    try Data(patternBytes(1 << 20, seed: 3)).write(to: URL(fileURLWithPath: raw))
    for (tool, arguments, name, phrase) in [
      ("xz", ["-k", "-0", raw], "disk.img.xz", "an xz-compressed file"),
      ("gzip", ["-k", raw], "disk.img.gz", "a gzip-compressed file"),
      ("zstd", ["-q", "-k", raw], "disk.img.zst", "a zstd-compressed file"),
      ("tar", ["-C", dir.path, "-cf", path("disk.ova"), "disk.img"], "disk.ova", "a tar archive"),
    ] {
      guard let program = which(tool) else {
        print("\(tool) is not installed; skipping \(name)")
        continue
      }
      XCTAssertEqual(try runProgram(program, arguments).status, 0, "\(tool) failed")
      cases.append((name, nil, phrase))
    }
    XCTAssertGreaterThanOrEqual(cases.count, 8, "too few containers could be made to test")

    for (file, format, phrase) in cases {
      let info = try lacuna("info", "--output=json", path(file))
      if let format {
        XCTAssertEqual(info.status, 0, "\(file): \(info.stderr)")
        XCTAssertTrue(info.stdout.contains("\"format\": \"\(format)\""), "\(file): \(info.stdout)")
        continue
      }
      XCTAssertEqual(info.status, 1, "\(file): \(info.stdout) \(info.stderr)")
      XCTAssertEqual(info.stderr.split(separator: "\n").count, 1, info.stderr)
      XCTAssertTrue(info.stderr.contains(path(file)), info.stderr)
      XCTAssertTrue(info.stderr.contains(phrase), "\(file): \(info.stderr)")
      XCTAssertTrue(info.stderr.contains("-f raw"), info.stderr)

      let output = path("out-\(file).img")
      let convert = try lacuna("convert", "-O", "raw", path(file), output)
      XCTAssertEqual(convert.status, 1, "\(file): \(convert.stderr)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(file): an output was left")
      // -f raw copies the container's bytes, as asked.
      let forced = try lacuna("convert", "-f", "raw", "-O", "raw", path(file), output)
      XCTAssertEqual(forced.status, 0, forced.stderr)
      XCTAssertTrue(
        try Data(contentsOf: URL(fileURLWithPath: output)) == Data(contentsOf: URL(fileURLWithPath: path(file))),
        "\(file): -f raw is a byte copy")
    }
  }

  /// Every image of the corpus (made by VMware, VirtualBox, Hyper-V, forensic tools, ...)
  /// is read as its own format or refused by name; only the two that are raw disks (an ISO
  /// 9660 file system, a test suite's "invalid image" without magic) are called raw.
  func testNothingInTheCorpusIsMistakenForRaw() throws {
    let rawOnes: Set<String> = ["iso9660.raw", "image-default.invalid"]
    var checked = 0
    for file in try corpusFiles() {
      let image = try unpackCorpusFile(file, into: dir)
      let name = URL(fileURLWithPath: image).lastPathComponent
      let info = try lacuna("info", "--output=json", image)
      let saysRaw = info.status == 0 && info.stdout.contains("\"format\": \"raw\"")
      if rawOnes.contains(name) {
        XCTAssertTrue(saysRaw, "\(name): \(info.stdout) \(info.stderr)")
      } else {
        XCTAssertFalse(saysRaw, "\(name) was read as a raw disk")
        if info.status != 0 {
          XCTAssertEqual(info.status, 1, "\(name): \(info.stderr)")
          XCTAssertEqual(info.stderr.split(separator: "\n").count, 1, info.stderr)
          XCTAssertTrue(info.stderr.contains(image), info.stderr)
        }
      }
      try? FileManager.default.removeItem(atPath: image)
      checked += 1
    }
    XCTAssertGreaterThan(checked, 30)
  }

  /// A raw disk whose bytes happen to look like nothing in particular stays raw.
  func testPlainDataIsRaw() throws {
    let raw = path("plain.img")
    try Data(patternBytes(1 << 20, seed: 9)).write(to: URL(fileURLWithPath: raw))
    let info = try lacuna("info", raw)
    XCTAssertEqual(info.status, 0, info.stderr)
    XCTAssertTrue(info.stdout.contains("file format: raw"), info.stdout)
  }
}

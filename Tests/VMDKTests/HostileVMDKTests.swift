import DiskImage
import Foundation
import TestSupport
import VMDK
import XCTest

/// Damaged and hostile VMDKs, each made from a valid qemu-img image with one thing changed:
/// every one is an error naming the file and the problem, never zeros, a crash or a trap.
final class HostileVMDKTests: QemuTestCase {
  private var sparse: PatchableVMDK!
  private var stream: PatchableVMDK!

  override func setUpWithError() throws {
    try super.setUpWithError()
    try qemuImgOK("create", "-q", "-f", "vmdk", path("sparse.vmdk"), "4M")
    try qemuIO(format: "vmdk", path("sparse.vmdk"), ["write -P 0x11 0 64k", "write -P 0x12 1M 64k"])
    sparse = try PatchableVMDK(path: path("sparse.vmdk"))
    // Two grains: a full one and a short last one (96 KiB disk).
    try qemuImgOK("create", "-q", "-f", "raw", path("stream.raw"), "96k")
    try qemuIO(format: "raw", path("stream.raw"), ["write -P 0x21 0 96k"])
    try qemuImgOK("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", path("stream.raw"), path("stream.vmdk"))
    stream = try PatchableVMDK(path: path("stream.vmdk"))
  }

  /// Writes `image` as `name`, then checks the reader's error (at open, or when the whole
  /// disk is mapped and read) and the binary's: exit 1, one line naming the file.
  private func assertRefused(
    _ image: PatchableVMDK, as name: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let target = path(name)
    try image.write(to: target)
    assertImageError(expected, file: file, line: line) {
      let reader = try openVMDK(target)
      _ = try reader.allExtents(in: 0..<reader.virtualSize)
      _ = try readAll(reader)
    }
    let outcome = try lacuna(["convert", "-O", "raw", target, path(name + ".raw")])
    XCTAssertEqual(outcome.status, 1, "\(name): \(outcome.stderr)", file: file, line: line)
    let lines = outcome.stderr.split(separator: "\n")
    XCTAssertEqual(lines.count, 1, "\(name): \(outcome.stderr)", file: file, line: line)
    XCTAssertTrue(outcome.stderr.contains(target), "\(name): \(outcome.stderr)", file: file, line: line)
    XCTAssertNil(outcome.signal, file: file, line: line)
  }

  func testTruncatedFile() throws {
    var image = sparse!
    image.bytes.removeLast(image.bytes.count - 20_000)
    try assertRefused(image, as: "truncated.vmdk", "truncated")
  }

  func testTruncatedGrain() throws {
    // The metadata is intact, the last grain is cut in half.
    var image = sparse!
    image.bytes.removeLast(32 << 10)
    try assertRefused(image, as: "short-grain.vmdk", "past the end of the file")
  }

  func testGrainDirectoryPastTheEnd() throws {
    var image = sparse!
    image.set(UInt64(image.bytes.count / 512 - 1), at: 56)
    try assertRefused(image, as: "gd-past-end.vmdk", "grain directory")
  }

  func testGrainTablePastTheEnd() throws {
    var image = sparse!
    image.set(UInt32(1 << 30), at: image.gdOffset)
    try assertRefused(image, as: "gt-past-end.vmdk", "past the end of the file")
  }

  func testGrainTableOverlappingTheDescriptor() throws {
    var image = sparse!
    image.set(UInt32(1), at: image.gdOffset)
    try assertRefused(image, as: "gt-descriptor.vmdk", "overlaps the embedded descriptor")
  }

  func testGrainTableInsideTheGrainDirectory() throws {
    var image = sparse!
    image.set(UInt32(image.gdOffset / 512), at: image.gdOffset)
    try assertRefused(image, as: "gt-gd.vmdk", "overlaps the grain directory")
  }

  func testGrainOverlappingTheDescriptor() throws {
    var image = sparse!
    image.setTableEntry(virtualOffset: 0, 2)
    try assertRefused(image, as: "grain-descriptor.vmdk", "overlaps the embedded descriptor")
  }

  func testGrainInsideTheGrainDirectory() throws {
    var image = sparse!
    image.setTableEntry(virtualOffset: 0, UInt32(image.gdOffset / 512))
    try assertRefused(image, as: "grain-gd.vmdk", "overlaps the grain directory")
  }

  func testAbsurdCapacity() throws {
    var image = sparse!
    image.set(UInt64(1) << 60, at: 12)
    try assertRefused(image, as: "capacity.vmdk", "absurd")
    image.set(UInt64.max, at: 12)
    try assertRefused(image, as: "capacity-max.vmdk", "absurd")
  }

  func testGrainSizeNotAPowerOfTwo() throws {
    var image = sparse!
    image.set(UInt64(100), at: 20)
    try assertRefused(image, as: "grain-100.vmdk", "grain size")
    image.set(UInt64(1) << 40, at: 20)
    try assertRefused(image, as: "grain-huge.vmdk", "grain size")
    image.set(UInt64(0), at: 20)
    try assertRefused(image, as: "grain-0.vmdk", "grain size")
  }

  func testTooManyEntriesPerTable() throws {
    var image = sparse!
    image.set(UInt32(0xffff_ffff), at: 44)
    try assertRefused(image, as: "gtes.vmdk", "entries")
    image.set(UInt32(0), at: 44)
    try assertRefused(image, as: "gtes-0.vmdk", "entries")
  }

  func testDescriptorSizes() throws {
    var image = sparse!
    image.set(UInt64(1) << 40, at: 36)
    try assertRefused(image, as: "descriptor-size.vmdk", "descriptor")
    image = sparse!
    image.set(UInt64.max, at: 28)
    try assertRefused(image, as: "descriptor-offset.vmdk", "descriptor")
  }

  func testNoEmbeddedDescriptor() throws {
    var image = sparse!
    image.set(UInt64(0), at: 28)
    try assertRefused(image, as: "split.vmdk", "open the disk's descriptor")
  }

  func testNewlineCheckDamage() throws {
    var image = sparse!
    image.bytes[75] = 0x0a  // "\r" became "\n", as a text-mode transfer does
    try assertRefused(image, as: "newline.vmdk", "text-mode transfer")
  }

  func testDescriptorWithTwoExtents() throws {
    var image = sparse!
    let text = image.descriptorText.replacingOccurrences(
      of: "RW 8192 SPARSE \"sparse.vmdk\"", with: "RW 8192 SPARSE \"sparse.vmdk\"\nRW 8192 SPARSE \"other.vmdk\"")
    XCTAssertNotEqual(text, image.descriptorText)
    image.setDescriptor(text)
    try assertRefused(image, as: "two-extents.vmdk", "2 extents")
  }

  func testDescriptorWithoutCID() throws {
    var image = sparse!
    image.setDescriptor(image.descriptorText.replacingOccurrences(of: "CID=", with: "XCID="))
    try assertRefused(image, as: "no-cid.vmdk", "CID")
  }

  func testDescriptorDisagreeingWithCapacity() throws {
    var image = sparse!
    image.setDescriptor(image.descriptorText.replacingOccurrences(of: "RW 8192 ", with: "RW 8000 "))
    try assertRefused(image, as: "extent-size.vmdk", "8000 sectors")
  }

  func testZeroedGrainWithoutTheFlag() throws {
    var image = sparse!
    image.setTableEntry(virtualOffset: 0, 1)
    try assertRefused(image, as: "zeroed-no-flag.vmdk", "zeroed-grain flag")
  }

  // MARK: - Compressed grains

  func testCompressedGrainWithTheWrongLBA() throws {
    var image = stream!
    let marker = Int(image.tableEntry(virtualOffset: 0)) * 512
    image.set(UInt64(128), at: marker)
    try assertRefused(image, as: "lba.vmdk", "marker for sector 128, expected 0")
  }

  /// The short last grain's stream used for the first, full grain: it inflates to 32 KiB
  /// where 64 KiB are needed.
  func testCompressedGrainThatInflatesShort() throws {
    var image = stream!
    let last = Int(image.tableEntry(virtualOffset: 65536)) * 512
    let size = Int(image.uint32(at: last + 8))
    var copy = Array(image.bytes[last..<last + 12 + size])
    copy.replaceSubrange(0..<8, with: [UInt8](repeating: 0, count: 8))
    let sector = image.append(copy)
    image.setTableEntry(virtualOffset: 0, UInt32(sector))
    try assertRefused(image, as: "short-inflate.vmdk", "inflates to 32768 bytes, expected 65536")
  }

  func testCompressedGrainCorrupt() throws {
    var image = stream!
    let marker = Int(image.tableEntry(virtualOffset: 0)) * 512
    for offset in marker + 20..<marker + 40 { image.bytes[offset] ^= 0x5a }
    try assertRefused(image, as: "corrupt.vmdk", "does not inflate")
  }

  func testCompressedGrainSizePastTheEnd() throws {
    var image = stream!
    let marker = Int(image.tableEntry(virtualOffset: 65536)) * 512
    image.set(UInt32(120_000), at: marker + 8)
    try assertRefused(image, as: "size.vmdk", "runs past the end of the file")
    image.set(UInt32(0), at: marker + 8)
    try assertRefused(image, as: "size-0.vmdk", "compressed bytes")
  }

  func testCompressedGrainPastTheEnd() throws {
    var image = stream!
    image.setTableEntry(virtualOffset: 0, UInt32(image.bytes.count / 512 + 10))
    try assertRefused(image, as: "grain-past-end.vmdk", "past the end of the file")
  }

  func testMemorySourcesOfEveryLengthDoNotCrash() throws {
    // Every prefix of a valid header region: errors, never traps.
    let bytes = sparse.bytes
    for length in stride(from: 0, to: 70_000, by: 509) {
      let source = MemorySource(name: "prefix-\(length).vmdk", bytes: Array(bytes.prefix(length)))
      do {
        let reader = try VMDK.format.open(source)
        _ = try reader.allExtents(in: 0..<reader.virtualSize)
        _ = try readAll(reader)
      } catch let error as ImageError {
        XCTAssertTrue(error.description.hasPrefix("prefix-\(length).vmdk: "), error.description)
      }
    }
  }
}

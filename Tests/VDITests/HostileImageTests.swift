import DiskImage
import Foundation
import TestSupport
import VDI
import XCTest

/// Damaged and hostile VDIs, each a valid hand-made image with one thing changed: every
/// one is refused with one line naming the file, before anything is allocated from it.
final class HostileImageTests: XCTestCase {
  /// Two data blocks of 4 KiB (0xa1, 0xa2) in a 4-block disk; block 1 is zero, block 3 free.
  private func valid() -> HandMadeVDI {
    HandMadeVDI(
      map: [1, 0xFFFF_FFFE, 0, 0xFFFF_FFFF],
      blocks: [[UInt8](repeating: 0xA2, count: 4096), [UInt8](repeating: 0xA1, count: 4096)])
  }

  private func open(_ image: HandMadeVDI) throws -> ImageReader {
    let reader = try VDIReader(source: image.source(), parentDirectories: [])
    _ = try wholeMap(reader)
    _ = try readAll(reader)
    return reader
  }

  private func expectFailure(_ expected: String, line: UInt = #line, _ change: (inout HandMadeVDI) -> Void) {
    var image = valid()
    change(&image)
    assertImageError("hand.vdi: " + expected, line: line) { _ = try open(image) }
  }

  func testValidImageReads() throws {
    let reader = try open(valid())
    XCTAssertEqual(reader.virtualSize, 16384)
    XCTAssertEqual(reader.clusterSize, 4096)
    XCTAssertEqual(
      try wholeMap(reader),
      [
        Extent(0..<4096, .data, hostOffset: 0x400 + 4096), Extent(4096..<8192, .zero),
        Extent(8192..<12288, .data, hostOffset: 0x400), Extent(12288..<16384, .zero),
      ])
    let bytes = try readAll(reader, chunk: 3000)
    XCTAssertEqual(
      bytes,
      [UInt8](repeating: 0xA1, count: 4096) + [UInt8](repeating: 0, count: 4096)
        + [UInt8](repeating: 0xA2, count: 4096) + [UInt8](repeating: 0, count: 4096))
  }

  /// A disk size that is no multiple of 512 (VBoxManage convertfromraw makes them) is kept
  /// exact; qemu-img would round it up to 512.
  func testOddDiskSize() throws {
    var image = HandMadeVDI(map: [0, 0xFFFF_FFFF], blocks: [[UInt8](repeating: 0xC7, count: 4096)])
    image.set(UInt64(5000), at: 0x170)
    let reader = try open(image)
    XCTAssertEqual(reader.virtualSize, 5000)
    XCTAssertEqual(try wholeMap(reader), [Extent(0..<4096, .data, hostOffset: 0x400), Extent(4096..<5000, .zero)])
    // The last block need only hold the disk's part of it: 904 bytes of the last data block.
    image = HandMadeVDI(map: [0xFFFF_FFFF, 0], blocks: [[UInt8](repeating: 0xC8, count: 904)])
    image.set(UInt64(5000), at: 0x170)
    image.bytes.removeLast(4096 - 904)
    XCTAssertEqual(try readAll(try open(image)), [UInt8](repeating: 0, count: 4096) + [UInt8](repeating: 0xC8, count: 904))
  }

  func testSignatureAndVersion() {
    expectFailure("signature at 0x40 is 0xbeda1070, expected 0xbeda107f") { $0.bytes[0x40] = 0x70 }
    expectFailure("VDI version 1.2 is not supported") { $0.set(UInt32(0x0001_0002), at: 0x44) }
    expectFailure("VDI version 0.0 is not supported") { $0.set(UInt32(0), at: 0x44) }
    expectFailure("header size is 0x10, expected 0x180..0x1b8") { $0.set(UInt32(0x10), at: 0x48) }
    expectFailure("image type is 7, expected") { $0.set(UInt32(7), at: 0x4C) }
    expectFailure("is a VirtualBox undo image (type 3), which is not read") { $0.set(UInt32(3), at: 0x4C) }
    expectFailure("the file is 300 bytes, too short for a VDI header") { $0.bytes.removeLast($0.bytes.count - 300) }
  }

  func testSizes() {
    expectFailure("sector size is 4096, expected 512") { $0.set(UInt32(4096), at: 0x168) }
    expectFailure("block size is 0, expected a power of two") { $0.set(UInt32(0), at: 0x178) }
    expectFailure("block size is 3000, expected a power of two") { $0.set(UInt32(3000), at: 0x178) }
    expectFailure("block size is 2147483648, expected a power of two") { $0.set(UInt32(1) << 31, at: 0x178) }
    expectFailure("block extra is 3, expected 0 or a power of two") { $0.set(UInt32(3), at: 0x17C) }
    expectFailure("block count is 4294967295, more than the largest allowed") { $0.set(UInt32.max, at: 0x180) }
    expectFailure("disk size 18446744073709551615 is larger than its 4 blocks") { $0.set(UInt64.max, at: 0x170) }
    expectFailure("disk size 16385 is larger than its 4 blocks of 4096 bytes (16384)") { $0.set(UInt64(16385), at: 0x170) }
    expectFailure("disk size 8192 needs 2 blocks of 4096 bytes, but the block map has 4") { $0.set(UInt64(8192), at: 0x170) }
    expectFailure("3 blocks are allocated, more than the 2") {
      $0.set(UInt32(2), at: 0x180)
      $0.set(UInt64(8192), at: 0x170)
      $0.set(UInt32(3), at: 0x184)
    }
    // An absurd block count, with a disk size to match: the map would run far past the end.
    expectFailure("block map at 0x200 (536870784 entries, 2147483136 bytes) runs past the end of the file (size 0x2400)") {
      $0.set(UInt32(0x1FFF_FF80), at: 0x180)
      $0.set(UInt64(0x1FFF_FF80) * 4096, at: 0x170)
    }
  }

  func testOffsets() {
    expectFailure("block map at 0x100 overlaps the header (which ends at 0x1c8)") { $0.set(UInt32(0x100), at: 0x154) }
    expectFailure("block map at 0xffffff00 (4 entries, 16 bytes) runs past the end of the file") {
      $0.set(UInt32(0xFFFF_FF00), at: 0x154)
    }
    expectFailure("data at 0x200 overlaps the block map (0x200..0x210)") { $0.set(UInt32(0x200), at: 0x158) }
  }

  func testBlockMapEntries() {
    expectFailure("block map entry 3 (virtual offset 0x3000) is block 2, but only 2 blocks are allocated") {
      $0.set(UInt32(2), at: 0x200 + 12)
    }
    expectFailure("block map entry 2 (virtual offset 0x2000) points at block 1, which another entry already uses") {
      $0.set(UInt32(1), at: 0x200 + 8)
    }
    expectFailure("block map entry 0 (virtual offset 0x0) points at block 1 at 0x1400 (4096 bytes), past the end of the file (size 0x2000)") {
      $0.bytes.removeLast(1024)
    }
    // Data past the end of the file: the data offset moved out.
    expectFailure("block map entry 0 (virtual offset 0x0) points at block 1 at 0xffff1000 (4096 bytes), past the end of the file (size 0x2400)") { $0.set(UInt32(0xFFFF_0000), at: 0x158) }
  }

  /// A differencing image with no parent in reach is refused by name.
  func testDifferencingWithoutParent() {
    expectFailure("is a differencing VDI whose parent UUID (link UUID at 0x1a8) is null") { $0.set(UInt32(4), at: 0x4C) }
    expectFailure("is a differencing VDI (a VirtualBox snapshot) whose parent, image UUID 04030201-0605-0807-090a-0b0c0d0e0f10") {
      $0.set(UInt32(4), at: 0x4C)
      for i in 0..<16 { $0.bytes[0x1A8 + i] = UInt8(i + 1) }
    }
  }

  /// Private bytes before each block (block extra, 0 in every image seen) are skipped.
  func testBlockExtra() throws {
    var image = HandMadeVDI(blockSize: 512, map: [1, 0])
    image.set(UInt32(512), at: 0x17C)  // block extra
    image.set(UInt32(2), at: 0x184)  // blocks allocated
    for fill: UInt8 in [0xB2, 0xB1] {
      image.bytes += [UInt8](repeating: 0xEE, count: 512) + [UInt8](repeating: fill, count: 512)
    }
    let reader = try open(image)
    XCTAssertEqual(try readAll(reader), [UInt8](repeating: 0xB1, count: 512) + [UInt8](repeating: 0xB2, count: 512))
  }

  /// The binary refuses each damaged file with exit 1 and one line naming it.
  func testBinaryRefusesDamage() throws {
    let directory = try temporaryDirectory(self)
    var cases: [(String, HandMadeVDI)] = []
    var image = valid()
    image.bytes.removeLast(5000)
    cases.append(("truncated.vdi", image))
    image = valid()
    image.set(UInt32(0x10_0000), at: 0x154)
    cases.append(("map-past-end.vdi", image))
    image = valid()
    image.set(UInt32(0x1FFF_FF80), at: 0x180)
    image.set(UInt64(0x1FFF_FF80) * 4096, at: 0x170)
    cases.append(("absurd-count.vdi", image))
    image = valid()
    image.set(UInt32(0x0002_0001), at: 0x44)
    cases.append(("bad-version.vdi", image))
    for (name, image) in cases {
      let path = directory.appendingPathComponent(name).path
      try image.write(to: path)
      for arguments in [["info", path], ["convert", "-O", "raw", path, path + ".raw"]] {
        let outcome = try lacuna(arguments)
        XCTAssertEqual(outcome.status, 1, "\(arguments): \(outcome.stderr)")
        XCTAssertNil(outcome.signal)
        let lines = outcome.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, outcome.stderr)
        XCTAssertTrue(outcome.stderr.contains(path), outcome.stderr)
      }
      XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".raw"))
    }
  }

  /// Every prefix of a small image (cut at each 256 bytes) opens and reads, or is refused
  /// with an ImageError; none traps.
  func testEveryTruncation() {
    let whole = valid().bytes
    for length in stride(from: 0, to: whole.count, by: 256) {
      let source = MemorySource(name: "cut.vdi", bytes: Array(whole[0..<length]))
      do {
        let reader = try VDIReader(source: source, parentDirectories: [])
        _ = try readAll(reader)
      } catch {
        XCTAssertTrue(error is ImageError, "\(length): \(error)")
      }
    }
  }
}

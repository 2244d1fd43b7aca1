import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// Damaged and hostile files: each is refused with one line naming the file and the
/// problem, never read as zeros, never a trap.
final class HostileImageTests: XCTestCase {
  private static let payload = VHDXBuilder.payloadOffset

  /// A valid image with one present block, to change one thing at a time.
  private func valid() -> VHDXBuilder {
    var builder = VHDXBuilder()
    builder.bat = [0: VHDXBuilder.entry(state: 6, offset: Self.payload)]
    builder.contents = [(Self.payload, [UInt8](repeating: 0x33, count: 1 << 20))]
    return builder
  }

  /// Opening and mapping and reading the whole image fails with a message holding `expected`.
  private func assertRefused(
    _ bytes: [UInt8], _ expected: String, file: StaticString = #filePath, line: UInt = #line
  ) {
    do {
      let reader = try VHDXReader(source: MemorySource(name: "bad.vhdx", bytes: bytes))
      _ = try reader.allExtents(in: 0..<reader.virtualSize)
      var buffer = [UInt8](repeating: 0, count: Int(min(reader.virtualSize, 8 << 20)))
      try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 0) }
      XCTFail("accepted; expected an error saying \(expected)", file: file, line: line)
    } catch let error as ImageError {
      let text = error.description
      XCTAssertTrue(text.hasPrefix("bad.vhdx: "), text, file: file, line: line)
      XCTAssertTrue(text.contains(expected), "\(text) does not say \(expected)", file: file, line: line)
      XCTAssertFalse(text.contains("\n"), text, file: file, line: line)
    } catch {
      XCTFail("not an ImageError: \(error)", file: file, line: line)
    }
  }

  func testValidBaseOpens() throws {
    let reader = try VHDXReader(source: MemorySource(name: "ok.vhdx", bytes: valid().build()))
    XCTAssertEqual(try readBytes(reader, at: 0, count: 2), [0x33, 0x33])
  }

  func testIdentifierAndTruncation() {
    var file = valid().build()
    file[0] = UInt8(ascii: "V")
    assertRefused(file, "file identifier")
    assertRefused(Array(valid().build()[0..<(100 << 10)]), "runs past the end of the file")
    assertRefused(Array(valid().build()[0..<(Self.payload + 4096)]), "past the end of the file")
  }

  func testBothHeadersDamaged() {
    var file = valid().build()
    file[(64 << 10) + 200] ^= 0xFF
    file[(128 << 10) + 4] ^= 0xFF
    assertRefused(file, "no valid header")
  }

  func testRegionTables() {
    var file = valid().build()
    file[(192 << 10) + 40] ^= 1
    XCTAssertNoThrow(try VHDXReader(source: MemorySource(name: "copy.vhdx", bytes: file)), "the second table is used")
    file[(256 << 10) + 40] ^= 1
    assertRefused(file, "no valid region table")

    file = valid().build()
    for table in [192 << 10, 256 << 10] {
      storeLittleEndian(UInt32(5000), at: table + 8, in: &file)
      refreshChecksum(&file, at: table, length: 64 << 10)
    }
    assertRefused(file, "5000 entries")

    var builder = valid()
    builder.extraRegions = [(GUID("01234567-89AB-CDEF-0123-456789ABCDEF")!, offset: 8 << 20, length: 1 << 20, flags: 1)]
    assertRefused(builder.build(), "required region 01234567-89AB-CDEF-0123-456789ABCDEF")
    builder.extraRegions[0].flags = 0
    XCTAssertNoThrow(try VHDXReader(source: MemorySource(name: "ok.vhdx", bytes: builder.build())))
    builder.extraRegions = [(GUID("01234567-89AB-CDEF-0123-456789ABCDEF")!, offset: 2 << 20, length: 1 << 20, flags: 0)]
    assertRefused(builder.build(), "overlaps the metadata region")
  }

  func testMetadata() {
    var builder = valid()
    builder.blockSize = 3 << 20
    assertRefused(builder.build(), "block size 3145728")
    builder.blockSize = 512 << 20
    assertRefused(builder.build(), "block size")
    builder = valid()
    builder.logicalSectorSize = 1000
    assertRefused(builder.build(), "logical sector size 1000")
    builder = valid()
    builder.virtualSize = (64 << 40) + 512
    assertRefused(builder.build(), "up to 64 TiB")
    builder = valid()
    builder.extraMetadata = [(GUID("FEDCBA98-7654-3210-FEDC-BA9876543210")!, flags: 4, bytes: [1, 2, 3, 4])]
    assertRefused(builder.build(), "required metadata item FEDCBA98-7654-3210-FEDC-BA9876543210")
    builder.extraMetadata = [(.virtualDiskSize, flags: 4, bytes: [UInt8](repeating: 0, count: 8))]
    assertRefused(builder.build(), "virtual disk size twice")

    var file = valid().build()
    storeLittleEndian(UInt16(3000), at: VHDXBuilder.metadataOffset + 10, in: &file)
    assertRefused(file, "3000 entries")
    file = valid().build()
    storeLittleEndian(UInt32(0xFFFF_0000), at: VHDXBuilder.metadataOffset + 32 + 16, in: &file)
    assertRefused(file, "not inside the metadata region")
    file = valid().build()
    storeLittleEndian(UInt32(5 << 20), at: VHDXBuilder.metadataOffset + 32 + 20, in: &file)
    assertRefused(file, "more than the 1 MiB allowed")
  }

  func testBATEntries() {
    var builder = valid()
    builder.bat[0] = VHDXBuilder.entry(state: 6, offset: 1 << 40)
    assertRefused(builder.build(), "BAT entry 0 points at 0x10000000000 (0x100000 bytes), past the end of the file")
    builder.bat[0] = 0xFFFF_FFFF_FFF0_0006
    assertRefused(builder.build(), "past the end of the file")
    builder.bat[0] = VHDXBuilder.entry(state: 6, offset: VHDXBuilder.metadataOffset)
    assertRefused(builder.build(), "inside the metadata region")
    builder.bat[0] = VHDXBuilder.entry(state: 6, offset: 0)
    assertRefused(builder.build(), "inside the headers")
    builder.bat[0] = VHDXBuilder.entry(state: 4)
    assertRefused(builder.build(), "reserved state 4")
    builder.bat[0] = VHDXBuilder.entry(state: 7, offset: Self.payload)
    assertRefused(builder.build(), "only differencing images")
    builder = valid()
    builder.bat[1] = VHDXBuilder.entry(state: 6, offset: Self.payload)
    assertRefused(builder.build(), "overlapping blocks")
    // Sector bitmap entries of a file without a parent are ignored (old qemu left junk there).
    builder = valid()
    builder.bat[builder.bitmapIndex(0)] = 0xDEAD_BEEF
    builder.virtualSize = Int64(builder.chunkRatio + 1) << 20
    XCTAssertNoThrow(try VHDXReader(source: MemorySource(name: "junk.vhdx", bytes: builder.build())))
  }

  func testBATRegionTooSmallForTheDisk() {
    var builder = valid()
    builder.virtualSize = 1 << 40  // 1 TiB in 1 MiB blocks: 8 MiB of BAT in a 1 MiB region
    assertRefused(builder.build(), "BAT region of 0x100000 bytes is too small")
  }

  /// Random damage in the metadata part of a valid image (checksums repaired half the
  /// time): opening, mapping and reading either work or throw an ImageError.
  func testRandomDamageNeverTraps() throws {
    var builder = valid()
    builder.parentLocator = [("parent_linkage", "{11111111-2222-3333-4444-555555555555}"), ("relative_path", "p.vhdx")]
    builder.bat[builder.bitmapIndex(0)] = VHDXBuilder.entry(state: 6, offset: Self.payload + (1 << 20))
    builder.bat[1] = VHDXBuilder.entry(state: 7, offset: Self.payload + (2 << 20))
    builder.fileSize = Self.payload + (3 << 20)
    let original = builder.build()
    let interesting: [Range<Int>] = [
      (64 << 10)..<(64 << 10) + 80, (192 << 10)..<(192 << 10) + 80, VHDXBuilder.batOffset..<VHDXBuilder.batOffset + 64,
      VHDXBuilder.batOffset + 4096..<VHDXBuilder.batOffset + 4112,
      VHDXBuilder.metadataOffset..<VHDXBuilder.metadataOffset + 256,
      VHDXBuilder.metadataOffset + (64 << 10)..<VHDXBuilder.metadataOffset + (64 << 10) + 400,
    ]
    var random = SystemRandomNumberGenerator()
    for round in 0..<400 {
      var file = original
      for _ in 0..<Int.random(in: 1...4, using: &random) {
        let range = interesting.randomElement(using: &random)!
        file[Int.random(in: range, using: &random)] = UInt8.random(in: 0...255, using: &random)
      }
      if round % 2 == 0 {
        refreshChecksum(&file, at: 64 << 10, length: 4096)
        refreshChecksum(&file, at: 192 << 10, length: 64 << 10)
      }
      do {
        let reader = try VHDXReader(source: MemorySource(name: "fuzz.vhdx", bytes: file))
        _ = try reader.allExtents(in: 0..<reader.virtualSize)
        var buffer = [UInt8](repeating: 0, count: Int(min(reader.virtualSize, 4 << 20)))
        try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 0) }
      } catch is ImageError {
      }
    }
  }
}

/// The same refusals through the binary: exit 1, one line naming the file.
final class HostileFileTests: QemuTestCase {
  private func assertExitsOne(_ bytes: [UInt8], _ name: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let image = path(name)
    try Data(bytes).write(to: URL(fileURLWithPath: image))
    for arguments in [["info", image], ["convert", "-O", "raw", image, path(name + ".raw")]] {
      let outcome = try lacuna(arguments)
      XCTAssertEqual(outcome.status, 1, "\(arguments): \(outcome.stderr)", file: file, line: line)
      let lines = outcome.stderr.split(separator: "\n")
      XCTAssertEqual(lines.count, 1, outcome.stderr, file: file, line: line)
      XCTAssertTrue(outcome.stderr.contains(image), outcome.stderr, file: file, line: line)
      XCTAssertTrue(outcome.stderr.contains(expected), "\(outcome.stderr) does not say \(expected)", file: file, line: line)
      XCTAssertFalse(FileManager.default.fileExists(atPath: path(name + ".raw")), file: file, line: line)
    }
  }

  func testQemuImageDamaged() throws {
    let image = path("good.vhdx")
    try qemuImgOK("create", "-f", "vhdx", "-o", "block_size=1M", image, "8M")
    try qemuIO(image, "write -P 0x21 0 1M", "write -P 0x22 7M 1M")
    let good = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))

    try assertExitsOne(Array(good[0..<(good.count - (512 << 10))]), "truncated.vhdx", "past the end of the file")

    var headers = good
    headers[(64 << 10) + 4] ^= 0xFF
    headers[(128 << 10) + 4] ^= 0xFF
    try assertExitsOne(headers, "headers.vhdx", "no valid header")

    // qemu puts the BAT at 2 MiB: point block 0 far past the end.
    var bat = good
    storeLittleEndian(UInt64(1 << 40) | 6, at: 2 << 20, in: &bat)
    try assertExitsOne(bat, "bat.vhdx", "past the end of the file")

    // qemu puts the file parameters first in the metadata region (3 MiB), at +64 KiB.
    var block = good
    storeLittleEndian(UInt32(5 << 20), at: (3 << 20) + (64 << 10), in: &block)
    try assertExitsOne(block, "block.vhdx", "block size 5242880")
  }
}

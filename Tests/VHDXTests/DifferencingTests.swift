import DiskImage
import Foundation
import TestSupport
import XCTest

@testable import VHDX

/// A differencing VHDX (qemu cannot make one: built byte by byte) over a parent made by
/// qemu-img, converted through the binary: the chain reads as Hyper-V would show it.
final class DifferencingTests: QemuTestCase {
  func testChainThroughTheBinary() throws {
    let parent = path("parent.vhdx")
    try qemuImgOK("create", "-f", "vhdx", "-o", "block_size=1M", parent, "4M")
    try qemuIO(parent, "write -P 0x11 0 4M")

    // The child links to the parent's DataWriteGuid, as Hyper-V records it.
    let linkage = try openVHDX(parent).dataWriteGuid
    var builder = VHDXBuilder()
    builder.parentLocator = [("parent_linkage", linkage), ("relative_path", ".\\parent.vhdx")]
    let payload = VHDXBuilder.payloadOffset
    let bitmapOffset = payload + (2 << 20)
    builder.bat = [
      builder.payloadIndex(0): VHDXBuilder.entry(state: 7, offset: payload),
      builder.payloadIndex(1): VHDXBuilder.entry(state: 6, offset: payload + (1 << 20)),
      builder.payloadIndex(3): VHDXBuilder.entry(state: 2),
      builder.bitmapIndex(0): VHDXBuilder.entry(state: 6, offset: bitmapOffset),
    ]
    var bitmap = [UInt8](repeating: 0, count: 1 << 20)
    bitmap[0] = 0b0000_0010
    builder.contents = [
      (payload, [UInt8](repeating: 0x71, count: 1 << 20)), (payload + (1 << 20), [UInt8](repeating: 0x72, count: 1 << 20)),
      (bitmapOffset, bitmap),
    ]
    let child = path("child.vhdx")
    try Data(builder.build()).write(to: URL(fileURLWithPath: child))
    XCTAssertEqual(try openVHDX(child).backing, BackingReference(name: "./parent.vhdx", format: "vhdx"))

    let output = path("chain.raw")
    let convert = try lacuna(["convert", "-O", "raw", child, output])
    XCTAssertEqual(convert.status, 0, convert.stderr)
    var expected = [UInt8](repeating: 0x11, count: 4 << 20)
    expected.replaceSubrange(512..<1024, with: [UInt8](repeating: 0x71, count: 512))
    expected.replaceSubrange(1 << 20..<2 << 20, with: [UInt8](repeating: 0x72, count: 1 << 20))
    expected.replaceSubrange(3 << 20..<4 << 20, with: [UInt8](repeating: 0, count: 1 << 20))
    XCTAssertTrue([UInt8](try Data(contentsOf: URL(fileURLWithPath: output))) == expected, "the chain's bytes differ")

    // A child made from another parent (its linkage is not this parent's DataWriteGuid) is
    // refused, naming the child: the chain would be a disk nobody ever had.
    builder.parentLocator = [("parent_linkage", "{99999999-2222-3333-4444-555555555555}"), ("relative_path", "parent.vhdx")]
    let stranger = path("stranger.vhdx")
    try Data(builder.build()).write(to: URL(fileURLWithPath: stranger))
    let refused = try lacuna(["convert", "-O", "raw", stranger, path("stranger.raw")])
    XCTAssertEqual(refused.status, 1, refused.stderr)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertTrue(refused.stderr.contains("\(stranger): parent"), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("links to {99999999-2222-3333-4444-555555555555}"), refused.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: path("stranger.raw")))
  }
}

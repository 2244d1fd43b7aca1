import DiskImage
import Foundation
import Raw
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// The file layer and the raw reader on real files in a temporary directory.
final class FileTests: XCTestCase {
  var directory: URL!

  override func setUpWithError() throws {
    directory = try temporaryDirectory(self)
  }

  func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

  func makeFile(_ name: String, size: Int64, data: [(Int64, Int)]) throws -> String {
    let file = path(name)
    let fd = open(file, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
    defer { close(fd) }
    for (offset, length) in data {
      let bytes = [UInt8](repeating: 0xab, count: length)
      XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, length, off_t(offset)) }, length)
    }
    XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
    return file
  }

  func testRawExtentsFollowTheFileSystem() throws {
    let file = try makeFile("a.img", size: 10 << 20, data: [(1 << 20, 4096), (4 << 20, 65536)])
    let reader = try RawReader(source: ImageFile.openForReading(file))
    XCTAssertEqual(reader.virtualSize, 10 << 20)
    let extents = try reader.allExtents(in: 0..<reader.virtualSize)
    XCTAssertEqual(
      extents,
      [
        Extent(0..<(1 << 20), .zero, hostOffset: 0),
        Extent((1 << 20)..<((1 << 20) + 4096), .data, hostOffset: 1 << 20),
        Extent(((1 << 20) + 4096)..<(4 << 20), .zero, hostOffset: (1 << 20) + 4096),
        Extent((4 << 20)..<((4 << 20) + 65536), .data, hostOffset: 4 << 20),
        Extent(((4 << 20) + 65536)..<(10 << 20), .zero, hostOffset: (4 << 20) + 65536),
      ])
    // A range that starts inside a data extent is clipped to it.
    let middle = try reader.allExtents(in: ((4 << 20) + 100)..<((4 << 20) + 200))
    XCTAssertEqual(middle, [Extent(((4 << 20) + 100)..<((4 << 20) + 200), .data, hostOffset: (4 << 20) + 100)])
  }

  func testReadPastTheEndIsAnError() throws {
    let file = try makeFile("short.img", size: 1000, data: [(0, 1000)])
    let handle = try ImageFile.openForReading(file)
    var buffer = [UInt8](repeating: 0, count: 100)
    XCTAssertThrowsError(
      try buffer.withUnsafeMutableBytes { try handle.readExactly(into: $0, at: 950, what: "L2 table") }
    ) { error in
      XCTAssertTrue("\(error)".contains("L2 table at 0x3b6"), "\(error)")
      XCTAssertTrue("\(error)".contains("past the end of the file"), "\(error)")
    }
  }

  func testInputsAreOpenedReadOnly() throws {
    let file = try makeFile("ro.img", size: 4096, data: [(0, 4096)])
    let handle = try ImageFile.openForReading(file)
    let bytes = [UInt8](repeating: 1, count: 16)
    XCTAssertThrowsError(try bytes.withUnsafeBytes { try handle.write($0, at: 0) })
  }

  func testOutputAppearsOnlyOnCommit() throws {
    let destination = path("out.img")
    let output = try OutputFile(creatingBeside: destination)
    // Unnamed where the file system can (O_TMPFILE): nothing in the directory until commit.
    XCTAssertTrue(output.isUnnamed, "ext4, xfs, btrfs and tmpfs have O_TMPFILE")
    XCTAssertTrue(output.temporaryPath.hasPrefix("/proc/self/fd/"), output.temporaryPath)
    try [UInt8](repeating: 7, count: 512).withUnsafeBytes { try output.file.write($0, at: 0) }
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), [])
    try output.commit()
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: destination)).count, 512)
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), ["out.img"])
  }

  /// Where there is no O_TMPFILE (forced here), a named temporary file beside the
  /// destination is renamed into place.
  func testNamedTemporaryFileIsRenamedIntoPlace() throws {
    setenv("LACUNA_TEMPORARY_FILE", "named", 1)
    defer { unsetenv("LACUNA_TEMPORARY_FILE") }
    let destination = path("out.img")
    let output = try OutputFile(creatingBeside: destination)
    XCTAssertFalse(output.isUnnamed)
    XCTAssertTrue(output.temporaryPath.hasPrefix(directory.path + "/.out.img.lacuna-"), output.temporaryPath)
    try [UInt8](repeating: 7, count: 512).withUnsafeBytes { try output.file.write($0, at: 0) }
    XCTAssertFalse(FileManager.default.fileExists(atPath: destination))
    try output.commit()
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: destination)).count, 512)
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), ["out.img"])
  }

  /// Replacing a file: the unnamed file is linked beside it and renamed over it; the old
  /// file's mode stays, and no temporary name is left.
  func testUnnamedOutputReplacesAnExistingFile() throws {
    let destination = path("old.img")
    FileManager.default.createFile(atPath: destination, contents: Data("old".utf8), attributes: [.posixPermissions: 0o600])
    let output = try OutputFile(creatingBeside: destination)
    XCTAssertTrue(output.isUnnamed)
    try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try output.file.write($0, at: 0) }
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: destination)), Data("old".utf8))
    try output.commit()
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: destination)), Data(repeating: 9, count: 4096))
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), ["old.img"])
    let mode = try FileManager.default.attributesOfItem(atPath: destination)[.posixPermissions] as? Int
    XCTAssertEqual(mode, 0o600)
  }

  func testAbandonLeavesNothing() throws {
    let output = try OutputFile(creatingBeside: path("gone.img"))
    try output.file.truncate(to: 1 << 20)
    output.abandon()
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), [])
  }

  func testPunchHoleAndAllocate() throws {
    let file = try makeFile("p.img", size: 1 << 20, data: [(0, 1 << 20)])
    let fd = open(file, O_RDWR)
    let handle = ImageFile.adoptWritable(descriptor: fd, path: file)
    XCTAssertTrue(try handle.punchHole(65536..<131072))
    XCTAssertEqual(try handle.dataRanges(in: 0..<(1 << 20)), [0..<65536, 131072..<(1 << 20)])
    try handle.allocate(65536..<131072)
    XCTAssertEqual(try handle.allocatedSize(), 1 << 20)
  }
}

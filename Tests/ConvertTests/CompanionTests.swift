import DiskImage
import Foundation
import Raw
import TestSupport
import XCTest

@testable import Convert

/// The seam for images whose disk lies in files they name (VMDK descriptors and their
/// extents): a test format, "pair", whose file is `PAIR <name>` and whose disk is the named
/// file's bytes. The Resolver opens the companion by the rules for backing files.
final class CompanionTests: XCTestCase {
  /// A reader whose disk is one companion file, read as raw.
  final class PairReader: ImageReader {
    let source: ByteSource
    let companion: ByteSource
    let inner: RawReader
    var formatName: String { "pair" }
    var virtualSize: Int64 { inner.virtualSize }
    var backing: BackingReference? { nil }
    var companionSources: [ByteSource] { [companion] }
    init(source: ByteSource, companions: CompanionOpener) throws {
      self.source = source
      let text = String(decoding: try source.readBytes(count: Int(try source.size()), at: 0, what: "pair file"), as: UTF8.self)
      guard text.hasPrefix("PAIR ") else { throw ImageError.invalid(path: source.name, "not a pair file") }
      let name = String(text.dropFirst(5).prefix { $0 != "\n" })
      companion = try companions.openCompanion(name, heldBy: source, what: "extent file")
      inner = try RawReader(source: companion)
    }
    func extents(in range: Range<Int64>) throws -> [Extent] { try inner.extents(in: range) }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws { try inner.read(into: buffer, at: offset) }
  }

  static let pair = ImageFormat(
    name: "pair", probeLength: 5, probe: { $0.starts(with: Array("PAIR ".utf8)) },
    openWithCompanions: { source, companions in try PairReader(source: source, companions: companions) })
  let resolver = Resolver(registry: FormatRegistry(formats: [CompanionTests.pair], fallback: Raw.format))
  var dir: URL!

  override func setUpWithError() throws { dir = try temporaryDirectory(self) }
  func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
  func write(_ name: String, _ text: String) throws { try Data(text.utf8).write(to: URL(fileURLWithPath: path(name))) }

  func testACompanionResolvesBesideTheImageAndCountsAsAnInput() throws {
    try FileManager.default.createDirectory(atPath: path("sub"), withIntermediateDirectories: true)
    try write("sub/disk.pair", "PAIR disk-flat.img\n")
    try Data(repeating: 7, count: 4096).write(to: URL(fileURLWithPath: path("sub/disk-flat.img")))
    let chain = try resolver.openChain(path("sub/disk.pair"), format: nil)
    XCTAssertEqual(chain.layers[0].formatName, "pair")
    XCTAssertEqual(chain.virtualSize, 4096)
    // The extent is an input: writing the output over it is refused like over the image.
    let extent = try ImageFile.openForReading(path("sub/disk-flat.img"))
    XCTAssertTrue(try chain.identities().contains(try XCTUnwrap(try extent.identity())))
  }

  func testCompanionProblemsNameTheImage() throws {
    try write("missing.pair", "PAIR nowhere.img\n")
    XCTAssertThrowsError(try resolver.openChain(path("missing.pair"), format: nil)) { error in
      XCTAssertEqual("\(error)", "\(path("missing.pair")): open extent file \(path("nowhere.img")): No such file or directory")
    }
    try write("self.pair", "PAIR self.pair\n")
    XCTAssertThrowsError(try resolver.openChain(path("self.pair"), format: nil)) { error in
      XCTAssertEqual("\(error)", "\(path("self.pair")): names itself as extent file 'self.pair'")
    }
    XCTAssertEqual(mkfifo(path("fifo"), 0o600), 0)
    try write("fifo.pair", "PAIR fifo\n")
    XCTAssertThrowsError(try resolver.openChain(path("fifo.pair"), format: nil)) { error in
      XCTAssertTrue("\(error)".hasPrefix("\(path("fifo.pair")): extent file"), "\(error)")
      XCTAssertTrue("\(error)".contains("FIFO"), "\(error)")
    }
    try write("url.pair", "PAIR nbd://host/export\n")
    XCTAssertThrowsError(try resolver.openChain(path("url.pair"), format: nil)) { error in
      XCTAssertTrue("\(error)".hasPrefix("\(path("url.pair")): extent file 'nbd://host/export' is not a plain file name"), "\(error)")
    }
  }

  /// The classic attack: an uploaded descriptor naming /etc/shadow as its extent. An
  /// untrusted image opens nothing but itself.
  func testAnUntrustedImageOpensNoCompanion() throws {
    try write("evil.pair", "PAIR /etc/shadow\n")
    var untrusted = resolver
    untrusted.policy = .untrusted
    XCTAssertThrowsError(try untrusted.openChain(path("evil.pair"), format: nil)) { error in
      XCTAssertEqual(
        "\(error)", "\(path("evil.pair")): names extent file '/etc/shadow'; an untrusted image may not make lacuna open other files")
    }
  }

  /// Without a Resolver (the fuzz harness), companions are refused by name.
  func testNoCompanionsRefusesByName() throws {
    try write("alone.pair", "PAIR x.img\n")
    XCTAssertThrowsError(try CompanionTests.pair.open(try ImageFile.openForReading(path("alone.pair")))) { error in
      XCTAssertTrue("\(error)".contains("names extent file 'x.img'"), "\(error)")
    }
  }
}

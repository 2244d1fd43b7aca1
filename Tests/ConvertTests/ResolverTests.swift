import DiskImage
import Foundation
import QCOW2
import Raw
import TestSupport
import XCTest

@testable import Convert

/// The rules for names images hold, in one place: relative to the image that holds them,
/// no URLs, a depth limit, loops named with the whole chain, and the untrusted policy.
final class ResolverTests: QemuTestCase {
  let resolver = Resolver(registry: FormatRegistry(formats: [QCOW2.format], fallback: Raw.format))

  func testNamesResolveAgainstTheDirectoryOfTheImageThatHoldsThem() throws {
    XCTAssertEqual(try resolver.resolve("base.qcow2", heldBy: "/a/b/top.qcow2"), "/a/b/base.qcow2")
    XCTAssertEqual(try resolver.resolve("../base.qcow2", heldBy: "b/top.qcow2"), "b/../base.qcow2")
    XCTAssertEqual(try resolver.resolve("/abs/base.qcow2", heldBy: "/a/top.qcow2"), "/abs/base.qcow2")
    XCTAssertEqual(try resolver.resolve("base.qcow2", heldBy: "top.qcow2"), "base.qcow2")
    for bad in ["", "nbd://host/x", "json:{\"driver\":\"raw\"}"] {
      XCTAssertThrowsError(try resolver.resolve(bad, heldBy: "top.qcow2")) { error in
        XCTAssertTrue("\(error)".hasPrefix("top.qcow2: "), "\(error)")
      }
    }
  }

  func testAChainOpensFromAnyDirectoryAndALoopNamesTheWholeChain() throws {
    try FileManager.default.createDirectory(atPath: path("sub"), withIntermediateDirectories: true)
    try qemuImgOK("create", "-f", "qcow2", path("sub/a.qcow2"), "1M")
    try qemuImgOK("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", path("sub/b.qcow2"))
    try qemuImgOK("create", "-f", "qcow2", "-b", "sub/b.qcow2", "-F", "qcow2", path("c.qcow2"))
    do {
      // (Closed at the end of this block: while open, its locks keep qemu-img from writing.)
      let chain = try resolver.openChain(path("c.qcow2"), format: nil)
      XCTAssertEqual(chain.layers.map(\.path), [path("c.qcow2"), path("sub/b.qcow2"), path("sub/a.qcow2")])
    }

    // a -> b -> a: rebase a onto b without checking.
    try qemuImgOK("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", path("sub/a.qcow2"))
    XCTAssertThrowsError(try resolver.openChain(path("c.qcow2"), format: nil)) { error in
      let text = "\(error)"
      XCTAssertEqual(
        text, "\(path("c.qcow2")) -> \(path("sub/b.qcow2")) -> \(path("sub/a.qcow2")) -> \(path("sub/b.qcow2")): backing chain loops")
    }
    // A missing backing file deeper down: the user's image, then the chain to the layer at fault.
    try FileManager.default.removeItem(atPath: path("sub/a.qcow2"))
    XCTAssertThrowsError(try resolver.openChain(path("c.qcow2"), format: nil)) { error in
      XCTAssertEqual(
        "\(error)",
        "\(path("c.qcow2")) -> \(path("sub/b.qcow2")): open backing file \(path("sub/a.qcow2")): No such file or directory")
    }
  }

  func testTheDepthLimitHolds() throws {
    try qemuImgOK("create", "-f", "qcow2", path("l0.qcow2"), "1M")
    for index in 1...4 {
      try qemuImgOK("create", "-f", "qcow2", "-b", "l\(index - 1).qcow2", "-F", "qcow2", path("l\(index).qcow2"))
    }
    var shallow = resolver
    shallow.depthLimit = 4
    XCTAssertThrowsError(try shallow.openChain(path("l4.qcow2"), format: nil)) { error in
      XCTAssertTrue("\(error)".contains("deeper than 4 layers"), "\(error)")
    }
    shallow.depthLimit = 5
    XCTAssertEqual(try shallow.openChain(path("l4.qcow2"), format: nil).layers.count, 5)
  }

  func testAnUntrustedImageOpensNoOtherFile() throws {
    try qemuImgOK("create", "-f", "qcow2", path("base.qcow2"), "1M")
    try qemuImgOK("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path("top.qcow2"))
    var untrusted = resolver
    untrusted.policy = .untrusted
    XCTAssertThrowsError(try untrusted.openChain(path("top.qcow2"), format: nil)) { error in
      XCTAssertTrue("\(error)".hasPrefix(path("top.qcow2") + ": names backing file 'base.qcow2'"), "\(error)")
    }
    // What the user named alone is fine.
    XCTAssertEqual(try untrusted.openChain(path("base.qcow2"), format: nil).layers.count, 1)
  }
}

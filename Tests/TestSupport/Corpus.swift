import Foundation
import XCTest

/// The corpus of real images made by other tools (`../shared/corpus` beside the repository,
/// or `LACUNA_CORPUS`), each stored `.xz` or `.gz`; its MANIFEST.md says where each comes
/// from. Tests unpack what they need into their temporary folder; nothing of it is copied
/// into the repository.
public func corpusDirectory() throws -> URL {
  guard let directory = corpusRoot() else {
    throw XCTSkip(
      "the image corpus is not at \(corpusCandidates.map(\.path).joined(separator: " or ")) (set LACUNA_CORPUS); skipping the real-image checks")
  }
  return directory
}

/// Where the corpus may be: `LACUNA_CORPUS`, `../shared/corpus` beside the repository (a
/// checkout in the workplace), or the workplace's own `/work/shared/corpus` (a clone made
/// elsewhere, as CI makes).
private let corpusCandidates: [URL] =
  (ProcessInfo.processInfo.environment["LACUNA_CORPUS"].map { [URL(fileURLWithPath: $0)] } ?? []) + [
    fixturesDirectory.deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("shared").appendingPathComponent("corpus"),
    URL(fileURLWithPath: "/work/shared/corpus"),
  ]

/// The first place that holds the corpus (its MANIFEST.md), or nil.
public func corpusRoot() -> URL? {
  corpusCandidates.first { FileManager.default.fileExists(atPath: $0.appendingPathComponent("MANIFEST.md").path) }
}

/// Every stored file of the corpus, as paths relative to it ("dfvfs/ext2.vhd.xz").
public func corpusFiles() throws -> [String] {
  let directory = try corpusDirectory()
  guard let walker = FileManager.default.enumerator(atPath: directory.path) else { return [] }
  return walker.compactMap { $0 as? String }.filter { $0.hasSuffix(".xz") || $0.hasSuffix(".gz") }.sorted()
}

/// Unpacks one corpus file (`relative`, as `corpusFiles` lists it) into `directory`, under
/// its name without the compression suffix; returns the unpacked path.
public func unpackCorpusFile(_ relative: String, into directory: URL) throws -> String {
  let source = try corpusDirectory().appendingPathComponent(relative).path
  let name = URL(fileURLWithPath: relative).deletingPathExtension().lastPathComponent
  let output = directory.appendingPathComponent(name).path
  let tool = relative.hasSuffix(".xz") ? "xz" : "gzip"
  guard let program = which(tool) else { throw XCTSkip("\(tool) is not installed; cannot unpack the corpus") }
  let unpacked = try runProgram("/bin/sh", ["-c", "\"$0\" -dc \"$1\" > \"$2\"", program, source, output])
  guard unpacked.status == 0 else {
    throw NSError(domain: "corpus", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(tool) -dc \(source): \(unpacked.stderr)"])
  }
  return output
}

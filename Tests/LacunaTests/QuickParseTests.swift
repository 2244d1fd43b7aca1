import ArgumentParser
import Foundation
import TestSupport
import XCTest

@testable import lacuna

/// The quick parser of `convert` (QuickParse.swift) against swift-argument-parser, which
/// stays the authority: wherever the quick parser gives settings, they are the ones
/// swift-argument-parser gives for the same arguments.
final class QuickParseTests: XCTestCase {
  /// swift-argument-parser's settings for `convert` with these arguments, or nil where it
  /// refuses them (a usage error, help, ...).
  private func fullParse(_ arguments: [String]) -> ConvertSettings? {
    guard let command = try? Lacuna.parseAsRoot(["convert"] + arguments) else { return nil }
    return (command as? ConvertCommand)?.settings
  }

  /// The quick table names every option and flag ConvertCommand declares, with the same
  /// spellings, and takes a value and repeats exactly where the declaration does.
  func testTheTableIsTheDeclaredOptions() throws {
    var dump = ""
    do {
      _ = try Lacuna.parseAsRoot(["convert", "--experimental-dump-help"])
      XCTFail("--experimental-dump-help parsed as a command")
    } catch {
      dump = Lacuna.fullMessage(for: error)
    }
    let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(dump.utf8)) as? [String: Any])
    let command = try XCTUnwrap(json["command"] as? [String: Any])
    let arguments = try XCTUnwrap(command["arguments"] as? [[String: Any]])
    var declared: [String] = []
    var positionals = 0
    for argument in arguments {
      let kind = try XCTUnwrap(argument["kind"] as? String)
      if kind == "positional" {
        positionals += 1
        continue
      }
      let names = try XCTUnwrap(argument["names"] as? [[String: String]]).map { name in
        (name["kind"] == "short" ? "-" : "--") + (name["name"] ?? "")
      }
      // swift-argument-parser's own; the quick parser leaves them to it.
      if names.contains("--help") || names.contains("--version") { continue }
      let repeats = argument["isRepeating"] as? Bool ?? false
      declared.append("\(names.sorted()) \(kind == "flag" ? "flag" : "value")\(repeats ? " repeats" : "")")
    }
    let quick = ConvertSettings.quickOptions.map { option in
      "\(option.names.sorted()) \(option.set == nil ? "flag" : "value")\(option.repeats ? " repeats" : "")"
    }
    XCTAssertEqual(declared.sorted(), quick.sorted())
    XCTAssertEqual(positionals, 2)
  }

  /// The command lines people and the bench type go the quick way, and give what
  /// swift-argument-parser gives.
  func testPlainCommandLinesAreQuick() throws {
    for arguments in [
      ["-f", "raw", "-O", "raw", "-t", "unsafe", "source.img", "copy.img"],
      ["-O", "qcow2", "-c", "-o", "compression_type=zstd", "disk.img", "disk.qcow2"],
      ["source.qcow2", "-O", "raw", "copy.img", "--summary", "--copy-mode=clone"],
      ["-p", "-m", "4", "-S", "64k", "-B", "base.qcow2", "-F", "qcow2", "-O", "qcow2", "a", "b"],
      ["-U", "--untrusted", "-l", "snapshot.name=x", "-l", "snapshot.id=1", "a.qcow2", "-"],
    ] {
      let quick = ConvertSettings.quick(arguments[...])
      XCTAssertNotNil(quick, "\(arguments)")
      XCTAssertEqual(quick, fullParse(arguments), "\(arguments)")
    }
    let bench = ConvertSettings.quick(["-f", "raw", "-O", "raw", "-t", "unsafe", "a", "b"])
    XCTAssertEqual(bench?.cacheMode, .unsafe)
    XCTAssertEqual(bench?.sparseSize, "4k")
    XCTAssertEqual(bench?.copyMode, .auto)
  }

  /// What the quick parser is not sure of goes to swift-argument-parser: help, --version,
  /// unknown or combined flags, `--`, a value that looks like an option, a value an option
  /// does not take, settings that fail validation.
  func testWhatItIsNotSureOfIsLeftToTheFullParser() {
    for arguments in [
      ["--help", "a", "b"], ["-h"], ["--version"], ["--nope", "a", "b"], ["-cp", "a", "b"],
      ["--", "a", "b"], ["-O", "-c", "a", "b"], ["-t", "none", "a", "b"], ["-m", "x", "a", "b"],
      ["-S", "3", "a", "b"], ["-F", "qcow2", "a", "b"], ["-f", "raw", "-f", "raw", "a", "b"],
      ["-c=yes", "a", "b"], ["--summary=1", "a", "b"], ["a"], ["a", "b", "c"],
      ["--generate-completion-script", "bash"],
    ] {
      XCTAssertNil(ConvertSettings.quick(arguments[...]), "\(arguments)")
    }
  }

  /// 1,200 command lines made from the table, plain and otherwise: wherever the
  /// quick parser gives settings, swift-argument-parser gives the same ones; on plain
  /// command lines (each option once, values that do not look like options) the two
  /// accept and refuse the same ones.
  func testRandomCommandLinesAgreeWithTheFullParser() {
    var generator = SplitMix(seed: 18)
    let values: [String: [String]] = [
      "-f": ["raw", "qcow2", "vmdk"], "-l": ["1", "snapshot.name=x", "snapshot.size=1", "snapshot.id=2,snapshot.name=y"],
      "-s": ["1", "before"], "-O": ["raw", "qcow2", "vpc"], "-o": ["compression_type=zstd", "a=b,,c", "force_size"],
      "-S": ["4k", "0", "3", "64k", "512", "1M", "32M", "4 k"], "-B": ["base.qcow2", "a=b"], "-F": ["qcow2", "raw"],
      "--source-backing-format": ["raw", "qcow2"], "-m": ["1", "4", "0", "x", "+4", "65", "64", "04"],
      "-t": ["unsafe", "writeback", "none", "Unsafe"], "--progress": ["bar", "json", "xml", ""],
      "--copy-mode": ["auto", "clone", "copy", "rw", "fast"],
    ]
    let images = ["a.img", "b.qcow2", "-", "", "x=y", "two words", "nbd://host/x"]
    let odd = ["--", "-x", "--nope", "-cp", "-qp", "-O=raw", "--copy-mode", "-h", "--help"]
    var counts = (quick: 0, refusedByBoth: 0, fullOnly: 0)
    for round in 0..<1200 {
      let plain = round % 2 == 0
      var pieces: [[String]] = []
      for option in ConvertSettings.quickOptions where generator.next() % 3 == 0 {
        let name = option.names[Int(generator.next() % UInt64(option.names.count))]
        let times = !plain && option.repeats || !plain && generator.next() % 8 == 0 ? 2 : 1
        for _ in 0..<times {
          guard let pool = values[name] else {
            pieces.append([name])
            continue
          }
          let value = pool[Int(generator.next() % UInt64(pool.count))]
          if name.hasPrefix("--") && generator.next() % 2 == 0 {
            pieces.append([name + "=" + value])
          } else {
            pieces.append([name, !plain && generator.next() % 10 == 0 ? "-z" : value])
          }
        }
      }
      let count = plain ? 2 : Int(generator.next() % 4)
      for _ in 0..<count { pieces.append([images[Int(generator.next() % UInt64(images.count))]]) }
      if !plain && generator.next() % 3 == 0 { pieces.append([odd[Int(generator.next() % UInt64(odd.count))]]) }
      // Options and images in any order, as swift-argument-parser takes them.
      for index in pieces.indices.reversed() {
        pieces.swapAt(index, Int(generator.next() % UInt64(index + 1)))
      }
      let arguments = pieces.flatMap { $0 }
      let quick = ConvertSettings.quick(arguments[...])
      let full = fullParse(arguments)
      if let quick {
        counts.quick += 1
        XCTAssertEqual(quick, full, "\(arguments)")
      } else if full == nil {
        counts.refusedByBoth += 1
      } else {
        counts.fullOnly += 1
        XCTAssertFalse(plain, "plain, yet left to the full parser: \(arguments)")
      }
    }
    // Not vacuous: many command lines of each kind.
    XCTAssertGreaterThan(counts.quick, 150, "\(counts)")
    XCTAssertGreaterThan(counts.refusedByBoth, 150, "\(counts)")
    XCTAssertGreaterThan(counts.fullOnly, 5, "\(counts)")
  }
}

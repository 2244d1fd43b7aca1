import ArgumentParser
import Foundation
import TestSupport
import XCTest

@testable import lacuna

/// The quick parser of `convert`, `info` and `map` (QuickParse.swift) against
/// swift-argument-parser, which stays the authority: wherever the quick parser gives
/// settings, they are the ones swift-argument-parser gives for the same arguments.
final class QuickParseTests: XCTestCase {
  /// One verb: how each parser reads its arguments, and values to make command lines of.
  private struct Verb<Settings: Equatable> {
    var name: String
    var options: [QuickOption<Settings>]
    var quick: (ArraySlice<String>) -> Settings?
    var full: (ParsableCommand) -> Settings?
    var positionals: Int
    var values: [String: [String]]

    /// swift-argument-parser's settings for these arguments, or nil where it refuses them
    /// (a usage error, help, ...).
    func fullParse(_ arguments: [String]) -> Settings? {
      guard let command = try? Lacuna.parseAsRoot([name] + arguments) else { return nil }
      return full(command)
    }
  }

  private let convert = Verb(
    name: "convert", options: ConvertSettings.quickOptions, quick: ConvertSettings.quick,
    full: { ($0 as? ConvertCommand)?.settings }, positionals: 2,
    values: [
      "-f": ["raw", "qcow2", "vmdk"], "-l": ["1", "snapshot.name=x", "snapshot.size=1", "snapshot.id=2,snapshot.name=y"],
      "-s": ["1", "before"], "-O": ["raw", "qcow2", "vpc"], "-o": ["compression_type=zstd", "a=b,,c", "force_size"],
      "-S": ["4k", "0", "3", "64k", "512", "1M", "32M", "4 k"], "-B": ["base.qcow2", "a=b"], "-F": ["qcow2", "raw"],
      "--source-backing-format": ["raw", "qcow2"], "-m": ["1", "4", "0", "x", "+4", "65", "64", "04"],
      "-t": ["unsafe", "writeback", "none", "Unsafe"], "--progress": ["bar", "json", "xml", ""],
      "--copy-mode": ["auto", "clone", "copy", "rw", "fast"],
    ])

  private let info = Verb(
    name: "info", options: InfoSettings.quickOptions, quick: InfoSettings.quick,
    full: { ($0 as? InfoCommand)?.settings }, positionals: 1,
    values: ["-f": ["raw", "qcow2", "vmdk9"], "--output": ["human", "json", "xml", "JSON"]])

  private let map = Verb(
    name: "map", options: MapSettings.quickOptions, quick: MapSettings.quick,
    full: { ($0 as? MapCommand)?.settings }, positionals: 1,
    values: [
      "-f": ["raw", "qcow2"], "--output": ["human", "json", "xml"], "--start-offset": ["0", "1M", "x", "512"],
      "--max-length": ["4096", "1G", "y"],
    ])

  /// The quick tables name every option and flag each command declares, with the same
  /// spellings, and take a value and repeat exactly where the declaration does.
  func testTheTablesAreTheDeclaredOptions() throws {
    try checkTable(convert)
    try checkTable(info)
    try checkTable(map)
  }

  private func checkTable<Settings>(_ verb: Verb<Settings>) throws {
    var dump = ""
    do {
      _ = try Lacuna.parseAsRoot([verb.name, "--experimental-dump-help"])
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
    let quick = verb.options.map { option in
      "\(option.names.sorted()) \(option.takesValue ? "value" : "flag")\(option.repeats ? " repeats" : "")"
    }
    XCTAssertEqual(declared.sorted(), quick.sorted(), verb.name)
    XCTAssertEqual(positionals, verb.positionals, verb.name)
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
      let quick = convert.quick(arguments[...])
      XCTAssertNotNil(quick, "\(arguments)")
      XCTAssertEqual(quick, convert.fullParse(arguments), "\(arguments)")
    }
    let bench = ConvertSettings.quick(["-f", "raw", "-O", "raw", "-t", "unsafe", "a", "b"])
    XCTAssertEqual(bench?.cacheMode, .unsafe)
    XCTAssertEqual(bench?.sparseSize, "4k")
    XCTAssertEqual(bench?.copyMode, .auto)
    for arguments in [["disk.qcow2"], ["--output=json", "--backing-chain", "top.qcow2"], ["-U", "-f", "raw", "x"]] {
      let quick = info.quick(arguments[...])
      XCTAssertNotNil(quick, "\(arguments)")
      XCTAssertEqual(quick, info.fullParse(arguments), "\(arguments)")
    }
    for arguments in [["disk.img"], ["--output", "json", "top.qcow2"], ["--start-offset", "1M", "--max-length=4k", "x"]] {
      let quick = map.quick(arguments[...])
      XCTAssertNotNil(quick, "\(arguments)")
      XCTAssertEqual(quick, map.fullParse(arguments), "\(arguments)")
    }
    XCTAssertEqual(InfoSettings.quick(["--output=json", "a"])?.output, .json)
    XCTAssertEqual(MapSettings.quick(["--untrusted", "a"])?.access.untrusted, true)
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
    for arguments in [["--help", "a"], ["a", "b"], [], ["--output", "xml", "a"], ["--backing-chain=1", "a"]] {
      XCTAssertNil(InfoSettings.quick(arguments[...]), "\(arguments)")
    }
    for arguments in [["-h"], ["--start-offset", "-1", "a"], ["--max-length", "1", "--max-length", "2", "a"]] {
      XCTAssertNil(MapSettings.quick(arguments[...]), "\(arguments)")
    }
    XCTAssertNil(QuickParse.command(["create", "-f", "qcow2", "a", "1G"]), "verbs without a table")
    XCTAssertNotNil(QuickParse.command(["map", "a"]))
  }

  /// Command lines made from the tables, plain and otherwise (1,200 of `convert`, 300 of
  /// `info` and of `map`): wherever the quick parser gives settings, swift-argument-parser
  /// gives the same ones; on plain command lines (each option once, values that do not
  /// look like options) the two accept and refuse the same ones.
  func testRandomCommandLinesAgreeWithTheFullParser() {
    agree(convert, rounds: 1200, seed: 18)
    agree(info, rounds: 300, seed: 19)
    agree(map, rounds: 300, seed: 20)
  }

  private func agree<Settings>(_ verb: Verb<Settings>, rounds: Int, seed: UInt64) {
    var generator = SplitMix(seed: seed)
    func pick<T>(_ list: [T]) -> T { list[Int(generator.next() % UInt64(list.count))] }
    let images = ["a.img", "b.qcow2", "-", "", "x=y", "two words", "nbd://host/x"]
    let odd = ["--", "-x", "--nope", "-cp", "-qp", "-O=raw", "--copy-mode", "--output", "-h", "--help"]
    var counts = (quick: 0, refusedByBoth: 0, fullOnly: 0)
    for round in 0..<rounds {
      let plain = round % 2 == 0
      var pieces: [[String]] = []
      for option in verb.options where generator.next() % 3 == 0 {
        let name = pick(option.names)
        let times = !plain && option.repeats || !plain && generator.next() % 8 == 0 ? 2 : 1
        for _ in 0..<times {
          guard let pool = verb.values[name] else {
            pieces.append([name])
            continue
          }
          let value = pick(pool)
          if name.hasPrefix("--") && generator.next() % 2 == 0 {
            pieces.append([name + "=" + value])
          } else {
            pieces.append([name, !plain && generator.next() % 10 == 0 ? "-z" : value])
          }
        }
      }
      let count = plain ? verb.positionals : Int(generator.next() % 4)
      for _ in 0..<count { pieces.append([pick(images)]) }
      if !plain && generator.next() % 3 == 0 { pieces.append([pick(odd)]) }
      // Options and images in any order, as swift-argument-parser takes them.
      for index in pieces.indices.reversed() {
        pieces.swapAt(index, Int(generator.next() % UInt64(index + 1)))
      }
      let arguments = pieces.flatMap { $0 }
      let quick = verb.quick(arguments[...])
      let full = verb.fullParse(arguments)
      if let quick {
        counts.quick += 1
        XCTAssertEqual(quick, full, "\(verb.name) \(arguments)")
      } else if full == nil {
        counts.refusedByBoth += 1
      } else {
        counts.fullOnly += 1
        XCTAssertFalse(plain, "plain, yet left to the full parser: \(verb.name) \(arguments)")
      }
    }
    // Not vacuous: many command lines of each kind.
    XCTAssertGreaterThan(counts.quick, rounds / 8, "\(verb.name) \(counts)")
    XCTAssertGreaterThan(counts.refusedByBoth, rounds / 8, "\(verb.name) \(counts)")
    XCTAssertGreaterThan(counts.fullOnly, rounds / 240, "\(verb.name) \(counts)")
  }
}

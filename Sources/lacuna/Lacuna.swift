import ArgumentParser
import Compression
import Convert
import NBD
import FoundationEssentials
import DiskImage
import LacunaKit
import QCOW2
import Raw
import Stream
import VDI
import VHD
import VHDX
import VMDK

#if canImport(Glibc)
  import Glibc
#endif

struct Lacuna: ParsableCommand {
  static let version = LacunaKit.version

  static let configuration = CommandConfiguration(
    commandName: "lacuna",
    abstract: "Convert virtual-machine disk images, keeping their holes.",
    discussion: """
      lacuna reads and writes raw, qcow2 (with backing chains), VMDK (every subformat qemu-img \
      writes, streamOptimized for VMware), VHD (vpc: fixed for Azure, dynamic), VHDX and VDI \
      images, from files, block devices and NBD servers; it asks each layer which ranges hold \
      data, reads only those, and writes sparse output. Flags mean what they mean in qemu-img.

      Examples:
        lacuna convert -O raw disk.qcow2 disk.img
        lacuna convert -O vmdk -o subformat=streamOptimized disk.qcow2 disk.vmdk
        lacuna info --output=json disk.qcow2
        lacuna map --output=json disk.img
        lacuna compare disk.img disk.qcow2
      """,
    // What swift-argument-parser prints for --version, wherever it is given; main.swift
    // prints `versionText()` in its place, so that libnbd loads only when asked for.
    version: versionLine,
    subcommands: [
      CheckCommand.self, CompareCommand.self, ConvertCommand.self, CreateCommand.self, InfoCommand.self, MapCommand.self,
      MeasureCommand.self, SparsifyCommand.self, StreamReceiverCommand.self,
    ])
}

/// The first line of `--version`, and the cheap stand-in for it that the parser holds.
let versionLine = "lacuna version \(Lacuna.version)"

/// What `--version` prints: the version, as qemu-img prints its own, then what this build
/// reads and writes and the libraries it runs with (their versions asked of them at run
/// time, so a static binary on another host says what it found there).
func versionText() -> String {
  let writable = registry.all.filter { $0.create != nil }.map(\.name).sorted()
  let readOnly = registry.all.filter { $0.create == nil }.map(\.name).sorted()
  var lines = [
    versionLine,
    "Formats (read and write): " + writable.joined(separator: " "),
  ]
  if !readOnly.isEmpty { lines.append("Formats (read only): " + readOnly.joined(separator: " ")) }
  lines.append("Compression: zlib \(CompressionLibraries.zlibVersion), zstd \(CompressionLibraries.zstdVersion)")
  lines.append("NBD: libnbd " + (NBDLibrary.version ?? "(unavailable)"))
  return lines.joined(separator: "\n")
}

/// The formats this build knows, in probing order; raw is what is left (LacunaKit's).
let registry = LacunaKit.registry
/// How every name the user gives or an image holds becomes an image.
let resolver: Resolver = LacunaKit.resolver()

/// How the verbs that read images may open them: `-U` and `--untrusted`.
struct ImageAccess: ParsableArguments {
  @Flag(
    name: [.customShort("U"), .customLong("force-share")],
    help: "Read the image even if a running VM holds it for writing (qemu's locks are ignored; the copy may be inconsistent).")
  var forceShare = false

  @Flag(
    name: .customLong("untrusted"),
    help: "The image comes from elsewhere (an upload): refuse it if it names any other file (a backing file), and read only regular files.")
  var untrusted = false

  /// What these flags ask for, as the quick parser (QuickParse.swift) gives it too.
  var settings: AccessSettings { AccessSettings(forceShare: forceShare, untrusted: untrusted) }

  /// The resolver these flags ask for.
  var resolver: Resolver { settings.resolver }
}

/// `-U` and `--untrusted` as values, for the settings the verbs run with.
struct AccessSettings: Equatable {
  var forceShare = false
  var untrusted = false

  /// How the image and its backing files are opened.
  var resolver: Resolver { LacunaKit.resolver(untrusted: untrusted, forceShare: forceShare) }
}

/// A failure that is not an image's fault, with the exit status it deserves.
struct CommandFailure: Error {
  var message: String
  var status: Int32 = 1
}

/// Prints one line to standard error, prefixed with the program's name.
func printError(_ message: String, prefix: Bool = true) {
  let line = (prefix ? "lacuna: " : "") + message + (message.hasSuffix("\n") ? "" : "\n")
  fputs(line, stderr)
}

/// `--output=human|json`, as qemu-img takes it.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
  case human, json
}

/// Parses `-o key=value,key=value`. qemu-img's `,,` escape stands for a literal comma, and
/// a key alone is a flag set to `on` (`-o subformat=fixed,force_size`, as Azure's
/// documentation spells it).
func parseOptions(_ list: [String]) throws -> [String: String] {
  var result: [String: String] = [:]
  for text in list {
    let parts = text.replacing(",,", with: "\u{0}").split(separator: ",")
    for part in parts {
      let item = String(part.replacing("\u{0}", with: ","))
      guard let equals = item.firstIndex(of: "=") else {
        result[item] = "on"
        continue
      }
      guard equals != item.startIndex else {
        throw ValidationError("option '\(item)' is not key=value")
      }
      result[String(item[..<equals])] = String(item[item.index(after: equals)...])
    }
  }
  return result
}

/// Takes qemu-img's `-o backing_file=...,backing_fmt=...` out of the options: they mean
/// the same as `-B`/`-b` and `-F`, and giving both ways at once is refused.
func takeBackingOptions(
  _ options: inout [String: String], backing: String?, format: String?
) throws -> (backing: String?, format: String?) {
  var backing = backing
  var format = format
  if let name = options.removeValue(forKey: "backing_file") {
    guard backing == nil || backing == name else { throw ValidationError("backing file given twice, differently") }
    backing = name
  }
  if let name = options.removeValue(forKey: "backing_fmt") {
    guard format == nil || format == name else { throw ValidationError("backing format given twice, differently") }
    format = name
  }
  if format != nil && backing == nil { throw ValidationError("a backing format needs a backing file") }
  return (backing, format)
}

/// Formats a byte count as qemu-img does in its human output ("5 MiB", "1.5 GiB", "0 B"):
/// three significant digits, and the next unit up from 1000 of the one below ("0.977 KiB"
/// for 1000 bytes), as qemu's size_to_str picks it.
func humanSize(_ bytes: Int64) -> String {
  let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
  let value = Double(max(bytes, 0))
  // One less than the exponent of value * 1024 / 1000 is floor(log2) of it; every ten a unit.
  let exponent = frexp(value / (1000.0 / 1024.0)).1
  let unit = min(suffixes.count - 1, max(0, (exponent - 1) / 10))
  let divisor = Double(UInt64(1) << UInt64(unit * 10))
  return cFormat("%0.3g", value / divisor) + " " + suffixes[unit] + "B"
}

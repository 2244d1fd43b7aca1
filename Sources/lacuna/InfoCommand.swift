import ArgumentParser
import Convert
import DiskImage

struct InfoCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "info",
    abstract: "Show an image's format, sizes and backing file.",
    discussion: """
      The JSON form uses qemu-img's field names (virtual-size, filename, format, \
      actual-size, cluster-size, backing-filename, snapshots, format-specific, ...).
      A qcow2 image's internal snapshots are listed as qemu-img lists them ("Snapshot \
      list:", dates in local time); `lacuna convert -l` converts one of them.

      Examples:
        lacuna info disk.qcow2
        lacuna info --output=json --backing-chain top.qcow2
      """)

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp(
      "The image's format; probed from its magic when omitted.",
      valueName: "format"))
  var format: String?

  @Option(name: .customLong("output"), help: ArgumentHelp("human or json.", valueName: "human|json"))
  var output: OutputFormat = .human

  @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.")
  var backingChain = false

  @OptionGroup var access: ImageAccess

  @Argument(help: "The image.")
  var image: String

  /// What the flags ask for: the quick parser (QuickParse.swift) makes the same from the
  /// same arguments without reflection, and this is what both run.
  var settings: InfoSettings {
    InfoSettings(format: format, output: output, backingChain: backingChain, access: access.settings, image: image)
  }

  func run() throws { try settings.run() }
}

/// `lacuna info` as the command line asks for it, defaults filled in (the same defaults as
/// InfoCommand's declarations; QuickParseTests holds the two to each other).
struct InfoSettings: Equatable {
  var format: String? = nil
  var output = OutputFormat.human
  var backingChain = false
  var access = AccessSettings()
  var image: String

  func run() throws {
    // An untrusted image is refused if it names another file, even when only the image
    // itself is shown: that is the check uploads need.
    let chain = try access.resolver.openChain(
      image, format: format, followBacking: backingChain || access.untrusted)
    let layers = backingChain ? chain.layers : [chain.top]
    for layer in layers { for warning in layer.warnings { printError("\(layer.path): \(warning)") } }
    let described = try layers.map(describe)
    switch output {
    case .json:
      print(renderJSON(backingChain ? .array(described) : described[0]))
    case .human:
      print(try layers.map(humanDescription).joined(separator: "\n\n"))
    }
  }

  /// One layer as qemu-img's `info --output=json` prints it, in its key order.
  func describe(_ layer: ImageReader) throws -> InfoValue {
    var fields: [(String, InfoValue)] = []
    if let format = layer.backing?.format { fields.append(("backing-filename-format", .string(format))) }
    if !layer.snapshots.isEmpty { fields.append(("snapshots", SnapshotOption.json(layer.snapshots))) }
    fields.append(("virtual-size", .integer(layer.virtualSize)))
    fields.append(("filename", .string(layer.path)))
    if let cluster = layer.clusterSize { fields.append(("cluster-size", .integer(Int64(cluster)))) }
    fields.append(("format", .string(layer.formatName)))
    if let allocated = try layer.source.allocatedSize() { fields.append(("actual-size", .integer(allocated))) }
    if !layer.formatSpecific.isEmpty {
      fields.append(
        ("format-specific", .object([("type", .string(layer.formatName)), ("data", .object(layer.formatSpecific))])))
    }
    if let backing = layer.backing {
      fields.append(("full-backing-filename", .string(Resolver.path(of: backing.name, heldBy: layer.path))))
      fields.append(("backing-filename", .string(backing.name)))
    }
    fields.append(("dirty-flag", .bool(layer.isDirty)))
    return .object(fields)
  }

  /// One layer as qemu-img's human `info` prints it.
  /// One layer as qemu-img's human `info` prints it. Names and values come from inside
  /// images: each line is escaped, so no control character reaches the terminal.
  func humanDescription(_ layer: ImageReader) throws -> String {
    var lines = [
      "image: \(layer.path)",
      "file format: \(layer.formatName)",
      "virtual size: \(humanSize(layer.virtualSize)) (\(layer.virtualSize) bytes)",
    ]
    if let allocated = try layer.source.allocatedSize() { lines.append("disk size: \(humanSize(allocated))") }
    if let cluster = layer.clusterSize { lines.append("cluster_size: \(cluster)") }
    if layer.isDirty { lines.append("cleanly shut down: no") }
    if let backing = layer.backing {
      let full = Resolver.path(of: backing.name, heldBy: layer.path)
      lines.append("backing file: \(backing.name)" + (full == backing.name ? "" : " (actual path: \(full))"))
      if let format = backing.format { lines.append("backing file format: \(format)") }
    }
    if !layer.snapshots.isEmpty { lines += SnapshotOption.humanLines(layer.snapshots) }
    if !layer.formatSpecific.isEmpty {
      lines.append("Format specific information:")
      for (key, value) in layer.formatSpecific { lines += humanLines(key, value, indent: 4) }
    }
    return lines.map(escapingControlCharacters).joined(separator: "\n")
  }

  /// One field of `format-specific` as qemu-img prints it: `key: value`, with dashes in
  /// keys as spaces; an object or a list opens a block indented four more, a list's items
  /// named `[0]`, `[1]`, ...
  func humanLines(_ key: String, _ value: InfoValue, indent: Int) -> [String] {
    let head = String(repeating: " ", count: indent) + key.replacing("-", with: " ") + ":"
    switch value {
    case .string(let text): return [head + " " + text]
    case .integer(let number): return [head + " " + String(number)]
    case .bool(let flag): return [head + " " + (flag ? "true" : "false")]
    case .object(let fields): return [head] + fields.flatMap { humanLines($0.0, $0.1, indent: indent + 4) }
    case .array(let items):
      return [head] + items.enumerated().flatMap { humanLines("[\($0.offset)]", $0.element, indent: indent + 4) }
    }
  }
}

import ArgumentParser
import Convert
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

struct MapCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "map",
    abstract: "Show which ranges of an image hold data, zeros or nothing, layer by layer.",
    discussion: """
      The JSON form prints qemu-img's fields: start, length, depth (0 is the named image, \
      1 its backing file, ...), present, zero, data, offset (where the bytes sit in that \
      layer's file, when they sit there plainly).

      Examples:
        lacuna map disk.img
        lacuna map --output=json top.qcow2
      """)

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp(
      "The image's format; probed from its magic when omitted.",
      valueName: "format"))
  var format: String?

  @Option(name: .customLong("output"), help: ArgumentHelp("human or json.", valueName: "human|json"))
  var output: OutputFormat = .human

  @Option(name: .customLong("start-offset"), help: ArgumentHelp("Start mapping at this offset.", valueName: "offset"))
  var startOffset: String?

  @Option(name: .customLong("max-length"), help: ArgumentHelp("Map at most this many bytes.", valueName: "length"))
  var maxLength: String?

  @OptionGroup var access: ImageAccess

  @Argument(help: "The image.")
  var image: String

  /// What the flags ask for: the quick parser (QuickParse.swift) makes the same from the
  /// same arguments without reflection, and this is what both run.
  var settings: MapSettings {
    MapSettings(format: format, output: output, startOffset: startOffset, maxLength: maxLength, access: access.settings,
      image: image)
  }

  func run() throws { try settings.run() }
}

/// `lacuna map` as the command line asks for it, defaults filled in (the same defaults as
/// MapCommand's declarations; QuickParseTests holds the two to each other).
struct MapSettings: Equatable {
  var format: String? = nil
  var output = OutputFormat.human
  var startOffset: String? = nil
  var maxLength: String? = nil
  var access = AccessSettings()
  var image: String

  func run() throws {
    let chain = try access.resolver.openChain(image, format: format)
    for layer in chain.layers { for warning in layer.warnings { printError("\(layer.path): \(warning)") } }
    guard let start = startOffset.map(parseByteSize) ?? 0, let length = maxLength.map(parseByteSize) ?? Int64.max else {
      throw ValidationError("--start-offset and --max-length take a size")
    }
    let end = min(chain.virtualSize, start &+ length < start ? Int64.max : start + length)
    // 64 MiB at first, then as the extents allow: memory follows the extents of a window,
    // and an empty disk of any size takes few windows.
    var window = AdaptiveWindow(minimum: 64 << 20)
    var position = start
    var first = true
    if output == .json { writeOut("[") } else {
      writeOut("Offset          Length          Mapped to       File\n")
    }
    // Entries are merged across windows, so a window boundary never shows in the output.
    var pending: LayeredExtent?
    func emit(_ extent: LayeredExtent) {
      if output == .json {
        writeOut((first ? "" : ",\n") + jsonLine(extent))
        first = false
      } else if extent.kind == .data, let offset = extent.hostOffset {
        writeOut(pad(hexNumber(extent.range.lowerBound)) + pad(hexNumber(extent.length)) + pad(hexNumber(offset))
          + escapingControlCharacters(chain.layers[extent.depth].path) + "\n")
      }
    }
    while position < end {
      let range = window.range(from: position, to: end)
      let extents = try chain.extents(in: range)
      window.adjust(after: extents.count)
      for extent in extents {
        if var last = pending, last.canMerge(with: extent) {
          last.range = last.range.lowerBound..<extent.range.upperBound
          pending = last
        } else {
          if let last = pending { emit(last) }
          pending = extent
        }
      }
      position = range.upperBound
    }
    if let last = pending { emit(last) }
    if output == .json { writeOut("]\n") }
  }

  func jsonLine(_ extent: LayeredExtent) -> String {
    var line = "{ \"start\": \(extent.range.lowerBound), \"length\": \(extent.length), \"depth\": \(extent.depth),"
    line += " \"present\": \(extent.present), \"zero\": \(extent.kind != .data), \"data\": \(extent.kind == .data || extent.isHostHole)"
    if let offset = extent.hostOffset { line += ", \"offset\": \(offset)" }
    return line + "}"
  }

  func hexNumber(_ value: Int64) -> String { value == 0 ? "0" : "0x" + String(value, radix: 16) }
  func pad(_ text: String) -> String { text.count >= 16 ? text + " " : text + String(repeating: " ", count: 16 - text.count) }
  func writeOut(_ text: String) { fputs(text, stdout) }
}

import ArgumentParser
import Convert
import DiskImage

struct CreateCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "create",
    abstract: "Create an empty image, or an overlay on a backing file.",
    discussion: """
      Sizes take the suffixes k, M, G, T (powers of 1024). With -b the size may be left \
      out: it is the backing file's. Raw images are sparse unless -o preallocation says \
      otherwise.

      Examples:
        lacuna create -f qcow2 disk.qcow2 100G
        lacuna create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
        lacuna create -f raw -o preallocation=falloc disk.img 10G
      """)

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp(
      "The new image's format (raw by default, as in qemu-img).",
      valueName: "format"))
  var format: String = "raw"

  @Option(
    name: .customShort("b"),
    help: ArgumentHelp(
      "The backing file the new image records (relative to the new image's directory).",
      valueName: "backing-file"))
  var backing: String?

  @Option(
    name: .customShort("F"),
    help: ArgumentHelp(
      "The backing file's format; probed and recorded when omitted.",
      valueName: "backing-format"))
  var backingFormat: String?

  @Option(name: .customShort("o"), help: ArgumentHelp("Format options, key=value,...", valueName: "options"))
  var options: [String] = []

  @Flag(name: .customShort("q"), help: "Quiet.")
  var quiet = false

  @Argument(help: "The image to create.")
  var image: String

  @Argument(help: "The virtual size (e.g. 10G); taken from the backing file when omitted.")
  var size: String?

  func validate() throws {
    if let size, parseByteSize(size) == nil {
      throw ValidationError("'\(size)' is not a size (a number of bytes, or with k, M, G, T)")
    }
    if backingFormat != nil && backing == nil { throw ValidationError("-F needs -b") }
    if backing == nil && size == nil && !options.contains(where: { $0.contains("backing_file=") }) {
      throw ValidationError("give a size, or a backing file (-b) to take it from")
    }
  }

  func run() throws {
    var request = CreationRequest(image: image, format: format, size: size.flatMap(parseByteSize))
    request.writerOptions = WriterOptions(options: try parseOptions(options))
    (request.backing, request.backingFormat) = try takeBackingOptions(
      &request.writerOptions.options, backing: backing, format: backingFormat)
    let created = try createImage(request, resolver: resolver)
    if !quiet {
      let backingText = created.backing.map { " backing_file=\($0.name) backing_fmt=\($0.format ?? "")" } ?? ""
      print("Formatting '\(image)', fmt=\(format) size=\(created.virtualSize)\(backingText)")
    }
  }
}

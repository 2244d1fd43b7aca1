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

  @Option(name: .customShort("f"), help: "The new image's format (raw by default, as in qemu-img).")
  var format: String = "raw"

  @Option(name: .customShort("b"), help: "The backing file the new image records (relative to the new image's directory).")
  var backing: String?

  @Option(name: .customShort("F"), help: "The backing file's format; probed and recorded when omitted.")
  var backingFormat: String?

  @Option(name: .customShort("o"), help: "Format options, key=value,...")
  var options: [String] = []

  @Flag(name: .customShort("q"), help: "Quiet.")
  var quiet = false

  @Argument(help: "The image to create.")
  var image: String

  @Argument(help: "The virtual size (e.g. 10G); taken from the backing file when omitted.")
  var size: String?

  func validate() throws {
    if let size, parseSize(size) == nil {
      throw ValidationError("'\(size)' is not a size (a number of bytes, or with k, M, G, T)")
    }
    if backingFormat != nil && backing == nil { throw ValidationError("-F needs -b") }
    if backing == nil && size == nil && !options.contains(where: { $0.contains("backing_file=") }) {
      throw ValidationError("give a size, or a backing file (-b) to take it from")
    }
  }

  func run() throws {
    guard let entry = registry.format(named: format), let create = entry.create else {
      throw ImageError.usage(path: image, "cannot create images of format '\(format)' (known: \(registry.names.joined(separator: ", ")))")
    }
    var writerOptions = WriterOptions(options: try parseOptions(options))
    let (backing, backingFormat) = try takeBackingOptions(
      &writerOptions.options, backing: self.backing, format: self.backingFormat)
    var virtualSize = size.flatMap(parseSize)
    if let backing {
      let base = try Chain.open(Chain.resolveBacking(backing, relativeTo: image), format: backingFormat, registry: registry)
      writerOptions.backing = BackingReference(name: backing, format: backingFormat ?? base.top.formatName)
      if virtualSize == nil { virtualSize = base.virtualSize }
      if let target = FileIdentity.of(path: image), try base.identities().contains(target) {
        throw ImageError.usage(path: image, "the new image is the same file as its backing chain; refusing to overwrite it")
      }
    }
    let output = try OutputFile(creatingBeside: image)
    do {
      let writer = try create(output, virtualSize!, writerOptions)
      try writer.finish()
    } catch {
      output.abandon()
      throw error
    }
    if !quiet {
      let backingText = writerOptions.backing.map { " backing_file=\($0.name) backing_fmt=\($0.format ?? "")" } ?? ""
      print("Formatting '\(image)', fmt=\(format) size=\(virtualSize!)\(backingText)")
    }
  }
}

import ArgumentParser
import Convert
import DiskImage
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

struct SparsifyCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "sparsify",
    abstract: "Give a raw image its holes back in place: punch out every all-zero block.",
    discussion: """
      Reads the file's data extents (never its holes) and punches a hole (fallocate \
      PUNCH_HOLE) over each all-zero block, as fallocate --dig-holes does: the content and \
      the size are unchanged, the blocks are freed. The image is opened for writing, which \
      is the point of this verb; do not run it on an image a virtual machine is using.

      qcow2 images are refused (exit status 2): lacuna convert -O qcow2 OLD NEW drops their \
      zero clusters.

      Examples:
        lacuna sparsify disk.img
        lacuna sparsify -S 64k --summary disk.img
      """)

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp(
      "The image's format (raw only); probed when omitted.",
      valueName: "format"))
  var format: String?

  @Option(
    name: .customShort("S"),
    help: ArgumentHelp(
      "Zero blocks of this size (aligned to the file) become holes (default 4k).",
      valueName: "size"))
  var sparseSize: String = "4k"

  @Flag(name: .customLong("summary"), help: "Print a summary line when done (bytes scanned and punched, allocation before and after).")
  var summary = false

  @Flag(
    name: [.customShort("U"), .customLong("force-share")],
    help: "Write even if another process (a VM, a conversion) has the image open (qemu's locks are ignored).")
  var forceShare = false

  @Argument(help: "The raw image to sparsify in place.")
  var image: String

  func validate() throws {
    guard let size = parseByteSize(sparseSize), size > 0, size % 512 == 0, size <= 16 << 20 else {
      throw ValidationError("-S takes a multiple of 512 bytes up to 16M (got '\(sparseSize)')")
    }
  }

  func run() throws {
    let started = Date()
    let sparsifier = try Sparsifier.open(
      image, format: format, blockSize: Int(parseByteSize(sparseSize)!), registry: registry, forceShare: forceShare)
    let statistics = try sparsifier.run()
    try sparsifier.file.closeChecked()
    if summary {
      printError(
        "sparsified \(image): \(statistics.bytesScanned) bytes of data scanned, "
          + "\(statistics.bytesPunched) punched in \(statistics.holesPunched) holes, "
          + "allocated \(statistics.allocatedBefore) -> \(statistics.allocatedAfter) bytes, "
          + cFormat("%.3f s", Date().timeIntervalSince(started)), prefix: false)
    }
  }
}

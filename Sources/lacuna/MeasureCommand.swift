import ArgumentParser
import Convert
import DiskImage

struct MeasureCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "measure",
    abstract: "Say how large the output of convert would be, for an image or for a size.",
    discussion: """
      Prints what qemu-img measure prints: "required size" and "fully allocated size" \
      (JSON: required, fully-allocated; and "bitmaps size"/bitmaps where qemu-img prints it: \
      qcow2 v3 output of a qcow2 v3 source; lacuna convert copies no bitmaps, so it is 0).

      A size is the length of the output file, as qemu-img counts it; for a VMDK made of \
      several files, the sum of their lengths. Raw output is always as long as the disk.

      Unlike qemu-img's estimate, "required" is exact: lacuna runs the real conversion (the \
      same zero-block detection, the same writer) into a target that keeps no data, so it is \
      the length of what `lacuna convert` writes with the same -O, -o, -c and -S, for every \
      format lacuna writes (qemu-img measures qcow2 and raw only). With -c the clusters are \
      compressed for real, so it stays exact (and takes the time compression takes). \
      "fully allocated" is the length of the output for a disk of the same size whose every \
      byte is data that does not compress (with -c too: such clusters are stored as they are); \
      qcow2, VDI, VMDK (but streamOptimized), raw and stream compute it from their options, \
      the others run their writer over such a disk (no data is read; VMDK streamOptimized deflates every grain, about 4 s \
      per GiB). With --size, "required" is the length of an empty image of that size.

      A multi-file VMDK's descriptor records its extent files' names, made from the output's \
      name: give it with --name for an exact count (default disk.vmdk).

      Examples:
        lacuna measure -O qcow2 disk.img
        lacuna measure --output=json -O vmdk -o subformat=twoGbMaxExtentSparse disk.qcow2
        lacuna measure -O qcow2 -o cluster_size=2M --size 16T
      """)

  @Option(name: .customLong("output"), help: "human or json.")
  var output: OutputFormat = .human

  @Option(name: .customShort("f"), help: "The source's format; probed from its magic when omitted.")
  var sourceFormat: String?

  @Option(name: .customShort("O"), help: "The output's format (raw by default, as in qemu-img).")
  var outputFormat: String = "raw"

  @Option(name: .customShort("o"), help: "Output options, key=value,..., as convert takes them.")
  var options: [String] = []

  @Flag(name: .customShort("c"), help: "Measure compressed output (convert -c); the clusters are compressed to count them.")
  var compress = false

  @Option(name: .customShort("S"), help: "As convert's -S: zero runs of this size are left as holes (default 4k).")
  var sparseSize: String = "4k"

  @Option(name: .customLong("size"), help: "Measure an empty disk of this size (k, M, G, T, P, E suffixes) instead of an image.")
  var size: String?

  @Option(name: .customLong("name"), help: "The output's name, for outputs whose files record each other's names (multi-file VMDK).")
  var name: String?

  @Option(
    name: .customLong("source-backing-format"),
    help: "The format of the source's backing file, when the source does not record it.")
  var sourceBackingFormat: String?

  @Option(name: .customShort("m"), help: "Worker threads (default: the number of cores, from 2 to 8).")
  var threads: Int?

  @OptionGroup var access: ImageAccess

  @Argument(help: "The source image (or --size).")
  var source: String?

  func validate() throws {
    if source == nil && size == nil {
      throw ValidationError("Either --size N or one filename must be specified.")
    }
    if source != nil && size != nil {
      throw ValidationError("--size N cannot be used together with a filename.")
    }
    if let size, parseByteSize(size) == nil {
      throw ValidationError(
        "Invalid image size specified ('\(size)'). You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    }
    guard let sparse = parseByteSize(sparseSize), sparse % 512 == 0, sparse <= 16 << 20 else {
      throw ValidationError("-S takes 0 or a multiple of 512 bytes up to 16M (got '\(sparseSize)')")
    }
    if let threads, !(1...64).contains(threads) {
      throw ValidationError("-m takes a number of threads from 1 to 64 (got \(threads))")
    }
  }

  func run() throws {
    var request = MeasureRequest(
      source: source, size: size.flatMap(parseByteSize), outputFormat: outputFormat, outputName: name)
    request.sourceFormat = sourceFormat
    request.sourceBackingFormat = sourceBackingFormat
    request.writerOptions = WriterOptions(options: try parseOptions(options), compress: compress)
    if request.writerOptions.options["backing_file"] != nil || request.writerOptions.options["backing_fmt"] != nil {
      throw ValidationError("measure takes no backing file (backing_file, backing_fmt)")
    }
    request.engine.sparseSize = Int(parseByteSize(sparseSize)!)
    if let threads { request.engine.threads = threads }
    request.warn = { printError($0) }
    let result = try measure(request, resolver: access.resolver)
    switch output {
    case .json:
      var fields: [(String, InfoValue)] = []
      if let bitmaps = result.bitmaps { fields.append(("bitmaps", .integer(bitmaps))) }
      fields.append(("required", .integer(result.required)))
      fields.append(("fully-allocated", .integer(result.fullyAllocated)))
      print(renderJSON(.object(fields)))
    case .human:
      print("required size: \(result.required)")
      print("fully allocated size: \(result.fullyAllocated)")
      if let bitmaps = result.bitmaps { print("bitmaps size: \(bitmaps)") }
    }
  }
}

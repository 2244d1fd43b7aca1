import ArgumentParser
import Convert
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

struct CompareCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "compare",
    abstract: "Check whether two images (backing chains flattened) hold the same disk.",
    discussion: """
      Prints qemu-img's lines and exits as qemu-img compare does: 0 "Images are identical.", \
      1 "Content mismatch at offset N!" (N is the first differing 512-byte sector, counted \
      from the start of the run where the images differ, as qemu-img counts it), 2 an image \
      could not be opened, 3 an allocation query failed, 4 a read failed.

      Images of different sizes are compared over the smaller size; then the rest of the \
      larger one must read as zeros ("Warning: Image size mismatch!" first). With -s they \
      differ ("Strict mode: Image size mismatch!"), and so does any offset where the \
      allocation status differs ("Strict mode: Offset N block status mismatch!"). Sizes \
      count in 512-byte sectors, as in qemu.

      Only what must be read is read: ranges both allocation maps call holes or zeros are \
      skipped, where one side is zero only the other is read, and both sides are read in \
      units of 2 MiB on worker threads.

      Stricter than qemu-img: a damaged image (data past the end of its file, a broken \
      table) is an error (exit 3 or 4) rather than zeros, and an empty file is refused \
      unless -f raw says it is an empty disk.

      Examples:
        lacuna compare disk.img disk.qcow2
        lacuna compare -f raw -F qcow2 -p disk.img disk.qcow2
        lacuna compare -s top.qcow2 flat.qcow2
      """)

  @Option(name: .customShort("f"), help: "The first image's format; probed from its magic when omitted.")
  var firstFormat: String?

  @Option(name: .customShort("F"), help: "The second image's format; probed from its magic when omitted.")
  var secondFormat: String?

  @Flag(name: .customShort("s"), help: "Strict: images of different sizes or allocation differ.")
  var strict = false

  @Flag(name: .customShort("p"), help: "Show progress.")
  var progress = false

  @Flag(name: .customShort("q"), help: "Print nothing; the exit status tells.")
  var quiet = false

  @Option(name: .customShort("T"), help: "qemu-img's cache mode for the images; accepted and ignored (lacuna only reads).")
  var cacheMode: String?

  @Option(name: .customShort("m"), help: "Worker threads.")
  var threads: Int?

  @OptionGroup var access: ImageAccess

  @Argument(help: "The first image.")
  var first: String

  @Argument(help: "The second image.")
  var second: String

  func run() throws {
    let resolver = access.resolver
    let chains: (Chain, Chain)
    do {
      chains = (try resolver.openChain(first, format: firstFormat), try resolver.openChain(second, format: secondFormat))
    } catch let error as ImageError {
      throw CommandFailure(message: error.description, status: 2)
    }
    for chain in [chains.0, chains.1] {
      for layer in chain.layers { for warning in layer.warnings { printError("\(layer.path): \(warning)") } }
    }
    var comparison = Comparison(first: chains.0, second: chains.1)
    comparison.strict = strict
    if let threads { comparison.threads = max(1, threads) }
    let meter = progress && !quiet ? ProgressMeter(format: .bar, toStandardError: false) : nil
    comparison.progress = meter.map { meter in { meter.update(done: $0, total: $1) } }
    let report: ComparisonReport
    do {
      report = try comparison.run()
    } catch let failure as ComparisonFailure {
      if meter != nil { say("") }
      throw CommandFailure(message: failure.description, status: failure.step == .allocation ? 3 : 4)
    }
    if report.warnsOfSizes { say("Warning: Image size mismatch!") }
    switch report.outcome {
    case .identical: say("Images are identical.")
    case .contentMismatch(let offset): say("Content mismatch at offset \(offset)!")
    case .statusMismatch(let offset): say("Strict mode: Offset \(offset) block status mismatch!")
    case .sizeMismatch: say("Strict mode: Image size mismatch!")
    }
    // qemu-img ends its progress display with an empty line after the verdict.
    if meter != nil { say("") }
    if report.outcome != .identical { Glibc.exit(1) }
  }

  func validate() throws {
    if let threads, threads < 1 { throw ValidationError("-m takes a number of threads, 1 or more") }
  }

  private func say(_ line: String) {
    guard !quiet else { return }
    fputs(line + "\n", stdout)
    fflush(stdout)
  }
}

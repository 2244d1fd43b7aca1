import ArgumentParser
import Convert
import DiskImage
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

struct ConvertCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "convert",
    abstract: "Convert an image (and its backing chain) to another format, sparse.",
    discussion: """
      Reads only the ranges the source's layers hold, drops zero blocks, and writes the \
      output under a temporary name that is renamed into place once complete. Flags mean \
      what they mean in qemu-img convert.

      Examples:
        lacuna convert -O raw disk.qcow2 disk.img
        lacuna convert -f raw -O raw -S 64k inflated.img sparse.img
        lacuna convert -O raw -o preallocation=falloc disk.qcow2 disk.img
      """)

  @Option(name: .customShort("f"), help: "The source's format; probed from its magic when omitted.")
  var sourceFormat: String?

  @Option(name: .customShort("O"), help: "The output's format (raw by default, as in qemu-img).")
  var outputFormat: String = "raw"

  @Option(name: .customShort("o"), help: "Output options, key=value,... (e.g. preallocation=falloc).")
  var options: [String] = []

  @Option(name: .customShort("S"), help: "Zero runs of this size are left as holes (default 4k; 0 writes everything).")
  var sparseSize: String = "4k"

  @Flag(name: .customShort("c"), help: "Compress the output (qcow2).")
  var compress = false

  @Option(name: .customShort("B"), help: "The backing file the output records.")
  var backing: String?

  @Option(name: .customShort("F"), help: "The format of the backing file given with -B.")
  var backingFormat: String?

  @Option(
    name: .customLong("source-backing-format"),
    help: "The format of the source's backing file, when the source does not record it.")
  var sourceBackingFormat: String?

  @Option(name: .customShort("m"), help: "Worker threads (default: the number of cores, at least 2).")
  var threads: Int?

  @Flag(name: .customShort("W"), help: "Accepted for qemu-img compatibility; output is always written in order.")
  var outOfOrder = false

  @Option(
    name: .customShort("t"),
    help: "Output cache mode: writeback (default: fsync, then rename) or unsafe (no fsync, as qemu-img).")
  var cacheMode: CacheMode = .writeback

  @Flag(name: .customShort("p"), help: "Show progress.")
  var progress = false

  @Option(
    name: .customLong("progress"),
    help: "Progress as 'bar' (like -p) or 'json': one object per line with bytes-done, bytes-total, elapsed.")
  var progressFormat: ProgressFormat?

  @Flag(name: .customShort("q"), help: "Quiet: no progress, no summary.")
  var quiet = false

  @Flag(name: .customLong("summary"), help: "Print a summary line when done (bytes read, written, skipped; time).")
  var summary = false

  @Argument(help: "The source image.")
  var source: String

  @Argument(help: "The output image.")
  var destination: String

  func validate() throws {
    guard let size = parseSize(sparseSize), size % 512 == 0, size <= 16 << 20 else {
      throw ValidationError("-S takes 0 or a multiple of 512 bytes up to 16M (got '\(sparseSize)')")
    }
    if let threads, !(1...64).contains(threads) {
      throw ValidationError("-m takes a number of threads from 1 to 64 (got \(threads))")
    }
    if backingFormat != nil && backing == nil {
      throw ValidationError("-F needs -B")
    }
  }

  func run() throws {
    let started = Date()
    guard let outputFormatEntry = registry.format(named: outputFormat) else {
      throw ImageError.usage(path: destination, "unknown output format '\(outputFormat)' (known: \(registry.names.joined(separator: ", ")))")
    }
    guard let create = outputFormatEntry.create else {
      throw ImageError.usage(path: destination, "lacuna cannot write \(outputFormat) images")
    }
    if try readsStream() { return try receiveStream() }  // StreamConvert.swift
    let chain = try Chain.open(source, format: sourceFormat, registry: registry, backingFormat: sourceBackingFormat)
    for layer in chain.layers { for warning in layer.warnings { printError("\(layer.path): \(warning)") } }

    var engineOptions = ConvertOptions()
    var writerOptions = WriterOptions(options: try parseOptions(options), compress: compress)
    let (backing, backingFormat) = try takeBackingOptions(
      &writerOptions.options, backing: self.backing, format: self.backingFormat)
    var inputs = try chain.identities()
    if let backing {
      // The name is recorded as given and, like any backing name, resolves against the
      // directory of the image that holds it: the output's.
      let base = try Chain.open(
        Chain.resolveBacking(backing, relativeTo: destination), format: backingFormat, registry: registry)
      writerOptions.backing = BackingReference(name: backing, format: backingFormat ?? base.top.formatName)
      let baseIdentity = try base.top.file.identity()
      if let depth = try chain.layers.firstIndex(where: { try $0.file.identity() == baseIdentity }) {
        engineOptions.stopDepth = depth  // store exactly what the layers above it hold
      } else {
        engineOptions.compareBase = base  // store what differs from it, cluster by cluster
      }
      inputs.formUnion(try base.identities())
    }

    // Writing over any file the conversion reads would destroy an input mid-read.
    if let target = FileIdentity.of(path: destination), inputs.contains(target) {
      throw ImageError.usage(path: destination, "the output is the same file as an input; refusing to overwrite it")
    }

    let output = try openOutput()  // a temporary file, or standard output for `-` (StreamConvert.swift)
    output.synchronizes = cacheMode != .unsafe
    let writer: ImageWriter
    do {
      writer = try create(output, chain.virtualSize, writerOptions)
    } catch {
      output.abandon()
      throw error
    }

    engineOptions.sparseSize = Int(parseSize(sparseSize)!)
    if let threads { engineOptions.threads = threads }
    let format = progressFormat ?? (progress ? .bar : nil)
    let meter = quiet ? nil : format.map { ProgressMeter(format: $0, toStandardError: destination == "-") }
    engineOptions.progress = meter.map { meter in { meter.update(done: $0, total: $1) } }
    let statistics = try Converter(chain: chain, writer: writer, options: engineOptions).run()
    meter?.finish()
    if summary && !quiet {
      let seconds = Date().timeIntervalSince(started)
      printError(
        "converted \(source) to \(destination): \(statistics.virtualSize) bytes virtual, "
          + "\(statistics.bytesRead) read, \(statistics.bytesWritten) written, "
          + "\(statistics.holeBytes) skipped as holes, \(statistics.zeroBytesSkipped) as zero blocks, "
          + (statistics.backingBytes > 0 ? "\(statistics.backingBytes) left to the backing file, " : "")
          + String(format: "%.3f s", seconds), prefix: false)
    }
  }
}

/// qemu-img's `-t` cache modes that lacuna has: both write through the page cache; only
/// writeback flushes before the rename.
enum CacheMode: String, ExpressibleByArgument, CaseIterable {
  case writeback, unsafe
}

import ArgumentParser
import Convert
import DiskImage
import FoundationEssentials
import LacunaKit

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
        lacuna convert -O qcow2 -l snapshot.name=before-upgrade vm.qcow2 old.qcow2

      An internal snapshot of a qcow2 source is converted instead of its current state \
      with -l snapshot.name=NAME, -l snapshot.id=ID, both (comma-joined; both must \
      match), or -l ID_OR_NAME (the snapshot with that id, else the first with that \
      name), as in qemu-img; -s ID_OR_NAME is the old spelling. The output has the \
      snapshot's own virtual size (qemu-img 7.2 gives it the image's current size). \
      `lacuna info` lists the snapshots.

      Raw output, and uncompressed qcow2 output's data clusters, take the data of a raw \
      source, or of a qcow2 source's uncompressed clusters, from the source file by the \
      kernel where it can: on a file system that \
      shares extents (XFS with reflink, btrfs) the output's blocks are cloned from the \
      source's, so the copy costs metadata only. Zero blocks still become holes (every \
      block is read and checked first). --copy-mode=auto (the default) clones where the \
      file system can and writes otherwise; clone insists (an error where it cannot); \
      copy uses copy_file_range; rw always writes the bytes read. --summary says how \
      many bytes were cloned, copied, and written from the source's page cache or from \
      memory (decompressed or received data); on ext4 with auto, part of each goes \
      straight to the disk, O_DIRECT, while the rest is copied.
        lacuna convert --copy-mode=clone -O raw /xfs/disk.img /xfs/copy.img
      """)

  @Option(
    name: .customShort("f"),
    help: ArgumentHelp(
      "The source's format; probed from its magic when omitted.",
      valueName: "format"))
  var sourceFormat: String?

  @Option(
    name: .customShort("l"),
    help: ArgumentHelp(
      "Convert this internal snapshot (qcow2): snapshot.id=ID, snapshot.name=NAME, or an id or name.",
      valueName: "snapshot"))
  var snapshotOptions: [String] = []

  @Option(
    name: .customShort("s"),
    help: ArgumentHelp(
      "Convert this internal snapshot, by id or name (the old form of -l).",
      valueName: "snapshot"))
  var oldSnapshot: String?

  @Option(
    name: .customShort("O"),
    help: ArgumentHelp(
      "The output's format (raw by default, as in qemu-img).",
      valueName: "output-format"))
  var outputFormat: String = "raw"

  @Option(
    name: .customShort("o"),
    help: ArgumentHelp(
      "Output options, key=value,... (e.g. preallocation=falloc).",
      valueName: "options"))
  var options: [String] = []

  @Option(
    name: .customShort("S"),
    help: ArgumentHelp(
      "Zero runs of this size are left as holes (default 4k; 0 writes everything).",
      valueName: "size"))
  var sparseSize: String = "4k"

  @Flag(name: .customShort("c"), help: "Compress the output (qcow2; VMDK streamOptimized always is).")
  var compress = false

  @Option(
    name: .customShort("B"),
    help: ArgumentHelp(
      "The backing file the output records.",
      valueName: "backing-file"))
  var backing: String?

  @Option(
    name: .customShort("F"),
    help: ArgumentHelp(
      "The format of the backing file given with -B.",
      valueName: "backing-format"))
  var backingFormat: String?

  @Option(
    name: .customLong("source-backing-format"),
    help: ArgumentHelp(
      "The format of the source's backing file, when the source does not record it.",
      valueName: "format"))
  var sourceBackingFormat: String?

  @Flag(
    name: .customShort("n"),
    help: "Write into the existing destination as it is (a file or a block device; raw only): no temporary file, no resizing; it must be large enough.")
  var inPlace = false

  @Flag(
    name: .customLong("target-is-zero"),
    help: "With -n: the destination reads as zeros already, so zero ranges are skipped instead of zeroed.")
  var targetIsZero = false

  @Option(
    name: .customShort("m"),
    help: ArgumentHelp(
      "Worker threads (default: the number of cores, from 2 to 8; 8 when the source is an NBD server, whose requests wait on the network).",
      valueName: "threads"))
  var threads: Int?

  @Flag(name: .customShort("W"), help: "Accepted for qemu-img compatibility; output is always written in order.")
  var outOfOrder = false

  @Option(
    name: .customShort("t"),
    help: ArgumentHelp(
      "Output cache mode: writeback (default: fsync, then rename) or unsafe (no fsync, as qemu-img).",
      valueName: "cache"))
  var cacheMode: CacheMode = .writeback

  @Flag(name: .customShort("p"), help: "Show progress: on a terminal a bar with bytes, rate and time left; elsewhere qemu-img's (N.NN/100%).")
  var progress = false

  @Option(
    name: .customLong("progress"),
    help: ArgumentHelp(
      "Progress as 'bar' (like -p) or 'json': one object per line with bytes-done, bytes-total, elapsed.",
      valueName: "bar|json"))
  var progressFormat: ProgressFormat?

  @Flag(name: .customShort("q"), help: "Quiet: no progress, no summary.")
  var quiet = false

  @Flag(name: .customLong("summary"), help: "Print a summary line when done (bytes read, written, skipped; time).")
  var summary = false

  @Option(
    name: .customLong("copy-mode"),
    help: "How data from a plain source file reaches raw or uncompressed qcow2 output: auto (default: clone where the file system shares extents, else write), clone, copy (copy_file_range), rw.")
  var copyMode: CopyModeOption = .auto

  @OptionGroup var access: ImageAccess

  @Argument(help: "The source image.")
  var source: String

  @Argument(help: "The output image.")
  var destination: String

  /// What the flags ask for: the quick parser (QuickParse.swift) makes the same from the
  /// same arguments without reflection, and this is what both run.
  var settings: ConvertSettings {
    ConvertSettings(
      sourceFormat: sourceFormat, snapshotOptions: snapshotOptions, oldSnapshot: oldSnapshot,
      outputFormat: outputFormat, options: options, sparseSize: sparseSize, compress: compress,
      backing: backing, backingFormat: backingFormat, sourceBackingFormat: sourceBackingFormat,
      inPlace: inPlace, targetIsZero: targetIsZero, threads: threads, outOfOrder: outOfOrder,
      cacheMode: cacheMode, progress: progress, progressFormat: progressFormat, quiet: quiet,
      summary: summary, copyMode: copyMode, access: access.settings,
      source: source, destination: destination)
  }

  func validate() throws { try settings.validate() }

  func run() throws { try settings.run() }
}

/// A conversion as the command line asks for it, defaults filled in (the same defaults as
/// ConvertCommand's declarations; QuickParseTests holds the two to each other).
struct ConvertSettings: Equatable {
  var sourceFormat: String? = nil
  var snapshotOptions: [String] = []
  var oldSnapshot: String? = nil
  var outputFormat = "raw"
  var options: [String] = []
  var sparseSize = "4k"
  var compress = false
  var backing: String? = nil
  var backingFormat: String? = nil
  var sourceBackingFormat: String? = nil
  var inPlace = false
  var targetIsZero = false
  var threads: Int? = nil
  var outOfOrder = false
  var cacheMode = CacheMode.writeback
  var progress = false
  var progressFormat: ProgressFormat? = nil
  var quiet = false
  var summary = false
  var copyMode = CopyModeOption.auto
  var access = AccessSettings()
  var source: String
  var destination: String

  func validate() throws {
    guard let size = parseByteSize(sparseSize), size % 512 == 0, size <= 16 << 20 else {
      throw ValidationError("-S takes 0 or a multiple of 512 bytes up to 16M (got '\(sparseSize)')")
    }
    if let threads, !(1...64).contains(threads) {
      throw ValidationError("-m takes a number of threads from 1 to 64 (got \(threads))")
    }
    if backingFormat != nil && backing == nil {
      throw ValidationError("-F needs -B")
    }
    _ = try SnapshotOption.parse(list: snapshotOptions, old: oldSnapshot)
  }

  func run() throws {
    let started = Date()
    var request = ConversionRequest(source: source, destination: destination, outputFormat: outputFormat)
    request.sourceFormat = sourceFormat
    request.sourceBackingFormat = sourceBackingFormat
    request.sourceSnapshot = try SnapshotOption.parse(list: snapshotOptions, old: oldSnapshot)
    request.writerOptions = WriterOptions(options: try parseOptions(options), compress: compress)
    (request.backing, request.backingFormat) = try takeBackingOptions(
      &request.writerOptions.options, backing: backing, format: backingFormat)
    request.synchronizes = cacheMode != .unsafe
    request.inPlace = inPlace
    request.targetIsZero = targetIsZero
    request.engine.sparseSize = Int(parseByteSize(sparseSize)!)
    if let threads {
      request.engine.threads = threads
    } else if access.resolver.isNetworkName(source) {
      // Reading from a server is waiting more than working: more requests at once.
      request.engine.threads = 8
    }
    request.engine.copyMode = copyMode.mode
    let format = progressFormat ?? (progress ? .bar : nil)
    let meter = quiet ? nil : format.map { ProgressMeter(format: $0, toStandardError: destination == "-") }
    request.engine.progress = meter.map { meter in { meter.update(done: $0, total: $1) } }
    request.warn = { printError($0) }

    let conversion = try Conversion.open(request, resolver: access.resolver)
    let statistics = try conversion.run()
    meter?.finish()
    guard summary && !quiet else { return }
    let seconds = cFormat("%.3f s", Date().timeIntervalSince(started))
    if let streamBytes = statistics.sourceBytes {
      printError(
        "received \(conversion.input.name) into \(destination): \(statistics.virtualSize) bytes virtual, "
          + "\(streamBytes) stream bytes, \(statistics.bytesRead) data, "
          + "\(statistics.holeBytes + statistics.holeBytesWritten) in zero records, \(statistics.bytesWritten) written"
          + (statistics.bytesDirectFromMemory > 0
            ? " (\(statistics.bytesDirectFromMemory) of them straight to the disk)" : "") + ", "
          + "\(statistics.zeroBytesSkipped) zero bytes skipped, " + seconds, prefix: false)
    } else {
      printError(
        "converted \(source) to \(destination): \(statistics.virtualSize) bytes virtual, "
          + "\(statistics.bytesRead) read, \(statistics.bytesWritten) written"
          + (statistics.bytesCloned + statistics.bytesCopied + statistics.bytesFromPageCache
            + statistics.bytesDirectFromMemory > 0
            ? " (\(statistics.bytesCloned) cloned, \(statistics.bytesCopied) copied by the kernel, "
              + "\(statistics.bytesFromPageCache) from the source's page cache"
              + (statistics.bytesDirect > 0 ? " (\(statistics.bytesDirect) of them straight to the disk), " : ", ")
              + "\(statistics.bytesWritten - statistics.bytesCloned - statistics.bytesCopied - statistics.bytesFromPageCache) written from memory"
              + (statistics.bytesDirectFromMemory > 0
                ? " (\(statistics.bytesDirectFromMemory) of them straight to the disk))" : ")")
            : "")
          + ", "
          + "\(statistics.holeBytes) skipped as holes, \(statistics.zeroBytesSkipped) as zero blocks, "
          + (statistics.backingBytes > 0 ? "\(statistics.backingBytes) left to the backing file, " : "")
          + seconds, prefix: false)
    }
  }
}

/// `--copy-mode`: how data that lies plainly in a source file reaches the output.
enum CopyModeOption: String, ExpressibleByArgument, CaseIterable {
  case auto, clone, copy, rw
  var mode: CopyMode { CopyMode(rawValue: rawValue)! }
}

/// qemu-img's `-t` cache modes that lacuna has: both write through the page cache; only
/// writeback flushes before the rename.
enum CacheMode: String, ExpressibleByArgument, CaseIterable {
  case writeback, unsafe
}

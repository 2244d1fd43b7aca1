import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// What the user asked a conversion to do, as names and options; `Conversion.open` turns
/// it into images, a target and a writer.
public struct ConversionRequest {
  /// The source's name (`-` is standard input).
  public var source: String
  /// `-f`: nil probes the source.
  public var sourceFormat: String?
  /// The format of the source's backing file, when the source does not record it.
  public var sourceBackingFormat: String?
  /// `-l`/`-s`: convert this internal snapshot of the source instead of its active state.
  public var sourceSnapshot: SnapshotSelector?
  /// The destination's name (`-` is standard output).
  public var destination: String
  /// `-O`.
  public var outputFormat: String
  /// `-o` and `-c`; the backing file is set from `backing`.
  public var writerOptions: WriterOptions
  /// `-B`: the backing file the output records, as it is to be recorded.
  public var backing: String?
  /// `-F`: its format; nil records the format it is found to have.
  public var backingFormat: String?
  /// False is `-t unsafe`: no fsync before the rename.
  public var synchronizes = true
  /// `-n`: write into the existing destination as it is (no temporary file, no rename). A
  /// block device destination is always written so.
  public var inPlace = false
  /// `--target-is-zero`: the in-place destination reads as zeros already; zero ranges are
  /// skipped instead of zeroed.
  public var targetIsZero = false
  /// Threads, `-S`, progress.
  public var engine = ConvertOptions()
  /// Called with each warning an opened image gives ("path: warning").
  public var warn: (String) -> Void = { _ in }

  public init(source: String, destination: String, outputFormat: String = "raw") {
    self.source = source
    self.destination = destination
    self.outputFormat = outputFormat
    self.writerOptions = WriterOptions()
  }
}

/// A conversion opened and ready to run: the source (a chain, or a sequential image), the
/// decision about `-B`, the target and the writer. Nothing is visible at the destination
/// until `run` succeeds; a failure at any step leaves nothing there.
public final class Conversion {
  public let request: ConversionRequest
  public let input: ConversionInput
  private let writer: ImageWriter
  private var options: ConvertOptions

  public var virtualSize: Int64 { input.virtualSize }
  /// True when the source is read from start to end (a stream).
  public var isSequential: Bool { if case .sequential = input { return true } else { return false } }

  /// Opens the source and any backing file, decides what `-B` means, refuses an output that
  /// is one of the inputs, and creates the writer on a temporary target.
  public static func open(_ request: ConversionRequest, resolver: Resolver) throws -> Conversion {
    let registry = resolver.registry
    let outputFormat = try registry.format(named: request.outputFormat, for: request.destination)
    guard let create = outputFormat.create else {
      throw ImageError.usage(path: request.destination, "lacuna cannot write \(outputFormat.name) images")
    }
    if request.backing != nil { try requireBackingFile(outputFormat, path: request.destination, registry: registry) }
    // A destination that cannot be written is refused before any work, not after it.
    let toNetwork = resolver.isNetworkName(request.destination)
    let inPlacePath = toNetwork ? nil : try inPlaceDestination(request, format: outputFormat, registry: registry)
    var options = request.engine
    var writerOptions = request.writerOptions
    var inputs = Set<FileIdentity>()

    let input = try openInput(request, resolver: resolver)
    switch input {
    case .chain(let chain):
      for layer in chain.layers { for warning in layer.warnings { request.warn("\(layer.path): \(warning)") } }
      inputs = try chain.identities()
      if let backing = request.backing {
        // The name is recorded as given and, like any backing name, resolves against the
        // directory of the image that holds it: the output's.
        let base = try resolver.openChain(
          Resolver.path(of: backing, heldBy: request.destination), format: request.backingFormat)
        writerOptions.backing = BackingReference(name: backing, format: request.backingFormat ?? base.top.formatName)
        writerOptions.backingImage = base.top
        let baseIdentity = try base.top.source.identity()
        if let baseIdentity, let depth = try chain.layers.firstIndex(where: { try $0.source.identity() == baseIdentity }) {
          options.backing = .chainLayer(depth)  // store exactly what the layers above it hold
        } else {
          options.backing = .compared(base)  // store what differs from it, cluster by cluster
        }
        inputs.formUnion(try base.identities())
      }
    case .sequential(let reader):
      if request.backing != nil || request.sourceBackingFormat != nil {
        throw ImageError.usage(
          path: reader.name,
          "is read from start to end as a whole, flattened disk: -B and --source-backing-format do not apply")
      }
      if request.source != "-", let identity = FileIdentity.of(path: request.source) { inputs.insert(identity) }
    }

    // Writing over any file the conversion reads would destroy an input mid-read.
    if toNetwork && request.destination == request.source {
      throw ImageError.usage(
        path: request.destination, "the output is the same export as the input; refusing to overwrite it")
    }
    if !toNetwork, let target = FileIdentity.of(path: request.destination), inputs.contains(target) {
      throw ImageError.usage(
        path: request.destination, "the output is the same file as an input; refusing to overwrite it")
    }

    let target: ByteTarget
    if toNetwork, let network = resolver.network {
      // A format written in place makes its zero ranges zero itself; any other format's
      // writer counts on a new, empty file: the export is zeroed first.
      target = try network.openTarget(
        request.destination, targetIsZero: request.targetIsZero,
        zeroFirst: !outputFormat.capabilities.contains(.inPlace), synchronizes: request.synchronizes)
    } else if let inPlacePath {
      let inPlace = try InPlaceTarget(opening: inPlacePath, targetIsZero: request.targetIsZero, lock: !resolver.forceShare)
      inPlace.synchronizes = request.synchronizes
      target = inPlace
    } else {
      let file = try openTarget(request.destination, format: outputFormat, registry: registry)
      file.synchronizes = request.synchronizes
      target = file
      if !file.isStandardOutput {
        writerOptions.companions = try OutputCompanions(
          destination: request.destination, inputs: inputs, synchronizes: request.synchronizes)
      }
    }
    do {
      let writer = try create(target, input.virtualSize, writerOptions)
      return Conversion(request: request, input: input, writer: writer, options: options)
    } catch {
      target.abandon()
      throw error
    }
  }

  private init(request: ConversionRequest, input: ConversionInput, writer: ImageWriter, options: ConvertOptions) {
    self.request = request
    self.input = input
    self.writer = writer
    self.options = options
  }

  /// Converts, then makes the output visible; on failure nothing is left at the destination.
  @discardableResult
  public func run() throws -> ConvertStatistics {
    try Converter(input: input, writer: writer, options: options).run()
  }

  /// The source as a chain, or as a sequential image when its format is read from start
  /// to end (standard input always is).
  static func openInput(_ request: ConversionRequest, resolver: Resolver) throws -> ConversionInput {
    let registry = resolver.registry
    let sequentialFormats = registry.all.filter { $0.openSequential != nil }
    if request.source == "-" {
      let format: ImageFormat
      if let name = request.sourceFormat {
        format = try registry.format(named: name, for: "-")
      } else if let only = sequentialFormats.first {
        format = only
      } else {
        throw ImageError.usage(path: "-", "no format this lacuna reads can be read from standard input")
      }
      guard let openSequential = format.openSequential else {
        let names = sequentialFormats.map { "-f \($0.name)" }.joined(separator: " or ")
        throw ImageError.usage(
          path: "-", "standard input can only be read as a format read from start to end (\(names)), not as \(format.name)")
      }
      if let snapshot = request.sourceSnapshot {
        throw ImageError.usage(path: "-", "a stream holds no internal snapshots; cannot read snapshot \(snapshot)")
      }
      if isatty(STDIN_FILENO) != 0 {
        throw ImageError.usage(path: "-", "standard input is a terminal; pipe a stream into it")
      }
      return .sequential(try openSequential(SequentialInput(descriptor: STDIN_FILENO, name: "standard input")))
    }
    if let name = request.sourceFormat { _ = try registry.format(named: name, for: request.source) }
    let source = try resolver.openSource(request.source)
    let format = try registry.format(of: source, named: request.sourceFormat)
    if format.openReader == nil, let openSequential = format.openSequential {
      if let snapshot = request.sourceSnapshot {
        throw ImageError.unsupported(
          path: request.source, "\(format.name) images hold no internal snapshots; cannot read snapshot \(snapshot)")
      }
      return .sequential(try openSequential(SequentialInput(source: source)))
    }
    var top = try format.open(source, companions: resolver)
    if let snapshot = request.sourceSnapshot { top = try top.opening(snapshot: snapshot) }
    return .chain(try resolver.openChain(above: top, name: request.source, backingFormat: request.sourceBackingFormat))
  }

  /// Checks the destination before any work, and says where it is written in place: with
  /// `-n`, or when it is a block device (then the path it resolves to); nil when the output
  /// goes to a temporary file renamed into place (or to standard output).
  static func inPlaceDestination(
    _ request: ConversionRequest, format: ImageFormat, registry: FormatRegistry
  ) throws -> String? {
    var inPlacePath: String?
    if request.destination != "-" {
      let (finalPath, existing) = try OutputFile.checkDestination(request.destination)
      if request.inPlace || existing.map({ $0.st_mode & S_IFMT == S_IFBLK }) == true {
        guard existing != nil else {
          throw ImageError.usage(path: request.destination, "does not exist; -n writes into an existing file or device")
        }
        try requireInPlace(format, path: request.destination, registry: registry, why: "-n, a block device")
        inPlacePath = finalPath
      }
    }
    if request.targetIsZero && inPlacePath == nil {
      throw ImageError.usage(path: request.destination, "--target-is-zero needs -n (or a block device as the destination)")
    }
    return inPlacePath
  }

  /// Refuses to write a format in place (into an existing file, device or export) when its
  /// writer counts on a new, empty file.
  static func requireInPlace(_ format: ImageFormat, path: String, registry: FormatRegistry, why: String) throws {
    guard !format.capabilities.contains(.inPlace) else { return }
    let names = registry.formats(with: .inPlace).map { "-O \($0.name)" }.joined(separator: " or ")
    throw ImageError.usage(
      path: path, "\(format.name) images cannot be written in place (\(why)); that needs \(names)")
  }

  /// Refuses `-B` for a format that cannot record a backing file, before any image is
  /// opened, naming the formats that can.
  static func requireBackingFile(_ format: ImageFormat, path: String, registry: FormatRegistry) throws {
    guard !format.capabilities.contains(.backingFile) else { return }
    let names = registry.formats(with: .backingFile).map { "-O \($0.name)" }.joined(separator: " or ")
    throw ImageError.usage(path: path, "\(format.name) images cannot record a backing file (that needs \(names))")
  }

  /// The output: standard output for `-` (only formats written in order, never a
  /// terminal), otherwise a temporary file beside the destination.
  static func openTarget(_ destination: String, format: ImageFormat, registry: FormatRegistry) throws -> OutputFile {
    guard destination == "-" else { return try OutputFile(creatingBeside: destination) }
    guard format.capabilities.contains(.sequentialOutput) else {
      let names = registry.formats(with: .sequentialOutput).map { "-O \($0.name)" }.joined(separator: " or ")
      throw ImageError.usage(
        path: "-", "only \(names) can be written to standard output (\(format.name) needs a file to seek in)")
    }
    if isatty(STDOUT_FILENO) != 0 {
      throw ImageError.usage(path: "-", "standard output is a terminal; send the stream into a pipe or a file")
    }
    return OutputFile(standardOutput: ())
  }
}

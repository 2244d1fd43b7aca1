import Convert
import DiskImage
import FoundationEssentials
import NBD
import QCOW2
import Raw
import Stream
import VDI
import VHD
import VHDX
import VMDK

/// lacuna as a library: open a disk image or a backing chain, read its allocation map, and
/// convert it to another format with progress and cancellation, without spawning
/// `lacuna` or `qemu-img`. The `lacuna` command is built on this module.
///
/// ```swift
/// import LacunaKit
///
/// let image = try DiskImageChain.open("vm.qcow2")
/// print(image.format, image.virtualSize, image.layers)
/// let data = try image.map().filter(\.isData).reduce(0) { $0 + $1.length }
///
/// var options = ConversionOptions(outputFormat: "vmdk")
/// options.formatOptions = ["subformat": "streamOptimized"]
/// let conversion = try ImageConversion(source: "vm.qcow2", destination: "vm.vmdk", options: options)
/// let result = try conversion.run { progress in print(progress.fraction) }
/// ```
public enum LacunaKit {
  /// The version of lacuna, semantic-versioned: the library's public API changes
  /// incompatibly only with the major number.
  public static let version = "0.1.0"

  /// The names of the formats this build reads (`qcow2`, `vmdk`, `vpc`, ...), as `-f` takes them.
  public static var formats: [String] { registry.names }

  /// The names of the formats this build writes, as `-O` takes them.
  public static var writableFormats: [String] { registry.all.filter { $0.create != nil }.map(\.name) }

  /// The formats this build knows, in probing order; raw is what is left.
  package static let registry = FormatRegistry(
    formats: [QCOW2.format, SparseStream.format, VMDK.format, VHD.format, VDI.format, VHDX.format],
    fallback: Raw.format)

  /// How names become images: local files, block devices, and NBD URIs.
  package static func resolver(untrusted: Bool = false, forceShare: Bool = false) -> Resolver {
    var resolver = Resolver(registry: registry)
    resolver.network = NBDStorage()
    if untrusted { resolver.policy = .untrusted }
    resolver.forceShare = forceShare
    return resolver
  }
}

/// How an image is opened.
public struct OpenOptions: Sendable {
  /// The top image's format; nil probes it by its magic.
  public var format: String?
  /// The image comes from elsewhere: refuse it if it names any other file.
  public var untrusted = false
  /// Read it even if a running VM holds qemu's write lock on it.
  public var forceShare = false

  /// Options that probe the format and trust the image.
  public init(format: String? = nil) { self.format = format }
}

/// An image and the backing files below it, opened for reading.
public final class DiskImageChain {
  let chain: Chain

  private init(chain: Chain) { self.chain = chain }

  /// Opens `path` (a file, a block device or an NBD URI) and every backing file it names.
  /// - Throws: a `LacunaError` saying what is wrong and where.
  public static func open(_ path: String, options: OpenOptions = OpenOptions()) throws -> DiskImageChain {
    do {
      let resolver = LacunaKit.resolver(untrusted: options.untrusted, forceShare: options.forceShare)
      return DiskImageChain(chain: try resolver.openChain(path, format: options.format))
    } catch { throw LacunaError(error) }
  }

  /// The size of the disk the guest sees, in bytes.
  public var virtualSize: Int64 { chain.virtualSize }
  /// The top image's format name (`qcow2`, `raw`, ...).
  public var format: String { chain.top.formatName }
  /// The paths of the images, top first, then each backing file.
  public var layers: [String] { chain.layers.map(\.path) }

  /// Which ranges of the disk hold data and which read as zeros, and in which layer, in
  /// order, as `lacuna map --output=json` (and `qemu-img map`) reports them.
  /// - Parameter range: the part of the disk to map; the whole disk by default.
  public func map(_ range: Range<Int64>? = nil) throws -> [MapEntry] {
    let whole = range ?? 0..<virtualSize
    let end = min(whole.upperBound, virtualSize)
    var window = AdaptiveWindow(minimum: 64 << 20)
    var position = max(0, whole.lowerBound)
    var entries: [MapEntry] = []
    do {
      while position < end {
        let part = window.range(from: position, to: end)
        let extents = try chain.extents(in: part)
        window.adjust(after: extents.count)
        for extent in extents {
          let entry = MapEntry(
            start: extent.range.lowerBound, length: Int64(extent.range.count), depth: extent.depth,
            isPresent: extent.present, isData: extent.kind == .data || extent.isHostHole,
            isZero: extent.kind != .data)
          if let last = entries.last, last.isPresent == entry.isPresent, last.isData == entry.isData,
            last.isZero == entry.isZero, last.depth == entry.depth, last.start + last.length == entry.start
          {
            entries[entries.count - 1].length += entry.length
          } else {
            entries.append(entry)
          }
        }
        position = part.upperBound
      }
    } catch { throw LacunaError(error) }
    return entries
  }
}

/// One run of the map: `length` bytes from `start` that read the same way.
public struct MapEntry: Sendable, Equatable {
  /// Where the run starts on the disk.
  public var start: Int64
  /// How many bytes it covers.
  public var length: Int64
  /// Which layer answers for it: 0 the top image, 1 its backing file, ...
  public var depth: Int
  /// True when some layer of the chain describes the run (false: no layer allocates it).
  public var isPresent: Bool
  /// True when a layer stores bytes for it.
  public var isData: Bool
  /// True when it reads as zeros.
  public var isZero: Bool

  /// A run of the map, as `map()` returns them (for comparing maps).
  public init(start: Int64, length: Int64, depth: Int, isPresent: Bool, isData: Bool, isZero: Bool) {
    (self.start, self.length, self.depth) = (start, length, depth)
    (self.isPresent, self.isData, self.isZero) = (isPresent, isData, isZero)
  }
}

/// What a conversion writes, and how.
public struct ConversionOptions: Sendable {
  /// The output's format (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`, `stream`).
  public var outputFormat: String
  /// The source's format; nil probes it.
  public var sourceFormat: String?
  /// The output format's options, as `-o key=value`: `["subformat": "streamOptimized"]`.
  public var formatOptions: [String: String] = [:]
  /// Compress the output (qcow2).
  public var compress = false
  /// Worker threads; nil takes the number of cores, from 2 to 8.
  public var threads: Int?
  /// Zero runs of this many bytes (a multiple of 512) are left as holes; 0 writes everything.
  public var sparseSize = 4096
  /// A backing file for the output to record; only what differs from it is written.
  public var backingFile: String?
  /// The backing file's format.
  public var backingFormat: String?
  /// The source comes from elsewhere: refuse it if it names any other file.
  public var untrusted = false

  /// Options that write `outputFormat` with its defaults.
  public init(outputFormat: String = "raw") { self.outputFormat = outputFormat }
}

/// How far a conversion has got.
public struct ConversionProgress: Sendable, Equatable {
  /// Bytes of the disk converted so far.
  public var bytesDone: Int64
  /// Bytes of the disk in all.
  public var bytesTotal: Int64
  /// From 0 to 1.
  public var fraction: Double { bytesTotal == 0 ? 1 : Double(bytesDone) / Double(bytesTotal) }

  /// A point of progress, as `run` reports it.
  public init(bytesDone: Int64, bytesTotal: Int64) {
    self.bytesDone = bytesDone
    self.bytesTotal = bytesTotal
  }
}

/// What a finished conversion did.
public struct ConversionResult: Sendable, Equatable {
  /// The disk's size.
  public var virtualSize: Int64
  /// Bytes read from the source's data.
  public var bytesRead: Int64
  /// Bytes written to the output.
  public var bytesWritten: Int64
  /// Bytes skipped because the source's map said they hold nothing.
  public var holeBytes: Int64
  /// Bytes skipped because they were read and found to be zeros.
  public var zeroBytesSkipped: Int64
}

/// A failure, with a message that names the image and what is wrong with it.
public struct LacunaError: Error, CustomStringConvertible {
  /// One line, as the `lacuna` command prints it.
  public var description: String
  /// True when the conversion stopped because `cancel()` was called.
  public var isCancellation: Bool

  init(_ error: Error) {
    if let error = error as? LacunaError {
      self = error
      return
    }
    isCancellation = error is ConversionCancelled
    description = isCancellation ? "the conversion was cancelled" : String(describing: error)
  }
}

/// One conversion of an image (and its backing chain) to another file. The output is
/// written under a temporary name and renamed into place once complete; a failed or
/// cancelled conversion leaves nothing at the destination.
public final class ImageConversion: @unchecked Sendable {
  private let conversion: Conversion
  private let cancelled = CancelFlag()
  private let reporter = ProgressReporter()

  /// Opens the source and creates the output; nothing is converted until `run`.
  public init(source: String, destination: String, options: ConversionOptions) throws {
    var request = ConversionRequest(source: source, destination: destination, outputFormat: options.outputFormat)
    request.sourceFormat = options.sourceFormat
    request.writerOptions = WriterOptions(options: options.formatOptions, compress: options.compress)
    request.backing = options.backingFile
    request.backingFormat = options.backingFormat
    request.engine.sparseSize = options.sparseSize
    if let threads = options.threads { request.engine.threads = threads }
    request.engine.isCancelled = { [cancelled] in cancelled.isSet }
    request.engine.progress = { [reporter] in reporter.report?(ConversionProgress(bytesDone: $0, bytesTotal: $1)) }
    do {
      conversion = try Conversion.open(request, resolver: LacunaKit.resolver(untrusted: options.untrusted))
    } catch { throw LacunaError(error) }
  }

  /// The size of the disk being converted.
  public var virtualSize: Int64 { conversion.virtualSize }

  /// Converts, calling `progress` as the work advances (on the calling thread).
  /// - Throws: a `LacunaError`; `isCancellation` when `cancel()` stopped it.
  @discardableResult
  public func run(progress: ((ConversionProgress) -> Void)? = nil) throws -> ConversionResult {
    reporter.report = progress
    defer { reporter.report = nil }
    do {
      let statistics = try conversion.run()
      return ConversionResult(
        virtualSize: statistics.virtualSize, bytesRead: statistics.bytesRead, bytesWritten: statistics.bytesWritten,
        holeBytes: statistics.holeBytes, zeroBytesSkipped: statistics.zeroBytesSkipped)
    } catch { throw LacunaError(error) }
  }

  /// Stops a conversion under way (from any thread, or from the progress callback): `run`
  /// throws a cancellation and removes what it wrote.
  public func cancel() { cancelled.set() }
}

/// Where the engine's progress goes: the callback of the `run` under way.
private final class ProgressReporter: @unchecked Sendable {
  var report: ((ConversionProgress) -> Void)?
}

/// A flag set from one thread and read from another.
private final class CancelFlag: @unchecked Sendable {
  private let lock = Lock()
  private var value = false
  var isSet: Bool { lock.withLock { value } }
  func set() { lock.withLock { value = true } }
}

/// What a format can do, for the engine and the command line to ask instead of testing
/// format names.
public struct FormatCapabilities: OptionSet, Sendable {
  public let rawValue: Int
  public init(rawValue: Int) { self.rawValue = rawValue }

  /// The writer takes the disk strictly in order and never seeks or reads back: its
  /// output may be a pipe (`-` as the destination).
  public static let sequentialOutput = FormatCapabilities(rawValue: 1 << 0)
  /// An image of this format is the disk byte for byte, so zero blocks can be punched out
  /// of it in place (`sparsify`).
  public static let sparsifyInPlace = FormatCapabilities(rawValue: 1 << 1)
  /// The writer can record a backing file (`-B`).
  public static let backingFile = FormatCapabilities(rawValue: 1 << 2)
  /// The writer can compress (`-c`).
  public static let compression = FormatCapabilities(rawValue: 1 << 3)
  /// The writer can write over existing content (`-n`, a block device): it makes every
  /// zero range zero instead of counting on a new file's holes.
  public static let inPlace = FormatCapabilities(rawValue: 1 << 4)
}

/// Opens the files an image names as parts of itself (the extent files of a VMDK
/// descriptor), under the rules of whoever opened the image: the Resolver resolves a
/// relative name against the directory of the image that holds it, refuses URLs, `json:`
/// names, FIFOs and devices, and refuses everything for an untrusted image.
public protocol CompanionOpener {
  /// Opens `name`, as the image read from `referrer` holds it; `what` says what it is to
  /// the image ("extent file"), for errors.
  func openCompanion(_ name: String, heldBy referrer: ByteSource, what: String) throws -> ByteSource
  /// Throws unless the image read from `referrer` may make lacuna look through other files
  /// to find `what` (a differencing VDI searches the .vdi files around it for its parent).
  func checkMaySearch(heldBy referrer: ByteSource, for what: String) throws
}

/// Opens no companion files: for callers that read one file alone (the fuzz harness, tests).
public struct NoCompanions: CompanionOpener {
  public init() {}
  public func openCompanion(_ name: String, heldBy referrer: ByteSource, what: String) throws -> ByteSource {
    throw ImageError.unsupported(path: referrer.name, "names \(what) '\(name)', and other files are not opened here")
  }
  public func checkMaySearch(heldBy referrer: ByteSource, for what: String) throws {
    throw ImageError.unsupported(path: referrer.name, "needs other files searched for \(what), which is not done here")
  }
}

/// A disk-image format: how to recognise it, read it and write it. A format reads and
/// writes through byte sources and targets; where the bytes live is not its business.
public struct ImageFormat {
  /// The name `-f` and `-O` take.
  public var name: String
  /// How many leading bytes `probe` wants to see.
  public var probeLength: Int
  /// True when these leading bytes carry the format's magic. Raw never claims a file.
  public var probe: (_ header: [UInt8]) -> Bool
  /// True when the file's last 512 bytes (fewer for a shorter file) mark it as this format:
  /// a trailer such as a fixed VHD's footer. Asked only when no format claims the header.
  public var probeTrailer: ((_ trailer: [UInt8]) -> Bool)?
  public var capabilities: FormatCapabilities
  /// Opens an image of this format for random access; nil for formats that can only be
  /// read from start to end.
  public var openReader: ((_ source: ByteSource) throws -> ImageReader)?
  /// Opens an image of this format whose disk lies partly in other files it names (a VMDK
  /// descriptor and its extents), opening those through `companions`; nil for formats whose
  /// image is one file. Takes precedence over `openReader`.
  public var openWithCompanions: ((_ source: ByteSource, _ companions: CompanionOpener) throws -> ImageReader)?
  /// Opens an image of this format that is read from start to end (from a pipe); nil for
  /// formats that need random access.
  public var openSequential: ((_ input: SequentialInput) throws -> SequentialImageReader)?
  /// Creates a writer that fills `target` with an image of `virtualSize` bytes; nil for
  /// formats that cannot be written.
  public var create: ((_ target: ByteTarget, _ virtualSize: Int64, _ options: WriterOptions) throws -> ImageWriter)?

  public init(
    name: String, probeLength: Int = 0, probe: @escaping ([UInt8]) -> Bool = { _ in false },
    probeTrailer: (([UInt8]) -> Bool)? = nil,
    capabilities: FormatCapabilities = [],
    open: ((ByteSource) throws -> ImageReader)? = nil,
    openWithCompanions: ((ByteSource, CompanionOpener) throws -> ImageReader)? = nil,
    openSequential: ((SequentialInput) throws -> SequentialImageReader)? = nil,
    create: ((ByteTarget, Int64, WriterOptions) throws -> ImageWriter)? = nil
  ) {
    self.name = name
    self.probeLength = probeLength
    self.probe = probe
    self.probeTrailer = probeTrailer
    self.capabilities = capabilities
    self.openReader = open
    self.openWithCompanions = openWithCompanions
    self.openSequential = openSequential
    self.create = create
  }

  /// Opens `source` as this format for random access, or says why it cannot be. Files the
  /// image names as parts of itself are opened through `companions`.
  public func open(_ source: ByteSource, companions: CompanionOpener = NoCompanions()) throws -> ImageReader {
    if let openWithCompanions { return try openWithCompanions(source, companions) }
    guard let open = openReader else {
      throw ImageError.usage(
        path: source.name,
        "is a \(name) image, which is read from start to end: use `lacuna convert -f \(name) \(source.name) OUTPUT`")
    }
    return try open(source)
  }
}

/// The formats lacuna knows, in probing order; raw is the fallback.
public struct FormatRegistry {
  public var formats: [ImageFormat]
  public var fallback: ImageFormat

  public init(formats: [ImageFormat], fallback: ImageFormat) {
    self.formats = formats
    self.fallback = fallback
  }

  public var all: [ImageFormat] { formats + [fallback] }
  public var names: [String] { all.map(\.name) }

  public func format(named name: String) -> ImageFormat? {
    all.first { $0.name == name }
  }

  /// The format named `name`, or a usage error naming `path` and the known formats.
  public func format(named name: String, for path: String) throws -> ImageFormat {
    guard let format = format(named: name) else {
      throw ImageError.usage(path: path, "unknown format '\(name)' (known: \(names.joined(separator: ", ")))")
    }
    return format
  }

  /// The formats that have every one of `capabilities`.
  public func formats(with capabilities: FormatCapabilities) -> [ImageFormat] {
    all.filter { $0.capabilities.isSuperset(of: capabilities) }
  }

  /// The format whose magic the source starts with (or whose trailer it ends with), or the
  /// fallback (raw) when none does. A container lacuna recognises but does not read
  /// (`Containers`) is refused by name: read as raw, it would be a wrong disk with exit 0.
  public func probe(_ source: ByteSource) throws -> ImageFormat {
    let length = max(formats.map(\.probeLength).max() ?? 0, Containers.headerLength)
    var header = [UInt8](repeating: 0, count: length)
    let n = try header.withUnsafeMutableBytes { try source.read(into: $0, at: 0) }
    // An empty file carries no format at all; calling it a raw disk of 0 bytes would turn
    // a failed download into an empty "successful" conversion.
    if n == 0, try source.size() == 0 {
      throw ImageError.invalid(
        path: source.name, "the file is empty (0 bytes), not an image; give -f raw to use it as an empty raw disk")
    }
    header.removeLast(length - n)
    if let format = formats.first(where: { $0.probe(header) }) { return format }
    let size = try source.size()
    let count = Int(min(size, 512))
    var trailer = [UInt8](repeating: 0, count: count)
    let read = try trailer.withUnsafeMutableBytes { try source.read(into: $0, at: size - Int64(count)) }
    trailer.removeLast(count - read)
    if let format = formats.first(where: { $0.probeTrailer?(trailer) ?? false }) { return format }
    if let container = Containers.recognize(header: header, trailer: trailer) {
      throw ImageError.unsupported(
        path: source.name,
        "is \(container), which lacuna does not read; -f raw would copy the container's bytes as they are, not the disk inside")
    }
    return fallback
  }

  /// The format of `source`: the one named (never probed: a guest can write any header
  /// into its disk), or the one its magic says.
  public func format(of source: ByteSource, named formatName: String?) throws -> ImageFormat {
    if let formatName { return try format(named: formatName, for: source.name) }
    return try probe(source)
  }

  /// Opens `source` for random access as `formatName`, or probes when it is nil.
  public func open(
    _ source: ByteSource, format formatName: String?, companions: CompanionOpener = NoCompanions()
  ) throws -> ImageReader {
    try format(of: source, named: formatName).open(source, companions: companions)
  }
}

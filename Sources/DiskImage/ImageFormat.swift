/// A disk-image format: how to recognise it, read it and write it.
public struct ImageFormat {
  /// The name `-f` and `-O` take.
  public var name: String
  /// How many leading bytes `probe` wants to see.
  public var probeLength: Int
  /// True when these leading bytes carry the format's magic. Raw never claims a file.
  public var probe: (_ header: [UInt8]) -> Bool
  /// Opens an image of this format from an open, read-only file.
  public var open: (_ file: ImageFile) throws -> ImageReader
  /// Creates a writer that fills `output` with an image of `virtualSize` bytes; nil
  /// for formats that cannot be written.
  public var create: ((_ output: OutputFile, _ virtualSize: Int64, _ options: WriterOptions) throws -> ImageWriter)?

  public init(
    name: String, probeLength: Int = 0, probe: @escaping ([UInt8]) -> Bool = { _ in false },
    open: @escaping (ImageFile) throws -> ImageReader,
    create: ((OutputFile, Int64, WriterOptions) throws -> ImageWriter)? = nil
  ) {
    self.name = name
    self.probeLength = probeLength
    self.probe = probe
    self.open = open
    self.create = create
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

  public var names: [String] { formats.map(\.name) + [fallback.name] }

  public func format(named name: String) -> ImageFormat? {
    (formats + [fallback]).first { $0.name == name }
  }

  /// The format whose magic the file starts with, or the fallback (raw) when none does.
  public func probe(_ file: ImageFile) throws -> ImageFormat {
    let length = formats.map(\.probeLength).max() ?? 0
    var header = [UInt8](repeating: 0, count: length)
    let n = try header.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
    // An empty file carries no format at all; calling it a raw disk of 0 bytes would turn
    // a failed download into an empty "successful" conversion.
    if n == 0, length > 0, try file.size() == 0 {
      throw ImageError.invalid(
        path: file.path, "the file is empty (0 bytes), not an image; give -f raw to use it as an empty raw disk")
    }
    header.removeLast(length - n)
    return formats.first { $0.probe(header) } ?? fallback
  }

  /// Opens `path` read-only as `formatName`, or probes when it is nil. With a format
  /// given, the file is never probed: a guest can write any header into its disk.
  public func open(_ path: String, format formatName: String?) throws -> ImageReader {
    let file = try ImageFile.openForReading(path)
    let format: ImageFormat
    if let formatName {
      guard let named = self.format(named: formatName) else {
        throw ImageError.usage(path: path, "unknown format '\(formatName)' (known: \(names.joined(separator: ", ")))")
      }
      format = named
    } else {
      format = try probe(file)
    }
    return try format.open(file)
  }
}

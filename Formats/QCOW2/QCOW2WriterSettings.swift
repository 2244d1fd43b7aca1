import Compression
import DiskImage

extension QCOW2Writer {
  /// What the image will look like, from `-o key=value` and the other writer options,
  /// checked the way qemu-img checks them before anything is written.
  struct Settings: Equatable {
    enum Preallocation: String { case off, metadata }

    /// 2 (compat=0.10) or 3 (compat=1.1).
    var version: UInt32 = 3
    var clusterBits = 16
    /// log2 of refcount_bits (qemu's refcount_order).
    var refcountOrder = 4
    var compressionType: CompressionType = .zlib
    /// `compression_level`: nil for the type's default (zlib 4, zstd 3).
    var compressionLevel: Int32?
    var preallocation: Preallocation = .off

    var clusterSize: Int { 1 << clusterBits }
    var refcountBits: Int { 1 << refcountOrder }

    /// The `-o` keys the writer takes; anything else is refused.
    static let knownKeys: Set<String> = [
      "compat", "cluster_size", "refcount_bits", "preallocation", "compression_type", "compression_level", "lazy_refcounts",
    ]

    /// Parses and cross-checks `options`; errors name `path` and say what was expected.
    init(_ options: WriterOptions, path: String) throws {
      try options.checkKnown(Self.knownKeys, format: "qcow2", path: path)
      func usage(_ message: String) -> ImageError { .usage(path: path, message) }
      let values = options.options

      switch values["compat"] ?? "1.1" {
      case "1.1", "v3": version = 3
      case "0.10", "v2": version = 2
      case let other: throw usage("compat '\(other)' is not one of 1.1 (v3), 0.10 (v2)")
      }

      if let text = values["cluster_size"] {
        guard let size = parseByteSize(text).flatMap({ Int(exactly: $0) }) else {
          throw usage("cluster_size '\(text)' is not a size (a number, optionally with k or M)")
        }
        guard size >= 512, size <= 2 << 20, size & (size - 1) == 0 else {
          throw usage("cluster_size \(size) must be a power of two from 512 to 2M")
        }
        clusterBits = size.trailingZeroBitCount
      }

      if let text = values["refcount_bits"] {
        guard let bits = Int(text), bits >= 1, bits <= 64, bits & (bits - 1) == 0 else {
          throw usage("refcount_bits '\(text)' is not one of 1, 2, 4, 8, 16, 32, 64")
        }
        if version == 2 && bits != 16 {
          throw usage("refcount_bits \(bits) needs compat=1.1 (compat=0.10 has only 16-bit refcounts)")
        }
        refcountOrder = bits.trailingZeroBitCount
      }

      if let text = values["compression_type"] {
        guard let type = CompressionType(rawValue: text) else {
          throw usage("compression_type '\(text)' is not one of zlib, zstd")
        }
        if type != .zlib && version == 2 {
          throw usage("compression_type \(text) needs compat=1.1 (compat=0.10 images are always zlib)")
        }
        compressionType = type
      }

      if let text = values["compression_level"] {
        let range = compressionType.levels
        guard let level = Int32(text), range.contains(level) else {
          throw usage(
            "compression_level '\(text)' is not a level of \(compressionType.rawValue) "
              + "(\(range.lowerBound) to \(range.upperBound))")
        }
        guard options.compress else {
          throw usage("compression_level needs compressed output (-c)")
        }
        compressionLevel = level
      }

      if let text = values["preallocation"] {
        guard let mode = Preallocation(rawValue: text) else {
          throw usage(
            text == "falloc" || text == "full"
              ? "preallocation=\(text) is not supported for qcow2 output (off, metadata)"
              : "preallocation '\(text)' is not one of off, metadata")
        }
        preallocation = mode
      }
      if preallocation != .off {
        if options.compress {
          throw usage("preallocation=\(preallocation.rawValue) cannot be combined with compression (-c)")
        }
        if options.backing != nil {
          throw usage("preallocation=\(preallocation.rawValue) cannot be combined with a backing file")
        }
      }

      switch values["lazy_refcounts"] ?? "off" {
      case "off": break
      case "on":
        // Refcounts are written once, at the end, before the header: there is nothing for
        // lazy refcounts to save, and the flag would only ask readers to repair the image.
        throw usage("lazy_refcounts=on is not supported (refcounts are always written exactly)")
      case let other: throw usage("lazy_refcounts '\(other)' is not one of on, off")
      }
    }

    init() {}
  }
}

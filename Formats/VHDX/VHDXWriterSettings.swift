import DiskImage

extension VHDXWriter {
  /// What the image will look like, from `-o key=value` (qemu-img's vhdx option names and
  /// meanings) and the backing file, checked before anything is written.
  struct Settings: Equatable {
    enum Subformat: String { case dynamic, fixed }

    var subformat: Subformat = .dynamic
    /// The payload block size; nil until chosen from the disk size (qemu's rule) or from
    /// `block_size`.
    var blockSize: Int64 = 0
    var logSize: Int64 = 1 << 20
    /// Blocks that hold no data are marked ZERO (2) instead of NOT_PRESENT (0), as qemu does
    /// by default. No effect on fixed images (every block present) or differencing ones
    /// (a block without data of its own must show the parent).
    var blockStateZero = true

    static let knownKeys: Set<String> = ["subformat", "block_size", "log_size", "block_state_zero"]
    static let mebibyte: Int64 = 1 << 20
    static let largestBlock: Int64 = 256 << 20

    /// The block size qemu-img picks for a disk of `size` bytes when `block_size` is 0 or
    /// not given: 8 MiB up to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above.
    static func automaticBlockSize(for size: Int64) -> Int64 {
      if size > 32 << 40 { return 64 << 20 }
      if size > 100 << 30 { return 32 << 20 }
      if size > 1 << 30 { return 16 << 20 }
      return 8 << 20
    }

    /// Hyper-V's block size for a new differencing disk, whatever its parent's.
    static let differencingBlockSize: Int64 = 2 << 20

    /// Parses and cross-checks `options` for a disk of `size` bytes; errors name `path`.
    init(_ options: WriterOptions, size: Int64, path: String) throws {
      try options.checkKnown(Self.knownKeys, format: "vhdx", path: path)
      func usage(_ message: String) -> ImageError { .usage(path: path, message) }
      let values = options.options

      if let text = values["subformat"] {
        guard let value = Subformat(rawValue: text) else {
          throw usage("subformat '\(text)' is not one of dynamic, fixed")
        }
        subformat = value
      }
      if options.backing != nil && subformat == .fixed {
        throw usage("subformat=fixed cannot have a backing file (-B): a differencing VHDX is dynamic")
      }

      var requested: Int64 = 0
      if let text = values["block_size"] {
        guard let value = parseByteSize(text), value >= 0 else {
          throw usage("block_size '\(text)' is not a size (a number, optionally with k, M or G)")
        }
        requested = value
      }
      if requested == 0 {
        blockSize = options.backing != nil ? Self.differencingBlockSize : Self.automaticBlockSize(for: size)
      } else {
        // qemu rounds up to whole MiB; what is then not a power of two from 1 MiB to
        // 256 MiB cannot be opened by anyone.
        let rounded = (requested + Self.mebibyte - 1) / Self.mebibyte * Self.mebibyte
        guard rounded <= Self.largestBlock, rounded & (rounded - 1) == 0 else {
          throw usage("block_size \(requested) must be a power of two from 1M to 256M")
        }
        blockSize = rounded
      }

      if let text = values["log_size"] {
        guard let value = parseByteSize(text), value > 0 else {
          throw usage("log_size '\(text)' is not a size of at least 1M")
        }
        // qemu rounds up to whole MiB; the header holds the length in 32 bits.
        let rounded = (value + Self.mebibyte - 1) / Self.mebibyte * Self.mebibyte
        guard rounded <= 4095 * Self.mebibyte else {
          throw usage("log_size \(value) is larger than the 4095M a VHDX header can record")
        }
        logSize = rounded
      }

      if let text = values["block_state_zero"] {
        switch text {
        case "on", "yes", "true": blockStateZero = true
        case "off", "no", "false": blockStateZero = false
        default: throw usage("block_state_zero '\(text)' is not one of on, off")
        }
      }
    }

    init() {}
  }
}

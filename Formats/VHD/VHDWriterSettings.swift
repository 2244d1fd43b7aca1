import DiskImage

extension VHDWriter {
  /// What the image will look like, from `-o subformat=, force_size=`, checked the way
  /// qemu-img checks them before anything is written.
  struct Settings: Equatable {
    enum Subformat: String { case dynamic, fixed }

    var subformat: Subformat = .dynamic
    /// `force_size=on`: the footer records the size asked for (creator `qem2`, the largest
    /// geometry) instead of rounding it up to a CHS geometry (creator `qemu`).
    var forceSize = false

    /// The `-o` keys the writer takes (qemu's vpc driver's create options); anything else
    /// is refused.
    static let knownKeys: Set<String> = ["subformat", "force_size"]

    /// Parses `options`; errors name `path` and say what was expected.
    init(_ options: WriterOptions, path: String) throws {
      try options.checkKnown(Self.knownKeys, format: "vpc", path: path)
      if options.backing != nil {
        throw ImageError.usage(path: path, "vpc images cannot record a backing file (qemu-img cannot make them either)")
      }
      if options.compress {
        throw ImageError.usage(path: path, "vpc images cannot be compressed (-c), as in qemu-img")
      }
      let values = options.options
      if let text = values["subformat"] {
        guard let subformat = Subformat(rawValue: text) else {
          throw ImageError.usage(path: path, "subformat '\(text)' is not one of dynamic, fixed")
        }
        self.subformat = subformat
      }
      if let text = values["force_size"] {
        // qemu's spellings of a boolean option; a bare `force_size` comes as "on".
        switch text {
        case "on", "yes", "true": forceSize = true
        case "off", "no", "false": forceSize = false
        default: throw ImageError.usage(path: path, "force_size '\(text)' is not one of on, off")
        }
      }
    }

    init() {}
  }

  /// The disk a new VHD describes: its size as every reader will see it, the geometry and
  /// the creator recorded in the footer.
  struct Disk: Equatable {
    /// Bytes, a multiple of 512: what `qemu-img info` will say.
    var size: Int64
    var geometry: VHDGeometry
    /// `qemu` (the CHS geometry is the size) or `qem2` (`force_size`: the current size is).
    var creator: String

    static let mebibyte: Int64 = 1 << 20
    /// qemu's limit, 0xFF000000 sectors (2040 GiB): it neither makes nor opens larger VHDs.
    static let maximumSize = Int64(VHDFooter.maximumSectors) * 512

    /// The disk qemu-img makes for `requestedSize` bytes (rounded up to a sector), with
    /// the refusals of qemu-img and Azure's rule for `subformat=fixed,force_size=on`.
    ///
    /// - Without `force_size`, the geometry is the first the specification's algorithm
    ///   gives for the sector count or a little more whose product covers it, and the disk
    ///   is that product (1 GiB becomes 1073995776 bytes, 2081/16/63); past the largest
    ///   geometry (about 127 GiB) the footer's current size holds the sector count.
    /// - With `force_size`, the disk is the sector count, under the largest geometry.
    init(requestedSize: Int64, settings: Settings, path: String) throws {
      guard requestedSize >= 0 else {
        throw ImageError.usage(path: path, "virtual size \(requestedSize) is negative")
      }
      guard requestedSize <= Self.maximumSize else {
        throw ImageError.usage(
          path: path,
          "virtual size \(requestedSize) bytes is larger than a VHD can hold: at most 2040 GiB (\(Self.maximumSize) bytes), as qemu-img allows")
      }
      let sectors = (requestedSize + 511) / 512
      if settings.forceSize {
        geometry = .maximum
        creator = "qem2"
        size = sectors * 512
      } else {
        geometry = .covering(sectors)
        creator = "qemu"
        // The largest geometry means "the current size is the truth", so the disk keeps
        // its own sector count instead of the geometry's.
        size = (geometry == .maximum ? sectors : geometry.sectors) * 512
      }
      if settings.subformat == .fixed && settings.forceSize && size % Self.mebibyte != 0 {
        throw ImageError.usage(path: path, Self.azureRefusal(size: size))
      }
    }

    /// Why a fixed VHD of `size` bytes (not a whole number of MiB) is refused, naming the
    /// whole-MiB sizes on either side.
    static func azureRefusal(size: Int64) -> String {
      func describe(_ bytes: Int64) -> String {
        let mebibytes = bytes / mebibyte
        return mebibytes % 1024 == 0 ? "\(bytes) bytes (\(mebibytes / 1024) GiB)" : "\(bytes) bytes (\(mebibytes) MiB)"
      }
      let below = size / mebibyte * mebibyte
      let above = below + mebibyte
      let choices = below == 0 ? describe(above) : "\(describe(below)) or \(describe(above))"
      return "subformat=fixed,force_size=on makes a VHD for Azure, which accepts only fixed VHDs of a whole number of MiB, "
        + "and this disk is \(size) bytes; resize it to \(choices) first"
    }
  }
}

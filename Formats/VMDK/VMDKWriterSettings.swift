import DiskImage

/// The layouts `-o subformat=` chooses, with qemu-img's names.
enum VMDKSubformat: String, CaseIterable {
  case monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized

  /// Extents are raw files (no grain tables): no backing file, no zeroed grains, no `-c`.
  var isFlat: Bool { self == .monolithicFlat || self == .twoGbMaxExtentFlat }
  /// The disk is cut into extent files of at most 2 GiB.
  var isSplit: Bool { self == .twoGbMaxExtentSparse || self == .twoGbMaxExtentFlat }
  /// The image is one sparse file that embeds its descriptor.
  var isSingleFile: Bool { self == .monolithicSparse || self == .streamOptimized }
}

/// The `ddb.adapterType` values qemu-img takes; they also choose the geometry's heads.
enum VMDKAdapterType: String, CaseIterable {
  case ide, buslogic, lsilogic, legacyESX

  /// qemu's rule: 16 heads for IDE, 255 for the SCSI adapters; always 63 sectors a track.
  var heads: Int64 { self == .ide ? 16 : 255 }
}

/// What the VMDK output will look like, from `-o key=value` and the other writer options,
/// checked the way qemu-img checks them (and a little more) before anything is written.
struct VMDKWriterSettings {
  var subformat = VMDKSubformat.monolithicSparse
  var adapterType = VMDKAdapterType.ide
  /// `ddb.virtualHWVersion`: qemu's default is 4, `compat6` makes it 6.
  var hardwareVersion = "4"
  /// `ddb.toolsVersion`; qemu's default is 2147483647.
  var toolsVersion = "2147483647"
  /// Zeroed-grain entries (version 2, flag 0x4): grains that must read as zero over a
  /// parent take no space.
  var zeroedGrain = false

  /// The `-o` keys the writer takes; anything else is refused.
  static let knownKeys: Set<String> = [
    "subformat", "adapter_type", "hwversion", "toolsversion", "zeroed_grain", "compat6",
  ]

  init(_ options: WriterOptions, path: String) throws {
    try options.checkKnown(Self.knownKeys, format: "vmdk", path: path)
    func usage(_ message: String) -> ImageError { .usage(path: path, message) }
    let values = options.options
    func flag(_ key: String) throws -> Bool {
      switch values[key] ?? "off" {
      case "on", "yes", "true": return true
      case "off", "no", "false": return false
      case let other: throw usage("\(key) '\(other.prefix(40))' is not one of on, off")
      }
    }

    if let text = values["subformat"] {
      guard let chosen = VMDKSubformat(rawValue: text) else {
        throw usage(
          "subformat '\(text.prefix(40))' is not one of \(VMDKSubformat.allCases.map(\.rawValue).joined(separator: ", "))")
      }
      subformat = chosen
    }
    if let text = values["adapter_type"] {
      guard let chosen = VMDKAdapterType(rawValue: text) else {
        throw usage(
          "adapter_type '\(text.prefix(40))' is not one of \(VMDKAdapterType.allCases.map(\.rawValue).joined(separator: ", "))")
      }
      adapterType = chosen
    }
    let compat6 = try flag("compat6")
    if let text = values["hwversion"] {
      if compat6 { throw usage("compat6 cannot be combined with hwversion (compat6 means hwversion=6)") }
      if text != "undefined" {
        try Self.checkDescriptorValue(text, key: "hwversion", path: path)
        hardwareVersion = text
      }
    } else if compat6 {
      hardwareVersion = "6"
    }
    if let text = values["toolsversion"] {
      try Self.checkDescriptorValue(text, key: "toolsversion", path: path)
      toolsVersion = text
    }
    zeroedGrain = try flag("zeroed_grain")

    if subformat.isFlat {
      if options.backing != nil {
        throw usage("a \(subformat.rawValue) image cannot have a backing file (its extents are raw files); use subformat=monolithicSparse")
      }
      if zeroedGrain { throw usage("zeroed_grain=on needs a sparse subformat; \(subformat.rawValue) extents are raw files") }
      if options.compress {
        throw usage("-c needs a sparse subformat (streamOptimized compresses); \(subformat.rawValue) extents are raw files")
      }
    }
    if !subformat.isSingleFile && options.companions == nil {
      throw usage(
        "a \(subformat.rawValue) image is several files, which cannot be written here (standard output, or in place); use subformat=monolithicSparse or streamOptimized")
    }
  }

  /// A `ddb` value is written between double quotes on one line: it may not hold either.
  static func checkDescriptorValue(_ text: String, key: String, path: String) throws {
    guard !text.isEmpty, text.utf8.count <= 64, !text.unicodeScalars.contains(where: { $0 == "\"" || $0.value < 0x20 || $0.value == 0x7f })
    else {
      throw ImageError.usage(path: path, "\(key) '\(text.prefix(40))' must be 1 to 64 characters without quotes or control characters")
    }
  }
}

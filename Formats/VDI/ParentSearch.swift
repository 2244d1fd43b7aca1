import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// Finds the parent of a differencing VDI. The file names no path: only the parent's image
/// UUID (and its modification UUID when the snapshot was taken). VirtualBox keeps the path
/// in its media registry; without it, the parent is the one `.vdi` file in the searched
/// directories whose image UUID matches. Snapshots usually sit in `Snapshots/` below the
/// base image's folder, so the image's own directory and its parent are searched, in that
/// order, and the first directory with a match decides.
struct ParentSearch {
  /// Directories to search, relative to the image's directory (or absolute).
  var directories: [String]
  /// At most this many directory entries are looked at per directory, so a huge
  /// directory cannot make opening an image slow.
  static let entriesLimit = 10_000

  /// What the search found: the reference to record and what to warn about.
  struct Found {
    var reference: BackingReference
    var warnings: [String]
  }

  /// The parent of the image at `imagePath`, named relative to the image's directory.
  func find(for imagePath: String, header: VDIHeader, imageIdentity: FileIdentity?) throws -> Found {
    let imageDirectory = splitPath(imagePath).directory
    func onDisk(_ name: String) -> String {
      if name == "." { return imageDirectory.isEmpty ? "." : imageDirectory }
      return name.hasPrefix("/") || imageDirectory.isEmpty ? name : imageDirectory + "/" + name
    }
    for directory in directories {
      var matches: [(name: String, modification: VDIHeader.UUID)] = []
      for entry in Self.vdiFiles(in: onDisk(directory)) {
        let name = directory == "." ? entry : directory + "/" + entry
        let path = onDisk(name)
        if let imageIdentity, FileIdentity.of(path: path) == imageIdentity { continue }
        guard let uuids = Self.uuids(of: path), uuids.image == header.linkUUID else { continue }
        matches.append((name, uuids.modification))
      }
      guard !matches.isEmpty else { continue }
      let exact = matches.filter { $0.modification == header.parentModificationUUID }
      let chosen = exact.isEmpty ? matches : exact
      guard chosen.count == 1 else {
        throw ImageError.invalid(
          path: imagePath,
          "is a differencing VDI whose parent (image UUID \(header.linkUUID)) is ambiguous: "
            + chosen.map(\.name).joined(separator: ", ") + " all have that UUID")
      }
      var warnings: [String] = []
      if exact.isEmpty {
        warnings.append(
          "parent \(chosen[0].name) has modification UUID \(chosen[0].modification), but the snapshot was taken "
            + "of \(header.parentModificationUUID): the parent may have changed since")
      }
      return Found(reference: BackingReference(name: chosen[0].name, format: "vdi"), warnings: warnings)
    }
    let places =
      directories.isEmpty
      ? "nowhere (no directories to search)" : directories.map { onDisk($0) }.joined(separator: " and ")
    throw ImageError.advised(
      .unsupported(
        path: imagePath,
        "is a differencing VDI (a VirtualBox snapshot) whose parent, image UUID \(header.linkUUID), "
          + "is not among the .vdi files in \(places)"),
      advice: "put the parent image beside it")
  }

  /// The names of regular `.vdi` files (any case) in `directory`, sorted; none if it
  /// cannot be listed.
  static func vdiFiles(in directory: String) -> [String] {
    guard let handle = opendir(directory.isEmpty ? "." : directory) else { return [] }
    defer { closedir(handle) }
    var names: [String] = []
    var seen = 0
    while seen < entriesLimit, let entry = readdir(handle) {
      seen += 1
      let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
        String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
      }
      if name.lowercased().hasSuffix(".vdi") { names.append(name) }
    }
    return names.sorted()
  }

  /// The image and modification UUIDs of the VDI at `path`, or nil when it is not a
  /// readable regular file with a VDI 1.1 header.
  static func uuids(of path: String) -> (image: VDIHeader.UUID, modification: VDIHeader.UUID)? {
    guard let file = try? ImageFile.openForReading(path), !file.isBlockDevice else { return nil }
    defer { file.close() }
    guard let bytes = try? file.readBytes(count: 0x200, at: 0, what: "VDI header") else { return nil }
    let le = VDILittleEndian(bytes)
    guard le.uint32(0x40) == 0xBEDA_107F, le.uint32(0x44) == VDIHeader.supportedVersion else { return nil }
    return (VDIHeader.UUID(bytes: Array(bytes[0x188..<0x198])), VDIHeader.UUID(bytes: Array(bytes[0x198..<0x1A8])))
  }
}

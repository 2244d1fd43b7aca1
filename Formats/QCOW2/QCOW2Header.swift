import Compression
import DiskImage

/// The qcow2 header and its extensions, every field checked before anything relies on it.
/// Layout (big-endian) per qemu's docs/interop/qcow2.txt; see README.md beside this file.
struct QCOW2Header {
  var version: UInt32
  var clusterBits: Int
  var virtualSize: Int64
  var l1Size: Int
  var l1TableOffset: Int64
  var refcountTableOffset: Int64
  var refcountTableClusters: Int64
  var snapshotCount: Int
  var snapshotsOffset: Int64
  var incompatibleFeatures: UInt64
  var compatibleFeatures: UInt64
  var autoclearFeatures: UInt64
  var refcountOrder: Int
  var headerLength: Int
  var compressionType: CompressionType
  var backingName: String?
  var backingFormat: String?
  /// The bitmaps extension, when present and marked consistent by its autoclear bit.
  var bitmaps: BitmapsExtension?

  var clusterSize: Int { 1 << clusterBits }
  var isDirty: Bool { incompatibleFeatures & Feature.dirty != 0 }
  var isCorrupt: Bool { incompatibleFeatures & Feature.corrupt != 0 }
  var hasExtendedL2: Bool { incompatibleFeatures & Feature.extendedL2 != 0 }
  var hasLazyRefcounts: Bool { compatibleFeatures & Feature.lazyRefcounts != 0 }

  enum Feature {
    static let dirty: UInt64 = 1 << 0
    static let corrupt: UInt64 = 1 << 1
    static let externalDataFile: UInt64 = 1 << 2
    static let compressionType: UInt64 = 1 << 3
    static let extendedL2: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = dirty | corrupt | externalDataFile | compressionType | extendedL2
    static let lazyRefcounts: UInt64 = 1 << 0
    static let bitmapsConsistent: UInt64 = 1 << 0
    /// Autoclear bit 1: the external data file reads as a raw image.
    static let rawExternalData: UInt64 = 1 << 1
  }

  enum ExtensionType {
    static let end: UInt32 = 0
    static let backingFormat: UInt32 = 0xe279_2aca
    static let featureNames: UInt32 = 0x6803_f857
    static let bitmaps: UInt32 = 0x2385_2875
    static let encryption: UInt32 = 0x0537_be77
    static let externalDataFile: UInt32 = 0x4441_5441
  }

  struct BitmapsExtension {
    var count: Int
    var directorySize: Int64
    var directoryOffset: Int64
  }

  static let version2Length = 72
  static let version3MinimumLength = 104
  static let maximumBackingNameLength = 1023
  /// qemu's limit on the active L1 table (32 MiB); also caps what we allocate for it.
  static let maximumL1Bytes = 32 << 20
  /// qemu's limit on internal snapshots.
  static let maximumSnapshots = 65536
  /// The fixed part of a snapshot table entry; the id and name follow it.
  static let minimumSnapshotEntryBytes = 40
  /// qemu's limit on the refcount table (8 MiB).
  static let maximumRefcountTableBytes = 8 << 20
  /// The largest cluster qemu opens (2 MiB); cluster_bits beyond it are refused as unsupported.
  static let maximumClusterBits = 21

  /// Reads and checks the header of `file`, whose size is `fileSize`. `tablesMayPassEnd`
  /// (for `check`, as qemu opens an image to check it) lets the L1, refcount and snapshot
  /// tables run past the end of the file, where they read as zeros.
  static func read(from file: ByteSource, fileSize: Int64, tablesMayPassEnd: Bool = false) throws -> QCOW2Header {
    let path = file.name
    func invalid(_ message: String) -> ImageError { .invalid(path: path, message) }
    func unsupported(_ message: String) -> ImageError { .unsupported(path: path, message) }

    guard fileSize >= Int64(version2Length) else {
      throw invalid("file of \(fileSize) bytes is too short for a qcow2 header (at least \(version2Length))")
    }
    let fixed = BigEndianReader(try file.readBytes(count: version2Length, at: 0, what: "qcow2 header"))
    let magic = fixed.uint32(at: 0)!
    guard magic == 0x5146_49fb else {
      throw invalid("not a qcow2 image: magic is \(hex(UInt64(magic))), expected 0x514649fb (QFI\\xfb)")
    }
    let version = fixed.uint32(at: 4)!
    guard version == 2 || version == 3 else {
      if version == 1 { throw unsupported("qcow version 1 is not supported (only qcow2: versions 2 and 3)") }
      throw unsupported("qcow2 version \(version) is not supported (expected 2 or 3)")
    }
    let rawClusterBits = fixed.uint32(at: 20)!
    guard rawClusterBits >= 9, rawClusterBits < 64 else {
      throw invalid("cluster_bits is \(rawClusterBits), expected 9 to \(maximumClusterBits)")
    }
    guard rawClusterBits <= UInt32(maximumClusterBits) else {
      throw unsupported(
        "cluster_bits is \(rawClusterBits) (clusters of 2^\(rawClusterBits) bytes); clusters larger than 2 MiB (cluster_bits \(maximumClusterBits)) are not supported")
    }
    let clusterBits = Int(rawClusterBits)
    let clusterSize = 1 << clusterBits

    // Everything the header and its extensions may use lies in the first cluster.
    let firstClusterLength = Int(min(Int64(clusterSize), fileSize))
    let bytes = try file.readBytes(count: firstClusterLength, at: 0, what: "qcow2 header cluster")
    let reader = BigEndianReader(bytes)

    let rawSize = reader.uint64(at: 24)!
    guard rawSize <= UInt64(Int64.max) else {
      throw invalid("virtual size \(rawSize) is 2^63 or more")
    }
    let virtualSize = Int64(rawSize)
    let cryptMethod = reader.uint32(at: 32)!
    guard cryptMethod == 0 else {
      throw unsupported("encrypted images are not supported (crypt_method \(cryptMethod))")
    }

    var header = QCOW2Header(
      version: version, clusterBits: clusterBits, virtualSize: virtualSize, l1Size: 0,
      l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 0, snapshotCount: 0,
      snapshotsOffset: 0, incompatibleFeatures: 0, compatibleFeatures: 0, autoclearFeatures: 0,
      refcountOrder: 4, headerLength: version2Length, compressionType: .zlib)

    if version >= 3 {
      guard let length = reader.uint32(at: 100) else {
        throw invalid("version 3 header needs \(version3MinimumLength) bytes, file has \(bytes.count)")
      }
      guard length >= UInt32(version3MinimumLength), length % 8 == 0, length <= UInt32(clusterSize) else {
        throw invalid(
          "header_length is \(length), expected a multiple of 8 from \(version3MinimumLength) to the cluster size \(clusterSize)")
      }
      guard Int(length) <= bytes.count else {
        throw invalid("header_length \(length) runs past the end of the file (size \(hex(fileSize)))")
      }
      header.headerLength = Int(length)
      header.incompatibleFeatures = reader.uint64(at: 72)!
      header.compatibleFeatures = reader.uint64(at: 80)!
      header.autoclearFeatures = reader.uint64(at: 88)!
      let refcountOrder = reader.uint32(at: 96)!
      guard refcountOrder <= 6 else {
        throw invalid("refcount_order is \(refcountOrder), expected 0 to 6")
      }
      header.refcountOrder = Int(refcountOrder)
    }

    let extensions = try readExtensions(in: reader, from: header.headerLength, path: path)
    try header.checkIncompatibleFeatures(names: extensions.featureNames, path: path)

    // compression_type (byte 104) counts only when header_length covers it.
    let compressionCode = header.headerLength > 104 ? reader.uint8(at: 104)! : 0
    if header.incompatibleFeatures & Feature.compressionType != 0 {
      guard header.headerLength > 104 else {
        throw invalid("compression type bit is set but header_length \(header.headerLength) leaves out compression_type")
      }
      guard compressionCode != 0 else {
        throw invalid("compression type bit is set but compression_type is 0 (zlib), expected a non-zlib type")
      }
    } else if compressionCode != 0 {
      throw invalid("compression_type is \(compressionCode) but the compression type bit (incompatible bit 3) is not set")
    }
    guard let compressionType = CompressionType(qcow2Code: compressionCode) else {
      throw unsupported("compression_type \(compressionCode) is not supported (expected 0 zlib or 1 zstd)")
    }
    header.compressionType = compressionType

    if header.hasExtendedL2 && clusterBits < 14 {
      throw invalid("extended L2 entries need clusters of at least 16 KiB, cluster_bits is \(clusterBits)")
    }

    try header.readTables(from: reader, fileSize: tablesMayPassEnd ? Int64.max : fileSize, path: path)
    try header.readBacking(from: reader, bytes: bytes, path: path)
    header.backingFormat = extensions.backingFormat
    if header.autoclearFeatures & Feature.bitmapsConsistent != 0 {
      header.bitmaps = extensions.bitmaps
    }
    return header
  }

  /// Reads the L1, refcount and snapshot table fields and checks them against the file.
  private mutating func readTables(from reader: BigEndianReader, fileSize: Int64, path: String) throws {
    func invalid(_ message: String) -> ImageError { .invalid(path: path, message) }
    let clusterSize = Int64(self.clusterSize)

    let rawL1Size = reader.uint32(at: 36)!
    guard Int(rawL1Size) <= Self.maximumL1Bytes / 8 else {
      throw ImageError.unsupported(
        path: path, "L1 table of \(rawL1Size) entries is larger than the 32 MiB limit (\(Self.maximumL1Bytes / 8) entries)")
    }
    l1Size = Int(rawL1Size)
    // Each L1 entry covers one L2 table's worth of clusters.
    let l2Span = clusterSize * Int64(l2EntriesPerTable)
    let neededL1Entries = virtualSize / l2Span + (virtualSize % l2Span == 0 ? 0 : 1)
    guard Int64(l1Size) >= neededL1Entries else {
      throw invalid("L1 table has \(l1Size) entries, the virtual size \(virtualSize) needs \(neededL1Entries)")
    }
    let rawL1Offset = reader.uint64(at: 40)!
    if l1Size > 0 {
      guard rawL1Offset % UInt64(clusterSize) == 0 else {
        throw invalid("L1 table offset \(hex(rawL1Offset)) is not aligned to the cluster size \(hex(clusterSize))")
      }
      guard rawL1Offset != 0 else { throw invalid("L1 table offset is 0, inside the header cluster") }
      guard rawL1Offset < UInt64(fileSize), UInt64(fileSize) - rawL1Offset >= UInt64(l1Size) * 8 else {
        throw invalid(
          "L1 table at \(hex(rawL1Offset)) (\(l1Size) entries) runs past the end of the file (size \(hex(fileSize)))")
      }
    }
    // With no L1 entries the offset means nothing (and may be any 64-bit value).
    l1TableOffset = l1Size > 0 ? Int64(rawL1Offset) : 0

    let rawRefcountOffset = reader.uint64(at: 48)!
    guard rawRefcountOffset % UInt64(clusterSize) == 0 else {
      throw invalid("refcount table offset \(hex(rawRefcountOffset)) is not aligned to the cluster size \(hex(clusterSize))")
    }
    let rawRefcountClusters = reader.uint32(at: 56)!
    guard rawRefcountOffset <= UInt64(Int64.max) - UInt64(rawRefcountClusters) * UInt64(clusterSize) else {
      throw invalid("refcount table at \(hex(rawRefcountOffset)) (\(rawRefcountClusters) clusters) is beyond any file")
    }
    // We never read refcounts, but a table qemu would refuse, or one the file does not
    // hold, says the header is damaged.
    guard UInt64(rawRefcountClusters) * UInt64(clusterSize) <= UInt64(Self.maximumRefcountTableBytes) else {
      throw invalid(
        "refcount table of \(rawRefcountClusters) clusters is larger than the 8 MiB limit (\(Self.maximumRefcountTableBytes / Int(clusterSize)) clusters)")
    }
    guard rawRefcountOffset + UInt64(rawRefcountClusters) * UInt64(clusterSize) <= UInt64(fileSize)
      || rawRefcountClusters == 0
    else {
      throw invalid(
        "refcount table at \(hex(rawRefcountOffset)) (\(rawRefcountClusters) clusters) runs past the end of the file (size \(hex(fileSize)))")
    }
    refcountTableOffset = Int64(rawRefcountOffset)
    refcountTableClusters = Int64(rawRefcountClusters)

    let rawSnapshotCount = reader.uint32(at: 60)!
    let rawSnapshotsOffset = reader.uint64(at: 64)!
    if rawSnapshotCount > 0 {
      guard rawSnapshotCount <= UInt32(Self.maximumSnapshots) else {
        throw invalid("\(rawSnapshotCount) snapshots, more than the limit of \(Self.maximumSnapshots)")
      }
      guard rawSnapshotsOffset % UInt64(clusterSize) == 0 else {
        throw invalid("snapshot table offset \(hex(rawSnapshotsOffset)) is not aligned to the cluster size \(hex(clusterSize))")
      }
      // Each entry is at least 40 bytes (its fixed part), so the table's least extent is known.
      guard rawSnapshotsOffset < UInt64(fileSize),
        UInt64(fileSize) - rawSnapshotsOffset >= UInt64(rawSnapshotCount) * UInt64(Self.minimumSnapshotEntryBytes)
      else {
        throw invalid(
          "snapshot table at \(hex(rawSnapshotsOffset)) (\(rawSnapshotCount) snapshots, at least \(UInt64(rawSnapshotCount) * UInt64(Self.minimumSnapshotEntryBytes)) bytes) runs past the end of the file (size \(hex(fileSize)))")
      }
    }
    snapshotCount = Int(rawSnapshotCount)
    // With no snapshots the offset means nothing (and may be any 64-bit value).
    snapshotsOffset = rawSnapshotCount > 0 ? Int64(rawSnapshotsOffset) : 0
  }

  /// Reads the backing file name, which must lie in the first cluster after the header.
  private mutating func readBacking(from reader: BigEndianReader, bytes: [UInt8], path: String) throws {
    let offset = reader.uint64(at: 8)!
    guard offset != 0 else { return }
    let length = reader.uint32(at: 16)!
    guard length <= UInt32(Self.maximumBackingNameLength) else {
      throw ImageError.invalid(
        path: path, "backing file name is \(length) bytes long, at most \(Self.maximumBackingNameLength) allowed")
    }
    guard offset >= UInt64(headerLength), offset <= UInt64(clusterSize),
      UInt64(length) <= UInt64(clusterSize) - offset
    else {
      throw ImageError.invalid(
        path: path,
        "backing file name at \(hex(offset)) (\(length) bytes) is outside the header cluster (\(hex(UInt64(headerLength))) to \(hex(UInt64(clusterSize))))")
    }
    guard let name = reader.slice(at: Int(offset), count: Int(length)) else {
      throw ImageError.invalid(path: path, "backing file name at \(hex(offset)) runs past the end of the file")
    }
    guard !name.isEmpty, !name.contains(0) else {
      throw ImageError.invalid(path: path, "backing file name at \(hex(offset)) is empty or holds a NUL byte")
    }
    backingName = String(decoding: name, as: UTF8.self)
  }

  /// How many L2 entries fit in one cluster-sized L2 table.
  var l2EntriesPerTable: Int { clusterSize / (hasExtendedL2 ? 16 : 8) }

  /// What the header extensions said.
  struct Extensions {
    var backingFormat: String?
    var featureNames: [(type: UInt8, bit: UInt8, name: String)] = []
    var bitmaps: BitmapsExtension?
  }

  private static func readExtensions(in reader: BigEndianReader, from start: Int, path: String) throws -> Extensions {
    func invalid(_ message: String) -> ImageError { .invalid(path: path, message) }
    var result = Extensions()
    var offset = start
    var seen: Set<UInt32> = []
    // The extension area ends with an end marker, or at the end of the first cluster.
    while offset + 8 <= reader.bytes.count {
      let type = reader.uint32(at: offset)!
      let length = Int(reader.uint32(at: offset + 4)!)
      if type == ExtensionType.end { break }
      let dataStart = offset + 8
      guard let data = reader.slice(at: dataStart, count: length) else {
        throw invalid(
          "header extension \(hex(UInt64(type))) at \(hex(UInt64(offset))) (\(length) bytes) runs past the header cluster (\(hex(UInt64(reader.bytes.count))))")
      }
      let mustBeUnique = type == ExtensionType.backingFormat || type == ExtensionType.featureNames
        || type == ExtensionType.bitmaps
      if mustBeUnique, !seen.insert(type).inserted {
        throw invalid("header extension \(hex(UInt64(type))) appears twice")
      }
      switch type {
      case ExtensionType.backingFormat:
        guard !data.isEmpty, !data.contains(0) else {
          throw invalid("backing format extension at \(hex(UInt64(offset))) is empty or holds a NUL byte")
        }
        result.backingFormat = String(decoding: data, as: UTF8.self)
      case ExtensionType.featureNames:
        let entrySize = 48
        for entry in stride(from: dataStart, to: dataStart + length - entrySize + 1, by: entrySize) {
          let nameBytes = reader.bytes[(entry + 2)..<(entry + entrySize)].prefix { $0 != 0 }
          result.featureNames.append(
            (reader.bytes[entry], reader.bytes[entry + 1], String(decoding: nameBytes, as: UTF8.self)))
        }
      case ExtensionType.externalDataFile:
        throw ImageError.unsupported(path: path, "images with an external data file are not supported")
      case ExtensionType.encryption:
        throw ImageError.unsupported(path: path, "encrypted images are not supported (encryption header extension)")
      case ExtensionType.bitmaps:
        guard length >= 24 else {
          throw invalid("bitmaps extension is \(length) bytes, expected at least 24")
        }
        let count = reader.uint32(at: dataStart)!
        let directorySize = reader.uint64(at: dataStart + 8)!
        let directoryOffset = reader.uint64(at: dataStart + 16)!
        guard directorySize <= UInt64(BitmapDirectory.maximumSize), directoryOffset <= UInt64(Int64.max) else {
          throw invalid("bitmap directory at \(hex(directoryOffset)) of \(directorySize) bytes is beyond the \(BitmapDirectory.maximumSize) byte limit")
        }
        result.bitmaps = BitmapsExtension(
          count: Int(count), directorySize: Int64(directorySize), directoryOffset: Int64(directoryOffset))
      default:
        break  // Unknown extensions can be ignored, the spec says.
      }
      offset = dataStart + (length + 7) / 8 * 8
    }
    return result
  }

  /// Refuses incompatible features we do not implement, naming each one.
  private func checkIncompatibleFeatures(
    names: [(type: UInt8, bit: UInt8, name: String)], path: String
  ) throws {
    if incompatibleFeatures & Feature.externalDataFile != 0 {
      throw ImageError.unsupported(path: path, "images with an external data file are not supported (incompatible bit 2)")
    }
    let unknown = incompatibleFeatures & ~Feature.knownIncompatible
    guard unknown != 0 else { return }
    let bits = (0..<64).filter { unknown & (1 << UInt64($0)) != 0 }
    let described = bits.map { bit -> String in
      if let entry = names.first(where: { $0.type == 0 && Int($0.bit) == bit }), !entry.name.isEmpty {
        return "\(bit) (\(entry.name))"
      }
      return "\(bit)"
    }
    throw ImageError.unsupported(
      path: path,
      "unknown incompatible feature bit\(bits.count == 1 ? "" : "s") \(described.joined(separator: ", ")) set; this image needs a newer reader")
  }
}

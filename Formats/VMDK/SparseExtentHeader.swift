import DiskImage

/// The 512-byte header of a hosted sparse extent ("KDMV"), as stored: fields are only
/// decoded here, `SparseLayout` checks them. Layout (little-endian) per VMware's "Virtual
/// Disk Format 5.0"; see README.md beside this file.
struct SparseExtentHeader: Equatable {
  static let size = 512
  /// "KDMV": the little-endian u32 0x564d444b.
  static let magic: [UInt8] = [0x4b, 0x44, 0x4d, 0x56]
  /// `gdOffset` of a stream whose grain directory is found through the footer.
  static let gdAtEnd: UInt64 = .max
  /// The four bytes at offset 73 of an undamaged header: "\n", " ", "\r", "\n".
  static let newlineCheck: [UInt8] = [0x0a, 0x20, 0x0d, 0x0a]

  enum Flag {
    static let validNewlineCheck: UInt32 = 1 << 0
    static let redundantGrainTables: UInt32 = 1 << 1
    static let zeroedGrains: UInt32 = 1 << 2
    static let compressedGrains: UInt32 = 1 << 16
    static let markers: UInt32 = 1 << 17
  }

  var version: UInt32
  var flags: UInt32
  /// Sectors of the extent.
  var capacity: UInt64
  /// Sectors per grain.
  var grainSize: UInt64
  /// Sector of the embedded descriptor; 0 when there is none.
  var descriptorOffset: UInt64
  /// Sectors reserved for the embedded descriptor.
  var descriptorSize: UInt64
  var numGTEsPerGT: UInt32
  var rgdOffset: UInt64
  var gdOffset: UInt64
  var overHead: UInt64
  var uncleanShutdown: Bool
  var newlineBytes: [UInt8]
  var compressAlgorithm: UInt16

  /// Decodes a header from `bytes` (at least 512 of them, starting with the magic); nil
  /// when the magic is not there.
  init?(_ bytes: [UInt8]) {
    guard bytes.count >= Self.size, bytes.starts(with: Self.magic) else { return nil }
    let le = LittleEndianReader(bytes)
    version = le.uint32(at: 4)!
    flags = le.uint32(at: 8)!
    capacity = le.uint64(at: 12)!
    grainSize = le.uint64(at: 20)!
    descriptorOffset = le.uint64(at: 28)!
    descriptorSize = le.uint64(at: 36)!
    numGTEsPerGT = le.uint32(at: 44)!
    rgdOffset = le.uint64(at: 48)!
    gdOffset = le.uint64(at: 56)!
    overHead = le.uint64(at: 64)!
    uncleanShutdown = bytes[72] != 0
    newlineBytes = Array(bytes[73..<77])
    compressAlgorithm = le.uint16(at: 77)!
  }

  var isCompressed: Bool { compressAlgorithm == 1 }
  var hasMarkers: Bool { flags & Flag.markers != 0 }
  var honoursZeroedGrains: Bool { flags & Flag.zeroedGrains != 0 }
}

/// The checked geometry of a sparse extent: every size bounded and every table inside the
/// file, so nothing read later needs to re-check a header field.
struct SparseLayout {
  /// The header in force: the footer's when the first header says GD_AT_END.
  var header: SparseExtentHeader
  var virtualSize: Int64
  var grainBytes: Int
  var entriesPerTable: Int
  /// Bytes of the virtual disk one grain table maps.
  var tableSpan: Int64
  var directoryOffset: Int64
  var directoryEntries: Int
  var descriptorRange: Range<Int64>
  /// The footer marker, footer and end-of-stream marker, when the grain directory was
  /// found through them.
  var footerRange: Range<Int64>?

  /// qemu's limits, which VMware's own images stay far inside: grains of at most 1 GiB,
  /// at most 512 entries per grain table, at most 32 Mi grain-directory entries.
  static let maximumGrainSectors: UInt64 = 1 << 21
  static let maximumEntriesPerTable: UInt32 = 512
  static let maximumDirectoryEntries: UInt64 = 32 << 20
  /// Compressed grains are inflated into buffers of one grain; larger ones are refused so a
  /// hostile header cannot make every reading thread allocate a gigabyte.
  static let maximumCompressedGrainBytes = 16 << 20
  /// The embedded descriptor is read whole; VMware reserves 20 sectors.
  static let maximumDescriptorSectors: UInt64 = 2048

  /// Checks `header` (the file's first 512 bytes) against the file's size and, for a stream
  /// whose grain directory is at the end, reads and checks the footer. `needsDescriptor`:
  /// the file is a whole image and must embed its descriptor; an extent of a descriptor's
  /// disk may have none (its `descriptorRange` is then empty).
  static func check(
    _ header: SparseExtentHeader, source: ByteSource, fileSize: Int64, needsDescriptor: Bool = true
  ) throws -> SparseLayout {
    let path = source.name
    func invalid(_ message: String) -> ImageError { .invalid(path: path, message) }
    func unsupported(_ message: String) -> ImageError { .unsupported(path: path, message) }

    guard (1...3).contains(header.version) else {
      throw unsupported("VMDK sparse extent version \(header.version) is not supported (expected 1, 2 or 3)")
    }
    if header.flags & SparseExtentHeader.Flag.validNewlineCheck != 0,
      header.newlineBytes != SparseExtentHeader.newlineCheck
    {
      throw invalid(
        "the header's newline check bytes are \(header.newlineBytes.map { hex(UInt64($0)) }.joined(separator: " ")), expected 0xa 0x20 0xd 0xa: the file was damaged by a text-mode transfer")
    }
    guard header.compressAlgorithm <= 1 else {
      throw unsupported("compression algorithm \(header.compressAlgorithm) is not supported (expected 0 none or 1 deflate)")
    }
    if header.flags & SparseExtentHeader.Flag.compressedGrains != 0, !header.isCompressed {
      throw invalid("the flags say grains are compressed (0x10000) but the compression algorithm is 0 (none)")
    }
    if header.descriptorOffset == 0, needsDescriptor {
      throw unsupported(
        "this sparse extent has no embedded descriptor: it is one extent of a split (twoGbMaxExtentSparse) disk; open the disk's descriptor .vmdk instead")
    }

    // The embedded descriptor.
    var descriptorRange: Range<Int64> = 0..<0
    if header.descriptorOffset != 0 {
      guard header.descriptorSize > 0, header.descriptorSize <= maximumDescriptorSectors else {
        throw invalid(
          "the embedded descriptor's size is \(header.descriptorSize) sectors, expected 1 to \(maximumDescriptorSectors)")
      }
      guard let descriptorStart = byteOffset(ofSector: header.descriptorOffset),
        descriptorStart + Int64(header.descriptorSize) * 512 <= fileSize
      else {
        throw invalid(
          "the embedded descriptor at sector \(header.descriptorOffset) (\(header.descriptorSize) sectors) is past the end of the file (size \(hex(fileSize)))")
      }
      descriptorRange = descriptorStart..<descriptorStart + Int64(header.descriptorSize) * 512
    }

    // A stream written in one pass records the grain directory only in its footer.
    var inForce = header
    var footerRange: Range<Int64>?
    if header.gdOffset == SparseExtentHeader.gdAtEnd {
      let footer = try readFooter(source: source, fileSize: fileSize)
      for (name, first, last) in [
        ("version", UInt64(header.version), UInt64(footer.version)), ("capacity", header.capacity, footer.capacity),
        ("grainSize", header.grainSize, footer.grainSize),
        ("numGTEsPerGT", UInt64(header.numGTEsPerGT), UInt64(footer.numGTEsPerGT)),
        ("compressAlgorithm", UInt64(header.compressAlgorithm), UInt64(footer.compressAlgorithm)),
      ] where first != last {
        throw invalid("the footer's \(name) is \(last), the header's \(first): they must agree")
      }
      guard footer.gdOffset != SparseExtentHeader.gdAtEnd else {
        throw invalid("the footer's grain directory offset is GD_AT_END too: the grain directory cannot be found")
      }
      inForce.gdOffset = footer.gdOffset
      inForce.rgdOffset = footer.rgdOffset
      footerRange = fileSize - 1536..<fileSize
    }

    // Grains and grain tables.
    let grainSize = inForce.grainSize
    guard grainSize > 0, grainSize & (grainSize - 1) == 0, grainSize <= maximumGrainSectors else {
      throw invalid(
        "the grain size is \(grainSize) sectors, expected a power of two from 1 to \(maximumGrainSectors) (1 GiB)")
    }
    let grainBytes = Int(grainSize) * 512
    if inForce.isCompressed, grainBytes > maximumCompressedGrainBytes {
      throw unsupported(
        "compressed grains of \(grainBytes) bytes are not supported (at most \(maximumCompressedGrainBytes))")
    }
    guard inForce.numGTEsPerGT > 0, inForce.numGTEsPerGT <= maximumEntriesPerTable else {
      throw invalid("a grain table has \(inForce.numGTEsPerGT) entries, expected 1 to \(maximumEntriesPerTable)")
    }
    let entriesPerTable = Int(inForce.numGTEsPerGT)
    let tableSpanSectors = UInt64(entriesPerTable) * grainSize

    // The capacity bounds the grain directory, which must lie in the file.
    let capacity = inForce.capacity
    let directoryEntries = capacity / tableSpanSectors + (capacity % tableSpanSectors == 0 ? 0 : 1)
    guard directoryEntries <= maximumDirectoryEntries else {
      throw invalid(
        "the capacity of \(capacity) sectors needs \(directoryEntries) grain directory entries, more than \(maximumDirectoryEntries): the capacity is absurd")
    }
    guard let virtualSize = byteOffset(ofSector: capacity) else {
      throw invalid("the capacity of \(capacity) sectors is absurd: it does not fit in 63 bits of bytes")
    }
    guard let directoryStart = byteOffset(ofSector: inForce.gdOffset), inForce.gdOffset > 0 else {
      throw invalid("the grain directory offset is sector \(inForce.gdOffset), which is not in the file")
    }
    let directoryBytes = Int64(directoryEntries) * 4
    guard directoryStart <= fileSize - directoryBytes else {
      throw invalid(
        "the grain directory at sector \(inForce.gdOffset) (\(directoryEntries) entries) is past the end of the file (size \(hex(fileSize)))")
    }
    let directoryRange = directoryStart..<directoryStart + directoryBytes
    guard directoryEntries == 0 || !directoryRange.overlaps(0..<Int64(SparseExtentHeader.size)) else {
      throw invalid("the grain directory at sector \(inForce.gdOffset) overlaps the header")
    }
    guard directoryEntries == 0 || descriptorRange.isEmpty || !directoryRange.overlaps(descriptorRange) else {
      throw invalid("the grain directory at sector \(inForce.gdOffset) overlaps the embedded descriptor")
    }
    guard let overHeadBytes = byteOffset(ofSector: header.overHead), overHeadBytes <= fileSize else {
      throw invalid(
        "the file (size \(hex(fileSize))) is shorter than the \(header.overHead) sectors of metadata its header promises: it is truncated")
    }

    return SparseLayout(
      header: inForce, virtualSize: virtualSize, grainBytes: grainBytes, entriesPerTable: entriesPerTable,
      tableSpan: Int64(tableSpanSectors) * 512, directoryOffset: directoryStart, directoryEntries: Int(directoryEntries),
      descriptorRange: descriptorRange, footerRange: footerRange)
  }

  /// The byte offset of `sector`, or nil when it does not fit in an Int64.
  static func byteOffset(ofSector sector: UInt64) -> Int64? {
    sector <= UInt64(Int64.max / 512) ? Int64(sector) * 512 : nil
  }

  /// The footer of a stream: a footer marker, a copy of the header with the real grain
  /// directory offset, and the end-of-stream marker, which are the file's last 1536 bytes.
  private static func readFooter(source: ByteSource, fileSize: Int64) throws -> SparseExtentHeader {
    let path = source.name
    let missing =
      "the header's grain directory offset is GD_AT_END, but the file does not end with a footer marker, a footer and an end-of-stream marker"
    guard fileSize >= 512 + 1536 else { throw ImageError.invalid(path: path, "\(missing) (it is too short)") }
    let bytes = try source.readBytes(count: 1536, at: fileSize - 1536, what: "the stream's footer")
    let marker = LittleEndianReader(bytes)
    let endMarker = LittleEndianReader(bytes, base: 1024)
    guard marker.uint64(at: 0) == 1, marker.uint32(at: 8) == 0, marker.uint32(at: 12) == MarkerType.footer,
      endMarker.uint64(at: 0) == 0, endMarker.uint32(at: 8) == 0, endMarker.uint32(at: 12) == MarkerType.endOfStream
    else {
      throw ImageError.invalid(path: path, "\(missing) (truncated, or something follows the end-of-stream marker)")
    }
    guard let footer = SparseExtentHeader(Array(bytes[512..<1024])) else {
      throw ImageError.invalid(path: path, "the footer at \(hex(fileSize - 1024)) does not start with KDMV")
    }
    return footer
  }
}

/// The `type` of a metadata marker in a streamOptimized file.
enum MarkerType {
  static let endOfStream: UInt32 = 0
  static let grainTable: UInt32 = 1
  static let grainDirectory: UInt32 = 2
  static let footer: UInt32 = 3
}

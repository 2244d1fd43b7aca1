import DiskImage

/// The pre-header and the version 1.1 header of a VDI file (its first 512 bytes), read
/// field by field (all little-endian) and checked so that every later computation on
/// them stays far from overflow.
struct VDIHeader {
  /// What the image is; VirtualBox's numbering.
  enum ImageType: UInt32 {
    /// "Normal": blocks are allocated as they are written.
    case dynamic = 1
    /// Every block allocated when the image is made.
    case fixed = 2
    /// VirtualBox's old undo images: refused.
    case undo = 3
    /// A snapshot: free blocks belong to the parent image.
    case differencing = 4
  }

  /// A UUID as the file stores it (Microsoft GUID byte order); compared byte for byte.
  struct UUID: Equatable, CustomStringConvertible {
    var bytes: [UInt8]
    var isNull: Bool { bytes.allSatisfy { $0 == 0 } }

    /// The usual text form: the first three fields are stored little-endian.
    var description: String {
      let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
      return order.map { $0 < 0 ? "-" : hexByte(bytes[$0]) }.joined()
    }
  }

  var version: UInt32
  var headerSize: UInt32
  var imageType: ImageType
  var flags: UInt32
  /// Byte offset of the block map.
  var mapOffset: Int64
  /// Byte offset of data block 0.
  var dataOffset: Int64
  var sectorSize: UInt32
  /// The virtual size in bytes, exactly as recorded.
  var diskSize: Int64
  var blockSize: Int64
  /// Private bytes stored before each block's data (0 in every image seen).
  var blockExtra: Int64
  /// Entries in the block map.
  var blockCount: Int64
  /// Data blocks present in the file; every data entry of the map is below this.
  var blocksAllocated: Int64
  var imageUUID: UUID
  var modificationUUID: UUID
  /// Differencing: the parent's image UUID.
  var linkUUID: UUID
  /// Differencing: the parent's modification UUID when the snapshot was taken.
  var parentModificationUUID: UUID

  /// The only version read: 1.1 (major << 16 | minor).
  static let supportedVersion: UInt32 = 0x0001_0001
  /// The header fields start after the signature and the version; `headerSize` counts from here.
  static let fieldsOffset = 0x48
  static let smallestHeaderSize: UInt32 = 0x180
  /// Room left in the first 512 bytes for the header.
  static let largestHeaderSize: UInt32 = 0x200 - 0x48
  static let smallestBlockSize: Int64 = 512
  static let largestBlockSize: Int64 = 256 << 20
  /// qemu's limit (512 TiB with 1 MiB blocks): a block map of up to 2 GiB.
  static let largestBlockCount: Int64 = 0x1FFF_FF80

  /// Bytes of private data plus data per block in the file.
  var blockStride: Int64 { blockSize + blockExtra }
  /// Where the block map ends.
  var mapEnd: Int64 { mapOffset + blockCount * 4 }

  /// Reads and checks the header of `source` (`fileSize` bytes long).
  static func read(from source: ByteSource, fileSize: Int64) throws -> VDIHeader {
    let path = source.name
    func invalid(_ message: String) -> ImageError { .invalid(path: path, message) }
    guard fileSize >= 0x200 else {
      throw invalid("the file is \(fileSize) bytes, too short for a VDI header (512 bytes)")
    }
    let bytes = try source.readBytes(count: 0x200, at: 0, what: "VDI header")
    let le = VDILittleEndian(bytes)
    let signature = le.uint32(0x40)
    guard signature == 0xBEDA_107F else {
      throw invalid("signature at 0x40 is \(hex(UInt64(signature))), expected 0xbeda107f")
    }
    let version = le.uint32(0x44)
    guard version == supportedVersion else {
      throw ImageError.unsupported(
        path: path, "VDI version \(version >> 16).\(version & 0xffff) is not supported (only 1.1 is read)")
    }
    let headerSize = le.uint32(0x48)
    guard headerSize >= smallestHeaderSize, headerSize <= largestHeaderSize else {
      throw invalid(
        "header size is \(hex(UInt64(headerSize))), expected \(hex(UInt64(smallestHeaderSize)))..\(hex(UInt64(largestHeaderSize)))")
    }
    let typeValue = le.uint32(0x4C)
    guard let imageType = ImageType(rawValue: typeValue) else {
      throw invalid("image type is \(typeValue), expected 1 (dynamic), 2 (fixed) or 4 (differencing)")
    }
    if imageType == .undo {
      throw ImageError.unsupported(path: path, "is a VirtualBox undo image (type 3), which is not read")
    }

    let sectorSize = le.uint32(0x168)
    guard sectorSize == 512 else { throw invalid("sector size is \(sectorSize), expected 512") }

    let blockSize = Int64(le.uint32(0x178))
    guard blockSize >= smallestBlockSize, blockSize <= largestBlockSize, blockSize & (blockSize - 1) == 0 else {
      throw invalid("block size is \(blockSize), expected a power of two from 512 to \(largestBlockSize)")
    }
    let blockExtra = Int64(le.uint32(0x17C))
    guard blockExtra == 0 || (blockExtra <= blockSize && blockExtra & (blockExtra - 1) == 0) else {
      throw invalid("block extra is \(blockExtra), expected 0 or a power of two up to the block size \(blockSize)")
    }
    let blockCount = Int64(le.uint32(0x180))
    guard blockCount <= largestBlockCount else {
      throw invalid("block count is \(blockCount), more than the largest allowed (\(largestBlockCount))")
    }
    // blockCount * blockSize < 2^29 * 2^28: no overflow in Int64.
    let rawDiskSize = le.uint64(0x170)
    let capacity = blockCount * blockSize
    guard rawDiskSize <= UInt64(capacity) else {
      throw invalid(
        "disk size \(rawDiskSize) is larger than its \(blockCount) blocks of \(blockSize) bytes (\(capacity))")
    }
    let diskSize = Int64(rawDiskSize)
    let blocksNeeded = (diskSize + blockSize - 1) / blockSize
    guard blockCount == blocksNeeded else {
      throw invalid(
        "disk size \(diskSize) needs \(blocksNeeded) blocks of \(blockSize) bytes, but the block map has \(blockCount)")
    }
    let blocksAllocated = Int64(le.uint32(0x184))
    guard blocksAllocated <= blockCount else {
      throw invalid("\(blocksAllocated) blocks are allocated, more than the \(blockCount) blocks of the disk")
    }

    let headerEnd = Int64(fieldsOffset) + Int64(headerSize)
    let mapOffset = Int64(le.uint32(0x154))
    guard mapOffset >= headerEnd else {
      throw invalid("block map at \(hex(mapOffset)) overlaps the header (which ends at \(hex(headerEnd)))")
    }
    let mapEnd = mapOffset + blockCount * 4
    guard mapEnd <= fileSize else {
      throw invalid(
        "block map at \(hex(mapOffset)) (\(blockCount) entries, \(blockCount * 4) bytes) "
          + "runs past the end of the file (size \(hex(fileSize)))")
    }
    let dataOffset = Int64(le.uint32(0x158))
    guard dataOffset >= mapEnd else {
      throw invalid("data at \(hex(dataOffset)) overlaps the block map (\(hex(mapOffset))..\(hex(mapEnd)))")
    }

    func uuid(_ offset: Int) -> UUID { UUID(bytes: Array(bytes[offset..<offset + 16])) }
    let header = VDIHeader(
      version: version, headerSize: headerSize, imageType: imageType, flags: le.uint32(0x50),
      mapOffset: mapOffset, dataOffset: dataOffset, sectorSize: sectorSize, diskSize: diskSize,
      blockSize: blockSize, blockExtra: blockExtra, blockCount: blockCount, blocksAllocated: blocksAllocated,
      imageUUID: uuid(0x188), modificationUUID: uuid(0x198), linkUUID: uuid(0x1A8),
      parentModificationUUID: uuid(0x1B8))
    if imageType == .differencing && header.linkUUID.isNull {
      throw invalid("is a differencing VDI whose parent UUID (link UUID at 0x1a8) is null")
    }
    return header
  }
}

/// Little-endian integers at fixed offsets of a byte array the caller has sized.
struct VDILittleEndian {
  let bytes: [UInt8]
  init(_ bytes: [UInt8]) { self.bytes = bytes }

  func uint32(_ offset: Int) -> UInt32 {
    var value: UInt32 = 0
    for i in (0..<4).reversed() { value = value << 8 | UInt32(bytes[offset + i]) }
    return value
  }

  func uint64(_ offset: Int) -> UInt64 {
    UInt64(uint32(offset)) | UInt64(uint32(offset + 4)) << 32
  }
}

private func hexByte(_ byte: UInt8) -> String {
  let digits = String(byte, radix: 16)
  return digits.count == 1 ? "0" + digits : digits
}

extension VDIHeader {
  /// The informational text qemu-img writes: readers that check the text at all know it,
  /// and VirtualBox and qemu ignore it.
  static let qemuText = "<<< QEMU VM Virtual Disk Image >>>\n"

  /// The 512 bytes of pre-header and header (version 1.1, `headerSize` bytes of fields)
  /// as they go into the file, little-endian; the legacy geometry, the description and
  /// the padding are zero, as qemu-img writes them.
  func encoded(text: String = VDIHeader.qemuText) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 0x200)
    func put(_ value: UInt64, at offset: Int, size: Int) {
      for i in 0..<size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * i)) }
    }
    func put32(_ value: UInt32, at offset: Int) { put(UInt64(value), at: offset, size: 4) }
    for (i, byte) in text.utf8.prefix(63).enumerated() { bytes[i] = byte }
    put32(0xBEDA_107F, at: 0x40)
    put32(version, at: 0x44)
    put32(headerSize, at: 0x48)
    put32(imageType.rawValue, at: 0x4C)
    put32(flags, at: 0x50)
    put32(UInt32(mapOffset), at: 0x154)
    put32(UInt32(dataOffset), at: 0x158)
    put32(sectorSize, at: 0x168)
    put(UInt64(diskSize), at: 0x170, size: 8)
    put32(UInt32(blockSize), at: 0x178)
    put32(UInt32(blockExtra), at: 0x17C)
    put32(UInt32(blockCount), at: 0x180)
    put32(UInt32(blocksAllocated), at: 0x184)
    for (offset, uuid) in [
      (0x188, imageUUID), (0x198, modificationUUID), (0x1A8, linkUUID), (0x1B8, parentModificationUUID),
    ] {
      bytes.replaceSubrange(offset..<offset + 16, with: uuid.bytes)
    }
    return bytes
  }
}

extension VDIHeader.UUID {
  static let null = VDIHeader.UUID(bytes: [UInt8](repeating: 0, count: 16))

  /// A random (version 4) UUID, stored as the file stores UUIDs: the first three fields
  /// little-endian, as in a Microsoft GUID.
  static func random() -> VDIHeader.UUID {
    var generator = SystemRandomNumberGenerator()
    var rfc = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
    rfc[6] = rfc[6] & 0x0F | 0x40  // version 4
    rfc[8] = rfc[8] & 0x3F | 0x80  // RFC 4122 variant
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    return VDIHeader.UUID(bytes: order.map { rfc[$0] })
  }
}

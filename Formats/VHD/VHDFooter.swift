import DiskImage

/// The 512-byte footer every VHD ends with (and a dynamic or differencing VHD also starts
/// with): cookie, creator, sizes, geometry, disk type, checksum. Big-endian throughout.
struct VHDFooter {
  /// The disk types the footer names (offset 60).
  enum DiskType: UInt32 {
    case fixed = 2
    case dynamic = 3
    case differencing = 4
  }

  static let length = 512
  /// "conectix", the first eight bytes of the footer.
  static let cookie: [UInt8] = Array("conectix".utf8)
  /// qemu's limit on the virtual size in sectors (2040 GiB): larger images are refused.
  static let maximumSectors: UInt64 = 0xFF00_0000
  /// Creators whose footer's current size is the disk's size; every other creator's disk
  /// is as large as its CHS geometry (Virtual PC's rule, kept by qemu).
  static let currentSizeCreators: Set<String> = ["win ", "qem2", "d2v ", "CTXS", "tap\0"]

  var dataOffset: UInt64
  /// Four ASCII characters (`qemu`, `win `, `vpc `...), as stored.
  var creatorApplication: String
  var currentSize: UInt64
  var cylinders: Int
  var heads: Int
  var sectorsPerTrack: Int
  var diskType: DiskType
  var uniqueID: [UInt8]

  /// Whether `bytes` (at least 8 of them) start with the footer cookie.
  static func hasCookie(_ bytes: some Collection<UInt8>) -> Bool {
    bytes.count >= 8 && bytes.prefix(8).elementsEqual(cookie)
  }

  /// The one's complement of the sum of every byte of `bytes`, with the four bytes at
  /// `checksumOffset` counted as zero.
  static func checksum(_ bytes: [UInt8], checksumOffset: Int) -> UInt32 {
    var sum: UInt32 = 0
    for (index, byte) in bytes.enumerated() where !(checksumOffset..<checksumOffset + 4).contains(index) {
      sum &+= UInt32(byte)
    }
    return ~sum
  }

  /// Parses and checks a footer read at `offset` of the file named `path`.
  init(_ bytes: [UInt8], at offset: Int64, path: String) throws {
    func damage(_ message: String) -> ImageError {
      .invalid(path: path, "VHD footer at \(hex(offset)): \(message)")
    }
    let fields = BigEndianReader(bytes)
    guard bytes.count == Self.length, Self.hasCookie(bytes) else {
      throw damage("no 'conectix' cookie")
    }
    let stored = fields.uint32(at: 64)!
    let computed = Self.checksum(bytes, checksumOffset: 64)
    guard stored == computed else {
      throw damage("checksum is \(hex(UInt64(stored))), expected \(hex(UInt64(computed)))")
    }
    let type = fields.uint32(at: 60)!
    guard let diskType = DiskType(rawValue: type) else {
      throw ImageError.unsupported(
        path: path, "VHD footer at \(hex(offset)): disk type \(type) (known: 2 fixed, 3 dynamic, 4 differencing)")
    }
    self.diskType = diskType
    dataOffset = fields.uint64(at: 16)!
    creatorApplication = String(decoding: bytes[28..<32], as: UTF8.self)
    currentSize = fields.uint64(at: 48)!
    cylinders = Int(fields.uint16(at: 56)!)
    heads = Int(fields.uint8(at: 58)!)
    sectorsPerTrack = Int(fields.uint8(at: 59)!)
    uniqueID = Array(bytes[68..<84])
  }

  /// The virtual size as qemu-img 7.2 reports it: the CHS product for Virtual PC, Virtual
  /// Server, qemu (`qemu`) and unknown creators; the current size (rounded down to a sector)
  /// for Hyper-V, Disk2vhd, XenServer, XenConverter and `qem2`, and for any footer with the
  /// largest geometry. Larger than 2040 GiB is refused, as qemu refuses it.
  func virtualSize(path: String) throws -> Int64 {
    let usesGeometry =
      !Self.currentSizeCreators.contains(creatorApplication)
      && VHDGeometry(cylinders: cylinders, heads: heads, sectorsPerTrack: sectorsPerTrack) != .maximum
    // At most 65535 * 255 * 255 sectors: no overflow.
    let sectors = usesGeometry ? UInt64(cylinders * heads * sectorsPerTrack) : currentSize / 512
    guard sectors <= Self.maximumSectors else {
      throw ImageError.unsupported(
        path: path,
        "VHD of \(sectors) sectors is larger than 2040 GiB (\(Self.maximumSectors) sectors), the format's limit")
    }
    return Int64(sectors) * 512
  }
}

extension VHDFooter {
  /// Seconds from the Unix epoch to the footer's (2000-01-01 00:00:00 UTC).
  static let epochOffset: Int64 = 946_684_800

  /// The 512 bytes of a new footer, as qemu-img writes one: features 2 (the reserved bit),
  /// format version 1.0, creator `creator` version 5.3 (Virtual PC 2007) on `Wi2k`,
  /// original size = current size = `size`, saved state 0, and the checksum.
  ///
  /// - Parameters:
  ///   - diskType: fixed or dynamic.
  ///   - dataOffset: where the dynamic header is; all ones for a fixed disk.
  ///   - timestamp: seconds since 2000-01-01 00:00:00 UTC.
  ///   - creator: four ASCII characters (`qemu`, `qem2`).
  ///   - size: the disk's size in bytes.
  ///   - geometry: cylinders, heads, sectors per track.
  ///   - uniqueID: 16 bytes.
  static func encode(
    diskType: DiskType, dataOffset: UInt64, timestamp: UInt32, creator: String, size: UInt64,
    geometry: VHDGeometry, uniqueID: [UInt8]
  ) -> [UInt8] {
    precondition(creator.utf8.count == 4 && uniqueID.count == 16)
    var fields = BigEndianWriter(capacity: length)
    fields.append(contentsOf: cookie)
    fields.append(UInt32(2))  // features: the reserved bit, always set
    fields.append(UInt32(0x0001_0000))  // file format version 1.0
    fields.append(dataOffset)
    fields.append(timestamp)
    fields.append(contentsOf: creator.utf8)
    fields.append(UInt32(0x0005_0003))  // creator version
    fields.append(contentsOf: "Wi2k".utf8)  // creator host OS
    fields.append(size)  // original size
    fields.append(size)  // current size
    fields.append(UInt16(geometry.cylinders))
    fields.append(UInt8(geometry.heads))
    fields.append(UInt8(geometry.sectorsPerTrack))
    fields.append(diskType.rawValue)
    fields.append(UInt32(0))  // checksum, filled in below
    fields.append(contentsOf: uniqueID)
    var bytes = fields.bytes
    bytes += [UInt8](repeating: 0, count: length - bytes.count)  // saved state 0, reserved
    BigEndianWriter.store(checksum(bytes, checksumOffset: 64), at: 64, in: &bytes)
    return bytes
  }
}

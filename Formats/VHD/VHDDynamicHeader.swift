import DiskImage

/// The 1024-byte dynamic disk header of a dynamic or differencing VHD ("cxsparse"): where
/// the block allocation table is, how large a block is, and for a differencing disk who
/// its parent is.
struct VHDDynamicHeader {
  static let length = 1024
  static let cookie: [UInt8] = Array("cxsparse".utf8)
  /// Blocks from 512 bytes to 256 MiB: every tool writes 2 MiB (Hyper-V also 512 KiB and
  /// 32 MiB); larger ones would make a single sector bitmap absurd.
  static let blockSizes: ClosedRange<UInt32> = 512...(256 << 20)
  static let locatorCount = 8

  var tableOffset: UInt64
  var maxTableEntries: UInt32
  var blockSize: UInt32
  var parentUniqueID: [UInt8]
  /// The parent's name from the header (UTF-16 big-endian), NULs dropped; may be empty.
  var parentName: String
  var locators: [Locator]
  /// Set when the stored checksum differs (qemu never checks it, so neither do we refuse).
  var checksumWarning: String?

  /// One parent locator entry: a platform code and where its data lies in the file.
  struct Locator {
    var platformCode: String
    var dataLength: UInt32
    var dataOffset: UInt64
  }

  /// Parses and checks the header read at `offset` of the file named `path`.
  init(_ bytes: [UInt8], at offset: Int64, path: String) throws {
    func damage(_ message: String) -> ImageError {
      .invalid(path: path, "VHD dynamic header at \(hex(offset)): \(message)")
    }
    guard bytes.count == Self.length, bytes.prefix(8).elementsEqual(Self.cookie) else {
      throw damage("no 'cxsparse' cookie")
    }
    let fields = BigEndianReader(bytes)
    let stored = fields.uint32(at: 36)!
    let computed = VHDFooter.checksum(bytes, checksumOffset: 36)
    checksumWarning =
      stored == computed
      ? nil : "VHD dynamic header checksum is \(hex(UInt64(stored))), expected \(hex(UInt64(computed))); reading it anyway, as qemu does"
    tableOffset = fields.uint64(at: 16)!
    maxTableEntries = fields.uint32(at: 28)!
    blockSize = fields.uint32(at: 32)!
    guard blockSize.nonzeroBitCount == 1, Self.blockSizes.contains(blockSize) else {
      throw damage("block size \(blockSize) is not a power of two from 512 bytes to 256 MiB")
    }
    parentUniqueID = Array(bytes[40..<56])
    var units: [UInt16] = []
    for index in 0..<256 {
      let unit = fields.uint16(at: 64 + 2 * index)!
      if unit == 0 { break }
      units.append(unit)
    }
    parentName = String(decoding: units, as: UTF16.self)
    locators = (0..<Self.locatorCount).map { index in
      let base = 576 + 24 * index
      return Locator(
        platformCode: String(decoding: bytes[base..<base + 4], as: UTF8.self),
        dataLength: fields.uint32(at: base + 8)!,
        dataOffset: fields.uint64(at: base + 16)!)
    }
  }

  /// The largest locator data read: a Windows path is at most 32767 UTF-16 units.
  static let maximumLocatorLength: UInt32 = 65536

  /// The parent's name for the resolver: the relative Windows path (`W2ru`) first, then
  /// the absolute one (`W2ku`) unless it is a drive-letter or UNC path that cannot name a
  /// file here, then a `MacX` file URL, then `W2ku` anyway, then the header's parent name.
  /// Windows separators become `/` and a leading `./` is dropped; nil when nothing names
  /// a parent.
  func parentReference(from source: ByteSource, fileSize: Int64, path: String) throws -> String? {
    func text(of code: String) throws -> String? {
      guard let locator = locators.first(where: { $0.platformCode == code && $0.dataLength > 0 }) else {
        return nil
      }
      guard locator.dataLength <= Self.maximumLocatorLength else {
        throw ImageError.invalid(
          path: path, "VHD parent locator \(code) is \(locator.dataLength) bytes, more than \(Self.maximumLocatorLength)")
      }
      guard locator.dataOffset < UInt64(fileSize), UInt64(locator.dataLength) <= UInt64(fileSize) - locator.dataOffset
      else {
        throw ImageError.invalid(
          path: path,
          "VHD parent locator \(code) at \(hex(locator.dataOffset)) (\(locator.dataLength) bytes) is past the end of the file (size \(hex(fileSize)))")
      }
      let bytes = try source.readBytes(
        count: Int(locator.dataLength), at: Int64(locator.dataOffset), what: "VHD parent locator \(code)")
      var result: String
      if code == "MacX" {
        result = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        if result.hasPrefix("file://") { result.removeFirst("file://".count) }
      } else {
        let units = stride(from: 0, to: bytes.count - 1, by: 2).map { UInt16(bytes[$0]) | UInt16(bytes[$0 + 1]) << 8 }
        result = String(decoding: units.prefix { $0 != 0 }, as: UTF16.self)
      }
      return result.isEmpty ? nil : result
    }
    func isWindowsAbsolute(_ name: String) -> Bool {
      let characters = Array(name)
      return name.hasPrefix("\\\\") || (characters.count >= 2 && characters[1] == ":" && characters[0].isLetter)
    }
    var name = try text(of: "W2ru")
    if name == nil, let absolute = try text(of: "W2ku"), !isWindowsAbsolute(absolute) { name = absolute }
    if name == nil { name = try text(of: "MacX") }
    if name == nil { name = try text(of: "W2ku") }
    if name == nil, !parentName.isEmpty { name = parentName }
    guard var found = name else { return nil }
    found = found.replacing("\\", with: "/")
    while found.hasPrefix("./") { found.removeFirst(2) }
    return found
  }
}

extension VHDDynamicHeader {
  /// The 1024 bytes of a dynamic disk's header, as qemu-img writes one: no next structure
  /// (data offset all ones, the 64 bits Microsoft's tools expect rather than the 32 the
  /// specification's text says), header version 1.0, no parent, and the checksum.
  ///
  /// - Parameters:
  ///   - tableOffset: where the BAT starts in the file.
  ///   - maxTableEntries: BAT entries, one per block of the disk.
  ///   - blockSize: bytes of disk data per block (the sector bitmap not counted).
  static func encode(tableOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) -> [UInt8] {
    var fields = BigEndianWriter(capacity: length)
    fields.append(contentsOf: cookie)
    fields.append(UInt64.max)  // data offset: unused
    fields.append(tableOffset)
    fields.append(UInt32(0x0001_0000))  // header version 1.0
    fields.append(maxTableEntries)
    fields.append(blockSize)
    fields.append(UInt32(0))  // checksum, filled in below
    var bytes = fields.bytes
    // Parent unique id, timestamp, name and locators: none.
    bytes += [UInt8](repeating: 0, count: length - bytes.count)
    BigEndianWriter.store(VHDFooter.checksum(bytes, checksumOffset: 36), at: 36, in: &bytes)
    return bytes
  }
}

import DiskImage

/// What the metadata region says about the virtual disk.
struct VHDXMetadata {
  var blockSize: Int64
  var leaveBlocksAllocated: Bool
  var hasParent: Bool
  var virtualSize: Int64
  var logicalSectorSize: Int64
  var physicalSectorSize: Int64?
  var page83Data: GUID?
  /// The parent locator's keys and values (differencing images only).
  var parentLocator: [String: String]?

  static let tableSize = 64 << 10
  static let maximumEntries = 2047
  static let maximumItemLength = 1 << 20
  /// The largest virtual disk the specification allows: 64 TiB.
  static let maximumVirtualSize: Int64 = 64 << 40

  /// The items a reader knows; any other item marked required is refused.
  static let knownItems: [GUID: String] = [
    .fileParameters: "file parameters", .virtualDiskSize: "virtual disk size", .page83Data: "page 83 data",
    .logicalSectorSize: "logical sector size", .physicalSectorSize: "physical sector size",
    .parentLocator: "parent locator",
  ]

  /// Reads the metadata table at the start of `region` and the items it lists.
  static func read(from source: ByteSource, region: Region) throws -> VHDXMetadata {
    func invalid(_ message: String) -> ImageError { .invalid(path: source.name, message) }
    guard region.length >= Int64(tableSize) else {
      throw invalid("metadata region at \(hex(region.offset)) is \(hex(region.length)) bytes, smaller than its 64 KiB table")
    }
    let table = LittleEndianReader(try source.readBytes(count: tableSize, at: region.offset, what: "metadata table"))
    guard table.matches("metadata", at: 0) else {
      throw invalid("metadata table at \(hex(region.offset)) has no 'metadata' signature")
    }
    let count = Int(table.uint16(at: 10)!)
    guard count <= maximumEntries else {
      throw invalid("metadata table has \(count) entries, more than the \(maximumEntries) allowed")
    }
    var items: [GUID: [UInt8]] = [:]
    for index in 0..<count {
      let base = 32 + index * 32
      let id = table.guid(at: base)!
      let offset = Int64(table.uint32(at: base + 16)!)
      let length = Int64(table.uint32(at: base + 20)!)
      let flags = table.uint32(at: base + 24)!
      let isRequired = flags & 4 != 0
      let name = knownItems[id] ?? "item \(id)"
      guard knownItems[id] != nil else {
        if isRequired { throw ImageError.unsupported(path: source.name, "has required metadata item \(id), which lacuna does not know") }
        continue
      }
      guard items[id] == nil else { throw invalid("metadata table lists the \(name) twice") }
      guard length <= Int64(maximumItemLength) else {
        throw invalid("metadata \(name) is \(hex(length)) bytes, more than the 1 MiB allowed")
      }
      guard length == 0 || (offset >= Int64(tableSize) && offset + length <= region.length) else {
        throw invalid(
          "metadata \(name) at \(hex(offset)) (\(hex(length)) bytes) is not inside the metadata region after its table (region length \(hex(region.length)))")
      }
      items[id] = try source.readBytes(count: Int(length), at: region.offset + offset, what: "metadata \(name)")
    }

    func item(_ id: GUID, length: Int) throws -> LittleEndianReader? {
      guard let bytes = items[id] else { return nil }
      guard bytes.count >= length else {
        throw invalid("metadata \(knownItems[id]!) is \(bytes.count) bytes, expected \(length)")
      }
      return LittleEndianReader(bytes)
    }
    func required(_ id: GUID, length: Int) throws -> LittleEndianReader {
      guard let reader = try item(id, length: length) else {
        throw invalid("has no \(knownItems[id]!) in its metadata")
      }
      return reader
    }

    let parameters = try required(.fileParameters, length: 8)
    let blockSize = Int64(parameters.uint32(at: 0)!)
    guard blockSize >= 1 << 20, blockSize <= 256 << 20, blockSize & (blockSize - 1) == 0 else {
      throw invalid("block size \(blockSize) is not a power of two from 1 MiB to 256 MiB")
    }
    let flags = parameters.uint32(at: 4)!
    let logical = Int64(try required(.logicalSectorSize, length: 4).uint32(at: 0)!)
    guard logical == 512 || logical == 4096 else {
      throw invalid("logical sector size \(logical) is neither 512 nor 4096")
    }
    let physical = try item(.physicalSectorSize, length: 4).map { Int64($0.uint32(at: 0)!) }
    if let physical, physical != 512 && physical != 4096 {
      throw invalid("physical sector size \(physical) is neither 512 nor 4096")
    }
    let size = try required(.virtualDiskSize, length: 8).uint64(at: 0)!
    guard size <= UInt64(maximumVirtualSize), size % UInt64(logical) == 0 else {
      throw invalid(
        "virtual disk size \(size) is not a multiple of the logical sector size \(logical) up to 64 TiB")
    }
    let page83 = try item(.page83Data, length: 16).map { $0.guid(at: 0)! }
    let hasParent = flags & 2 != 0
    var locator: [String: String]?
    if hasParent {
      guard let bytes = items[.parentLocator] else {
        throw invalid("is a differencing image (HasParent) without a parent locator")
      }
      locator = try parseParentLocator(bytes, path: source.name)
    }
    return VHDXMetadata(
      blockSize: blockSize, leaveBlocksAllocated: flags & 1 != 0, hasParent: hasParent, virtualSize: Int64(size),
      logicalSectorSize: logical, physicalSectorSize: physical, page83Data: page83, parentLocator: locator)
  }

  /// The key-value pairs of a VHDX parent locator (UTF-16LE strings without terminators).
  static func parseParentLocator(_ bytes: [UInt8], path: String) throws -> [String: String] {
    func invalid(_ message: String) -> ImageError { .invalid(path: path, "parent locator " + message) }
    let reader = LittleEndianReader(bytes)
    guard let type = reader.guid(at: 0), let count = reader.uint16(at: 18) else {
      throw invalid("is \(bytes.count) bytes, shorter than its 20-byte header")
    }
    guard type == .vhdxParentLocatorType else {
      throw ImageError.unsupported(path: path, "has a parent locator of type \(type), not the VHDX one")
    }
    guard 20 + Int(count) * 12 <= bytes.count else {
      throw invalid("lists \(count) entries, more than its \(bytes.count) bytes hold")
    }
    var pairs: [String: String] = [:]
    for index in 0..<Int(count) {
      let base = 20 + index * 12
      func string(offset: Int, length: Int, what: String) throws -> String {
        guard length % 2 == 0, let raw = reader.slice(at: offset, count: length) else {
          throw invalid("entry \(index) has its \(what) at \(offset) (\(length) bytes) outside the locator or of odd length")
        }
        let units = stride(from: 0, to: raw.count, by: 2).map { UInt16(raw[$0]) | UInt16(raw[$0 + 1]) << 8 }
        return String(decoding: units, as: UTF16.self)
      }
      let key = try string(
        offset: Int(reader.uint32(at: base)!), length: Int(reader.uint16(at: base + 8)!), what: "key")
      let value = try string(
        offset: Int(reader.uint32(at: base + 4)!), length: Int(reader.uint16(at: base + 10)!), what: "value")
      guard pairs[key] == nil else { throw invalid("lists the key '\(key)' twice") }
      pairs[key] = value
    }
    guard pairs["parent_linkage"] != nil else { throw invalid("has no parent_linkage") }
    return pairs
  }
}

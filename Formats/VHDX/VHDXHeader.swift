import DiskImage

/// One of the two 4 KiB headers (at 64 KiB and 128 KiB). The current header is the valid
/// one with the larger sequence number.
struct VHDXHeader: Equatable {
  var sequenceNumber: UInt64
  var fileWriteGuid: GUID
  var dataWriteGuid: GUID
  var logGuid: GUID
  var logLength: Int64
  var logOffset: Int64
  /// The 4 KiB as stored, to tell identical copies apart from different ones.
  var raw: [UInt8]

  static let size = 4096
  static let offsets: [Int64] = [64 << 10, 128 << 10]

  /// Parses the header at `offset`; throws a message (not yet naming the file) when it is
  /// not a valid header.
  static func parse(_ bytes: [UInt8], at offset: Int64) throws(HeaderProblem) -> VHDXHeader {
    let reader = LittleEndianReader(bytes)
    guard reader.matches("head", at: 0) else {
      throw HeaderProblem("header at \(hex(offset)) has no 'head' signature")
    }
    let stored = reader.uint32(at: 4)!
    let computed = CRC32C.checksum(bytes, zeroing: 4)
    guard stored == computed else {
      throw HeaderProblem(
        "header at \(hex(offset)) has checksum \(hex(UInt64(stored))), expected \(hex(UInt64(computed)))")
    }
    let logVersion = reader.uint16(at: 64)!
    let version = reader.uint16(at: 66)!
    guard version == 1 else { throw HeaderProblem("header at \(hex(offset)) has version \(version), expected 1") }
    guard logVersion == 0 else {
      throw HeaderProblem("header at \(hex(offset)) has log version \(logVersion), expected 0")
    }
    let logLength = Int64(reader.uint32(at: 68)!)
    let logOffset = reader.uint64(at: 72)!
    let mebibyte: UInt64 = 1 << 20
    guard logLength % Int64(mebibyte) == 0, logOffset % mebibyte == 0, logOffset <= UInt64(Int64.max / 2),
      logLength == 0 || logOffset >= mebibyte
    else {
      throw HeaderProblem(
        "header at \(hex(offset)) places the log at \(hex(logOffset)) (\(hex(logLength)) bytes), not 1 MiB-aligned at or after 1 MiB")
    }
    return VHDXHeader(
      sequenceNumber: reader.uint64(at: 8)!, fileWriteGuid: reader.guid(at: 16)!, dataWriteGuid: reader.guid(at: 32)!,
      logGuid: reader.guid(at: 48)!, logLength: logLength, logOffset: Int64(logOffset), raw: bytes)
  }

  /// The current header of the file: the only valid one, or the valid one with the
  /// larger sequence number. Two valid headers with the same sequence number must be
  /// identical (Disk2VHD writes them so); otherwise which one is current is unknowable.
  static func current(in source: ByteSource) throws -> VHDXHeader {
    var headers: [VHDXHeader] = []
    var problems: [String] = []
    for offset in offsets {
      let bytes = try source.readBytes(count: size, at: offset, what: "header")
      do {
        headers.append(try parse(bytes, at: offset))
      } catch {
        problems.append(error.message)
      }
    }
    switch headers.count {
    case 0:
      throw ImageError.invalid(path: source.name, "no valid header: " + problems.joined(separator: "; "))
    case 1:
      return headers[0]
    default:
      let (first, second) = (headers[0], headers[1])
      if first.sequenceNumber == second.sequenceNumber {
        guard first.raw == second.raw else {
          throw ImageError.invalid(
            path: source.name,
            "both headers have sequence number \(first.sequenceNumber) but differ, so neither is current")
        }
        return first
      }
      return first.sequenceNumber > second.sequenceNumber ? first : second
    }
  }
}

/// Why a header or table is not valid, before the file's name is attached.
struct HeaderProblem: Error {
  let message: String
  init(_ message: String) { self.message = message }
}

/// One entry of the region table: where a region lives and whether a reader must know it.
struct Region {
  var guid: GUID
  var offset: Int64
  var length: Int64
  var isRequired: Bool

  var range: Range<Int64> { offset..<offset + length }
}

/// The region table (64 KiB at 192 KiB, a copy at 256 KiB): the BAT and metadata regions.
enum RegionTable {
  static let size = 64 << 10
  static let offsets: [Int64] = [192 << 10, 256 << 10]
  static let maximumEntries = 2047

  /// The regions of the first valid table (the copy when the first one's checksum fails).
  static func read(from source: ByteSource, fileSize: Int64) throws -> [Region] {
    var problems: [String] = []
    for offset in offsets {
      let bytes = try source.readBytes(count: size, at: offset, what: "region table")
      do {
        return try parse(bytes, at: offset)
      } catch {
        problems.append(error.message)
      }
    }
    throw ImageError.invalid(path: source.name, "no valid region table: " + problems.joined(separator: "; "))
  }

  static func parse(_ bytes: [UInt8], at tableOffset: Int64) throws(HeaderProblem) -> [Region] {
    let reader = LittleEndianReader(bytes)
    let name = "region table at \(hex(tableOffset))"
    guard reader.matches("regi", at: 0) else { throw HeaderProblem("\(name) has no 'regi' signature") }
    let stored = reader.uint32(at: 4)!
    let computed = CRC32C.checksum(bytes, zeroing: 4)
    guard stored == computed else {
      throw HeaderProblem("\(name) has checksum \(hex(UInt64(stored))), expected \(hex(UInt64(computed)))")
    }
    let count = Int(reader.uint32(at: 8)!)
    guard count <= maximumEntries else {
      throw HeaderProblem("\(name) has \(count) entries, more than the \(maximumEntries) allowed")
    }
    var regions: [Region] = []
    for index in 0..<count {
      let base = 16 + index * 32
      let guid = reader.guid(at: base)!
      let offset = reader.uint64(at: base + 16)!
      let length = UInt64(reader.uint32(at: base + 24)!)
      let flags = reader.uint32(at: base + 28)!
      let mebibyte: UInt64 = 1 << 20
      guard offset % mebibyte == 0, length % mebibyte == 0, offset >= mebibyte, length > 0,
        offset <= UInt64(Int64.max / 2)
      else {
        throw HeaderProblem(
          "\(name) entry \(index) (\(guid)) places its region at \(hex(offset)) (\(hex(length)) bytes), not 1 MiB-aligned, non-empty and after the first MiB")
      }
      guard !regions.contains(where: { $0.guid == guid }) else {
        throw HeaderProblem("\(name) lists region \(guid) twice")
      }
      regions.append(Region(guid: guid, offset: Int64(offset), length: Int64(length), isRequired: flags & 1 != 0))
    }
    return regions
  }
}

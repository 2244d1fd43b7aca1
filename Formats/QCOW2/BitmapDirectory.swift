import DiskImage

/// The persistent dirty bitmaps an image lists, read only to report them in `info` the way
/// qemu-img does (name, granularity, flags). Their contents do not change what the disk holds.
enum BitmapDirectory {
  /// qemu's limit on the directory (64 KiB entries of at most ~1 KiB each); also caps what we read.
  static let maximumSize = 64 << 20
  static let maximumCount = 65535

  struct Entry: Equatable {
    var name: String
    var granularity: Int64
    var inUse: Bool
    var isAuto: Bool

    /// As qemu-img info prints one element of `bitmaps`.
    var infoValue: InfoValue {
      var flags: [InfoValue] = []
      if inUse { flags.append(.string("in-use")) }
      if isAuto { flags.append(.string("auto")) }
      return .object([
        ("flags", .array(flags)), ("name", .string(name)), ("granularity", .integer(granularity)),
      ])
    }
  }

  static func read(
    _ bitmaps: QCOW2Header.BitmapsExtension, from file: ByteSource, clusterSize: Int, fileSize: Int64
  ) throws -> [Entry] {
    func invalid(_ message: String) -> ImageError { .invalid(path: file.name, message) }
    let offset = bitmaps.directoryOffset
    guard bitmaps.count >= 1, bitmaps.count <= maximumCount else {
      throw invalid("bitmaps extension lists \(bitmaps.count) bitmaps, expected 1 to \(maximumCount)")
    }
    guard offset % Int64(clusterSize) == 0, offset > 0 else {
      throw invalid("bitmap directory offset \(hex(offset)) is not a cluster boundary after the header")
    }
    guard offset < fileSize, fileSize - offset >= bitmaps.directorySize else {
      throw invalid(
        "bitmap directory at \(hex(offset)) (\(bitmaps.directorySize) bytes) is past the end of the file (size \(hex(fileSize)))")
    }
    let directory = BigEndianReader(
      try file.readBytes(count: Int(bitmaps.directorySize), at: offset, what: "bitmap directory"))
    var entries: [Entry] = []
    var position = 0
    for index in 0..<bitmaps.count {
      guard let flags = directory.uint32(at: position + 12),
        let granularityBits = directory.uint8(at: position + 17),
        let nameSize = directory.uint16(at: position + 18),
        let extraSize = directory.uint32(at: position + 20),
        let name = directory.slice(at: position + 24 + Int(extraSize), count: Int(nameSize))
      else {
        throw invalid("bitmap directory entry \(index) runs past the directory (\(bitmaps.directorySize) bytes)")
      }
      guard granularityBits < 64, nameSize > 0 else {
        throw invalid("bitmap directory entry \(index): granularity_bits \(granularityBits), name_size \(nameSize)")
      }
      entries.append(
        Entry(
          name: String(decoding: name, as: UTF8.self), granularity: Int64(1) << Int64(granularityBits),
          inUse: flags & 1 != 0, isAuto: flags & 2 != 0))
      position += (24 + Int(extraSize) + Int(nameSize) + 7) / 8 * 8
    }
    return entries
  }
}

extension BitmapDirectory {
  /// Where each bitmap's table lies and how many 8-byte entries it has, for `check`.
  static func tables(
    _ bitmaps: QCOW2Header.BitmapsExtension, from file: ByteSource, clusterSize: Int, fileSize: Int64
  ) throws -> [(offset: Int64, entries: Int)] {
    _ = try read(bitmaps, from: file, clusterSize: clusterSize, fileSize: fileSize)
    let directory = BigEndianReader(
      try file.readBytes(count: Int(bitmaps.directorySize), at: bitmaps.directoryOffset, what: "bitmap directory"))
    var tables: [(offset: Int64, entries: Int)] = []
    var position = 0
    for _ in 0..<bitmaps.count {
      let offset = directory.uint64(at: position)!
      let entries = directory.uint32(at: position + 8)!
      guard offset <= UInt64(Int64.max), Int(entries) <= maximumSize / 8 else {
        throw ImageError.invalid(path: file.name, "bitmap table at \(hex(offset)) of \(entries) entries is out of range")
      }
      tables.append((Int64(offset), Int(entries)))
      let nameSize = Int(directory.uint16(at: position + 18)!)
      let extraSize = Int(directory.uint32(at: position + 20)!)
      position += (24 + extraSize + nameSize + 7) / 8 * 8
    }
    return tables
  }
}

import DiskImage

/// The block map of a VDI: one little-endian u32 per virtual block. It is checked whole
/// when the image opens (every entry free, zero, or a distinct allocated block that lies in
/// the file), then read again in windows as lookups reach them, so memory stays bounded
/// however large the disk: a map may be 2 GiB.
final class BlockMap: @unchecked Sendable {
  /// What one entry says about its virtual block.
  enum Entry: Equatable {
    /// 0xffffffff: never written; the parent's (differencing) or zeros.
    case free
    /// 0xfffffffe: discarded; reads as zeros, the parent is not asked.
    case zero
    /// The index of a data block in the file, in allocation order.
    case block(Int64)
  }

  static let freeValue: UInt32 = 0xFFFF_FFFF
  static let zeroValue: UInt32 = 0xFFFF_FFFE
  /// Entries per window: 64 KiB of map, 16 GiB of disk with 1 MiB blocks.
  static let entriesPerWindow = 16384
  /// Windows kept at once (4 MiB); the least recently used goes first.
  static let windowsKept = 64

  let source: ByteSource
  let header: VDIHeader
  private let windows = BoundedCache<Int64, [UInt32]>(capacity: BlockMap.windowsKept)

  /// Reads the whole map once and refuses it when an entry is not free, zero, or an
  /// allocated block that lies in the file, or when two entries share a block.
  init(source: ByteSource, header: VDIHeader, fileSize: Int64) throws {
    self.source = source
    self.header = header
    try verify(fileSize: fileSize)
  }

  /// The window of entries that holds virtual block `index` (below the block count), and
  /// the index of its first entry.
  func window(containing index: Int64) throws -> (first: Int64, entries: [UInt32]) {
    let windowIndex = index / Int64(Self.entriesPerWindow)
    return (windowIndex * Int64(Self.entriesPerWindow), try window(windowIndex))
  }

  /// Where virtual block `index`'s data (mapped to data block `block`) starts in the file.
  func hostOffset(ofBlock block: Int64) -> Int64 {
    header.dataOffset + block * header.blockStride + header.blockExtra
  }

  static func decode(_ value: UInt32) -> Entry {
    switch value {
    case freeValue: return .free
    case zeroValue: return .zero
    default: return .block(Int64(value))
    }
  }

  /// The decoded entries of window `windowIndex`, from the cache or the file.
  private func window(_ windowIndex: Int64) throws -> [UInt32] {
    try windows.value(for: windowIndex) {
      let first = windowIndex * Int64(Self.entriesPerWindow)
      let count = Int(min(Int64(Self.entriesPerWindow), header.blockCount - first))
      return try readEntries(first: first, count: count)
    }
  }

  private func readEntries(first: Int64, count: Int) throws -> [UInt32] {
    var entries = [UInt32](repeating: 0, count: count)
    try entries.withUnsafeMutableBytes { raw in
      try source.readExactly(
        into: raw, at: header.mapOffset + first * 4, what: "block map (entries \(first)..<\(first + Int64(count)))")
    }
    #if _endian(big)
      for i in entries.indices { entries[i] = UInt32(littleEndian: entries[i]) }
    #endif
    return entries
  }

  /// One pass over the map, 1 MiB of it at a time. Two virtual blocks on one data block are
  /// damage: VirtualBox and qemu give each new block the next index, so sharing only comes
  /// from corruption, and writing one would change the other (qemu-img check flags it).
  private func verify(fileSize: Int64) throws {
    let path = source.name
    let blockSize = header.blockSize
    // Only blocks that lie in the file can be used, so the bitmap of used blocks is bounded
    // by the file's size as well as by the allocated count.
    let blocksInFile =
      fileSize > header.dataOffset ? (fileSize - header.dataOffset) / header.blockStride + 1 : 0
    let trackedBlocks = min(header.blocksAllocated, blocksInFile)
    var used = [UInt64](repeating: 0, count: Int((trackedBlocks + 63) / 64))
    let chunk = Int64(1 << 18)
    var first: Int64 = 0
    while first < header.blockCount {
      let count = Int(min(chunk, header.blockCount - first))
      let entries = try readEntries(first: first, count: count)
      for i in 0..<count where entries[i] < Self.zeroValue {
        let block = Int64(entries[i])
        let index = first + Int64(i)
        let virtualOffset = index * blockSize
        func damage(_ message: String) -> ImageError {
          .invalid(path: path, "block map entry \(index) (virtual offset \(hex(virtualOffset))) \(message)")
        }
        guard block < header.blocksAllocated else {
          throw damage("is block \(block), but only \(header.blocksAllocated) blocks are allocated")
        }
        let needed = min(blockSize, header.diskSize - virtualOffset)
        let host = hostOffset(ofBlock: block)
        guard host + needed <= fileSize else {
          throw damage(
            "points at block \(block) at \(hex(host)) (\(needed) bytes), past the end of the file (size \(hex(fileSize)))")
        }
        let word = Int(block / 64)
        let bit = UInt64(1) << UInt64(block % 64)
        guard used[word] & bit == 0 else {
          throw damage("points at block \(block), which another entry already uses")
        }
        used[word] |= bit
      }
      first += Int64(count)
    }
  }
}

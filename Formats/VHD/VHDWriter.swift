import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// Writes a VHD (qemu's vpc), dynamic by default or fixed, in one pass over the virtual
/// disk as the engine hands it data and zeros in disk order.
///
/// - Fixed: the disk at its own offsets, then the footer. Only data is written; the rest
///   of the file is holes.
/// - Dynamic: footer copy @0, dynamic header @512, BAT @1536 (padded with 0xFF to a
///   sector), then the blocks in disk order, each a sector bitmap of all ones and 2 MiB of
///   data, then the footer. A block is allocated when the first data for it arrives; a
///   block that gets none stays unallocated (0xFFFFFFFF). Within a block only the data is
///   written, so its zero parts stay holes. Each block's data starts on a 4 KiB boundary of
///   the file (3.5 KiB of hole before its bitmap), so a 4 KiB piece of data takes one host
///   block, not two.
///
/// The BAT (4 bytes per 2 MiB block, at most 4 MiB at 2040 GiB) is the only state that
/// grows with the disk. Metadata is written by `finish()`, the footer copy at 0 last; the
/// file appears under its name only then.
public final class VHDWriter: ImageWriter {
  static let blockSize: Int64 = 2 << 20
  /// One bit per sector of a 2 MiB block, rounded up to a sector.
  static let bitmapSize: Int64 = 512
  static let headerOffset: Int64 = 512
  static let tableOffset: Int64 = 1536
  /// Where in the file each block's data starts: on a multiple of this.
  static let dataAlignment: Int64 = 4096
  static let unallocated: UInt32 = 0xFFFF_FFFF

  let target: ByteTarget
  let settings: Settings
  let disk: Disk
  /// The footer, at the end of the file (and at 0 for a dynamic disk).
  let footer: [UInt8]
  /// Dynamic: the block allocation table, the sector where each block starts.
  private var table: [UInt32]
  /// Dynamic: the end of the last block (or of the BAT, before the first): the footer's place.
  private var end: Int64

  /// Makes a writer for `target` (a new, empty file). This is `VHD.format`'s `create`.
  ///
  /// - Parameters:
  ///   - target: the temporary file; `finish()` commits it, `abandon()` removes it.
  ///   - virtualSize: the source's size in bytes; the disk written may be a little larger
  ///     (CHS rounding, as qemu-img rounds).
  ///   - options: `-o subformat=dynamic|fixed, force_size=on|off`.
  /// - Returns: the writer.
  public static func create(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws -> ImageWriter {
    try VHDWriter(target: target, virtualSize: virtualSize, options: options)
  }

  init(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    let settings = try Settings(options, path: target.name)
    let disk = try Disk(requestedSize: virtualSize, settings: settings, path: target.name)
    self.target = target
    self.settings = settings
    self.disk = disk
    let blocks = (disk.size + Self.blockSize - 1) / Self.blockSize
    table = settings.subformat == .dynamic ? [UInt32](repeating: Self.unallocated, count: Int(blocks)) : []
    end = Self.tableOffset + Self.tableLength(entries: blocks)
    footer = VHDFooter.encode(
      diskType: settings.subformat == .dynamic ? .dynamic : .fixed,
      dataOffset: settings.subformat == .dynamic ? UInt64(Self.headerOffset) : UInt64.max,
      timestamp: Self.now(), creator: disk.creator, size: UInt64(disk.size), geometry: disk.geometry,
      uniqueID: Self.randomUniqueID())
    // The file has its final length from the start, as qemu-img's has; the footer comes
    // at the end.
    if settings.subformat == .fixed { try target.truncate(to: disk.size + Int64(VHDFooter.length)) }
  }

  /// The BAT's length in the file: 4 bytes an entry, padded to a sector.
  static func tableLength(entries: Int64) -> Int64 { (entries * 4 + 511) / 512 * 512 }

  /// Seconds since 2000-01-01 00:00:00 UTC, as the footer counts them.
  static func now() -> UInt32 {
    UInt32(truncatingIfNeeded: max(Int64(time(nil)) - VHDFooter.epochOffset, 0))
  }

  /// A random (version 4) UUID, as qemu-img gives every new disk.
  static func randomUniqueID() -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
    bytes[6] = bytes[6] & 0x0f | 0x40
    bytes[8] = bytes[8] & 0x3f | 0x80
    return bytes
  }

  /// The disk is counted in sectors.
  public var granularity: Int { 512 }

  // MARK: - The engine's calls

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard offset >= 0, offset <= disk.size, Int64(bytes.count) <= disk.size - offset else {
      throw ImageError.invalid(
        path: target.name,
        "internal: write of \(bytes.count) bytes at \(hex(offset)) is outside the virtual disk (size \(disk.size))")
    }
    guard settings.subformat == .dynamic else { return try target.write(bytes, at: offset) }
    var position = 0
    while position < bytes.count {
      let virtual = offset + Int64(position)
      let block = Int(virtual / Self.blockSize)
      let inBlock = virtual % Self.blockSize
      let count = Int(min(Int64(bytes.count - position), Self.blockSize - inBlock))
      let start = try blockStart(block)
      try target.write(
        UnsafeRawBufferPointer(rebasing: bytes[position..<position + count]), at: start + Self.bitmapSize + inBlock)
      position += count
    }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // A new file reads as zeros where nothing was written, and so does an unallocated
    // block: nothing to do. (A VHD is never written over old content: no `.inPlace`.)
    guard !target.readsAsZero, settings.subformat == .fixed else { return }
    try target.writeZeroes(range)
  }

  public func finish() throws {
    if settings.subformat == .dynamic {
      var bat = [UInt8](repeating: 0xFF, count: Int(Self.tableLength(entries: Int64(table.count))))
      for (index, entry) in table.enumerated() where entry != Self.unallocated {
        BigEndianWriter.store(entry, at: index * 4, in: &bat)
      }
      try put(bat, at: Self.tableOffset)
      let header = VHDDynamicHeader.encode(
        tableOffset: UInt64(Self.tableOffset), maxTableEntries: UInt32(table.count), blockSize: UInt32(Self.blockSize))
      try put(header, at: Self.headerOffset)
      try put(footer, at: end)
      try put(footer, at: 0)
    } else {
      try put(footer, at: disk.size)
    }
    try target.commit()
  }

  public func abandon() { target.abandon() }

  // MARK: - Blocks

  /// Where block `block` starts in the file (its bitmap), allocating it at the end of the
  /// file on first use: its bitmap is written all ones, as qemu writes it, so that a tool
  /// that later writes into the block without updating the bitmap (qemu) leaves nothing
  /// that bitmap-honouring readers (Hyper-V) would read as zeros.
  private func blockStart(_ block: Int) throws -> Int64 {
    let entry = table[block]
    if entry != Self.unallocated { return Int64(entry) * 512 }
    let data = (end + Self.bitmapSize + Self.dataAlignment - 1) / Self.dataAlignment * Self.dataAlignment
    let start = data - Self.bitmapSize
    // 2040 GiB of blocks end below 2^41 bytes: every start is a sector number under 2^32.
    table[block] = UInt32(start / 512)
    try put([UInt8](repeating: 0xFF, count: Int(Self.bitmapSize)), at: start)
    end = data + Self.blockSize
    return start
  }

  private func put(_ bytes: [UInt8], at offset: Int64) throws {
    try bytes.withUnsafeBytes { try target.write($0, at: offset) }
  }
}

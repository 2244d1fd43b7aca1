import DiskImage

/// Writes a VDI (version 1.1 header, 1 MiB blocks) in one pass over the virtual disk, as
/// the conversion engine hands it data and zeros in disk order. The layout is qemu-img's:
/// the header in the first 512 bytes, the block map at 0x200, the data blocks right after
/// the map (rounded up to 512 bytes).
///
/// - Dynamic (`static=off`, the default): a block that holds data gets the next data block
///   of the file when its first data arrives, so blocks lie in disk order. Only its data
///   bytes are written; its zero parts stay holes in the host file. A block the engine
///   covers with zeros only is marked ZERO (0xfffffffe) in the map and takes no space; a
///   block nothing covers (an image made by `create`) stays FREE (0xffffffff).
/// - Static (`static=on`): block `i` is data block `i`; the file has its full length from
///   the start and holes wherever the disk reads zero.
///
/// The map is written window by window as the engine moves past it, so memory stays at one
/// window whatever the disk's size. The header goes last, in `finish()`, then the file is
/// committed (fsync and rename): until then nothing is at the destination.
public final class VDIWriter: ImageWriter {
  /// The only block size qemu opens.
  static let blockSize: Int64 = 1 << 20
  static let blockBits: Int64 = 20
  /// qemu's limit: 0x1fffff80 blocks of 1 MiB (a 2 GiB block map), about 512 TiB.
  static let largestDiskSize = VDIHeader.largestBlockCount * blockSize
  /// Map entries per window: 256 KiB of map, 64 GiB of disk.
  static let entriesPerWindow = 65536
  /// The `-o` keys the writer takes.
  static let knownKeys: Set<String> = ["static", "preallocation"]

  private let target: ByteTarget
  /// The header as it will be written; `blocksAllocated` grows as blocks are allocated.
  private var header: VDIHeader
  /// The size the engine writes; the header records it rounded up to 512 bytes.
  private let virtualSize: Int64
  private var isStatic: Bool { header.imageType == .fixed }

  /// Map entries of blocks `windowFirst ..< windowFirst + window.count`, host-endian.
  private var window: [UInt32] = []
  private var windowFirst: Int64 = 0
  /// Where the calls of the engine have reached: every block that ends by here, and got no
  /// data, reads as zero.
  private var coveredEnd: Int64 = 0

  /// Makes a writer for `target` (the open, empty temporary file). This is `VDI.format`'s
  /// `create`.
  ///
  /// - Parameters:
  ///   - target: the temporary file; `finish()` commits it, `abandon()` removes it.
  ///   - virtualSize: the size of the virtual disk in bytes.
  ///   - options: `-o static=on|off` (and `preallocation=off`); `-c` and a backing file are
  ///     refused, as qemu-img refuses them for vdi.
  public init(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    let path = target.name
    func usage(_ message: String) -> ImageError { .usage(path: path, message) }
    try options.checkKnown(Self.knownKeys, format: "vdi", path: path)
    if options.compress {
      throw usage("vdi images cannot be compressed (qemu-img refuses -c for vdi as well)")
    }
    if options.backing != nil {
      throw usage("vdi images cannot record a backing file (qemu-img refuses it for vdi as well)")
    }
    let isStatic: Bool
    switch options.options["static"] ?? "off" {
    case "on", "yes", "true", "y": isStatic = true
    case "off", "no", "false", "n": isStatic = false
    case let other: throw usage("static '\(other)' is not one of on, off")
    }
    switch options.options["preallocation"] ?? "off" {
    case "off": break
    case "falloc", "full":
      // qemu-img takes these for vdi and makes the same image as without them.
      throw usage(
        "preallocation=\(options.options["preallocation"]!) is not supported for vdi output (static=on allocates every block)")
    case let other: throw usage("preallocation '\(other)' is not one of off")
    }
    guard target.readsAsZero else {
      // The blocks' zero parts and the map's padding are left unwritten.
      throw usage("vdi images are written to a new file only, not over existing content")
    }
    guard virtualSize >= 0 else { throw usage("virtual size \(virtualSize) is negative") }
    // qemu counts the disk in 512-byte sectors and records the size rounded up to one.
    guard virtualSize <= Self.largestDiskSize else {
      throw usage(
        "virtual size \(virtualSize) is larger than a VDI image can hold (at most \(Self.largestDiskSize) bytes, 0x1fffff80 blocks of 1 MiB)")
    }
    let diskSize = (virtualSize + 511) / 512 * 512
    let blockCount = (diskSize + Self.blockSize - 1) >> Self.blockBits
    let mapOffset: Int64 = 0x200
    let dataOffset = mapOffset + (blockCount * 4 + 511) / 512 * 512
    self.target = target
    self.virtualSize = virtualSize
    header = VDIHeader(
      version: VDIHeader.supportedVersion, headerSize: VDIHeader.smallestHeaderSize,
      imageType: isStatic ? .fixed : .dynamic, flags: 0, mapOffset: mapOffset, dataOffset: dataOffset,
      sectorSize: 512, diskSize: diskSize, blockSize: Self.blockSize, blockExtra: 0, blockCount: blockCount,
      blocksAllocated: isStatic ? blockCount : 0,
      imageUUID: .random(), modificationUUID: .random(), linkUUID: .null, parentModificationUUID: .null)
    if isStatic { try target.truncate(to: dataOffset + blockCount * Self.blockSize) }
    resetWindow()
  }

  /// A VDI stores 1 MiB blocks; the engine cuts its work at multiples of them.
  public var granularity: Int { Int(Self.blockSize) }

  // MARK: - The engine's calls

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard offset >= 0, offset + Int64(bytes.count) <= virtualSize else {
      throw ImageError.invalid(
        path: target.name,
        "write of \(bytes.count) bytes at \(hex(offset)) is outside the virtual disk (size \(virtualSize))")
    }
    // Blocks are allocated in disk order, so data that is contiguous on the disk is
    // contiguous in the file: gather it into as few `pwrite` calls as it allows.
    try writeThroughUnits(bytes, at: offset, unitSize: Self.blockSize, to: target) { block in
      try hostOffset(forWriting: block)
    }
    coveredEnd = max(coveredEnd, offset + Int64(bytes.count))
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // The file is new: whatever is not written reads as zeros, and a block that gets no
    // data is marked ZERO when its map window is written.
    coveredEnd = max(coveredEnd, range.upperBound)
  }

  public func finish() throws {
    while windowFirst < header.blockCount { try flushWindow() }
    if !isStatic {
      // Every allocated block lies whole in the file, as qemu and VirtualBox leave it; the
      // parts never written are holes.
      try target.truncate(to: header.dataOffset + header.blocksAllocated * Self.blockSize)
    }
    try header.encoded().withUnsafeBytes { try target.write($0, at: 0) }
    try target.commit()
  }

  public func abandon() { target.abandon() }

  // MARK: - Blocks and the map

  /// Where block `block`'s data starts in the file, allocating it on its first data.
  private func hostOffset(forWriting block: Int64) throws -> Int64 {
    if isStatic { return header.dataOffset + (block << Self.blockBits) }
    while block >= windowFirst + Int64(window.count) { try flushWindow() }
    guard block >= windowFirst else {
      throw ImageError.invalid(
        path: target.name,
        "internal: data for block \(block) came after its map entry was written (the engine goes in disk order)")
    }
    let slot = Int(block - windowFirst)
    var entry = window[slot]
    if entry >= BlockMap.zeroValue {
      entry = UInt32(header.blocksAllocated)
      header.blocksAllocated += 1
      window[slot] = entry
    }
    return header.dataOffset + (Int64(entry) << Self.blockBits)
  }

  /// Fills the window with the entries of the blocks from `windowFirst` as they are before
  /// any data: each its own block in a static image, FREE in a dynamic one.
  private func resetWindow() {
    let count = Int(min(Int64(Self.entriesPerWindow), header.blockCount - windowFirst))
    if isStatic {
      window = (0..<count).map { UInt32(windowFirst + Int64($0)) }
    } else {
      window = [UInt32](repeating: BlockMap.freeValue, count: count)
    }
  }

  /// Writes the current window of the map (blocks the engine has covered without data
  /// become ZERO) and moves to the next.
  private func flushWindow() throws {
    guard !window.isEmpty else { return }
    var bytes = [UInt8](repeating: 0, count: window.count * 4)
    for (slot, value) in window.enumerated() {
      var entry = value
      if entry == BlockMap.freeValue {
        let block = windowFirst + Int64(slot)
        if min((block + 1) << Self.blockBits, virtualSize) <= coveredEnd { entry = BlockMap.zeroValue }
      }
      bytes[slot * 4] = UInt8(truncatingIfNeeded: entry)
      bytes[slot * 4 + 1] = UInt8(truncatingIfNeeded: entry >> 8)
      bytes[slot * 4 + 2] = UInt8(truncatingIfNeeded: entry >> 16)
      bytes[slot * 4 + 3] = UInt8(truncatingIfNeeded: entry >> 24)
    }
    try bytes.withUnsafeBytes { try target.write($0, at: header.mapOffset + windowFirst * 4) }
    windowFirst += Int64(window.count)
    resetWindow()
  }
}

extension VDIWriter: FullyAllocatedLength {
  /// With every block data: the header, the map, then every block, allocated in disk order.
  public var fullyAllocatedLength: Int64 { Int64(header.dataOffset) + Int64(header.blockCount) * Self.blockSize }
}

import Compression
import DiskImage

/// Writes a streamOptimized VMDK: one file, in the order of VMware's "Virtual Disk Format
/// 5.0" stream, so it can be read (and could be written) from start to end:
///
/// ```
/// sector 0       header: version 3, flags 0x30001, compressAlgorithm 1, gdOffset GD_AT_END
/// sector 1-20    the embedded descriptor
/// sector 128...  grains, in disk order: a grain marker (u64 LBA, u32 size) + zlib stream,
///                padded to a sector; after the grains a table maps, a grain-table marker
///                (type 1) + the table (4 sectors); tables that map nothing are left out
/// end            grain-directory marker (type 2) + directory; footer marker (type 3) +
///                footer (the header with the real gdOffset); end-of-stream marker
/// ```
///
/// Grains are compressed on the engine's worker threads (`prepare`) with zlib's defaults,
/// as qemu's `compress()` (grains of random-looking data in stored blocks, which is
/// smaller and far faster); `commit` only places them, in disk order, so the bytes are the
/// same whatever the thread count. Every grain holding data is stored whole (the last one
/// of a disk whose size is not a grain multiple is padded with zeros).
public final class VMDKStreamWriter: PreparingImageWriter {
  let target: ByteTarget
  let settings: VMDKWriterSettings
  let virtualSize: Int64
  let hasParent: Bool
  private let descriptorBytes: [UInt8]
  private let deflaters = ZlibStreamDeflaterPool()
  /// Level 0 (stored blocks, still a zlib stream) for grains that would not shrink.
  private let storers = ZlibStreamDeflaterPool(level: 0)
  /// The record of a grain of zeros, less its LBA: what hides a parent's grain when
  /// zeroed grains are off.
  private let zeroGrainPayload: [UInt8]

  /// Where the next record goes (a sector boundary).
  private var end: Int64
  /// Grain tables still being filled, by index.
  private var openTables: [Int: [UInt32]] = [:]
  /// The sector of each table written (0: none), by index: the grain directory.
  private var directory: [UInt32]

  private static let grainBytes = VMDKWriterGeometry.grainBytes
  /// Sectors before the first grain: header and descriptor, up to a grain boundary.
  private static let overHead: UInt64 = VMDKWriterGeometry.grainSectors
  /// How far behind a `writeZeroes` a table must end before it is written: zero runs of a
  /// unit come before its data, and a unit is at most 32 MiB (the engine's bound).
  private static let tableFlushLag: Int64 = 64 << 20

  init(target: ByteTarget, virtualSize requested: Int64, settings: VMDKWriterSettings, options: WriterOptions) throws {
    self.target = target
    self.settings = settings
    let outputName = VMDKWriter.outputName(target: target, companions: options.companions)
    var (size, descriptor) = try VMDKWriter.plan(
      target: target, virtualSize: requested, settings: settings, options: options, outputName: outputName)
    virtualSize = size
    hasParent = options.backing != nil
    descriptor.extents = [(UInt64(size / 512), "SPARSE", outputName)]
    descriptorBytes = Array(descriptor.text.utf8)
    guard descriptorBytes.count <= Int(VMDKWriterGeometry.descriptorSectors) * 512 else {
      throw ImageError.usage(
        path: target.name,
        "the descriptor is \(descriptorBytes.count) bytes, more than the \(VMDKWriterGeometry.descriptorSectors * 512) a VMDK keeps for it (is the backing file name very long?)")
    }
    let tables = (size + VMDKWriterGeometry.tableSpan - 1) / VMDKWriterGeometry.tableSpan
    directory = [UInt32](repeating: 0, count: Int(tables))
    end = Int64(Self.overHead) * 512
    let zeros = [UInt8](repeating: 0, count: Self.grainBytes)
    zeroGrainPayload = try zeros.withUnsafeBytes { Array(try ZlibStreamDeflater().record($0, lba: 0).dropFirst(8)) }
  }

  public var granularity: Int { Self.grainBytes }

  // MARK: - Grains, prepared on the workers

  /// A unit's grains, compressed: their records back to back (each a sector multiple), and
  /// for each the grain's index and where its record starts.
  final class PreparedUnit {
    let end: Int64
    var records: [UInt8] = []
    var grains: [(index: Int64, offset: Int)] = []
    init(end: Int64) { self.end = end }
  }

  public func prepare(_ bytes: UnsafeRawBufferPointer, at offset: Int64, dataRanges: [Range<Int64>]) throws -> AnyObject {
    let unit = PreparedUnit(end: offset + Int64(bytes.count))
    let size = Self.grainBytes
    var scratch: [UInt8] = []
    try deflaters.withDeflater { deflater in
      var index = 0
      var cursor = offset  // where the next grain's data can start
      while index < dataRanges.count {
        let grain = max(dataRanges[index].lowerBound, cursor) / Int64(size)
        let grainStart = grain * Int64(size)
        let grainEnd = grainStart + Int64(size)
        // The parts of this grain that hold data; the rest of the buffer is not to be read.
        var parts: [Range<Int>] = []
        while index < dataRanges.count, dataRanges[index].lowerBound < grainEnd {
          let range = dataRanges[index]
          parts.append(Int(max(range.lowerBound, grainStart) - grainStart)..<Int(min(range.upperBound, grainEnd) - grainStart))
          if range.upperBound > grainEnd { break }  // the rest belongs to the next grain
          index += 1
        }
        cursor = grainEnd
        let from = Int(grainStart - offset)
        let lba = UInt64(grainStart / 512)
        let record: ArraySlice<UInt8>
        if parts.count == 1, parts[0] == 0..<size {
          let whole = UnsafeRawBufferPointer(rebasing: bytes[from..<from + size])
          if try Self.looksIncompressible(whole, deflater: deflater) {
            record = try storers.withDeflater { try $0.record(whole, lba: lba) }
          } else {
            record = try deflater.record(whole, lba: lba)
          }
        } else {
          // Built on zeros (also the padding of a disk's last, partial grain).
          if scratch.isEmpty { scratch = [UInt8](repeating: 0, count: size) }
          scratch.withUnsafeMutableBytes { grainBytes in
            grainBytes.initializeMemory(as: UInt8.self, repeating: 0)
            for part in parts {
              grainBytes.baseAddress!.advanced(by: part.lowerBound).copyMemory(
                from: bytes.baseAddress!.advanced(by: from + part.lowerBound), byteCount: part.count)
            }
          }
          record = try scratch.withUnsafeBytes { try deflater.record($0, lba: lba) }
        }
        unit.grains.append((grain, unit.records.count))
        unit.records.append(contentsOf: record)
      }
    }
    return unit
  }

  /// The engine hands data through `prepare` and `commit`; a direct call (grain aligned)
  /// takes the same way on this thread.
  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard offset % Int64(Self.grainBytes) == 0 else {
      throw ImageError.invalid(path: target.name, "internal: data at \(hex(offset)) does not start on a grain")
    }
    try commit(try prepare(bytes, at: offset, dataRanges: [offset..<offset + Int64(bytes.count)]))
  }

  /// True for a grain that is almost surely incompressible (random, encrypted or already
  /// compressed data): it is then stored in a zlib stream of stored blocks, which is
  /// smaller than what level 6 makes of it (5 bytes of framing per 64 KiB) and takes a
  /// twentieth of the time. The qcow2 writer's rule: eight 1 KiB samples have a nearly flat
  /// byte histogram (above 7.9 bits per byte) and the first 4 KiB do not shrink. A pure
  /// function of the grain, so the output stays the same for any thread count.
  static func looksIncompressible(_ grain: UnsafeRawBufferPointer, deflater: ZlibStreamDeflater) throws -> Bool {
    let sample = 4096
    guard grain.count >= 4 * sample, byteEntropy(grain, samples: 8, sampleSize: 1024) > 7.9 else { return false }
    var room = [UInt8](repeating: 0, count: deflater.bound(sample))
    let length = try room.withUnsafeMutableBytes {
      try deflater.deflate(UnsafeRawBufferPointer(rebasing: grain[0..<sample]), into: $0)
    }
    return length >= sample
  }

  public func commit(_ prepared: AnyObject) throws {
    guard let unit = prepared as? PreparedUnit else { preconditionFailure("commit got an object prepare did not make") }
    // Records go out in runs; a run ends where a grain table must be written first.
    var runFrom = 0
    func writeRun(upTo limit: Int) throws {
      guard limit > runFrom else { return }
      try unit.records.withUnsafeBytes { try target.write(UnsafeRawBufferPointer(rebasing: $0[runFrom..<limit]), at: end) }
      end += Int64(limit - runFrom)
      runFrom = limit
    }
    for grain in unit.grains {
      let table = Int(grain.index / Int64(VMDKWriterGeometry.entriesPerTable))
      if openTables.keys.contains(where: { $0 < table }) {
        try writeRun(upTo: grain.offset)
        try flushTables(below: table)
      }
      try setEntry(grain.index, sector: end + Int64(grain.offset - runFrom))
    }
    try writeRun(upTo: unit.records.count)
    try flushTables(below: Int(unit.end / VMDKWriterGeometry.tableSpan))
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // Grains never written read as zero, except over a parent: there whole grains must say
    // so. A grain zeroed in part also holds data, and its record (zeros included) comes.
    guard hasParent, !range.isEmpty else { return }
    let size = Int64(Self.grainBytes)
    var grain = (range.lowerBound + size - 1) / size
    while grain * size < range.upperBound {
      let start = grain * size
      guard range.upperBound >= min(start + size, virtualSize) else { break }
      if settings.zeroedGrain {
        try setEntry(grain, sector: nil)
      } else {
        var record = [UInt8](repeating: 0, count: 8)
        LittleEndianWriter.store(UInt64(start / 512), at: 0, in: &record)
        record += zeroGrainPayload
        try setEntry(grain, sector: end)
        try record.withUnsafeBytes { try target.write($0, at: end) }
        end += Int64(record.count)
      }
      grain += 1
      // A table the zero run covers whole is finished: no data can come for it. (One it
      // covers in part may still get data from the unit this run belongs to.)
      let perTable = Int64(VMDKWriterGeometry.entriesPerTable)
      if grain % perTable == 0, (grain - perTable) * size >= range.lowerBound {
        try flushTable(Int(grain / perTable) - 1)
      }
    }
    try flushTables(below: Int(max(0, range.lowerBound - Self.tableFlushLag) / VMDKWriterGeometry.tableSpan))
  }

  // MARK: - Tables

  /// Points grain `grain`'s entry at the record at byte `sector` (nil: a zeroed grain).
  private func setEntry(_ grain: Int64, sector byteOffset: Int64?) throws {
    let perTable = Int64(VMDKWriterGeometry.entriesPerTable)
    let index = Int(grain / perTable)
    guard directory[index] == 0 else {
      throw ImageError.invalid(
        path: target.name, "internal: grain at \(hex(grain * Int64(Self.grainBytes))) comes after its grain table was written")
    }
    var table = openTables[index] ?? [UInt32](repeating: 0, count: Int(perTable))
    let value: UInt64 = byteOffset.map { UInt64($0 / 512) } ?? 1
    guard value <= UInt64(UInt32.max) else {
      throw ImageError.usage(
        path: target.name, "the compressed data passes 2 TiB, past what grain table entries can point at")
    }
    table[Int(grain % perTable)] = UInt32(value)
    openTables[index] = table
  }

  /// Writes every open table with index below `limit`: a grain-table marker and the table,
  /// at the end of what is written.
  private func flushTables(below limit: Int) throws {
    guard !openTables.isEmpty else { return }
    for index in openTables.keys.filter({ $0 < limit }).sorted() { try flushTable(index) }
  }

  private func flushTable(_ index: Int) throws {
    guard let entries = openTables.removeValue(forKey: index) else { return }
    var bytes = Self.marker(sectors: VMDKWriterGeometry.tableSectors, type: MarkerType.grainTable)
    bytes += [UInt8](repeating: 0, count: entries.count * 4)
    for (slot, value) in entries.enumerated() where value != 0 {
      LittleEndianWriter.store(value, at: 512 + slot * 4, in: &bytes)
    }
    try bytes.withUnsafeBytes { try target.write($0, at: end) }
    directory[index] = UInt32((end + 512) / 512)
    end += Int64(bytes.count)
  }

  /// A metadata marker sector: u64 sectors that follow, u32 0, u32 type, zeros.
  static func marker(sectors: UInt64, type: UInt32) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 512)
    LittleEndianWriter.store(sectors, at: 0, in: &bytes)
    LittleEndianWriter.store(type, at: 12, in: &bytes)
    return bytes
  }

  // MARK: - The end

  public func finish() throws {
    do {
      try flushTables(below: Int.max)
      let directorySectors = UInt64((directory.count * 4 + 511) / 512)
      var tail = Self.marker(sectors: directorySectors, type: MarkerType.grainDirectory)
      tail += [UInt8](repeating: 0, count: Int(directorySectors) * 512)
      for (index, sector) in directory.enumerated() where sector != 0 {
        LittleEndianWriter.store(sector, at: 512 + index * 4, in: &tail)
      }
      let directorySector = UInt64(end / 512) + 1
      tail += Self.marker(sectors: 1, type: MarkerType.footer)
      tail += header(gdOffset: directorySector).encoded
      try tail.withUnsafeBytes { try target.write($0, at: end) }
      end += Int64(tail.count)
      // The end-of-stream marker is a sector of zeros: a hole.
      try target.truncate(to: end + 512)
      try descriptorBytes.withUnsafeBytes { try target.write($0, at: Int64(VMDKWriterGeometry.descriptorOffset) * 512) }
      try header(gdOffset: SparseExtentHeader.gdAtEnd).encoded.withUnsafeBytes { try target.write($0, at: 0) }
      try target.commit()
    } catch {
      abandon()
      throw error
    }
  }

  public func abandon() { target.abandon() }

  private func header(gdOffset: UInt64) -> SparseExtentHeader {
    var flags =
      SparseExtentHeader.Flag.validNewlineCheck | SparseExtentHeader.Flag.compressedGrains
      | SparseExtentHeader.Flag.markers
    if settings.zeroedGrain { flags |= SparseExtentHeader.Flag.zeroedGrains }
    return SparseExtentHeader(
      version: 3, flags: flags, capacity: UInt64(virtualSize / 512),
      descriptorOffset: VMDKWriterGeometry.descriptorOffset, descriptorSize: VMDKWriterGeometry.descriptorSectors,
      rgdOffset: 0, gdOffset: gdOffset, overHead: Self.overHead, compressAlgorithm: 1)
  }
}

extension ZlibStreamDeflater {
  /// A grain record: the marker's LBA (u64) and size (u32), the zlib stream, zeros to the
  /// next sector boundary.
  func record(_ grain: UnsafeRawBufferPointer, lba: UInt64) throws -> ArraySlice<UInt8> {
    var bytes = [UInt8](repeating: 0, count: 12 + bound(grain.count) + 511)
    let length = try bytes.withUnsafeMutableBytes { room in
      try deflate(grain, into: UnsafeMutableRawBufferPointer(rebasing: room[12...]))
    }
    LittleEndianWriter.store(lba, at: 0, in: &bytes)
    LittleEndianWriter.store(UInt32(length), at: 8, in: &bytes)
    let padded = (12 + length + 511) / 512 * 512
    return bytes[0..<padded]
  }
}

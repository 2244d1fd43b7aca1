import FoundationEssentials
import Compression
import DiskImage

/// Writes a qcow2 image (v3 by default, v2 with `compat=0.10`) in one pass over the virtual
/// disk, as the conversion engine hands it data and zeros in disk order.
///
/// Layout and order (see WRITER.md beside this file):
/// - Data clusters get host clusters in the order the engine delivers them, which is
///   virtual-disk order, so the file is the same bytes whatever the thread count. Only the
///   bytes that hold data are written: the zero parts of a cluster stay holes in the host file.
/// - An L2 table is written as soon as the engine has moved past the part of the disk it
///   maps, so memory holds only the tables near the current position, never one per cluster
///   of a large disk. Tables with no entry are never made.
/// - `finish()` writes the remaining L2 tables, the refcount blocks, the refcount table, the
///   L1 table and, last, the header in cluster 0; then fsyncs and renames the file into
///   place. Until the header exists the file is not a qcow2 image at all, and it sits under
///   a temporary name besides, so a crash leaves nothing that could be mistaken for output.
public final class QCOW2Writer: CopyingPreparingImageWriter {
  let output: ByteTarget
  let file: ByteTarget
  let settings: Settings
  let virtualSize: Int64
  /// The size the header records: qemu counts a disk in 512-byte sectors and drops a
  /// partial last sector, so the size is rounded up to one (qemu-img does the same).
  let recordedSize: Int64
  let backing: BackingReference?
  let compress: Bool
  let clusterBits: Int
  let clusterSize: Int
  /// Entries in one L2 table (8 bytes each, one table per cluster).
  let entriesPerL2: Int
  /// Entries in the L1 table: enough L2 tables to map the whole virtual disk.
  let l1Size: Int
  private let codecs: CodecPool?
  /// Takes uncompressed data clusters from a plain source file by the kernel (shared
  /// extents where the file system has them); nil for compressed or streamed output.
  private let copier: KernelCopier?

  /// The host offset of each L2 table written so far (0: none yet).
  var l2Offsets: [Int64]
  /// L2 tables still being filled, by L1 index. Entries are host-endian here.
  private var openTables: [Int: L2Table] = [:]
  private var cachedTable: (index: Int, table: L2Table)?
  /// The first host cluster not yet given to anything; cluster 0 is the header's.
  var nextFreeCluster: Int64 = 1
  /// Host clusters that hold compressed data, in increasing order, with how many compressed
  /// clusters touch each (their refcount). Every other used cluster has refcount 1.
  var sharedClusters: [Int64] = []
  var sharedCounts: [UInt64] = []
  /// Where the last compressed cluster's bytes end in the host file (0: none yet); the next
  /// one is packed right after it when it can be, as qemu does.
  private var compressedEnd: Int64 = 0
  /// With a backing file: how many bytes of a cluster `writeZeroes` covered, for clusters
  /// covered only in part so far (a whole cluster becomes a zero cluster).
  private var partialZeroes: [Int64: Int64] = [:]

  /// How far behind the position of a `writeZeroes` or `write` an L2 table must end before
  /// it is written out. Within a unit the engine sends the zero runs before `commit` brings
  /// the data, so a table is only certainly complete once a later unit has been committed;
  /// this margin (the engine's map window) covers any unit size it uses. Should a write come
  /// back to a table already written, the table is read back and written again in place.
  static let tableFlushLag: Int64 = 64 << 20

  static let copiedFlag: UInt64 = 1 << 63
  static let compressedFlag: UInt64 = 1 << 62
  static let zeroFlag: UInt64 = 1
  static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00

  final class L2Table {
    var entries: [UInt64]
    init(count: Int) { entries = [UInt64](repeating: 0, count: count) }
  }

  /// Makes a writer for `output` (the open, empty temporary file). This is `QCOW2.format`'s
  /// `create`.
  ///
  /// - Parameters:
  ///   - output: the temporary file; `finish()` commits it, `abandon()` removes it.
  ///   - virtualSize: the size of the virtual disk in bytes.
  ///   - options: `-o compat=, cluster_size=, refcount_bits=, preallocation=,
  ///     compression_type=, lazy_refcounts=`, the backing file to record, and `-c`.
  /// - Returns: the writer.
  public static func create(target output: ByteTarget, virtualSize: Int64, options: WriterOptions) throws -> ImageWriter {
    try QCOW2Writer(output: output, virtualSize: virtualSize, options: options)
  }

  init(output: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    let path = output.name
    let settings = try Settings(options, path: path)
    guard virtualSize >= 0 else {
      throw ImageError.usage(path: path, "virtual size \(virtualSize) is negative")
    }
    // qemu's limit on the L1 table (32 MiB) bounds a qcow2 disk at 2^61 bytes with 2 MiB
    // clusters; sizes near 2^63 are refused before any arithmetic on them.
    guard virtualSize <= 1 << 61 else {
      throw ImageError.usage(
        path: path, "virtual size \(virtualSize) is larger than a qcow2 image can hold (at most 2^61 bytes, with cluster_size=2M)")
    }
    if let backing = options.backing {
      if backing.name.utf8.count > 1023 {
        throw ImageError.usage(
          path: path, "backing file name is \(backing.name.utf8.count) bytes long, at most 1023 fit in a qcow2 header")
      }
      if backing.name.isEmpty { throw ImageError.usage(path: path, "backing file name is empty") }
    }
    self.output = output
    self.file = output
    self.settings = settings
    self.virtualSize = virtualSize
    self.recordedSize = (virtualSize + 511) / 512 * 512
    self.backing = options.backing
    self.compress = options.compress
    clusterBits = settings.clusterBits
    clusterSize = settings.clusterSize
    entriesPerL2 = clusterSize / 8
    let clusters = (recordedSize + Int64(clusterSize) - 1) >> Int64(clusterBits)
    let tables = (clusters + Int64(entriesPerL2) - 1) / Int64(entriesPerL2)
    // qemu refuses to open an image whose L1 table is over 32 MiB.
    guard tables * 8 <= 32 << 20 else {
      throw ImageError.usage(
        path: path,
        "virtual size \(virtualSize) needs an L1 table of \(tables * 8) bytes with \(clusterSize)-byte clusters; qemu allows 32 MiB (use a larger cluster_size)")
    }
    l1Size = Int(tables)
    l2Offsets = [Int64](repeating: 0, count: l1Size)
    codecs = options.compress ? CodecPool(type: settings.compressionType, level: settings.compressionLevel) : nil
    if !options.compress, let file = output as? OutputFile, !file.isStandardOutput {
      copier = KernelCopier(destination: file.file)
    } else {
      copier = nil
    }
    // Refuse now, not after the data, a backing name that cannot fit in cluster 0.
    try headerBytes(l1Offset: 0, refcountTableOffset: 0, refcountTableClusters: 0)
  }

  public var granularity: Int { clusterSize }

  // MARK: - The engine's calls

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try writeData(bytes, at: offset)
    try flushTables(endingBy: offset - Self.tableFlushLag)
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // Without a backing file, what is not allocated reads as zero: nothing to do. With one,
    // whole clusters must say "zero" so the backing file does not show through; a cluster
    // zeroed only in part also holds data, and its zero part stays a hole in the host file.
    guard backing != nil, !range.isEmpty else { return }
    let size = Int64(clusterSize)
    var cluster = range.lowerBound >> Int64(clusterBits)
    while cluster << Int64(clusterBits) < range.upperBound {
      let start = cluster << Int64(clusterBits)
      let end = min(start + size, virtualSize)
      let covered = min(range.upperBound, end) - max(range.lowerBound, start)
      if covered == end - start {
        try markZero(cluster)
      } else {
        let sum = partialZeroes[cluster, default: 0] + covered
        if sum >= end - start {
          partialZeroes[cluster] = nil
          try markZero(cluster)
        } else {
          partialZeroes[cluster] = sum
        }
      }
      cluster += 1
    }
    try flushTables(endingBy: range.lowerBound - Self.tableFlushLag)
  }

  /// A unit to be written as it is (no compression). It points into the engine's buffer
  /// instead of copying it: the engine's `FilledUnit` owns that buffer and keeps it until
  /// after `commit` returns (Converter.swift, `drainOne`). Plain conversion thus costs no copy.
  final class PlainUnit {
    let bytes: UnsafeRawBufferPointer
    let start: Int64
    let dataRanges: [Range<Int64>]
    init(bytes: UnsafeRawBufferPointer, start: Int64, dataRanges: [Range<Int64>]) {
      self.bytes = bytes
      self.start = start
      self.dataRanges = dataRanges
    }
  }

  /// A unit after compression: each cluster that holds data, compressed or, when that does
  /// not save anything, as its data bytes. Whole data clusters stored as they are point into
  /// the engine's buffer (kept until `commit` returns); everything else is owned.
  final class CompressedUnit {
    enum Payload {
      case compressed([UInt8])
      /// The cluster's bytes and the parts of it (relative to the cluster) that hold data.
      case plain([UInt8], [Range<Int>])
      /// A cluster wholly of data, stored as it is: it points into the engine's buffer,
      /// which outlives `commit` as for `PlainUnit`, so random data is never copied.
      case whole(UnsafeRawBufferPointer)
    }
    let end: Int64
    var clusters: [(index: Int64, payload: Payload)] = []
    init(end: Int64) { self.end = end }
  }

  public func prepare(_ bytes: UnsafeRawBufferPointer, at offset: Int64, dataRanges: [Range<Int64>]) throws -> AnyObject {
    guard offset & Int64(clusterSize - 1) == 0 else {
      throw ImageError.invalid(
        path: output.name, "internal: unit at \(hex(offset)) does not start on a \(clusterSize)-byte cluster boundary")
    }
    guard let codecs else { return PlainUnit(bytes: bytes, start: offset, dataRanges: dataRanges) }
    let unit = CompressedUnit(end: offset + Int64(bytes.count))
    let size = clusterSize
    // The engine's buffer holds garbage outside `dataRanges` (parts it never read): build
    // each cluster from its data parts on zeros. The last cluster of a disk whose size is
    // not a multiple of the cluster size is padded with zeros, as qemu does.
    var scratch = [UInt8](repeating: 0, count: size)
    var index = 0
    var cursor = offset  // where the next cluster's data can start
    while index < dataRanges.count {
      let cluster = max(dataRanges[index].lowerBound, cursor) >> Int64(clusterBits)
      let clusterStart = cluster << Int64(clusterBits)
      let clusterEnd = clusterStart + Int64(size)
      var parts: [Range<Int>] = []
      while index < dataRanges.count, dataRanges[index].lowerBound < clusterEnd {
        let range = dataRanges[index]
        let lower = max(range.lowerBound, clusterStart)
        let upper = min(range.upperBound, clusterEnd)
        parts.append(Int(lower - clusterStart)..<Int(upper - clusterStart))
        if range.upperBound > clusterEnd { break }  // the rest belongs to the next cluster
        index += 1
      }
      cursor = clusterEnd
      if parts.count == 1, parts[0] == 0..<size {
        // All data: compress straight from the engine's buffer, no copy.
        let start = Int(clusterStart - offset)
        let whole = UnsafeRawBufferPointer(rebasing: bytes[start..<start + size])
        let compressed = try QCOW2Writer.compressed(whole, codecs: codecs)
        unit.clusters.append((cluster, compressed.map { .compressed($0) } ?? .whole(whole)))
        continue
      }
      scratch.withUnsafeMutableBytes { target in
        var position = 0
        for part in parts {
          if part.lowerBound > position {
            target.baseAddress!.advanced(by: position).initializeMemory(
              as: UInt8.self, repeating: 0, count: part.lowerBound - position)
          }
          let source = Int(clusterStart - offset) + part.lowerBound
          target.baseAddress!.advanced(by: part.lowerBound).copyMemory(
            from: bytes.baseAddress!.advanced(by: source), byteCount: part.count)
          position = part.upperBound
        }
        if position < size {
          target.baseAddress!.advanced(by: position).initializeMemory(
            as: UInt8.self, repeating: 0, count: size - position)
        }
      }
      let compressed = try scratch.withUnsafeBytes { try QCOW2Writer.compressed($0, codecs: codecs) }
      unit.clusters.append((cluster, compressed.map { .compressed($0) } ?? .plain(scratch, parts)))
    }
    return unit
  }

  /// The cluster compressed, or nil to store it as it is. qemu's rule: keep the compressed
  /// form only when it is smaller than the cluster.
  static func compressed(_ cluster: UnsafeRawBufferPointer, codecs: CodecPool) throws -> [UInt8]? {
    let result = try codecs.withCodec { codec in
      try looksIncompressible(cluster, codec: codec) ? nil : codec.compress(cluster)
    }
    guard let result, result.count < cluster.count else { return nil }
    return result
  }

  /// True for a cluster that is almost surely incompressible (random bytes, encrypted or
  /// already compressed data), so the full compression attempt, which fails anyway, is
  /// skipped: qemu spends most of a compressed conversion of such data failing to compress
  /// it. Both must hold: the byte histogram of eight 1 KiB samples spread over the cluster
  /// is nearly flat (order-0 entropy above 7.9 bits per byte; random samples of that size
  /// measure about 7.98), and the first 4 KiB do not shrink at all; a flat histogram alone
  /// would also match data of repeating patterns, which compresses well. Sampling, not the
  /// whole cluster, because this runs on every cluster, compressible or not: the full
  /// histogram took a tenth of a zstd conversion. A cluster with compressible stretches
  /// between the samples may be stored uncompressed; the output is still exact. A pure
  /// function of the cluster's bytes, so the output stays the same whatever the thread count.
  static func looksIncompressible(_ cluster: UnsafeRawBufferPointer, codec: Codec) throws -> Bool {
    let sample = 4096
    guard cluster.count >= 4 * sample else { return false }
    let entropy = byteEntropy(cluster, samples: 8, sampleSize: 1024)
    guard entropy > 7.9 else { return false }
    return try codec.compress(UnsafeRawBufferPointer(rebasing: cluster[0..<sample])) == nil
  }

  public func commit(_ prepared: AnyObject) throws {
    let end: Int64
    if let unit = prepared as? PlainUnit {
      for range in unit.dataRanges {
        let from = Int(range.lowerBound - unit.start)
        try writeData(UnsafeRawBufferPointer(rebasing: unit.bytes[from..<from + range.count]), at: range.lowerBound)
      }
      end = unit.start + Int64(unit.bytes.count)
    } else if let unit = prepared as? CompressedUnit {
      var pending = PendingWrite()
      for (cluster, payload) in unit.clusters {
        switch payload {
        case .compressed(let data):
          let hostOffset = try placeCompressed(cluster, count: data.count)
          try pending.add(data, at: hostOffset, file: file)
        case .whole(let data):
          try pending.flush(file: file)
          try writeData(data, at: cluster << Int64(clusterBits))
        case .plain(let data, let parts):
          try pending.flush(file: file)
          let start = cluster << Int64(clusterBits)
          try data.withUnsafeBytes { bytes in
            for part in parts {
              try writeData(UnsafeRawBufferPointer(rebasing: bytes[part]), at: start + Int64(part.lowerBound))
            }
          }
        }
      }
      try pending.flush(file: file)
      end = unit.end
    } else {
      preconditionFailure("commit got an object prepare did not make")
    }
    try committed(upTo: end)
  }

  /// After a unit: what lies before its end is final.
  private func committed(upTo end: Int64) throws {
    if !partialZeroes.isEmpty {
      let endCluster = (end + Int64(clusterSize) - 1) >> Int64(clusterBits)
      partialZeroes = partialZeroes.filter { $0.key >= endCluster }
    }
    // Everything before the end of a committed unit is final: the engine moves on.
    try flushTables(endingBy: end)
  }

  public func copies(in mode: CopyMode) -> Bool { copier?.copies(in: mode) ?? false }

  public func writesMappedBytes(in mode: CopyMode) -> Bool { copier?.writesMappedBytes(in: mode) ?? false }

  /// `commit` for an uncompressed unit whose data lies (partly) in plain source files: those
  /// parts go to their host clusters by the kernel (cloned where the file system shares
  /// extents: host clusters and source blocks are both cluster- or block-aligned), in runs
  /// of host-contiguous clusters; the rest is written.
  public func commit(
    _ prepared: AnyObject, sources: [(range: Range<Int64>, bytes: HostBytes)], keeping owner: AnyObject?,
    mode: CopyMode
  ) throws -> CopyTally {
    guard let unit = prepared as? PlainUnit, let copier, !sources.isEmpty || owner != nil else {
      try commit(prepared)
      return CopyTally()
    }
    // The copier writes to the file itself: a lack of room is explained as `write` does.
    if let output = output as? OutputFile {
      return try output.explainingRoom {
        try commitCopying(unit, copier: copier, sources: sources, owner: owner, mode: mode)
      }
    }
    return try commitCopying(unit, copier: copier, sources: sources, owner: owner, mode: mode)
  }

  private func commitCopying(
    _ unit: PlainUnit, copier: KernelCopier, sources: [(range: Range<Int64>, bytes: HostBytes)], owner: AnyObject?,
    mode: CopyMode
  ) throws -> CopyTally {
    var tally = CopyTally()
    let bits = Int64(clusterBits)
    func bytes(_ range: Range<Int64>) -> UnsafeRawBufferPointer {
      UnsafeRawBufferPointer(rebasing: unit.bytes[Int(range.lowerBound - unit.start)..<Int(range.upperBound - unit.start)])
    }
    // Bytes from `source`, or from the unit's buffer (kept by `owner`) when nil.
    func copy(_ range: Range<Int64>, from source: HostBytes?) throws {
      var pending: (virtual: Int64, host: Int64, count: Int64)?
      func flush() throws {
        guard let run = pending else { return }
        let runBytes = bytes(run.virtual..<run.virtual + run.count)
        if let source {
          tally += try copier.write(
            runBytes, at: run.host, from: source.advanced(by: run.virtual - range.lowerBound), mode: mode)
        } else if let owner {
          tally += try copier.write(runBytes, at: run.host, keeping: owner, mode: mode)
        } else {
          try file.write(runBytes, at: run.host)
        }
        pending = nil
      }
      var position = range.lowerBound
      while position < range.upperBound {
        let cluster = position >> bits
        let inCluster = position - (cluster << bits)
        let count = min(range.upperBound - position, Int64(clusterSize) - inCluster)
        let host = try hostCluster(forWriting: cluster) + inCluster
        if let run = pending, run.host + run.count == host {
          pending!.count += count
        } else {
          try flush()
          pending = (position, host, count)
        }
        position += count
      }
      try flush()
    }
    func writeFromMemory(_ range: Range<Int64>) throws {
      if owner != nil { try copy(range, from: nil) } else { try writeData(bytes(range), at: range.lowerBound) }
    }
    for range in unit.dataRanges {
      var position = range.lowerBound
      for source in sources where source.range.upperBound > position && source.range.lowerBound < range.upperBound {
        let part = max(source.range.lowerBound, position)..<min(source.range.upperBound, range.upperBound)
        if part.lowerBound > position { try writeFromMemory(position..<part.lowerBound) }
        try copy(
          part, from: source.bytes.advanced(by: part.lowerBound - source.range.lowerBound))
        position = part.upperBound
      }
      if position < range.upperBound { try writeFromMemory(position..<range.upperBound) }
    }
    try committed(upTo: unit.start + Int64(unit.bytes.count))
    return tally
  }

  public func finish() throws {
    try copier?.flush()
    if settings.preallocation == .metadata { try preallocateAll() }
    try flushTables(endingBy: Int64.max)
    try writeMetadata()
    try output.commit()
  }

  public func abandon() { output.abandon() }

  /// Whether the copier made the file longer than the clusters written (`writeMetadata`
  /// cuts it back).
  var fileExtendedAhead: Bool { copier?.extendedAhead ?? false }

  // MARK: - Clusters and L2 entries

  private func allocateCluster() -> Int64 {
    let offset = nextFreeCluster << Int64(clusterBits)
    nextFreeCluster += 1
    return offset
  }

  /// The L2 table with index `index`, made or read back as needed.
  private func table(_ index: Int) throws -> L2Table {
    if let cachedTable, cachedTable.index == index { return cachedTable.table }
    let table: L2Table
    if let open = openTables[index] {
      table = open
    } else {
      table = L2Table(count: entriesPerL2)
      let hostOffset = l2Offsets[index]
      if hostOffset != 0 {
        let bytes = try file.readBytes(count: clusterSize, at: hostOffset, what: "L2 table \(index) (read back)")
        let reader = BigEndianReader(bytes)
        for slot in 0..<entriesPerL2 { table.entries[slot] = reader.uint64(at: slot * 8)! }
      }
      openTables[index] = table
    }
    cachedTable = (index, table)
    return table
  }

  private func entry(_ cluster: Int64) throws -> UInt64 {
    try table(Int(cluster / Int64(entriesPerL2))).entries[Int(cluster % Int64(entriesPerL2))]
  }

  private func setEntry(_ cluster: Int64, _ value: UInt64) throws {
    try table(Int(cluster / Int64(entriesPerL2))).entries[Int(cluster % Int64(entriesPerL2))] = value
  }

  /// The host offset of a standard cluster to write into, allocating it on first use.
  private func hostCluster(forWriting cluster: Int64) throws -> Int64 {
    let current = try entry(cluster)
    if current & Self.compressedFlag != 0 {
      throw ImageError.invalid(
        path: output.name, "virtual offset \(hex(cluster << Int64(clusterBits))) written after its cluster was stored compressed")
    }
    let existing = current & Self.offsetMask
    if existing != 0 { return Int64(existing) }
    let hostOffset = allocateCluster()
    try setEntry(cluster, UInt64(hostOffset) | Self.copiedFlag)
    return hostOffset
  }

  /// Writes data at a virtual offset, allocating clusters as it goes, in as few `pwrite`
  /// calls as the host layout allows.
  private func writeData(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard offset >= 0, offset + Int64(bytes.count) <= virtualSize else {
      throw ImageError.invalid(
        path: output.name,
        "write of \(bytes.count) bytes at \(hex(offset)) is outside the virtual disk (size \(virtualSize))")
    }
    try writeThroughUnits(bytes, at: offset, unitSize: Int64(clusterSize), to: file) { cluster in
      try hostCluster(forWriting: cluster)
    }
  }

  /// Makes a whole cluster read as zero over a backing file.
  private func markZero(_ cluster: Int64) throws {
    let current = try entry(cluster)
    guard current == 0 else { return }  // already holds data (its zero parts are holes)
    if settings.version >= 3 {
      try setEntry(cluster, Self.zeroFlag)
    } else {
      // v2 has no zero flag: the cluster is allocated and left a hole in the host file,
      // which reads as zeros and costs no space.
      try setEntry(cluster, UInt64(allocateCluster()) | Self.copiedFlag)
    }
  }

  private var maximumRefcount: UInt64 {
    settings.refcountBits == 64 ? UInt64.max : (UInt64(1) << UInt64(settings.refcountBits)) - 1
  }

  /// Chooses where a compressed cluster of `count` bytes goes, records its L2 entry and its
  /// refcounts, and returns its host offset. Compressed clusters are packed back to back,
  /// across host-cluster boundaries, as qemu packs them; each host cluster's refcount is the
  /// number of compressed clusters that touch it.
  private func placeCompressed(_ cluster: Int64, count: Int) throws -> Int64 {
    let bits = Int64(clusterBits)
    var hostOffset = nextFreeCluster << bits
    if compressedEnd > 0 {
      let tail = (compressedEnd - 1) >> bits
      let first = compressedEnd >> bits
      let last = (compressedEnd + Int64(count) - 1) >> bits
      var fits: Bool
      if first == tail {
        fits = sharedClusters.last == tail && sharedCounts.last! < maximumRefcount
        if last > tail { fits = fits && tail + 1 == nextFreeCluster }
      } else {
        fits = first == nextFreeCluster
      }
      if fits { hostOffset = compressedEnd }
    }
    let first = hostOffset >> bits
    let last = (hostOffset + Int64(count) - 1) >> bits
    for host in first...last {
      if sharedClusters.last == host {
        sharedCounts[sharedCounts.count - 1] += 1
      } else {
        sharedClusters.append(host)
        sharedCounts.append(1)
      }
    }
    nextFreeCluster = max(nextFreeCluster, last + 1)
    compressedEnd = hostOffset + Int64(count)

    guard try entry(cluster) & ~Self.zeroFlag == 0 else {
      throw ImageError.invalid(
        path: output.name, "virtual offset \(hex(cluster << bits)) stored twice (compressed after data)")
    }
    let sectors = UInt64((hostOffset + Int64(count) - 1) / 512 - hostOffset / 512)
    let shift = UInt64(62 - (clusterBits - 8))
    try setEntry(cluster, Self.compressedFlag | (sectors << shift) | UInt64(hostOffset))
    return hostOffset
  }

  /// Consecutive compressed clusters gathered into one `pwrite`.
  private struct PendingWrite {
    var bytes: [UInt8] = []
    var offset: Int64 = 0

    mutating func add(_ data: [UInt8], at hostOffset: Int64, file: ByteTarget) throws {
      if !bytes.isEmpty && offset + Int64(bytes.count) != hostOffset { try flush(file: file) }
      if bytes.isEmpty { offset = hostOffset }
      bytes.append(contentsOf: data)
    }

    mutating func flush(file: ByteTarget) throws {
      guard !bytes.isEmpty else { return }
      try bytes.withUnsafeBytes { try file.write($0, at: offset) }
      bytes.removeAll(keepingCapacity: true)
    }
  }

  // MARK: - L2 tables

  /// Writes out, in index order, every open L2 table that maps only virtual offsets below
  /// `end`, and forgets it.
  private func flushTables(endingBy end: Int64) throws {
    guard !openTables.isEmpty, end > 0 else { return }
    let span = Int64(entriesPerL2) << Int64(clusterBits)
    let limit = end == Int64.max ? Int.max : Int(end / span)  // tables with index < limit
    let done = openTables.keys.filter { $0 < limit }.sorted()
    for index in done { try flushTable(index) }
  }

  private func flushTable(_ index: Int) throws {
    guard let table = openTables.removeValue(forKey: index) else { return }
    if cachedTable?.index == index { cachedTable = nil }
    if l2Offsets[index] == 0 { l2Offsets[index] = allocateCluster() }
    var bytes = [UInt8](repeating: 0, count: clusterSize)
    for (slot, value) in table.entries.enumerated() where value != 0 {
      BigEndianWriter.store(value, at: slot * 8, in: &bytes)
    }
    try bytes.withUnsafeBytes { try file.write($0, at: l2Offsets[index]) }
  }

  /// `preallocation=metadata`: every cluster of the disk gets a host cluster (left a hole
  /// where nothing was written) and every L2 table is written.
  private func preallocateAll() throws {
    let clusters = (recordedSize + Int64(clusterSize) - 1) >> Int64(clusterBits)
    for index in 0..<l1Size {
      let table = try self.table(index)
      let first = Int64(index) * Int64(entriesPerL2)
      for slot in 0..<entriesPerL2 where first + Int64(slot) < clusters && table.entries[slot] == 0 {
        table.entries[slot] = UInt64(allocateCluster()) | Self.copiedFlag
      }
      try flushTable(index)
    }
  }
}

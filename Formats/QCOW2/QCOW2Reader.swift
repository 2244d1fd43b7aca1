import Compression
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// Reads one qcow2 layer: the active L1 table (or an internal snapshot's), L2 tables
/// through a bounded cache, and the clusters they point at. Answers for this layer alone;
/// the engine reads the backing file.
public final class QCOW2Reader: ImageReader {
  public let source: ByteSource
  public var formatName: String { "qcow2" }
  /// The header's size, or the snapshot's when one is read.
  public let virtualSize: Int64
  public let backing: BackingReference?
  public var clusterSize: Int? { header.clusterSize }
  public var isDirty: Bool { header.isDirty }
  public let warnings: [String]

  let header: QCOW2Header
  let fileSize: Int64
  /// The snapshot table, read when the image is opened (it is small: one read for most).
  let snapshotTable: [QCOW2Snapshot]
  /// The snapshot this reader reads, or nil for the active state.
  let snapshot: QCOW2Snapshot?
  private let l1Table: L1Table
  private let l2Cache: L2Cache
  private let decompressors: CodecPool
  private let bitmaps: [BitmapDirectory.Entry]
  /// Host ranges that hold metadata no L2 table or data cluster may point into.
  private let metadataRanges: [(range: Range<Int64>, name: String)]
  /// `looksPreallocated()`, decided on the first map question (as qemu decides it).
  private var preallocation: Bool?
  private let preallocationLock = Lock()

  /// Whether map answers report data clusters whose host bytes are holes as zeros.
  func reportsHostHoles() throws -> Bool {
    try preallocationLock.withLock {
      if let preallocation { return preallocation }
      let answer = try looksPreallocated()
      preallocation = answer
      return answer
    }
  }

  /// How many L2 tables one `extents` call visits at most; callers loop for the rest.
  static let l2TablesPerAnswer = 16

  /// Opens the qcow2 image in `source`: its active state, or with `snapshot` the internal
  /// snapshot it names (that snapshot's L1 table and disk size; the same backing file).
  public init(source: ByteSource, snapshot selector: SnapshotSelector? = nil) throws {
    self.source = source
    fileSize = try source.size()
    header = try QCOW2Header.read(from: source, fileSize: fileSize)
    let clusterSize = Int64(header.clusterSize)
    snapshotTable = try SnapshotTable.read(from: source, header: header, fileSize: fileSize)

    if let selector {
      guard let index = selector.index(in: snapshotTable.map(\.info)) else {
        let count = snapshotTable.count
        throw ImageError.invalid(
          path: source.name,
          "has no snapshot with \(selector) (it has \(count == 0 ? "no snapshots" : count == 1 ? "1 snapshot" : "\(count) snapshots")"
            + (count == 0 ? ")" : "; `lacuna info` lists them)"))
      }
      let chosen = snapshotTable[index]
      snapshot = chosen
      // An entry too old to record its disk size had the image's size (qemu's reading).
      virtualSize = chosen.diskSize ?? header.virtualSize
      l1Table = L1Table(source: source, offset: chosen.l1TableOffset, count: chosen.l1Size)
    } else {
      snapshot = nil
      virtualSize = header.virtualSize
      l1Table = L1Table(source: source, offset: header.l1TableOffset, count: header.l1Size)
    }
    l2Cache = L2Cache(tableBytes: header.clusterSize)
    decompressors = CodecPool(type: header.compressionType)

    func roundedUp(_ length: Int64) -> Int64 { (length + clusterSize - 1) / clusterSize * clusterSize }
    var metadata: [(range: Range<Int64>, name: String)] = [(0..<clusterSize, "the header")]
    if header.l1Size > 0 {
      let start = header.l1TableOffset
      metadata.append((start..<start + roundedUp(Int64(header.l1Size) * 8), "the L1 table"))
    }
    if let snapshot, snapshot.l1Size > 0 {
      let start = snapshot.l1TableOffset
      metadata.append((start..<start + roundedUp(Int64(snapshot.l1Size) * 8), "the snapshot's L1 table"))
    }
    if header.refcountTableClusters > 0 {
      let start = header.refcountTableOffset
      metadata.append((start..<start + header.refcountTableClusters * clusterSize, "the refcount table"))
    }
    metadataRanges = metadata

    if let name = header.backingName {
      backing = BackingReference(name: name, format: header.backingFormat)
    } else {
      backing = nil
    }
    if let extensionFields = header.bitmaps {
      bitmaps = try BitmapDirectory.read(
        extensionFields, from: source, clusterSize: header.clusterSize, fileSize: fileSize)
    } else {
      bitmaps = []
    }
    warnings =
      header.isCorrupt
      ? ["the image is marked corrupt (incompatible bit 1); reading it anyway, check the result"]
      : []
  }

  public var snapshots: [SnapshotInfo] { snapshotTable.map(\.info) }

  public func opening(snapshot selector: SnapshotSelector) throws -> ImageReader {
    try QCOW2Reader(source: source, snapshot: selector)
  }

  /// `format-specific.data` as qemu-img 7.2 prints it, key for key and in its order.
  public var formatSpecific: [(String, InfoValue)] {
    var fields: [(String, InfoValue)] = [
      ("compat", .string(header.version == 2 ? "0.10" : "1.1")),
      ("compression-type", .string(header.compressionType.rawValue)),
    ]
    if header.version >= 3 {
      fields.append(("lazy-refcounts", .bool(header.hasLazyRefcounts)))
      if !bitmaps.isEmpty { fields.append(("bitmaps", .array(bitmaps.map(\.infoValue)))) }
    }
    fields.append(("refcount-bits", .integer(Int64(1) << Int64(header.refcountOrder))))
    if header.version >= 3 {
      fields.append(("corrupt", .bool(header.isCorrupt)))
      fields.append(("extended-l2", .bool(header.hasExtendedL2)))
    }
    return fields
  }

  /// Uncompressed clusters sit plainly in the image file at their host offsets.
  public var plainHostFile: ImageFile? { source as? ImageFile }

  // MARK: - The allocation map

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    var result: [Extent] = []
    try walk(range, l2TableLimit: Self.l2TablesPerAnswer) { pieceRange, piece in
      switch piece {
      case .unallocated(let host): result.appendMerging(Extent(pieceRange, .unallocated, hostOffset: host))
      case .zero(let host): result.appendMerging(Extent(pieceRange, .zero, hostOffset: host))
      case .data(let host): result.appendMerging(Extent(pieceRange, .data, hostOffset: host))
      case .compressed: result.appendMerging(Extent(pieceRange, .data))
      }
    }
    // A data cluster whose host bytes are a hole in the file reads as zeros. Where the
    // image looks preallocated (qemu's rule), say so, as qemu-img map does; elsewhere
    // qemu calls such clusters plain data, and so does lacuna.
    return try reportsHostHoles() ? try result.splittingHostHoles(in: source) : result
  }

  /// What one stretch of the virtual disk maps to. A stretch never crosses a cluster,
  /// except a stretch of unallocated L1 entries, which comes as one piece however long.
  enum Piece {
    /// Not this layer's; `host` is set only for unallocated subclusters of an allocated
    /// cluster (extended L2), where qemu-img map reports the host offset too.
    case unallocated(host: Int64?)
    /// Reads as zeros; `host` when a host cluster is preallocated for it.
    case zero(host: Int64?)
    /// Stored plainly at `host` (the host offset of the stretch's first byte).
    case data(host: Int64)
    /// Part of a compressed cluster.
    case compressed(CompressedCluster)
  }

  struct CompressedCluster {
    /// Where the cluster starts in the virtual disk.
    var virtualOffset: Int64
    var hostOffset: Int64
    /// The stored length, to the end of its last 512-byte sector.
    var storedLength: Int
  }

  /// Visits the pieces of `range` in order until it is covered or `l2TableLimit` L2 tables
  /// have been visited (at least one). Unallocated L1 entries cost nothing, so a mostly
  /// empty disk of any size is walked in time proportional to its allocated L2 tables.
  private func walk(
    _ range: Range<Int64>, l2TableLimit: Int, _ visit: (Range<Int64>, Piece) throws -> Void
  ) throws {
    let clusterSize = Int64(header.clusterSize)
    let entriesPerTable = header.l2EntriesPerTable
    let tableSpan = clusterSize * Int64(entriesPerTable)
    var position = range.lowerBound
    var tablesVisited = 0
    while position < range.upperBound {
      let l1Index = Int(position / tableSpan)
      let spanEnd = min(range.upperBound, (Int64(l1Index) + 1) * tableSpan)
      guard let table = try l2Table(l1Index: l1Index) else {
        // Unallocated up to the next non-zero L1 entry, in one step however many lie between.
        let lastIndex = Int((range.upperBound - 1) / tableSpan)
        let next = try l1Table.firstNonZero(from: l1Index + 1, below: lastIndex + 1)
        let end = next.map { min(range.upperBound, Int64($0) * tableSpan) } ?? range.upperBound
        try visit(position..<end, .unallocated(host: nil))
        position = end
        continue
      }
      if tablesVisited == l2TableLimit { return }
      tablesVisited += 1
      while position < spanEnd {
        let clusterStart = position / clusterSize * clusterSize
        let clusterEnd = min(spanEnd, clusterStart + clusterSize)
        let l2Index = Int(position / clusterSize) % entriesPerTable
        let mapping = try decode(table: table, l1Index: l1Index, l2Index: l2Index, clusterStart: clusterStart)
        try visitCluster(mapping, clusterStart: clusterStart, from: position, to: clusterEnd, visit)
        position = clusterEnd
      }
    }
  }

  /// What one L2 entry says about its cluster.
  enum ClusterMapping {
    case unallocated
    case zero(host: Int64?)
    case data(host: Int64)
    case compressed(hostOffset: Int64, storedLength: Int)
    /// Extended L2: per-subcluster allocation (`allocated`) and zero (`zero`) bits.
    case subclusters(host: Int64?, allocated: UInt32, zero: UInt32)
  }

  private func visitCluster(
    _ mapping: ClusterMapping, clusterStart: Int64, from start: Int64, to end: Int64,
    _ visit: (Range<Int64>, Piece) throws -> Void
  ) throws {
    let inCluster = start - clusterStart
    switch mapping {
    case .unallocated:
      try visit(start..<end, .unallocated(host: nil))
    case .zero(let host):
      try visit(start..<end, .zero(host: host.map { $0 + inCluster }))
    case .data(let host):
      try checkInFile(host + inCluster, length: end - start, virtualOffset: start)
      try visit(start..<end, .data(host: host + inCluster))
    case .compressed(let hostOffset, let storedLength):
      try visit(
        start..<end,
        .compressed(CompressedCluster(virtualOffset: clusterStart, hostOffset: hostOffset, storedLength: storedLength)))
    case .subclusters(let host, let allocated, let zero):
      let subclusterSize = Int64(header.clusterSize / 32)
      var position = start
      while position < end {
        let index = Int((position - clusterStart) / subclusterSize)
        let pieceEnd = min(end, clusterStart + Int64(index + 1) * subclusterSize)
        let hostHere = host.map { $0 + (position - clusterStart) }
        if allocated & (1 << UInt32(index)) != 0 {
          try checkInFile(hostHere!, length: pieceEnd - position, virtualOffset: position)
          try visit(position..<pieceEnd, .data(host: hostHere!))
        } else if zero & (1 << UInt32(index)) != 0 {
          try visit(position..<pieceEnd, .zero(host: hostHere))
        } else {
          try visit(position..<pieceEnd, .unallocated(host: hostHere))
        }
        position = pieceEnd
      }
    }
  }

  /// Data past the end of the file is damage, never zeros (qemu would read zeros there).
  private func checkInFile(_ host: Int64, length: Int64, virtualOffset: Int64) throws {
    guard host + length <= fileSize else {
      throw ImageError.invalid(
        path: path,
        "data for virtual offset \(hex(virtualOffset)) at host \(hex(host)) (\(length) bytes) is past the end of the file (size \(hex(fileSize)))")
    }
  }

  // MARK: - L1 and L2 entries

  private static let l1ReservedBits: UInt64 = 0x7f00_0000_0000_01ff
  private static let offsetBits: UInt64 = 0x00ff_ffff_ffff_fe00
  private static let copiedBit: UInt64 = 1 << 63
  private static let compressedBit: UInt64 = 1 << 62
  private static let zeroBit: UInt64 = 1
  /// Bits 1-8 and 56-61 of a standard cluster descriptor.
  private static let standardReservedBits: UInt64 = 0x3f00_0000_0000_01fe

  /// The L2 table an L1 entry points at, or nil when the entry is unallocated.
  private func l2Table(l1Index: Int) throws -> [UInt64]? {
    let entry = try l1Table.entry(l1Index)
    guard entry & Self.l1ReservedBits == 0 else {
      throw ImageError.invalid(
        path: path, "L1 entry \(l1Index) has reserved bits set: \(hex(entry & Self.l1ReservedBits))")
    }
    let offset = Int64(entry & Self.offsetBits)
    guard offset != 0 else { return nil }
    let clusterSize = Int64(header.clusterSize)
    guard offset % clusterSize == 0 else {
      throw ImageError.invalid(
        path: path, "L2 table at \(hex(offset)) (L1 index \(l1Index)) is not aligned to the cluster size \(hex(clusterSize))")
    }
    guard offset + clusterSize <= fileSize else {
      throw ImageError.invalid(
        path: path, "L2 table at \(hex(offset)) (L1 index \(l1Index)) is past the end of the file (size \(hex(fileSize)))")
    }
    try checkNotMetadata(offset..<offset + clusterSize) { "L2 table at \(hex(offset)) (L1 index \(l1Index))" }
    return try l2Cache.table(at: offset) {
      let raw = BigEndianReader(
        try source.readBytes(count: header.clusterSize, at: offset, what: "L2 table (L1 index \(l1Index))"))
      return (0..<header.clusterSize / 8).map { raw.uint64(at: $0 * 8)! }
    }
  }

  private func checkNotMetadata(_ range: Range<Int64>, what: () -> String) throws {
    for (metadata, name) in metadataRanges where metadata.overlaps(range) {
      throw ImageError.invalid(
        path: path, "\(what()) overlaps \(name) at \(hex(metadata.lowerBound))..\(hex(metadata.upperBound))")
    }
  }

  /// Decodes the L2 entry for the cluster at `clusterStart`, checking every bit.
  private func decode(table: [UInt64], l1Index: Int, l2Index: Int, clusterStart: Int64) throws -> ClusterMapping {
    let extended = header.hasExtendedL2
    let entry = table[extended ? 2 * l2Index : l2Index]
    let bitmap = extended ? table[2 * l2Index + 1] : 0
    func damage(_ message: String) -> ImageError {
      .invalid(
        path: path,
        "L2 entry for virtual offset \(hex(clusterStart)) (L1 index \(l1Index), L2 index \(l2Index)) \(message)")
    }
    let clusterSize = Int64(header.clusterSize)

    if entry & Self.compressedBit != 0 {
      guard entry & Self.copiedBit == 0 else { throw damage("is compressed but has the copied bit (63) set") }
      guard bitmap == 0 else { throw damage("is compressed but its subcluster bitmap is \(hex(bitmap)), expected 0") }
      let offsetWidth = UInt64(62 - (header.clusterBits - 8))
      let hostOffset = entry & ((1 << offsetWidth) - 1)
      let extraSectors = (entry & ~(Self.copiedBit | Self.compressedBit)) >> offsetWidth
      guard hostOffset >> 56 == 0 else { throw damage("has a compressed host offset beyond 2^56: \(hex(hostOffset))") }
      guard hostOffset >= UInt64(clusterSize) else {
        throw damage("has compressed data at \(hex(hostOffset)), inside the header cluster")
      }
      guard hostOffset < UInt64(fileSize) else {
        throw damage("has compressed data at \(hex(hostOffset)), past the end of the file (size \(hex(fileSize)))")
      }
      let storedLength = Int(extraSectors + 1) * 512 - Int(hostOffset % 512)
      return .compressed(hostOffset: Int64(hostOffset), storedLength: storedLength)
    }

    var reserved = Self.standardReservedBits
    if header.version < 3 || extended { reserved |= Self.zeroBit }
    guard entry & reserved == 0 else { throw damage("has reserved bits set: \(hex(entry & reserved))") }
    let host = Int64(entry & Self.offsetBits)
    guard host % clusterSize == 0 else {
      throw damage("points at \(hex(host)), not aligned to the cluster size \(hex(clusterSize))")
    }
    if host != 0 {
      try checkNotMetadata(host..<host + clusterSize) {
        "data cluster at \(hex(host)) for virtual offset \(hex(clusterStart)) (L1 index \(l1Index), L2 index \(l2Index))"
      }
    }

    if extended {
      let allocated = UInt32(truncatingIfNeeded: bitmap)
      let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
      guard allocated & zero == 0 else {
        throw damage("marks subclusters both allocated and zero: bitmap \(hex(bitmap))")
      }
      guard allocated == 0 || host != 0 else {
        throw damage("has allocated subclusters (bitmap \(hex(bitmap))) but no host cluster")
      }
      return .subclusters(host: host == 0 ? nil : host, allocated: allocated, zero: zero)
    }
    if entry & Self.zeroBit != 0 { return .zero(host: host == 0 ? nil : host) }
    guard host != 0 else {
      // Offset 0 with the copied bit means host offset 0, valid only with an external data file.
      guard entry & Self.copiedBit == 0 else { throw damage("points at host offset 0 with the copied bit set") }
      return .unallocated
    }
    return .data(host: host)
  }

  // MARK: - Reading

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    guard buffer.count > 0 else { return }
    // Host-contiguous data is gathered into one read, whatever the cluster size.
    var reads = GatheredReads(from: source, into: buffer, at: offset)
    var scratch: UnsafeMutableRawBufferPointer?
    defer { scratch?.deallocate() }

    try walk(offset..<offset + Int64(buffer.count), l2TableLimit: .max) { range, piece in
      let start = Int(range.lowerBound - offset)
      let target = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + Int(range.count)])
      switch piece {
      case .unallocated, .zero:
        target.initializeMemory(as: UInt8.self, repeating: 0)
      case .data(let host):
        try reads.add(bufferStart: start, host: host, length: target.count)
      case .compressed(let cluster):
        if range.lowerBound == cluster.virtualOffset && target.count == header.clusterSize {
          try decompress(cluster, into: target)
        } else {
          if scratch == nil {
            scratch = .allocate(byteCount: header.clusterSize, alignment: 16)
          }
          try decompress(cluster, into: scratch!)
          let from = Int(range.lowerBound - cluster.virtualOffset)
          target.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch![from..<from + target.count]))
        }
      }
    }
    try reads.flush()
  }

  /// Decompresses one cluster into `output` (one cluster long). The stored length may run
  /// up to a sector past the end of the file for the last cluster; what exists is read.
  private func decompress(_ cluster: CompressedCluster, into output: UnsafeMutableRawBufferPointer) throws {
    let available = Int(min(Int64(cluster.storedLength), fileSize - cluster.hostOffset))
    let input = try source.readBytes(
      count: available, at: cluster.hostOffset,
      what: "compressed cluster for virtual offset \(hex(cluster.virtualOffset))")
    let codec: Codec
    do {
      codec = try decompressors.take()
    } catch {
      throw ImageError.system(path: path, operation: "set up \(decompressors.type) decompression: \(error)", errno: ENOMEM)
    }
    defer { decompressors.giveBack(codec) }
    do {
      try input.withUnsafeBytes { try codec.decompress($0, into: output) }
    } catch let error as CompressionError {
      throw ImageError.invalid(
        path: path,
        "compressed cluster for virtual offset \(hex(cluster.virtualOffset)) at host \(hex(cluster.hostOffset)) (\(cluster.storedLength) bytes) does not decompress: \(error)")
    }
  }
}

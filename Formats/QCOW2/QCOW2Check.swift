import DiskImage

/// What `qemu-img check` counts, under its names (`BdrvCheckResult` and its `bfi`).
public struct QCOW2CheckResult: Equatable, Sendable {
  /// Internal errors: the check could not look at something (qemu's `check-errors`).
  public var checkErrors = 0
  /// Stored refcounts lower than the references, and other damage that can lose data.
  public var corruptions = 0
  /// Stored refcounts higher than the references: clusters nothing uses.
  public var leaks = 0
  /// The end of the last cluster that is referenced or has a refcount.
  public var imageEndOffset: Int64 = 0
  /// Clusters of the virtual disk.
  public var totalClusters: Int64 = 0
  /// Clusters of the active L1 table's L2 tables that have a host cluster or are compressed.
  public var allocatedClusters: Int64 = 0
  /// Allocated clusters not stored right after the one before them in the same L2 table;
  /// every compressed cluster counts.
  public var fragmentedClusters: Int64 = 0
  public var compressedClusters: Int64 = 0
  /// Set when the check could not complete (qemu's check returns an error there and
  /// qemu-img prints no summary, only "Check failed: " and this reason).
  public var failure: String?

  public init() {}
}

/// `qemu-img check` for qcow2, read-only: every reference the image holds is counted into
/// a table of one small counter per host cluster (sized by the file, not the virtual disk),
/// then compared with the stored refcounts, then the copied flags (bit 63) of the active
/// L1 and L2 entries are checked against the stored refcounts. The references are those
/// qemu 7.2 counts (block/qcow2-refcount.c, `calculate_refcounts`): the header cluster, the
/// active L1 table and its L2 tables and clusters, each snapshot's L1 table and what it
/// references, the snapshot table, the refcount table, the bitmap directory with each
/// bitmap's table and data clusters, and the refcount blocks. Messages and counts are
/// qemu's, so the verdict and exit status agree.
///
/// L2 tables are read one at a time and dropped; refcount blocks are read in order for the
/// comparison and through a small cache for the copied-flag pass. Nothing is ever written.
public final class QCOW2Checker {
  private let source: ByteSource
  private let header: QCOW2Header
  private let fileSize: Int64
  private let reportLine: (String, Bool) -> Void
  private var result = QCOW2CheckResult()

  private func report(_ line: String) { reportLine(line, false) }
  /// A line qemu-img prints through error_report, after its own name.
  private func reportNamed(_ line: String) { reportLine(line, true) }
  private var signaledCorruption = false
  private var references: ReferenceCounts
  private let stored: StoredRefcounts
  private let clusterSize: Int64
  private let clusterBits: Int

  /// Checks the qcow2 image in `source`.
  ///
  /// - Parameters:
  ///   - source: the image file, read only.
  ///   - report: takes each finding as a line, in qemu's words and order (qemu-img prints
  ///     them to standard error), and whether qemu-img puts its name before the line.
  /// - Returns: the counts `qemu-img check` prints.
  /// - Throws: `ImageError` when the header cannot be read or checked: the image does not
  ///   open, as qemu-img would not open it.
  public static func check(_ source: ByteSource, report: @escaping (_ line: String, _ named: Bool) -> Void) throws
    -> QCOW2CheckResult
  {
    let checker = try QCOW2Checker(source: source, report: report)
    checker.run()
    return checker.result
  }

  private init(source: ByteSource, report: @escaping (String, Bool) -> Void) throws {
    self.source = source
    self.reportLine = report
    fileSize = try source.size()
    header = try QCOW2Header.read(from: source, fileSize: fileSize, tablesMayPassEnd: true)
    // qemu opens no such image, so it checks none.
    if header.autoclearFeatures & QCOW2Header.Feature.rawExternalData != 0 {
      throw ImageError.invalid(path: source.name, "data-file-raw (autoclear bit 1) requires a data file")
    }
    clusterBits = header.clusterBits
    clusterSize = Int64(header.clusterSize)
    let fileClusters = (fileSize + clusterSize - 1) / clusterSize
    // qemu refuses more clusters than an int counts; so do we (the counters would take 2 GiB).
    guard fileClusters <= Int64(Int32.max) else {
      throw ImageError.unsupported(
        path: source.name, "the file holds \(fileClusters) clusters, more than the \(Int32.max) a check counts")
    }
    references = ReferenceCounts(clusters: Int(fileClusters))
    stored = try StoredRefcounts(source: source, header: header, fileSize: fileSize)
  }

  private static let l1ReservedBits: UInt64 = 0x7f00_0000_0000_01ff
  private static let offsetBits: UInt64 = 0x00ff_ffff_ffff_fe00
  private static let copiedBit: UInt64 = 1 << 63
  private static let compressedBit: UInt64 = 1 << 62
  private static let zeroBit: UInt64 = 1
  private static let l2ReservedBits: UInt64 = 0x3f00_0000_0000_01fe
  private static let refcountTableReservedBits: UInt64 = 0x1ff
  private static let allAllocated: UInt64 = 0xffff_ffff

  private var refcountMaximum: UInt64 { header.refcountOrder == 6 ? .max : (1 << UInt64(1 << header.refcountOrder)) - 1 }

  private func run() {
    let virtualSize = header.virtualSize
    result.totalClusters = virtualSize / clusterSize + (virtualSize % clusterSize == 0 ? 0 : 1)
    do {
      let snapshots = try readSnapshotTable()
      try countReferences(snapshots: snapshots)
      compareRefcounts()
      try checkCopiedFlags()
    } catch let stop as CheckStopped {
      result.checkErrors += 1
      result.failure = stop.reason
    } catch {
      report("ERROR: \(error)")
      result.checkErrors += 1
      result.failure = "Input/output error"
    }
  }

  // MARK: - Counting references

  /// Counts one reference to every cluster that `size` bytes at `offset` touch, as qemu's
  /// `qcow2_inc_refcounts_imrt`: the last cluster may run past the end of the file by less
  /// than a cluster (a partly written last cluster), more is damage and is not counted.
  private func countReference(_ offset: Int64, _ size: Int64) {
    guard size > 0 else { return }
    if offset > Int64.max - size || offset + size - fileSize >= clusterSize {
      report(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(lowerHex(offset)) size 0x\(lowerHex(size))"
      )
      result.corruptions += 1
      return
    }
    let first = Int(offset >> Int64(clusterBits))
    let last = Int((offset + size - 1) >> Int64(clusterBits))
    for cluster in first...last {
      references.grow(toInclude: cluster)
      if references[cluster] == refcountMaximum {
        report("ERROR: overflow cluster offset=0x\(lowerHex(Int64(cluster) << Int64(clusterBits)))")
        report(
          "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
        )
        result.corruptions += 1
        continue
      }
      references.increment(cluster)
    }
  }

  private func countReferences(snapshots: CheckedSnapshotTable) throws {
    countReference(0, clusterSize)
    try checkL1(offset: header.l1TableOffset, count: header.l1Size, active: true)

    for snapshot in snapshots.entries {
      if snapshot.l1Offset % UInt64(clusterSize) != 0 {
        report(
          "ERROR snapshot \(snapshot.id) (\(snapshot.name)) l1_offset=\(alternateHex(Int64(bitPattern: snapshot.l1Offset))): L1 table is not cluster aligned; snapshot table entry corrupted"
        )
        result.corruptions += 1
        continue
      }
      if Int(snapshot.l1Size) > QCOW2Header.maximumL1Bytes / 8 {
        report(
          "ERROR snapshot \(snapshot.id) (\(snapshot.name)) l1_size=\(alternateHex(Int64(snapshot.l1Size))): L1 table is too large; snapshot table entry corrupted"
        )
        result.corruptions += 1
        continue
      }
      // Past what a file offset can be: qemu's check fails here too (its arithmetic breaks).
      guard snapshot.l1Offset <= UInt64(Int64.max) - UInt64(snapshot.l1Size) * 8 else {
        report(
          "ERROR snapshot \(snapshot.id) (\(snapshot.name)) l1_offset=\(alternateHex(Int64(bitPattern: snapshot.l1Offset))): L1 table offset is beyond any file"
        )
        throw CheckStopped(reason: "Invalid argument")
      }
      try checkL1(offset: Int64(snapshot.l1Offset), count: Int(snapshot.l1Size), active: false)
    }
    countReference(header.snapshotsOffset, snapshots.byteSize)
    countReference(header.refcountTableOffset, header.refcountTableClusters * clusterSize)
    try countBitmaps()
    checkRefcountBlocks()
  }

  /// Counts an L1 table, its L2 tables and the clusters they map. The active table also
  /// gives the allocation figures.
  private func checkL1(offset: Int64, count: Int, active: Bool) throws {
    countReference(offset, Int64(count) * 8)
    guard count > 0 else { return }
    var l2 = [UInt64](repeating: 0, count: header.clusterSize / 8)
    try forEachNonZeroEntry(ofL1At: offset, count: count) { index, entry in
      if entry & Self.l1ReservedBits != 0 {
        report("ERROR found L1 entry with reserved bits set: \(lowerHex(entry))")
        result.corruptions += 1
      }
      let l2Offset = Int64(entry & Self.offsetBits)
      guard l2Offset != 0 else { return }
      countReference(l2Offset, clusterSize)
      if l2Offset % clusterSize != 0 {
        report("ERROR l2_offset=\(lowerHex(l2Offset)): Table is not cluster aligned; L1 entry corrupted")
        result.corruptions += 1
      }
      try readEntries(into: &l2, count: l2.count, at: l2Offset)
      checkL2(l2, active: active)
    }
  }

  /// Reads big-endian 64-bit entries; what lies past the end of the file reads as zeros,
  /// as qemu's block layer reads it.
  private func readEntries(into entries: inout [UInt64], count: Int, at offset: Int64) throws {
    try entries.withUnsafeMutableBytes { buffer in
      let wanted = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count * 8])
      var done = 0
      while done < wanted.count, offset + Int64(done) < fileSize {
        let n = try source.read(
          into: UnsafeMutableRawBufferPointer(rebasing: wanted[done...]), at: offset + Int64(done))
        if n == 0 { break }
        done += n
      }
      if done < wanted.count {
        UnsafeMutableRawBufferPointer(rebasing: wanted[done...]).initializeMemory(as: UInt8.self, repeating: 0)
      }
    }
    for index in 0..<count { entries[index] = UInt64(bigEndian: entries[index]) }
  }

  /// Reads `count` bytes at `offset`; what lies past the end of the file reads as zeros.
  fileprivate func readZeroFilled(count: Int, at offset: Int64) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    try bytes.withUnsafeMutableBytes { buffer in
      var done = 0
      while done < count, offset + Int64(done) < fileSize {
        let n = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + Int64(done))
        if n == 0 { break }
        done += n
      }
    }
    return bytes
  }

  /// Counts what one L2 table maps, as qemu's `check_refcounts_l2`.
  private func checkL2(_ table: [UInt64], active: Bool) {
    let extended = header.hasExtendedL2
    let entryCount = extended ? table.count / 2 : table.count
    let offsetWidth = UInt64(62 - (clusterBits - 8))
    let sectorMask = (UInt64(1) << UInt64(clusterBits - 8)) - 1
    var nextContiguous: Int64 = 0
    for index in 0..<entryCount {
      let entry = extended ? table[2 * index] : table[index]
      let bitmap = extended ? table[2 * index + 1] : 0
      let compressed = entry & Self.compressedBit != 0
      let host = Int64(entry & Self.offsetBits)
      if !compressed && entry & Self.l2ReservedBits != 0 {
        report("ERROR found l2 entry with reserved bits set: \(lowerHex(entry))")
        result.corruptions += 1
      }
      if compressed {
        let hostOffset = Int64(entry & ((1 << offsetWidth) - 1))
        if entry & Self.copiedBit != 0 {
          report(
            "ERROR: coffset=0x\(lowerHex(hostOffset)): copied flag must never be set for compressed clusters")
          result.corruptions += 1
        }
        if bitmap != 0 {
          report(
            "ERROR compressed cluster \(index) with non-zero subcluster allocation bitmap, entry=0x\(lowerHex(entry))")
          result.corruptions += 1
          continue
        }
        let sectors = Int64((entry >> offsetWidth) & sectorMask) + 1
        countReference(hostOffset, sectors * 512 - hostOffset % 512)
        if active {
          result.allocatedClusters += 1
          result.compressedClusters += 1
          // qemu: compressed clusters are fragmented by nature.
          result.fragmentedClusters += 1
        }
        continue
      }
      let zeroFlag = !extended && entry & Self.zeroBit != 0
      guard host != 0 else {
        // Unallocated or a zero cluster without a host cluster.
        if extended && bitmap & Self.allAllocated != 0 {
          report("ERROR: Unallocated cluster has non-zero subcluster allocation map")
          result.corruptions += 1
        }
        continue
      }
      if (bitmap >> 32) & bitmap != 0 {
        report("ERROR offset=\(lowerHex(host)): Allocated cluster has corrupted subcluster allocation bitmap")
        result.corruptions += 1
      }
      if host % clusterSize != 0 {
        result.corruptions += 1
        let holdsData = extended ? bitmap & Self.allAllocated != 0 : !zeroFlag
        if holdsData {
          report("ERROR offset=\(lowerHex(host)): Data cluster is not properly aligned; L2 entry corrupted.")
        } else {
          report("ERROR offset=\(lowerHex(host)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
        }
      }
      if active {
        result.allocatedClusters += 1
        if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
        nextContiguous = host + clusterSize
      }
      countReference(host, clusterSize)
    }
  }

  /// The bitmap directory, each bitmap's table and its data clusters (qemu's
  /// `qcow2_check_bitmaps_refcounts`), when the autoclear bit says the bitmaps are valid.
  private func countBitmaps() throws {
    guard let bitmaps = header.bitmaps, bitmaps.count > 0 else { return }
    countReference(bitmaps.directoryOffset, bitmaps.directorySize)
    let tables: [(offset: Int64, entries: Int)]
    do {
      tables = try BitmapDirectory.tables(bitmaps, from: source, clusterSize: header.clusterSize, fileSize: fileSize)
    } catch {
      report("ERROR: \(error)")
      result.corruptions += 1
      throw CheckStopped(reason: "Invalid argument")
    }
    for (offset, entries) in tables {
      countReference(offset, Int64(entries) * 8)
      guard offset % clusterSize == 0, offset <= fileSize - Int64(entries) * 8 else {
        report("ERROR: bitmap table at 0x\(lowerHex(offset)) (\(entries) entries) is not a valid table")
        result.corruptions += 1
        throw CheckStopped(reason: "Invalid argument")
      }
      let window = 8192
      var table = [UInt64](repeating: 0, count: min(window, max(entries, 1)))
      for first in stride(from: 0, to: entries, by: window) {
        let length = min(window, entries - first)
        try readEntries(into: &table, count: length, at: offset + Int64(first) * 8)
        for entry in table[0..<length] {
          let dataOffset = Int64(entry & Self.offsetBits)
          let reserved: UInt64 = 0xff00_0000_0000_01fe
          if entry & reserved != 0 || (dataOffset != 0 && (entry & 1 != 0 || dataOffset % clusterSize != 0)) {
            result.corruptions += 1
            continue
          }
          if dataOffset != 0 { countReference(dataOffset, clusterSize) }
        }
      }
    }
  }

  /// Counts each refcount block and checks it is referenced once, as qemu's `check_refblocks`.
  private func checkRefcountBlocks() {
    let fileClusters = Int64(references.count)
    for (index, entry) in stored.table.enumerated() {
      if entry & Self.refcountTableReservedBits != 0 {
        report("ERROR refcount table entry \(index) has reserved bits set")
        result.corruptions += 1
        continue
      }
      let offset = Int64(bitPattern: entry)
      if offset % clusterSize != 0 {
        report("ERROR refcount block \(index) is not cluster aligned; refcount table entry corrupted")
        result.corruptions += 1
        continue
      }
      if offset < 0 || offset >> Int64(clusterBits) >= fileClusters {
        result.corruptions += 1
        report("ERROR refcount block \(index) is outside image")
        continue
      }
      guard offset != 0 else { continue }
      countReference(offset, clusterSize)
      let count = references[Int(offset >> Int64(clusterBits))]
      if count != 1 {
        report("ERROR refcount block \(index) refcount=\(count)")
        result.corruptions += 1
      }
    }
  }

  // MARK: - Comparing

  /// Compares every cluster's stored refcount with the references counted.
  private func compareRefcounts() {
    var highest = 0
    for cluster in 0..<references.count {
      let counted = references[cluster]
      let storedCount: UInt64
      do {
        storedCount = try stored.refcount(of: Int64(cluster))
      } catch {
        if let unaligned = error as? StoredRefcounts.UnalignedBlock, !signaledCorruption {
          // qemu says this once, then counts each cluster as an internal error.
          signaledCorruption = true
          report(
            "qcow2: Image is corrupt: Refblock offset \(alternateHex(unaligned.offset)) unaligned (reftable index: \(alternateHex(unaligned.tableIndex))); further non-fatal corruption events will be suppressed"
          )
        }
        report("Can't get refcount for cluster \(cluster): \(error)")
        result.checkErrors += 1
        continue
      }
      if storedCount > 0 || counted > 0 { highest = cluster }
      if storedCount != counted {
        report("\(storedCount < counted ? "ERROR" : "Leaked") cluster \(cluster) refcount=\(storedCount) reference=\(counted)")
        if storedCount < counted { result.corruptions += 1 } else { result.leaks += 1 }
      }
    }
    result.imageEndOffset = (Int64(highest) + 1) * clusterSize
  }

  /// The copied flag must be set exactly when the stored refcount is 1, on the active L1
  /// entries and the L2 entries of plain and preallocated zero clusters (qemu's
  /// `check_oflag_copied`).
  private func checkCopiedFlags() throws {
    let count = header.l1Size
    guard count > 0 else { return }
    var l2 = [UInt64](repeating: 0, count: header.clusterSize / 8)
    let extended = header.hasExtendedL2
    try forEachNonZeroEntry(ofL1At: header.l1TableOffset, count: count) { index, entry in
      let l2Offset = Int64(entry & Self.offsetBits)
      guard l2Offset != 0 else { return }
      guard let refcount = try? stored.refcount(of: l2Offset >> Int64(clusterBits)) else { return }
      if (refcount == 1) != (entry & Self.copiedBit != 0) {
        result.corruptions += 1
        report(
          "ERROR OFLAG_COPIED L2 cluster: l1_index=\(index) l1_entry=\(lowerHex(entry)) refcount=\(refcount)")
      }
      try readEntries(into: &l2, count: l2.count, at: l2Offset)
      let entryCount = extended ? l2.count / 2 : l2.count
      for l2Index in 0..<entryCount {
        let l2Entry = extended ? l2[2 * l2Index] : l2[l2Index]
        let host = Int64(l2Entry & Self.offsetBits)
        guard l2Entry & Self.compressedBit == 0, host != 0 else { continue }
        guard let dataRefcount = try? stored.refcount(of: host >> Int64(clusterBits)) else { continue }
        if (dataRefcount == 1) != (l2Entry & Self.copiedBit != 0) {
          result.corruptions += 1
          report("ERROR OFLAG_COPIED data cluster: l2_entry=\(lowerHex(l2Entry)) refcount=\(dataRefcount)")
        }
      }
    }
  }

  /// Visits the non-zero entries of an L1 table. A table inside the file is walked by
  /// `L1Table`, which skips its holes (a sparse 32 MiB table costs a few reads); one that
  /// runs past the end reads as zeros there, as qemu reads it.
  private func forEachNonZeroEntry(ofL1At offset: Int64, count: Int, _ visit: (Int, UInt64) throws -> Void) throws {
    if offset > 0, offset <= fileSize - Int64(count) * 8 {
      let table = L1Table(source: source, offset: offset, count: count)
      var index = 0
      while let found = try table.firstNonZero(from: index, below: count) {
        try visit(found, try table.entry(found))
        index = found + 1
      }
      return
    }
    let window = 8192
    var entries = [UInt64](repeating: 0, count: min(window, count))
    for first in stride(from: 0, to: count, by: window) {
      let length = min(window, count - first)
      try readEntries(into: &entries, count: length, at: offset + Int64(first) * 8)
      for index in 0..<length where entries[index] != 0 { try visit(first + index, entries[index]) }
    }
  }
}

/// The check cannot go on (qemu returns an error at the same point); `reason` is the
/// strerror text qemu-img prints after "Check failed: ".
private struct CheckStopped: Error {
  var reason: String
}

private func lowerHex(_ value: Int64) -> String { String(UInt64(bitPattern: value), radix: 16) }
private func lowerHex(_ value: UInt64) -> String { String(value, radix: 16) }
/// C's `%#lx`: `0x` before any value but zero.
private func alternateHex(_ value: Int64) -> String { value == 0 ? "0" : "0x" + lowerHex(value) }

/// One reference counter per host cluster: a byte each, with the rare count of 255 or
/// more kept aside, so a file of n clusters costs n bytes.
struct ReferenceCounts {
  private var small: [UInt8]
  private var large: [Int: UInt64] = [:]

  init(clusters: Int) { small = [UInt8](repeating: 0, count: clusters) }

  var count: Int { small.count }

  subscript(cluster: Int) -> UInt64 {
    let value = small[cluster]
    return value == .max ? large[cluster]! : UInt64(value)
  }

  /// Makes room for a reference just past the end of the file (qemu allows less than a
  /// cluster there).
  mutating func grow(toInclude cluster: Int) {
    if cluster >= small.count { small.append(contentsOf: repeatElement(0, count: cluster + 1 - small.count)) }
  }

  mutating func increment(_ cluster: Int) {
    let value = small[cluster]
    if value < .max - 1 {
      small[cluster] = value + 1
    } else if value == .max - 1 {
      small[cluster] = .max
      large[cluster] = UInt64(UInt8.max)
    } else {
      large[cluster]! += 1
    }
  }
}

/// The refcounts the image stores: the refcount table, held whole (qemu caps it at 8 MiB),
/// and refcount blocks read as asked, a few kept.
final class StoredRefcounts {
  let table: [UInt64]
  private let source: ByteSource
  private let fileSize: Int64
  private let clusterSize: Int
  private let refcountBits: Int
  /// log2 of the refcounts one block holds.
  private let blockBits: Int
  private var blocks: [Int64: [UInt8]] = [:]
  private var recent: [Int64] = []
  private var lastOffset: Int64 = -1
  private var lastBlock: [UInt8] = []
  /// At most 8 MiB of blocks (4 of 2 MiB clusters, 128 of 64 KiB ones).
  private var blocksKept: Int { max(4, (8 << 20) / clusterSize) }

  /// A refcount block the table points at is not cluster aligned (qemu answers EIO).
  struct UnalignedBlock: Error, CustomStringConvertible {
    var offset: Int64
    var tableIndex: Int64
    var description: String { "Input/output error" }
  }

  init(source: ByteSource, header: QCOW2Header, fileSize: Int64) throws {
    self.source = source
    self.fileSize = fileSize
    clusterSize = header.clusterSize
    refcountBits = 1 << header.refcountOrder
    blockBits = header.clusterBits + 3 - header.refcountOrder
    let count = Int(header.refcountTableClusters) * header.clusterSize / 8
    var entries = [UInt64](repeating: 0, count: count)
    // Past the end of the file the table reads as zeros, as qemu reads it.
    try entries.withUnsafeMutableBytes { buffer in
      var done = 0
      let start = header.refcountTableOffset
      while done < buffer.count, start + Int64(done) < fileSize {
        let n = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: start + Int64(done))
        if n == 0 { break }
        done += n
      }
    }
    table = entries.map { UInt64(bigEndian: $0) }
  }

  /// The stored refcount of the cluster with this index (0 where no block covers it).
  func refcount(of cluster: Int64) throws -> UInt64 {
    let tableIndex = cluster >> Int64(blockBits)
    guard tableIndex < table.count else { return 0 }
    let offset = Int64(bitPattern: table[Int(tableIndex)] & ~0x1ff)
    guard offset != 0 else { return 0 }
    guard offset % Int64(clusterSize) == 0 else { throw UnalignedBlock(offset: offset, tableIndex: tableIndex) }
    let block = try self.block(at: offset)
    let index = Int(cluster & ((1 << Int64(blockBits)) - 1))
    if refcountBits < 8 {
      let bit = index * refcountBits
      return UInt64(block[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(refcountBits)) - 1)
    }
    let width = refcountBits / 8
    var value: UInt64 = 0
    for byte in block[(index * width)..<(index * width + width)] { value = value << 8 | UInt64(byte) }
    return value
  }

  private func block(at offset: Int64) throws -> [UInt8] {
    if offset == lastOffset { return lastBlock }
    let block: [UInt8]
    if let cached = blocks[offset] {
      block = cached
    } else {
      // Past the end of the file a block reads as zeros, as qemu reads it.
      var bytes = [UInt8](repeating: 0, count: clusterSize)
      try bytes.withUnsafeMutableBytes { buffer in
        var done = 0
        while done < buffer.count, offset + Int64(done) < fileSize {
          let n = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + Int64(done))
          if n == 0 { break }
          done += n
        }
      }
      if recent.count >= blocksKept { blocks[recent.removeFirst()] = nil }
      blocks[offset] = bytes
      recent.append(offset)
      block = bytes
    }
    lastOffset = offset
    lastBlock = block
    return block
  }
}

/// The internal snapshots' table as the check reads it: where each snapshot's L1 table is,
/// and the table's size in bytes (which qemu counts as referenced). Not the reader's
/// `SnapshotTable`: the check reads the table the lenient way qemu's check does (what lies
/// past the end reads as zeros, an incomplete entry is a finding, not a refusal), so that it
/// can report on images the reader refuses to open.
struct CheckedSnapshotTable {
  struct Entry {
    var l1Offset: UInt64
    var l1Size: UInt32
    var extraDataSize: UInt32
    var id: String
    var name: String
  }

  var entries: [Entry] = []
  var byteSize: Int64 = 0
}

extension QCOW2Checker {
  /// qemu's limits: extra data per snapshot, and the whole table (1 KiB per snapshot).
  private static let maximumExtraData: UInt32 = 1024
  private static let maximumSnapshotTableBytes: Int64 = 64 << 20
  /// A version 3 snapshot's extra data holds at least the large VM state size and the disk size.
  private static let version3ExtraData: UInt32 = 16

  /// Reads the snapshot table as qemu's check reads it (`qcow2_check_read_snapshot_table`):
  /// what lies past the end of the file reads as zeros; too much extra data, or a table
  /// over 64 MiB, stops the check; a version 3 entry without the 16 bytes of extra data it
  /// needs is a corruption.
  fileprivate func readSnapshotTable() throws -> CheckedSnapshotTable {
    var table = CheckedSnapshotTable()
    // qemu validates the table's offset even when there are no snapshots.
    let pointer = BigEndianReader(try readZeroFilled(count: 12, at: 60))
    let rawOffset = pointer.uint64(at: 4)!
    let tableBytes = UInt64(header.snapshotCount) * UInt64(QCOW2Header.minimumSnapshotEntryBytes)
    if rawOffset > UInt64(Int64.max) - tableBytes || rawOffset % UInt64(clusterSize) != 0 {
      reportNamed("ERROR snapshot table offset invalid")
      throw CheckStopped(reason: "Invalid argument")
    }
    let start = header.snapshotsOffset
    var offset = start
    for index in 0..<header.snapshotCount {
      offset = (offset + 7) / 8 * 8
      let fixed = BigEndianReader(try readZeroFilled(count: QCOW2Header.minimumSnapshotEntryBytes, at: offset))
      offset += Int64(QCOW2Header.minimumSnapshotEntryBytes)
      let idSize = Int(fixed.uint16(at: 12)!)
      let nameSize = Int(fixed.uint16(at: 14)!)
      let extraSize = fixed.uint32(at: 36)!
      if extraSize > Self.maximumExtraData {
        reportNamed("ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry \(index)")
        throw CheckStopped(reason: "File too large")
      }
      offset += Int64(extraSize)
      let names = try readZeroFilled(count: idSize + nameSize, at: offset)
      offset += Int64(idSize + nameSize)
      table.entries.append(
        CheckedSnapshotTable.Entry(
          l1Offset: fixed.uint64(at: 0)!, l1Size: fixed.uint32(at: 8)!, extraDataSize: extraSize,
          id: String(decoding: names[0..<idSize], as: UTF8.self),
          name: String(decoding: names[idSize...], as: UTF8.self)))
      if offset - start > Self.maximumSnapshotTableBytes {
        reportNamed("ERROR failed to read the snapshot table: Snapshot table is too big")
        throw CheckStopped(reason: "File too large")
      }
    }
    table.byteSize = offset - start
    if header.version >= 3 {
      for (index, entry) in table.entries.enumerated() where entry.extraDataSize < Self.version3ExtraData {
        result.corruptions += 1
        report("ERROR snapshot table entry \(index) is incomplete")
      }
    }
    return table
  }
}

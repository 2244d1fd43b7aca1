import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

extension QCOW2Writer {
  /// Where `finish()` puts the tables that follow the data and the L2 tables.
  struct MetadataLayout: Equatable {
    /// Host clusters used before the metadata (header, data, L2 tables).
    var base: Int64
    var l1Clusters: Int64
    var refcountTableClusters: Int64
    var refcountBlocks: Int64

    var l1Offset: Int64 { base }
    var refcountTableCluster: Int64 { base + l1Clusters }
    var firstRefcountBlock: Int64 { refcountTableCluster + refcountTableClusters }
    /// Every host cluster of the finished image.
    var totalClusters: Int64 { firstRefcountBlock + refcountBlocks }

    /// Sizes the refcount structures so that they count every cluster, their own included:
    /// adding blocks can need more table clusters, which can need more blocks; the sizes only
    /// grow, so the loop ends (in two or three rounds).
    static func compute(base: Int64, l1Entries: Int, clusterSize: Int, refcountBits: Int) -> MetadataLayout {
      let size = Int64(clusterSize)
      let perBlock = size * 8 / Int64(refcountBits)
      var layout = MetadataLayout(
        base: base, l1Clusters: (Int64(l1Entries) * 8 + size - 1) / size,
        refcountTableClusters: 0, refcountBlocks: 0)
      while true {
        let blocks = (layout.totalClusters + perBlock - 1) / perBlock
        let tableClusters = max(1, (blocks * 8 + size - 1) / size)
        if blocks == layout.refcountBlocks && tableClusters == layout.refcountTableClusters { return layout }
        layout.refcountBlocks = max(blocks, layout.refcountBlocks)
        layout.refcountTableClusters = max(tableClusters, layout.refcountTableClusters)
      }
    }
  }

  /// Writes the refcount blocks, the refcount table, the L1 table and the header, in that
  /// order: the header, which makes the file an image, comes last.
  func writeMetadata() throws {
    let layout = MetadataLayout.compute(
      base: nextFreeCluster, l1Entries: l1Size, clusterSize: clusterSize, refcountBits: settings.refcountBits)
    let size = Int64(clusterSize)
    let bits = settings.refcountBits
    let perBlock = Int64(clusterSize * 8 / bits)
    let total = layout.totalClusters

    // Every cluster below `total` is used once, except those holding compressed data.
    let ones = Self.refcountBlockOfOnes(clusterSize: clusterSize, refcountBits: bits)
    var shared = 0
    var block = ones
    for index in 0..<layout.refcountBlocks {
      let first = index * perBlock
      let count = Int(min(perBlock, total - first))
      block = ones
      if count < Int(perBlock) {
        for entry in count..<Int(perBlock) { Self.storeRefcount(0, entry: entry, bits: bits, in: &block) }
      }
      while shared < sharedClusters.count, sharedClusters[shared] < first + Int64(count) {
        Self.storeRefcount(sharedCounts[shared], entry: Int(sharedClusters[shared] - first), bits: bits, in: &block)
        shared += 1
      }
      try block.withUnsafeBytes { try file.write($0, at: (layout.firstRefcountBlock + index) * size) }
    }

    var table = [UInt8](repeating: 0, count: Int(layout.refcountTableClusters * size))
    for index in 0..<Int(layout.refcountBlocks) {
      BigEndianWriter.store(UInt64((layout.firstRefcountBlock + Int64(index)) * size), at: index * 8, in: &table)
    }
    try table.withUnsafeBytes { try file.write($0, at: layout.refcountTableCluster * size) }

    // An empty disk has no L1 table at all (qemu writes offset 0 then). The table goes out
    // in pieces; in a new file, a piece without L2 tables is left a hole: a 2 PiB disk has
    // a 32 MiB L1 table that is mostly zeros.
    if l1Size > 0 {
      let pieceEntries = 8192
      let tableEntries = Int(layout.l1Clusters * size) / 8
      let skipZeros = file.readsAsZero && !file.isSequential
      var piece = [UInt8](repeating: 0, count: pieceEntries * 8)
      let zeros = [Int64](repeating: 0, count: pieceEntries)
      try l2Offsets.withUnsafeBufferPointer { offsets in
        for first in stride(from: 0, to: tableEntries, by: pieceEntries) {
          let count = min(pieceEntries, tableEntries - first)
          let used = max(0, min(count, offsets.count - first))
          let empty = zeros.withUnsafeBytes { memcmp(offsets.baseAddress! + first, $0.baseAddress!, used * 8) == 0 }
          if empty && skipZeros { continue }
          for index in 0..<count {
            let offset = index < used ? offsets[first + index] : 0
            BigEndianWriter.store(offset == 0 ? 0 : UInt64(offset) | Self.copiedFlag, at: index * 8, in: &piece)
          }
          try piece.withUnsafeBytes {
            try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<count * 8]), at: layout.l1Offset * size + Int64(first) * 8)
          }
        }
      }
    }

    let header = try headerBytes(
      l1Offset: l1Size == 0 ? 0 : layout.l1Offset * size, refcountTableOffset: layout.refcountTableCluster * size,
      refcountTableClusters: layout.refcountTableClusters)
    try header.withUnsafeBytes { try file.write($0, at: 0) }
    // The refcount blocks are the last clusters and are written whole, so the file already
    // ends at `total` clusters; this only makes sure of it. A file made longer ahead of
    // direct writes (`KernelCopier.extendedAhead`) holds nothing past them: it is cut back.
    let length = try file.size()
    if length < total * size || (length > total * size && fileExtendedAhead) { try file.truncate(to: total * size) }
  }

  /// A refcount block in which every entry is 1. Entries narrower than a byte fill each byte
  /// from its least significant bit, as qemu packs them; wider ones are big-endian.
  static func refcountBlockOfOnes(clusterSize: Int, refcountBits: Int) -> [UInt8] {
    switch refcountBits {
    case 1: return [UInt8](repeating: 0xff, count: clusterSize)
    case 2: return [UInt8](repeating: 0x55, count: clusterSize)
    case 4: return [UInt8](repeating: 0x11, count: clusterSize)
    default:
      let width = refcountBits / 8
      var block = [UInt8](repeating: 0, count: clusterSize)
      for entry in stride(from: width - 1, to: clusterSize, by: width) { block[entry] = 1 }
      return block
    }
  }

  static func storeRefcount(_ value: UInt64, entry: Int, bits: Int, in block: inout [UInt8]) {
    if bits < 8 {
      let perByte = 8 / bits
      let shift = (entry % perByte) * bits
      let mask = UInt8((1 << bits) - 1) << shift
      let byte = entry / perByte
      block[byte] = (block[byte] & ~mask) | (UInt8(truncatingIfNeeded: value) << shift) & mask
    } else {
      let width = bits / 8
      for i in 0..<width {
        block[entry * width + i] = UInt8(truncatingIfNeeded: value >> UInt64((width - 1 - i) * 8))
      }
    }
  }

  /// The bytes of cluster 0: the header, its extensions, then the backing file name.
  /// Throws when they do not fit in one cluster (a long backing name with small clusters).
  @discardableResult
  func headerBytes(l1Offset: Int64, refcountTableOffset: Int64, refcountTableClusters: Int64) throws -> [UInt8] {
    var header = BigEndianWriter(capacity: 512)
    header.append(UInt32(0x5146_49fb))  // magic "QFI\xfb"
    header.append(settings.version)
    header.append(UInt64(0))  // backing_file_offset, filled in below
    header.append(UInt32(0))  // backing_file_size
    header.append(UInt32(clusterBits))
    header.append(UInt64(recordedSize))
    header.append(UInt32(0))  // crypt_method: none
    header.append(UInt32(l1Size))
    header.append(UInt64(l1Offset))
    header.append(UInt64(refcountTableOffset))
    header.append(UInt32(refcountTableClusters))
    header.append(UInt32(0))  // nb_snapshots
    header.append(UInt64(0))  // snapshots_offset
    if settings.version >= 3 {
      // Incompatible bit 3: the compression_type field is not zlib's 0.
      header.append(UInt64(settings.compressionType == .zlib ? 0 : 1 << 3))  // incompatible_features
      header.append(UInt64(0))  // compatible_features
      header.append(UInt64(0))  // autoclear_features
      header.append(UInt32(settings.refcountOrder))
      header.append(UInt32(112))  // header_length, as qemu 7.2 writes it
      header.append(settings.compressionType.qcow2Code)
      header.append(contentsOf: [UInt8](repeating: 0, count: 7))  // padding to a multiple of 8
    }
    if let format = backing?.format {
      let name = Array(format.utf8)
      header.append(UInt32(0xe279_2aca))  // backing file format name
      header.append(UInt32(name.count))
      header.append(contentsOf: name)
      header.append(contentsOf: [UInt8](repeating: 0, count: (8 - name.count % 8) % 8))
    }
    header.append(UInt64(0))  // end of the header extensions (type 0, length 0)
    if let backing {
      let name = Array(backing.name.utf8)
      BigEndianWriter.store(UInt64(header.bytes.count), at: 8, in: &header.bytes)
      BigEndianWriter.store(UInt32(name.count), at: 16, in: &header.bytes)
      header.append(contentsOf: name)
    }
    guard header.bytes.count <= clusterSize else {
      throw ImageError.usage(
        path: output.name,
        "the header with its backing file name takes \(header.bytes.count) bytes, more than one \(clusterSize)-byte cluster (use a larger cluster_size)")
    }
    return header.bytes
  }
}

extension QCOW2Writer: FullyAllocatedLength {
  /// With every cluster data: the header cluster, one host cluster per cluster of the disk
  /// (data that does not compress is stored as it is, with or without -c), every L2 table,
  /// then the L1 table and the refcount structures as `writeMetadata` sizes them.
  public var fullyAllocatedLength: Int64 {
    let clusters = (recordedSize + Int64(clusterSize) - 1) >> Int64(clusterBits)
    let layout = MetadataLayout.compute(
      base: 1 + clusters + Int64(l1Size), l1Entries: l1Size, clusterSize: clusterSize,
      refcountBits: settings.refcountBits)
    return layout.totalClusters * Int64(clusterSize)
  }
}

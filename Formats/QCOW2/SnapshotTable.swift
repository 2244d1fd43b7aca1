import DiskImage

/// One entry of the qcow2 snapshot table: where the snapshot's L1 table is, and what
/// `info` lists about it. Layout per qemu's docs/interop/qcow2.txt ("Snapshot table").
struct QCOW2Snapshot {
  var l1TableOffset: Int64
  var l1Size: Int
  /// The virtual size the disk had when the snapshot was taken; nil when the entry is too
  /// old to record it (then it is the image's current size, as qemu reads it).
  var diskSize: Int64?
  var info: SnapshotInfo
}

/// Reads and checks the snapshot table the header points at. Every entry is checked
/// before anything is kept; damage is an error naming the image and the entry.
enum SnapshotTable {
  /// qemu's limit on the table as a whole (QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot
  /// at the most snapshots allowed).
  static let maximumTableBytes: Int64 = 64 << 20
  /// qemu's limit on one entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
  static let maximumExtraDataBytes = 1024
  /// Bytes read at a time: a table of a few snapshots takes one read.
  private static let windowBytes = 64 << 10

  /// The entries of the table of `header.snapshotCount` snapshots at
  /// `header.snapshotsOffset` in `source` (whose size is `fileSize`).
  static func read(from source: ByteSource, header: QCOW2Header, fileSize: Int64) throws -> [QCOW2Snapshot] {
    guard header.snapshotCount > 0 else { return [] }
    let path = source.name
    let tableStart = header.snapshotsOffset
    let clusterSize = Int64(header.clusterSize)
    var window = Window(source: source, fileSize: fileSize)
    var snapshots: [QCOW2Snapshot] = []
    snapshots.reserveCapacity(header.snapshotCount)
    var offset = tableStart

    for index in 0..<header.snapshotCount {
      func entryDamage(_ message: String) -> ImageError {
        .invalid(path: path, "snapshot table entry \(index) at \(hex(offset)) \(message)")
      }
      offset = (offset + 7) / 8 * 8
      let fixed = try window.bytes(
        at: offset, count: QCOW2Header.minimumSnapshotEntryBytes, what: "snapshot table entry \(index)")
      let rawL1Offset = fixed.uint64(at: 0)!
      let rawL1Size = fixed.uint32(at: 8)!
      let idLength = Int(fixed.uint16(at: 12)!)
      let nameLength = Int(fixed.uint16(at: 14)!)
      let dateSeconds = fixed.uint32(at: 16)!
      let dateNanoseconds = fixed.uint32(at: 20)!
      let vmClock = fixed.uint64(at: 24)!
      var vmStateSize = UInt64(fixed.uint32(at: 32)!)
      let extraLength = Int(fixed.uint32(at: 36)!)
      guard extraLength <= maximumExtraDataBytes else {
        throw entryDamage("has \(extraLength) bytes of extra data, more than qemu's limit of \(maximumExtraDataBytes)")
      }

      // The variable part: extra data, id, name. The table's total stays within qemu's limit.
      let variableStart = offset + Int64(QCOW2Header.minimumSnapshotEntryBytes)
      let variableLength = extraLength + idLength + nameLength
      let entryEnd = variableStart + Int64(variableLength)
      guard entryEnd - tableStart <= maximumTableBytes else {
        throw entryDamage(
          "ends \(entryEnd - tableStart) bytes into the snapshot table, past qemu's limit of \(maximumTableBytes) bytes")
      }
      let variable = try window.bytes(
        at: variableStart, count: variableLength,
        what: "extra data, id and name of snapshot table entry \(index) (at \(hex(offset)))")

      var diskSize: UInt64?
      var icount: UInt64?
      if extraLength >= 8 { vmStateSize = variable.uint64(at: 0)! }
      if extraLength >= 16 { diskSize = variable.uint64(at: 8)! }
      if extraLength >= 24 { icount = variable.uint64(at: 16)! }
      let idBytes = variable.slice(at: extraLength, count: idLength)!
      let nameBytes = variable.slice(at: extraLength + idLength, count: nameLength)!
      guard !idBytes.contains(0) else { throw entryDamage("has an id that holds a NUL byte") }
      guard !nameBytes.contains(0) else { throw entryDamage("has a name that holds a NUL byte") }
      let id = String(decoding: idBytes, as: UTF8.self)
      let name = String(decoding: nameBytes, as: UTF8.self)
      func damage(_ message: String) -> ImageError {
        .invalid(path: path, "snapshot '\(name)' (id '\(id)', table entry \(index)) \(message)")
      }

      guard vmStateSize <= UInt64(Int64.max) else { throw damage("has a VM state size of \(vmStateSize), 2^63 or more") }
      if let diskSize {
        guard diskSize <= UInt64(Int64.max) else { throw damage("has a disk size of \(diskSize), 2^63 or more") }
      }
      // The snapshot's L1 table, checked as the active one is (the header's rules).
      guard Int(rawL1Size) <= QCOW2Header.maximumL1Bytes / 8 else {
        throw damage(
          "has an L1 table of \(rawL1Size) entries, larger than the 32 MiB limit (\(QCOW2Header.maximumL1Bytes / 8) entries)")
      }
      if rawL1Size > 0 {
        guard rawL1Offset % UInt64(clusterSize) == 0 else {
          throw damage("has its L1 table at \(hex(rawL1Offset)), not aligned to the cluster size \(hex(clusterSize))")
        }
        guard rawL1Offset != 0 else { throw damage("has its L1 table at 0, inside the header cluster") }
        guard rawL1Offset < UInt64(fileSize), UInt64(fileSize) - rawL1Offset >= UInt64(rawL1Size) * 8 else {
          throw damage(
            "has its L1 table at \(hex(rawL1Offset)) (\(rawL1Size) entries), past the end of the file (size \(hex(fileSize)))")
        }
      }
      if let diskSize {
        let l2Span = clusterSize * Int64(header.l2EntriesPerTable)
        let needed = (Int64(diskSize) + l2Span - 1) / l2Span
        guard Int64(rawL1Size) >= needed else {
          throw damage("has an L1 table of \(rawL1Size) entries, its disk size \(diskSize) needs \(needed)")
        }
      }

      snapshots.append(
        QCOW2Snapshot(
          l1TableOffset: rawL1Size > 0 ? Int64(rawL1Offset) : 0, l1Size: Int(rawL1Size),
          diskSize: diskSize.map { Int64($0) },
          info: SnapshotInfo(
            id: id, name: name, vmStateSize: Int64(vmStateSize), dateSeconds: Int64(dateSeconds),
            dateNanoseconds: Int64(dateNanoseconds), vmClockNanoseconds: vmClock,
            // qemu stores -1 when icount was off; it and an entry too old to hold it mean "none".
            icount: icount.flatMap { $0 == UInt64.max ? nil : Int64(bitPattern: $0) })))
      offset = entryEnd
    }
    return snapshots
  }

  /// The table's bytes, read a window at a time as the entries reach them.
  private struct Window {
    let source: ByteSource
    let fileSize: Int64
    var start: Int64 = 0
    var bytes: [UInt8] = []

    init(source: ByteSource, fileSize: Int64) {
      self.source = source
      self.fileSize = fileSize
    }

    /// `count` bytes at `offset` of the file; `what` names them in errors.
    mutating func bytes(at offset: Int64, count: Int, what: @autoclosure () -> String) throws -> BigEndianReader {
      guard offset + Int64(count) <= fileSize else {
        throw ImageError.invalid(
          path: source.name,
          "\(what()) (\(count) bytes at \(hex(offset))) would end past the end of the file (size \(hex(fileSize)))")
      }
      if offset < start || offset + Int64(count) > start + Int64(bytes.count) {
        let length = Int(min(fileSize - offset, Int64(max(count, SnapshotTable.windowBytes))))
        bytes = try source.readBytes(count: length, at: offset, what: what())
        start = offset
      }
      let from = Int(offset - start)
      return BigEndianReader(Array(bytes[from..<from + count]))
    }
  }
}

import DiskImage

/// The metadata log: a ring of 4 KiB sectors holding entries of writes to the file. A file
/// that was not closed cleanly has a log to replay before its metadata can be trusted.
/// Replay here never writes the input: the writes of the active sequence become an
/// in-memory overlay (`ReplayedSource`) that the reader reads through.
enum VHDXLog {
  static let sector = 4096
  /// The largest log replayed in memory; larger logs are refused (qemu writes 1 MiB).
  static let maximumLength: Int64 = 64 << 20

  /// One valid entry of the log.
  struct Entry {
    var position: Int64
    var length: Int64
    var tail: Int64
    var sequenceNumber: UInt64
    var flushedFileOffset: UInt64
    var lastFileOffset: UInt64
    var writes: [ReplayedSource.Write]
  }

  /// The file as the log's newest complete sequence leaves it, or `source` itself when
  /// the log is empty.
  static func replay(_ header: VHDXHeader, over source: ByteSource, fileSize: Int64) throws -> ByteSource {
    guard !header.logGuid.isZero, header.logLength > 0 else { return source }
    func invalid(_ message: String) -> ImageError { .invalid(path: source.name, message) }
    guard header.logLength <= maximumLength else {
      throw ImageError.unsupported(
        path: source.name,
        "has a log of \(hex(header.logLength)) bytes to replay, more than the \(hex(maximumLength)) lacuna replays in memory")
    }
    guard header.logOffset <= fileSize - header.logLength else {
      throw invalid(
        "log at \(hex(header.logOffset)) (\(hex(header.logLength)) bytes) runs past the end of the file (size \(hex(fileSize)))")
    }
    let ring = try source.readBytes(count: Int(header.logLength), at: header.logOffset, what: "log")
    var entries: [Int64: Entry] = [:]
    // Hostile entries may each claim the whole ring: checksum at most a few rings' worth.
    var budget = ring.count * 8
    for position in stride(from: 0, to: ring.count, by: sector) {
      if let entry = parseEntry(ring, at: position, logGuid: header.logGuid, budget: &budget) {
        entries[entry.position] = entry
      }
    }
    // The newest entry whose sequence, from its tail, is complete is the head.
    for head in entries.values.sorted(by: { $0.sequenceNumber > $1.sequenceNumber }) {
      guard let sequence = walk(from: head, entries: entries, ringLength: Int64(ring.count)) else { continue }
      guard head.flushedFileOffset <= UInt64(fileSize) else {
        throw invalid(
          "log entry \(head.sequenceNumber) says the file was \(hex(head.flushedFileOffset)) bytes long, but it is \(hex(fileSize)): truncated")
      }
      let newSize = max(UInt64(fileSize), head.lastFileOffset)
      guard newSize <= UInt64(Int64.max / 2) else { throw invalid("log entry \(head.sequenceNumber) has an absurd last file offset") }
      for write in sequence.flatMap(\.writes) {
        guard write.range.upperBound <= Int64(newSize) else {
          throw invalid(
            "log entry \(head.sequenceNumber) writes \(hex(write.range.lowerBound))..\(hex(write.range.upperBound)), past the file's end after replay (\(hex(Int64(newSize))))")
        }
        guard write.range.lowerBound >= 1 << 20 else {
          throw invalid("log entry \(head.sequenceNumber) writes at \(hex(write.range.lowerBound)), inside the first MiB")
        }
      }
      return ReplayedSource(base: source, size: Int64(newSize), writes: sequence.flatMap(\.writes))
    }
    // No valid entry at all: the log holds nothing to replay.
    return source
  }

  /// The entries from `head`'s tail up to `head`, each one sequence number after the last,
  /// or nil when that run is broken.
  static func walk(from head: Entry, entries: [Int64: Entry], ringLength: Int64) -> [Entry]? {
    var sequence: [Entry] = []
    var position = head.tail
    var expected: UInt64? = nil
    while sequence.count <= entries.count {
      guard let entry = entries[position] else { return nil }
      if let expected, entry.sequenceNumber != expected { return nil }
      sequence.append(entry)
      if entry.position == head.position { return entry.sequenceNumber == head.sequenceNumber ? sequence : nil }
      expected = entry.sequenceNumber &+ 1
      position = (entry.position + entry.length) % ringLength
    }
    return nil
  }

  /// The entry starting at `position` of the ring, or nil when it is not a valid entry (or
  /// checking it would spend more of `budget`, in bytes, than is left).
  static func parseEntry(_ ring: [UInt8], at position: Int, logGuid: GUID, budget: inout Int) -> Entry? {
    let ringLength = ring.count
    func bytes(_ offset: Int, _ count: Int) -> [UInt8] {
      (0..<count).map { ring[(position + offset + $0) % ringLength] }
    }
    let header = LittleEndianReader(bytes(0, 64))
    guard header.matches("loge", at: 0) else { return nil }
    let length = Int(header.uint32(at: 8)!)
    let tail = Int(header.uint32(at: 12)!)
    let sequenceNumber = header.uint64(at: 16)!
    let descriptorCount = Int(header.uint32(at: 24)!)
    guard length >= sector, length % sector == 0, length <= ringLength, tail % sector == 0, tail < ringLength,
      sequenceNumber > 0, header.guid(at: 32) == logGuid,
      descriptorCount <= (length - 64) / 32, budget >= length
    else { return nil }
    budget -= length
    let entry = bytes(0, length)
    guard LittleEndianReader(entry).uint32(at: 4) == CRC32C.checksum(entry, zeroing: 4) else { return nil }
    let reader = LittleEndianReader(entry)
    let descriptorSectors = (64 + descriptorCount * 32 + sector - 1) / sector
    var dataSector = descriptorSectors
    var writes: [ReplayedSource.Write] = []
    for index in 0..<descriptorCount {
      let base = 64 + index * 32
      guard reader.uint64(at: base + 24) == sequenceNumber else { return nil }
      let fileOffset = reader.uint64(at: base + 16)!
      guard fileOffset % UInt64(sector) == 0, fileOffset <= UInt64(Int64.max / 4) else { return nil }
      if reader.matches("zero", at: base) {
        let zeroLength = reader.uint64(at: base + 8)!
        guard zeroLength % UInt64(sector) == 0, zeroLength <= UInt64(Int64.max / 4) else { return nil }
        writes.append(.init(range: Int64(fileOffset)..<Int64(fileOffset + zeroLength), bytes: nil))
      } else if reader.matches("desc", at: base) {
        let start = dataSector * sector
        guard start + sector <= length, reader.matches("data", at: start),
          reader.uint32(at: start + 4) == UInt32(truncatingIfNeeded: sequenceNumber >> 32),
          reader.uint32(at: start + 4092) == UInt32(truncatingIfNeeded: sequenceNumber)
        else { return nil }
        // The sector's first 8 and last 4 bytes live in the descriptor.
        let content = reader.slice(at: base + 8, count: 8)! + reader.slice(at: start + 8, count: 4084)!
          + reader.slice(at: base + 4, count: 4)!
        writes.append(.init(range: Int64(fileOffset)..<Int64(fileOffset) + Int64(sector), bytes: content))
        dataSector += 1
      } else {
        return nil
      }
    }
    return Entry(
      position: Int64(position), length: Int64(length), tail: Int64(tail), sequenceNumber: sequenceNumber,
      flushedFileOffset: reader.uint64(at: 48)!, lastFileOffset: reader.uint64(at: 56)!, writes: writes)
  }
}

/// A file as seen after a log replay: the original bytes with the log's writes laid over
/// them in order, in memory. The file itself is never written.
final class ReplayedSource: ByteSource, @unchecked Sendable {
  /// One write of the log: 4 KiB of data, or zeros over a range (`bytes` nil).
  struct Write {
    var range: Range<Int64>
    var bytes: [UInt8]?
  }

  let base: ByteSource
  private let replayedSize: Int64
  private let writes: [Write]

  init(base: ByteSource, size: Int64, writes: [Write]) {
    self.base = base
    self.replayedSize = size
    self.writes = writes
  }

  var name: String { base.name }
  func size() throws -> Int64 { replayedSize }
  func identity() throws -> FileIdentity? { try base.identity() }
  func allocatedSize() throws -> Int64? { try base.allocatedSize() }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    guard offset < replayedSize, buffer.count > 0 else { return 0 }
    let count = Int(min(Int64(buffer.count), replayedSize - offset))
    let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
    let read = try base.read(into: target, at: offset)
    // Past the end of the original file, a replayed file has grown: zeros there.
    if read < count { UnsafeMutableRawBufferPointer(rebasing: target[read...]).initializeMemory(as: UInt8.self, repeating: 0) }
    let wanted = offset..<offset + Int64(count)
    for write in writes where write.range.overlaps(wanted) {
      let overlap = write.range.clamped(to: wanted)
      let into = Int(overlap.lowerBound - offset)
      let length = Int(overlap.count)
      if let bytes = write.bytes {
        let from = Int(overlap.lowerBound - write.range.lowerBound)
        bytes.withUnsafeBytes {
          UnsafeMutableRawBufferPointer(rebasing: target[into..<into + length])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from..<from + length]))
        }
      } else {
        UnsafeMutableRawBufferPointer(rebasing: target[into..<into + length]).initializeMemory(as: UInt8.self, repeating: 0)
      }
    }
    return count
  }
}

import DiskImage

/// Reads a stream's records from start to end: the disk in order, as data pieces and zero
/// pieces, for the engine to take as a sequential source. Checks every record (its syntax,
/// that it stays inside the disk, that it covers something), then at the end the DONE
/// record, the CRC-32 of the disk, and that nothing follows. Memory is the input's buffer,
/// whatever the disk.
public final class StreamReceiver: DeferredCheckSequentialReader {
  public let input: SequentialInput
  /// The virtual size the stream's SIZE line gives.
  public let virtualSize: Int64
  public var name: String { input.name }
  public var bytesConsumed: Int64 { input.offset }

  private var checksum = DiskChecksum()
  /// Set once the data's check is left to the caller (`deferDataChecks`): data pieces are
  /// folded in here, by whoever holds them, in any order.
  private var scattered: ScatteredDiskChecksum?
  /// Data bytes handed out while the check is deferred: the caller must have checked as many.
  private var dataBytesDeferred: Int64 = 0
  /// The record being consumed and what is left of it (0: read the next header).
  private var current: StreamRecord = .zero(0)
  private var remaining: Int64 = 0
  private var currentOffset: Int64 = 0
  private var position: Int64 = 0

  /// Reads and checks the stream's first two lines: the magic line and SIZE.
  public init(input: SequentialInput) throws {
    self.input = input
    var magic = [UInt8](repeating: 0, count: SparseStream.magicLine.count)
    let n = try magic.withUnsafeMutableBytes { try input.read(into: $0) }
    guard n == magic.count, magic == SparseStream.magicLine else {
      let found = magic.withUnsafeBytes { StreamRecord.quoted(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
      if n == 0 { throw ImageError.invalid(path: input.name, "the stream is empty (expected \"LACUNA-STREAM 1\\n\")") }
      if n < magic.count, magic[0..<n].elementsEqual(SparseStream.magicLine[0..<n]) {
        throw ImageError.invalid(path: input.name, "the stream ends inside its first line: it was cut short")
      }
      if magic.starts(with: SparseStream.magicPrefix) {
        throw ImageError.unsupported(
          path: input.name, "stream version \(found) is not one this lacuna reads (it reads version \(SparseStream.version))")
      }
      throw ImageError.invalid(path: input.name, "not a lacuna stream: expected \"LACUNA-STREAM 1\\n\", found \(found)")
    }
    let offset = input.offset
    let record = try StreamReceiver.readRecord(input, position: 0, size: nil)
    guard case .size(let size) = record else {
      throw ImageError.invalid(
        path: input.name, "\(record.kind) record at stream offset \(offset): the second line must be SIZE")
    }
    virtualSize = size
  }

  public func next(limit: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Extent {
    guard position < virtualSize, limit > 0 else {
      throw ImageError.invalid(path: input.name, "internal: asked for more of the disk at \(position) of \(virtualSize)")
    }
    try nextRecordIfNeeded()
    let start = position
    if case .data = current {
      let n = Int(min(remaining, limit, Int64(buffer.count)))
      try readData(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]))
      return Extent(start..<position, .data)
    }
    let n = min(remaining, limit)
    if scattered == nil { checksum.updateZeros(n) }
    remaining -= n
    position += n
    return Extent(start..<position, .zero)
  }

  public func deferDataChecks() {
    guard scattered == nil else { return }
    precondition(position == 0, "the check is deferred before the first piece")
    scattered = ScatteredDiskChecksum(diskSize: virtualSize)
  }

  public func checkData(_ bytes: UnsafeRawBufferPointer, at offset: Int64) {
    scattered?.add(bytes, at: offset)
  }

  /// Checks the end of the stream: a DONE record whose checksum matches, then nothing.
  public func finish() throws {
    guard position == virtualSize else {
      throw ImageError.invalid(path: input.name, "internal: the disk ended at \(position) of \(virtualSize)")
    }
    // The end: a DONE record whose checksum matches, then nothing.
    let doneOffset = input.offset
    let record = try StreamReceiver.readRecord(input, position: position, size: virtualSize)
    guard case .done(let expected) = record else {
      throw ImageError.invalid(
        path: input.name,
        "\(record.kind) record at stream offset \(doneOffset): the disk ends at \(virtualSize) bytes, expected DONE")
    }
    if let scattered, scattered.dataBytes != dataBytesDeferred {
      throw ImageError.invalid(
        path: input.name,
        "internal: \(scattered.dataBytes) data bytes were checked of the \(dataBytesDeferred) received")
    }
    let received = scattered?.value ?? checksum.value
    guard expected == received else {
      throw ImageError.invalid(
        path: input.name,
        "checksum mismatch: the DONE record says CRC-32 \(expected), the disk received has \(received) (the stream was damaged)")
    }
    guard try input.isAtEnd() else {
      throw ImageError.invalid(path: input.name, "bytes follow the DONE record at stream offset \(input.offset)")
    }
  }

  // MARK: - Records

  private func nextRecordIfNeeded() throws {
    guard remaining == 0 else { return }
    currentOffset = input.offset
    let record = try StreamReceiver.readRecord(input, position: position, size: virtualSize)
    switch record {
    case .data(let n), .zero(let n):
      guard n > 0 else {
        throw ImageError.invalid(path: input.name, "\(record.kind) record at stream offset \(currentOffset) covers 0 bytes")
      }
      guard n <= virtualSize - position else {
        throw ImageError.invalid(
          path: input.name,
          "\(record.kind) record at stream offset \(currentOffset): \(n) bytes at disk offset \(position) run past the virtual size \(virtualSize)")
      }
      current = record
      remaining = n
    case .done:
      throw ImageError.invalid(
        path: input.name,
        "DONE record at stream offset \(currentOffset) at disk offset \(position), before the end of the disk (\(virtualSize) bytes)")
    case .size:
      throw ImageError.invalid(
        path: input.name, "SIZE record at stream offset \(currentOffset): only the second line gives the size")
    }
  }

  private func readData(into slice: UnsafeMutableRawBufferPointer) throws {
    let n = try input.read(into: slice)
    guard n == slice.count else {
      throw ImageError.invalid(
        path: input.name,
        "the stream ends inside the DATA record at stream offset \(currentOffset), \(remaining - Int64(n)) bytes short (disk offset \(position + Int64(n))): it was cut short")
    }
    if scattered != nil { dataBytesDeferred += Int64(n) } else { checksum.update(UnsafeRawBufferPointer(slice)) }
    remaining -= Int64(n)
    position += Int64(n)
  }

  /// Reads one 26-byte record header. The end of the stream here is a cut stream.
  static func readRecord(_ input: SequentialInput, position: Int64, size: Int64?) throws -> StreamRecord {
    let offset = input.offset
    var header = [UInt8](repeating: 0, count: StreamRecord.headerLength)
    let n = try header.withUnsafeMutableBytes { try input.read(into: $0) }
    let location = size.map { " (disk offset \(position) of \($0))" } ?? ""
    if n == 0 {
      throw ImageError.invalid(
        path: input.name, "the stream ends at stream offset \(offset)\(location) without its DONE record: it was cut short")
    }
    if n < header.count {
      throw ImageError.invalid(
        path: input.name, "the stream ends inside the record header at stream offset \(offset)\(location): it was cut short")
    }
    switch header.withUnsafeBytes({ StreamRecord.decode($0) }) {
    case .success(let record): return record
    case .failure(let failure):
      throw ImageError.invalid(path: input.name, "bad record header at stream offset \(offset)\(location): \(failure.message)")
    }
  }
}

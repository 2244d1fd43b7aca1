import DiskImage

/// What a receiver did, for the summary line.
public struct ReceiveStatistics: Equatable {
  public var virtualSize: Int64 = 0
  /// Bytes of the stream read, headers included.
  public var streamBytes: Int64 = 0
  /// Bytes the stream carried in DATA records.
  public var dataBytes: Int64 = 0
  /// Bytes the stream declared zero with ZERO records.
  public var zeroRecordBytes: Int64 = 0
  /// Bytes of DATA records that were zero blocks (`-S`), not written.
  public var zeroBytesSkipped: Int64 = 0
  /// Bytes handed to the writer as data.
  public var bytesWritten: Int64 = 0
}

/// Reads a stream from start to end and feeds any `ImageWriter`: `write`/`writeZeroes`
/// in disk order, as the conversion engine does, then `finish()`; on any failure (a cut
/// stream, a bad record, a wrong checksum, a write error) `abandon()`, so nothing is left
/// at the destination.
///
/// The disk is handled in units (2 MiB by default, rounded to the writer's granularity):
/// a unit's DATA bytes are read into one buffer, split into data and zero blocks at
/// `sparseSize` (so a stream sent with `-S 0` still lands sparse), and handed over; a
/// `PreparingImageWriter` gets `prepare` and `commit` per unit, after `writeZeroes` for the
/// unit's zero runs. ZERO records spanning whole units pass straight to `writeZeroes`.
/// Memory is one unit and the input's buffer, whatever the disk.
public final class StreamReceiver {
  public let input: StreamInput
  /// The virtual size the stream's SIZE line gives.
  public let virtualSize: Int64

  private var checksum = DiskChecksum()
  /// The record being consumed and what is left of it (0: read the next header).
  private var current: StreamRecord = .zero(0)
  private var remaining: Int64 = 0
  private var currentOffset: Int64 = 0
  private var position: Int64 = 0

  /// Reads and checks the stream's first two lines: the magic line and SIZE.
  public init(input: StreamInput) throws {
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

  /// Feeds `writer` with the whole stream, then checks the DONE record and that nothing
  /// follows it, then `writer.finish()`. On any error, `writer.abandon()` and rethrows.
  ///
  /// - Parameters:
  ///   - writer: a writer made for `virtualSize` bytes.
  ///   - sparseSize: data blocks of this many bytes (aligned to the disk) that are all zero
  ///     become `writeZeroes`; 0 writes every byte, ZERO records included, as data.
  ///   - unitSize: the span of the disk handled at a time.
  ///   - progress: called with (bytes done, total) after each unit.
  /// - Returns: what was read and written.
  @discardableResult
  public func run(
    into writer: ImageWriter, sparseSize: Int, unitSize: Int = 2 << 20,
    progress: ((Int64, Int64) -> Void)? = nil
  ) throws -> ReceiveStatistics {
    do {
      let statistics = try receive(into: writer, sparseSize: sparseSize, unitSize: unitSize, progress: progress)
      try writer.finish()
      return statistics
    } catch {
      writer.abandon()
      throw error
    }
  }

  private func receive(
    into writer: ImageWriter, sparseSize: Int, unitSize: Int, progress: ((Int64, Int64) -> Void)?
  ) throws -> ReceiveStatistics {
    var statistics = ReceiveStatistics()
    statistics.virtualSize = virtualSize
    let granularity = max(writer.granularity, 1)
    var unit = (max(unitSize, 1) + granularity - 1) / granularity * granularity
    // Units aligned to the zero-block size keep blocks whole; when the two sizes have no
    // small common multiple, a block cut by a unit boundary is judged in two parts.
    if sparseSize > 0 {
      let common = unit / gcd(unit, sparseSize) * sparseSize
      if common <= 32 << 20 { unit = common }
    }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: unit, alignment: 4096)
    defer { buffer.deallocate() }
    let preparing = writer as? PreparingImageWriter

    while position < virtualSize {
      let unitStart = position
      let unitEnd = min(virtualSize, unitStart + Int64(unit))
      try nextRecordIfNeeded()

      // A hole over whole units passes through without touching the buffer.
      if case .zero = current, sparseSize > 0, remaining >= Int64(unit) {
        let end = unitStart + remaining / Int64(unit) * Int64(unit)
        try writer.writeZeroes(unitStart..<end)
        consumeZeros(end - unitStart, into: &statistics)
        progress?(position, virtualSize)
        continue
      }

      var runs: [(range: Range<Int64>, isZero: Bool)] = []
      while position < unitEnd {
        try nextRecordIfNeeded()
        let n = min(remaining, unitEnd - position)
        let local = Int(position - unitStart)..<Int(position - unitStart + n)
        let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[local])
        let start = position
        if case .data = current {
          try readData(into: slice)
          statistics.dataBytes += n
          for piece in zeroRuns(UnsafeRawBufferPointer(slice), at: start, blockSize: sparseSize) {
            if piece.isZero { statistics.zeroBytesSkipped += Int64(piece.range.count) }
            runs.append(piece)
          }
        } else if sparseSize == 0 {
          slice.initializeMemory(as: UInt8.self, repeating: 0)
          consumeZeros(n, into: &statistics)
          runs.append((start..<start + n, false))
        } else {
          consumeZeros(n, into: &statistics)
          runs.append((start..<start + n, true))
        }
      }
      runs = merged(runs)

      let dataRanges = runs.filter { !$0.isZero }.map(\.range)
      statistics.bytesWritten += dataRanges.reduce(Int64(0)) { $0 + Int64($1.count) }
      if let preparing, !dataRanges.isEmpty {
        for run in runs where run.isZero { try writer.writeZeroes(run.range) }
        let bytes = UnsafeRawBufferPointer(rebasing: buffer[0..<Int(unitEnd - unitStart)])
        try preparing.commit(try preparing.prepare(bytes, at: unitStart, dataRanges: dataRanges))
      } else {
        for run in runs {
          if run.isZero {
            try writer.writeZeroes(run.range)
          } else {
            let local = Int(run.range.lowerBound - unitStart)..<Int(run.range.upperBound - unitStart)
            try writer.write(UnsafeRawBufferPointer(rebasing: buffer[local]), at: run.range.lowerBound)
          }
        }
      }
      progress?(position, virtualSize)
    }

    // The end: a DONE record whose checksum matches, then nothing.
    let doneOffset = input.offset
    let record = try StreamReceiver.readRecord(input, position: position, size: virtualSize)
    guard case .done(let expected) = record else {
      throw ImageError.invalid(
        path: input.name,
        "\(record.kind) record at stream offset \(doneOffset): the disk ends at \(virtualSize) bytes, expected DONE")
    }
    guard expected == checksum.value else {
      throw ImageError.invalid(
        path: input.name,
        "checksum mismatch: the DONE record says CRC-32 \(expected), the disk received has \(checksum.value) (the stream was damaged)")
    }
    guard try input.isAtEnd() else {
      throw ImageError.invalid(path: input.name, "bytes follow the DONE record at stream offset \(input.offset)")
    }
    statistics.streamBytes = input.offset
    return statistics
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
    checksum.update(UnsafeRawBufferPointer(slice))
    remaining -= Int64(n)
    position += Int64(n)
  }

  private func consumeZeros(_ n: Int64, into statistics: inout ReceiveStatistics) {
    checksum.updateZeros(n)
    statistics.zeroRecordBytes += n
    remaining -= n
    position += n
  }

  /// Reads one 26-byte record header. The end of the stream here is a cut stream.
  static func readRecord(_ input: StreamInput, position: Int64, size: Int64?) throws -> StreamRecord {
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

  private func merged(_ runs: [(range: Range<Int64>, isZero: Bool)]) -> [(range: Range<Int64>, isZero: Bool)] {
    var result: [(range: Range<Int64>, isZero: Bool)] = []
    for run in runs {
      if let last = result.last, last.isZero == run.isZero, last.range.upperBound == run.range.lowerBound {
        result[result.count - 1].range = last.range.lowerBound..<run.range.upperBound
      } else {
        result.append(run)
      }
    }
    return result
  }
}

private func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }

import DiskImage

/// Writes a sparse stream. The engine's calls map onto records directly: `write` becomes
/// DATA (adjacent writes coalesced, up to `maxDataRecord` bytes a record), `writeZeroes`
/// becomes ZERO (adjacent ones merged). Nothing seeks: the output may be a pipe.
///
/// Records are staged in one buffer and leave in large `write(2)` calls; memory is that
/// buffer, whatever the disk. A failed write (EPIPE when the reader has gone: lacuna
/// ignores SIGPIPE) is an error. `abandon()` stops before the DONE record, so a reader
/// of what was already sent sees a cut stream.
public final class SparseStreamWriter: ImageWriter {
  /// The most data one DATA record carries from this writer (readers take any size).
  public static let maxDataRecord = 4 << 20

  private let output: ByteTarget
  private let virtualSize: Int64
  private var checksum = DiskChecksum()
  /// The disk offset the next call must start at.
  private var position: Int64 = 0
  /// Zero bytes not yet written as a ZERO record.
  private var pendingZeros: Int64 = 0

  private let staging: UnsafeMutableRawBufferPointer
  private var staged = 0
  /// Where the open DATA record's header sits in `staging`, and its data so far.
  private var openRecord: (header: Int, count: Int)?
  /// Stream bytes written so far (for error messages).
  public private(set) var bytesSent: Int64 = 0

  public var granularity: Int { 1 }

  /// Makes a writer for `output` (a temporary file, or standard output: it only appends)
  /// and stages the stream's first two lines.
  public init(output: ByteTarget, virtualSize: Int64, options: WriterOptions) throws {
    try options.checkKnown([], format: "stream", path: output.name)
    if options.backing != nil {
      throw ImageError.usage(path: output.name, "a stream cannot record a backing file (it carries the flattened disk)")
    }
    if options.compress {
      throw ImageError.usage(path: output.name, "lacuna does not compress a stream (pipe it through zstd or gzip)")
    }
    guard virtualSize >= 0 else { throw ImageError.usage(path: output.name, "virtual size \(virtualSize) is negative") }
    self.output = output
    self.virtualSize = virtualSize
    staging = UnsafeMutableRawBufferPointer.allocate(
      byteCount: Self.maxDataRecord + 64 * StreamRecord.headerLength, alignment: 4096)
    SparseStream.magicLine.withUnsafeBytes { staging.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    staged = SparseStream.magicLine.count
    StreamRecord.size(virtualSize).encode(into: staging.baseAddress! + staged)
    staged += StreamRecord.headerLength
  }

  deinit { staging.deallocate() }

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    try expect(offset, count: Int64(bytes.count))
    guard bytes.count > 0 else { return }
    try closeZeroRun()
    checksum.update(bytes)
    var done = 0
    while done < bytes.count {
      if openRecord == nil {
        if staged + StreamRecord.headerLength >= staging.count { try flush() }
        openRecord = (staged, 0)
        staged += StreamRecord.headerLength
      }
      let room = min(Self.maxDataRecord - openRecord!.count, staging.count - staged)
      if room == 0 {
        try flush()
        continue
      }
      let n = min(room, bytes.count - done)
      (staging.baseAddress! + staged).copyMemory(from: bytes.baseAddress! + done, byteCount: n)
      staged += n
      openRecord!.count += n
      done += n
    }
    position += Int64(bytes.count)
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    try expect(range.lowerBound, count: Int64(range.count))
    guard !range.isEmpty else { return }
    closeDataRecord()
    pendingZeros += Int64(range.count)
    checksum.updateZeros(Int64(range.count))
    position = range.upperBound
  }

  /// Writes the DONE record, sends what is staged, and commits the output (for standard
  /// output: a flush).
  public func finish() throws {
    guard position == virtualSize else {
      throw ImageError.invalid(
        path: output.name, "internal: the stream covers \(position) of \(virtualSize) bytes at its end")
    }
    closeDataRecord()
    try closeZeroRun()
    if staged + StreamRecord.headerLength > staging.count { try flush() }
    StreamRecord.done(checksum.value).encode(into: staging.baseAddress! + staged)
    staged += StreamRecord.headerLength
    try flush()
    try output.commit()
  }

  public func abandon() { output.abandon() }

  // MARK: - Records

  private func expect(_ offset: Int64, count: Int64) throws {
    guard offset == position, count <= virtualSize - position else {
      throw ImageError.invalid(
        path: output.name,
        "internal: the stream is at disk offset \(hex(position)), got \(count) bytes at \(hex(offset)) (disk size \(virtualSize))")
    }
  }

  private func closeDataRecord() {
    guard let record = openRecord else { return }
    StreamRecord.data(Int64(record.count)).encode(into: staging.baseAddress! + record.header)
    openRecord = nil
  }

  private func closeZeroRun() throws {
    guard pendingZeros > 0 else { return }
    if staged + StreamRecord.headerLength > staging.count { try flush() }
    StreamRecord.zero(pendingZeros).encode(into: staging.baseAddress! + staged)
    staged += StreamRecord.headerLength
    pendingZeros = 0
  }

  /// Closes the open DATA record (the next write opens another) and appends the staging
  /// buffer to the output.
  private func flush() throws {
    closeDataRecord()
    try output.write(UnsafeRawBufferPointer(rebasing: staging[0..<staged]), at: bytesSent)
    bytesSent += Int64(staged)
    staged = 0
  }
}

extension SparseStreamWriter: FullyAllocatedLength {
  /// With every byte data: the first two lines, the disk in DATA records of `maxDataRecord`
  /// bytes (the last shorter), the DONE line.
  public var fullyAllocatedLength: Int64 {
    let records = (virtualSize + Int64(Self.maxDataRecord) - 1) / Int64(Self.maxDataRecord)
    return Int64(SparseStream.magicLine.count) + Int64(StreamRecord.headerLength) * (2 + records) + virtualSize
  }
}

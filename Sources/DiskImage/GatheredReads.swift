/// The reads of one `ImageReader.read(into:at:)`, gathered: pieces of data that lie one
/// after the other both in the buffer and in the file become one read, whatever the
/// cluster, grain or block size. A reader hands it each data piece in order, then calls
/// `flush()`.
public struct GatheredReads {
  private let source: ByteSource
  private let buffer: UnsafeMutableRawBufferPointer
  private let virtualOffset: Int64
  private let what: String
  private var pending: (bufferStart: Int, host: Int64, length: Int)?

  /// - Parameters:
  ///   - buffer: the caller's buffer, which holds the disk from `virtualOffset`.
  ///   - what: how errors name the data ("data", "VHD data").
  public init(from source: ByteSource, into buffer: UnsafeMutableRawBufferPointer, at virtualOffset: Int64, what: String = "data") {
    self.source = source
    self.buffer = buffer
    self.virtualOffset = virtualOffset
    self.what = what
  }

  /// `length` bytes at `host` in the file belong at `bufferStart` in the buffer.
  public mutating func add(bufferStart: Int, host: Int64, length: Int) throws {
    if let run = pending, run.bufferStart + run.length == bufferStart, run.host + Int64(run.length) == host {
      pending!.length += length
      return
    }
    try flush()
    pending = (bufferStart, host, length)
  }

  /// Reads what is pending; running into the end of the file is an error, never zeros.
  public mutating func flush() throws {
    guard let run = pending else { return }
    pending = nil
    try source.readExactly(
      into: UnsafeMutableRawBufferPointer(rebasing: buffer[run.bufferStart..<run.bufferStart + run.length]),
      at: run.host, what: "\(what) for virtual offset \(hex(virtualOffset + Int64(run.bufferStart)))")
  }
}

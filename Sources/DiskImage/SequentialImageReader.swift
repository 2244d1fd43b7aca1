/// An image that can only be read from start to end (a stream from a pipe): the engine
/// takes its pieces in disk order instead of asking for extents and reading at offsets.
/// What a sequential format knows ahead is only the virtual size; holes and data come as
/// they arrive.
public protocol SequentialImageReader: AnyObject {
  /// What errors name (the path, or "standard input").
  var name: String { get }
  /// The size of the virtual disk in bytes.
  var virtualSize: Int64 { get }
  /// Bytes of the input consumed so far, headers included.
  var bytesConsumed: Int64 { get }
  /// Consumes the next piece of the disk, starting where the last one ended, of at most
  /// `limit` bytes: for data, its bytes are read into the start of `buffer` (at most
  /// `buffer.count` of them); a zero piece only moves on. Returns the piece's range of the
  /// virtual disk and kind (`.data` or `.zero`). Damage or a cut input is an error.
  func next(limit: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Extent
  /// Called once the whole disk has been taken: checks what ends the input (a checksum,
  /// nothing after it).
  func finish() throws
}

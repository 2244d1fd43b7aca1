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

/// A sequential reader whose check of the data it hands out (a checksum over the disk) can
/// run on other threads than the one that reads: the engine's workers check each unit's
/// data while the reading thread only moves bytes into buffers.
public protocol DeferredCheckSequentialReader: SequentialImageReader {
  /// From now on `next` does not look at the bytes of data pieces: the caller passes every
  /// byte of every data piece to `checkData(_:at:)` once, before `finish()`. Called before
  /// the first `next`.
  func deferDataChecks()
  /// Folds `bytes`, data the reader handed out at `offset` of the disk, into the check.
  /// Safe from any thread, in any order.
  func checkData(_ bytes: UnsafeRawBufferPointer, at offset: Int64)
}

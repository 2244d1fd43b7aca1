import DiskImage
import Foundation

/// Bytes in memory as a byte source: what a reader reads without touching a disk. With
/// `dataRanges` it also plays storage that knows its own allocation (as SEEK_DATA does).
public final class MemorySource: ByteSource, @unchecked Sendable {
  public let name: String
  public let bytes: [UInt8]
  private let allocation: [Range<Int64>]?

  public init(name: String = "memory", bytes: [UInt8], dataRanges: [Range<Int64>]? = nil) {
    self.name = name
    self.bytes = bytes
    self.allocation = dataRanges
  }

  public func size() throws -> Int64 { Int64(bytes.count) }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    guard offset >= 0 else { throw ImageError.invalid(path: name, "read at negative offset \(offset)") }
    let start = Int(min(offset, Int64(bytes.count)))
    let n = min(buffer.count, bytes.count - start)
    bytes.withUnsafeBytes { source in
      if n > 0 { buffer.baseAddress!.copyMemory(from: source.baseAddress! + start, byteCount: n) }
    }
    return n
  }

  public func dataRanges(in range: Range<Int64>) throws -> [Range<Int64>]? {
    allocation.map { ranges in ranges.map { $0.clamped(to: range) }.filter { !$0.isEmpty } }
  }
}

/// A layer whose map is given: the test states what each range holds, and the reader
/// answers exactly that, a few extents at a time (so callers must loop), and records how
/// many bytes it was asked to read. Reads of `.unallocated` ranges return zeros.
public final class MemoryReader: ImageReader, @unchecked Sendable {
  public let source: ByteSource
  public let virtualSize: Int64
  public let backing: BackingReference?
  public var formatName: String { "memory" }
  public let map: [Extent]
  /// The most extents one `extents(in:)` answer holds.
  public let extentsPerAnswer: Int
  private let lock = Lock()
  private var readLog: [Range<Int64>] = []
  /// Fail reads that touch this range, to test what the engine does with a failing source.
  public var failingRange: Range<Int64>?

  /// - Parameters:
  ///   - map: extents covering `0..<bytes.count` in order.
  ///   - bytes: the layer's content where it says `.data` (zero elsewhere is not checked).
  public init(
    name: String = "memory", map: [Extent], bytes: [UInt8], backing: BackingReference? = nil, extentsPerAnswer: Int = 2
  ) {
    source = MemorySource(name: name, bytes: bytes)
    virtualSize = Int64(bytes.count)
    self.map = map
    self.backing = backing
    self.extentsPerAnswer = extentsPerAnswer
  }

  /// A layer holding `bytes`, with `.data` where `dataRanges` say and `fill` elsewhere.
  public convenience init(
    name: String = "memory", bytes: [UInt8], dataRanges: [Range<Int64>], fill: ExtentKind = .zero,
    backing: BackingReference? = nil
  ) {
    var map: [Extent] = []
    var position: Int64 = 0
    for range in dataRanges {
      if range.lowerBound > position { map.append(Extent(position..<range.lowerBound, fill)) }
      map.append(Extent(range, .data))
      position = range.upperBound
    }
    if position < Int64(bytes.count) { map.append(Extent(position..<Int64(bytes.count), fill)) }
    self.init(name: name, map: map, bytes: bytes, backing: backing)
  }

  /// The ranges `read` was asked for, in the order asked.
  public var reads: [Range<Int64>] { lock.withLock { readLog } }

  public func extents(in range: Range<Int64>) throws -> [Extent] {
    var answer: [Extent] = []
    for extent in map where extent.range.overlaps(range) {
      answer.append(Extent(extent.range.clamped(to: range), extent.kind))
      if answer.count == extentsPerAnswer { break }
    }
    return answer
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    let range = offset..<offset + Int64(buffer.count)
    if let failingRange, failingRange.overlaps(range) {
      throw ImageError.system(path: path, operation: "read \(buffer.count) bytes at \(hex(offset))", errno: EIO)
    }
    lock.withLock { readLog.append(range) }
    buffer.initializeMemory(as: UInt8.self, repeating: 0)
    for extent in map where extent.kind != .unallocated && extent.range.overlaps(range) {
      let piece = extent.range.clamped(to: range)
      _ = try source.read(
        into: UnsafeMutableRawBufferPointer(
          rebasing: buffer[Int(piece.lowerBound - offset)..<Int(piece.upperBound - offset)]),
        at: piece.lowerBound)
    }
  }
}

/// A sequential image whose pieces are given: the disk in order, as a stream would bring it.
public final class MemorySequentialReader: SequentialImageReader {
  public let name: String
  public let virtualSize: Int64
  public private(set) var bytesConsumed: Int64 = 0
  private let pieces: [Extent]
  private let bytes: [UInt8]
  private var position: Int64 = 0
  public private(set) var finished = false

  public init(name: String = "memory stream", pieces: [Extent], bytes: [UInt8]) {
    self.name = name
    self.pieces = pieces
    self.bytes = bytes
    virtualSize = Int64(bytes.count)
  }

  public func next(limit: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Extent {
    guard let piece = pieces.first(where: { $0.range.contains(position) }) else {
      throw ImageError.invalid(path: name, "no piece at \(position)")
    }
    var end = min(piece.range.upperBound, position + limit)
    if piece.kind == .data {
      end = min(end, position + Int64(buffer.count))
      bytes.withUnsafeBytes { source in
        buffer.baseAddress!.copyMemory(from: source.baseAddress! + Int(position), byteCount: Int(end - position))
      }
      bytesConsumed += end - position
    }
    defer { position = end }
    return Extent(position..<end, piece.kind)
  }

  public func finish() throws {
    guard position == virtualSize else { throw ImageError.invalid(path: name, "finished at \(position)") }
    finished = true
  }
}

/// A writer that logs every call, as nbdcopy's tests log operations: a test states the
/// operations it expects, not only the bytes.
public final class RecordingWriter: ImageWriter {
  public enum Call: Equatable, CustomStringConvertible {
    case write(Range<Int64>, zero: Bool)
    case zeroes(Range<Int64>)
    case finish, abandon

    public var description: String {
      switch self {
      case .write(let range, let zero): return "write \(range.lowerBound)..<\(range.upperBound)" + (zero ? " (zeros)" : "")
      case .zeroes(let range): return "zeroes \(range.lowerBound)..<\(range.upperBound)"
      case .finish: return "finish"
      case .abandon: return "abandon"
      }
    }
  }
  public private(set) var calls: [Call] = []
  public private(set) var bytes: [UInt8]
  public let granularity: Int

  public init(size: Int, granularity: Int = 1) {
    bytes = [UInt8](repeating: 0, count: size)
    self.granularity = granularity
  }

  public func write(_ data: UnsafeRawBufferPointer, at offset: Int64) throws {
    calls.append(.write(offset..<offset + Int64(data.count), zero: isAllZero(data)))
    bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
  }
  public func writeZeroes(_ range: Range<Int64>) throws {
    calls.append(.zeroes(range))
    bytes.withUnsafeMutableBytes {
      UnsafeMutableRawBufferPointer(rebasing: $0[Int(range.lowerBound)..<Int(range.upperBound)])
        .initializeMemory(as: UInt8.self, repeating: 0)
    }
  }
  public func finish() throws { calls.append(.finish) }
  public func abandon() { calls.append(.abandon) }
}

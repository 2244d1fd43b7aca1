import DiskImage
import Foundation
import XCTest

/// What a layer holds by another judge's account (qemu-img's map and content): the kind of
/// every range of the virtual disk, for this layer alone, and the bytes the disk reads.
public struct LayerTruth {
  /// Extents covering the whole disk in order; only their kinds are compared.
  public var map: [Extent]
  /// The disk's content where the layer answers (`data` or `zero`); unallocated ranges
  /// must read as zeros from the layer alone.
  public var bytes: [UInt8]

  public init(map: [Extent], bytes: [UInt8]) {
    self.map = map
    self.bytes = bytes
  }
}

/// The contract every `ImageReader` keeps, checked the same way for every format:
/// - `extents(in:)` answers for a non-empty prefix of the asked range, in order,
///   contiguous, never past its end, whatever range is asked (the range is a hint);
/// - the map and the bytes agree with `truth` (qemu-img's account of the layer alone);
/// - reads from several threads at once return the same bytes as one thread;
/// - a read that does not lie inside the virtual disk is refused with an `ImageError`.
public func assertReaderConforms(
  _ reader: ImageReader, truth: LayerTruth, _ label: String = "", file: StaticString = #filePath, line: UInt = #line
) throws {
  let size = reader.virtualSize
  let context = label.isEmpty ? reader.path : label
  XCTAssertEqual(size, Int64(truth.bytes.count), "\(context): virtual size", file: file, line: line)

  // 1. The whole map, asked for the rest of the disk each time.
  var map: [Extent] = []
  var position: Int64 = 0
  var answers = 0
  while position < size {
    let answer = try reader.extents(in: position..<size)
    answers += 1
    guard checkPrefix(answer, of: position..<size, context, file: file, line: line) else { return }
    for extent in answer { map.appendMerging(Extent(extent.range, extent.kind)) }
    position = answer.last!.range.upperBound
    if answers > 10_000_000 { return XCTFail("\(context): the map never ends", file: file, line: line) }
  }
  XCTAssertEqual(
    map.map(\.description), truth.map.map { Extent($0.range, $0.kind) }.merged().map(\.description),
    "\(context): the map differs from qemu-img's", file: file, line: line)

  // 2. Any range is a hint: unaligned, small, in the middle of an extent.
  var generator = SplitMix(seed: UInt64(truncatingIfNeeded: size) &+ 7)
  for _ in 0..<64 where size > 0 {
    let start = Int64(generator.next() % UInt64(size))
    let end = start + 1 + Int64(generator.next() % UInt64(size - start))
    let answer = try reader.extents(in: start..<end)
    guard checkPrefix(answer, of: start..<end, context, file: file, line: line) else { return }
    for extent in answer {
      let expected = map.first { $0.range.contains(extent.range.lowerBound) }
      XCTAssertEqual(
        extent.kind, expected?.kind, "\(context): extents(in: \(start)..<\(end)) says \(extent), the whole map \(String(describing: expected))",
        file: file, line: line)
    }
  }

  // 3. The bytes, in large reads over the whole disk, and odd-sized reads over its first
  // and last few MiB (unaligned to any cluster).
  let expected = expectedBytes(truth, map: map)
  var spans: [(chunk: Int64, range: Range<Int64>)] = [(1 << 20, 0..<size)]
  let odd: Int64 = 3 << 20
  spans.append((3000, 0..<min(size, odd)))
  if size > odd { spans.append((3000, max(odd, size - odd)..<size)) }
  for (chunk, span) in spans {
    var offset = span.lowerBound
    var buffer = [UInt8](repeating: 0xAA, count: Int(chunk))
    while offset < span.upperBound {
      let count = Int(min(chunk, span.upperBound - offset))
      try buffer.withUnsafeMutableBytes {
        try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset)
      }
      let want = expected[Int(offset)..<Int(offset) + count]
      if !buffer.withUnsafeBytes({ got in want.withUnsafeBytes { memcmp(got.baseAddress!, $0.baseAddress!, count) == 0 } }) {
        let first = (0..<count).first { buffer[$0] != want[want.startIndex + $0] } ?? 0
        return XCTFail("\(context): bytes differ at \(offset + Int64(first)) (reads of \(chunk))", file: file, line: line)
      }
      offset += Int64(count)
    }
  }

  // 4. Several threads at once.
  let failures = Lock()
  var failed: [String] = []
  DispatchQueue.concurrentPerform(iterations: 4) { thread in
    var random = SplitMix(seed: UInt64(thread) &+ 99)
    var buffer = [UInt8](repeating: 0, count: 256 << 10)
    for _ in 0..<40 where size > 0 {
      let start = Int64(random.next() % UInt64(size))
      let count = Int(min(Int64(1 + random.next() % UInt64(buffer.count)), size - start))
      do {
        try buffer.withUnsafeMutableBytes {
          try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: start)
        }
        let want = expected[Int(start)..<Int(start) + count]
        if !buffer.withUnsafeBytes({ got in want.withUnsafeBytes { memcmp(got.baseAddress!, $0.baseAddress!, count) == 0 } }) {
          failures.withLock { failed.append("thread \(thread): bytes differ in \(start)..<\(start + Int64(count))") }
        }
      } catch {
        failures.withLock { failed.append("thread \(thread): \(error)") }
      }
    }
  }
  XCTAssertEqual(failed, [], "\(context): concurrent reads", file: file, line: line)

  // 5. Reads outside the disk.
  for (offset, count) in [(size, 1), (size - 1, 2), (-1, 1), (size + (1 << 20), 512)] {
    var buffer = [UInt8](repeating: 0, count: count)
    XCTAssertThrowsError(
      try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: offset) },
      "\(context): a read of \(count) bytes at \(offset) (size \(size)) must be refused", file: file, line: line
    ) { error in
      XCTAssertTrue(error is ImageError, "\(context): \(error)", file: file, line: line)
    }
  }
}

/// An answer covers a non-empty prefix of `range`: starts at its start, contiguous,
/// non-empty extents, not past its end.
private func checkPrefix(
  _ answer: [Extent], of range: Range<Int64>, _ context: String, file: StaticString, line: UInt
) -> Bool {
  guard let first = answer.first, first.range.lowerBound == range.lowerBound else {
    XCTFail("\(context): extents(in: \(range)) answered \(answer), not starting at \(range.lowerBound)", file: file, line: line)
    return false
  }
  var position = range.lowerBound
  for extent in answer {
    guard extent.range.lowerBound == position, !extent.range.isEmpty, extent.range.upperBound <= range.upperBound else {
      XCTFail("\(context): extents(in: \(range)) answered \(answer): not a contiguous prefix", file: file, line: line)
      return false
    }
    position = extent.range.upperBound
  }
  return true
}

/// What the layer alone must read: the truth where it answers, zeros where it leaves the
/// disk to a backing file.
private func expectedBytes(_ truth: LayerTruth, map: [Extent]) -> [UInt8] {
  var bytes = truth.bytes
  for extent in map where extent.kind == .unallocated {
    bytes.withUnsafeMutableBytes { raw in
      let upper = min(Int(extent.range.upperBound), raw.count)
      let lower = min(Int(extent.range.lowerBound), upper)
      UnsafeMutableRawBufferPointer(rebasing: raw[lower..<upper]).initializeMemory(as: UInt8.self, repeating: 0)
    }
  }
  return bytes
}

/// The contract of a `SequentialImageReader`: pieces follow each other from 0 to the
/// virtual size, each non-empty, within `limit` and (for data) within the buffer; the
/// bytes are `truth`; `finish` accepts the end.
public func assertSequentialReaderConforms(
  _ reader: SequentialImageReader, truth: [UInt8], file: StaticString = #filePath, line: UInt = #line
) throws {
  XCTAssertEqual(reader.virtualSize, Int64(truth.count), file: file, line: line)
  var random = SplitMix(seed: 3)
  var position: Int64 = 0
  var buffer = [UInt8](repeating: 0, count: 1 << 20)
  while position < reader.virtualSize {
    let limit = Int64(1 + random.next() % (3 << 20))
    let room = Int(1 + random.next() % UInt64(buffer.count))
    let piece = try buffer.withUnsafeMutableBytes {
      try reader.next(limit: limit, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<room]))
    }
    guard piece.range.lowerBound == position, !piece.range.isEmpty, piece.length <= limit,
      piece.kind != .data || piece.length <= Int64(room), piece.kind == .data || piece.kind == .zero
    else {
      return XCTFail("\(reader.name): piece \(piece) at \(position) (limit \(limit), buffer \(room))", file: file, line: line)
    }
    let expected = truth[Int(piece.range.lowerBound)..<Int(piece.range.upperBound)]
    if piece.kind == .data {
      XCTAssertTrue(buffer[0..<Int(piece.length)].elementsEqual(expected), "\(reader.name): bytes of \(piece)", file: file, line: line)
    } else {
      XCTAssertTrue(expected.allSatisfy { $0 == 0 }, "\(reader.name): \(piece) is not zero in the truth", file: file, line: line)
    }
    position = piece.range.upperBound
  }
  try reader.finish()
}

/// A small deterministic generator, so a failing case can be replayed.
public struct SplitMix {
  private var state: UInt64
  public init(seed: UInt64) { state = seed }
  public mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}

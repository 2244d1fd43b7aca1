import DiskImage
import FoundationEssentials
#if canImport(Glibc)
  import Glibc
#endif

/// What `compare` found, in the order qemu-img looks: sizes (strict), then the common part
/// front to back, then the larger image's tail.
public enum ComparisonOutcome: Equatable, Sendable {
  /// Every byte of the two disks reads the same (a longer disk's tail reads zeros).
  case identical
  /// The disks read differently from `offset` (the 512-byte sector where they first
  /// differ, counted from the start of the run where they do, as qemu-img reports it).
  case contentMismatch(offset: Int64)
  /// Strict: the allocation status of the two disks differs at `offset`.
  case statusMismatch(offset: Int64)
  /// Strict: the disks have different sizes.
  case sizeMismatch
}

/// The finding of `compare`, with what the command line needs to print qemu-img's lines.
public struct ComparisonReport: Equatable, Sendable {
  public var outcome: ComparisonOutcome
  /// The sizes differ (after rounding up to 512-byte sectors, as qemu does).
  public var sizesDiffer: Bool
  /// The size both disks have (the smaller one).
  public var commonSize: Int64

  /// Whether qemu-img's "Warning: Image size mismatch!" comes before the outcome: the
  /// common part matched and the tail of the larger disk was looked at.
  public var warnsOfSizes: Bool {
    guard sizesDiffer else { return false }
    switch outcome {
    case .identical: return true
    case .contentMismatch(let offset): return offset >= commonSize
    case .statusMismatch, .sizeMismatch: return false
    }
  }
}

/// A step of the comparison that failed, as qemu-img tells them apart by exit status.
public struct ComparisonFailure: Error, CustomStringConvertible {
  public enum Step: Sendable {
    /// Asking an image which ranges hold data (qemu-img exits 3).
    case allocation
    /// Reading an image's bytes (qemu-img exits 4).
    case read
  }
  public var step: Step
  public var cause: Error

  public var description: String { (cause as? ImageError)?.description ?? String(describing: cause) }
}

/// Compares two virtual disks (chains flattened) as `qemu-img compare` does, reading only
/// what must be read: where both allocation maps say zero, nothing is read; where one side
/// is zero, only the other side is read (and checked for zeros); where both hold data, both
/// are read in units of up to 2 MiB on worker threads and compared with `memcmp`. Results
/// are taken in disk order, so the first mismatch reported is the first on the disk.
public struct Comparison {
  public var first: Chain
  public var second: Chain
  /// `-s`: different sizes, or different allocation status at the same offset, differ.
  public var strict = false
  /// Worker threads reading and comparing.
  public var threads = 2
  /// Called with (bytes done, bytes total) as the walk goes, from the calling thread.
  public var progress: ((Int64, Int64) -> Void)?

  /// qemu compares in 512-byte sectors, and sees disks whose size is not a multiple of it
  /// rounded up (the last sector's tail reads zeros).
  static let sector: Int64 = 512
  /// The most bytes one unit reads from each side, as qemu-img's buffer.
  static let unitSize = 2 << 20

  public init(first: Chain, second: Chain) {
    self.first = first
    self.second = second
  }

  /// Runs the comparison.
  ///
  /// - Throws: `ComparisonFailure` naming the step (allocation query or read) that failed.
  public func run() throws -> ComparisonReport {
    let size1 = roundedUp(first.virtualSize, to: Self.sector) ?? first.virtualSize
    let size2 = roundedUp(second.virtualSize, to: Self.sector) ?? second.virtualSize
    let common = min(size1, size2)
    let total = max(size1, size2)
    var report = ComparisonReport(outcome: .identical, sizesDiffer: size1 != size2, commonSize: common)
    progress?(0, total)
    if strict && size1 != size2 {
      report.outcome = .sizeMismatch
      return report
    }
    let walk = Walk(comparison: self, total: total)
    defer { walk.pipeline.shutdown() }
    if let outcome = try walk.commonPart(size1: size1, size2: size2, end: common) {
      report.outcome = outcome
      return report
    }
    if size1 != size2, let offset = try walk.tail(of: size1 > size2 ? first : second, from: common, to: total) {
      report.outcome = .contentMismatch(offset: offset)
      return report
    }
    progress?(total, total)
    return report
  }
}

/// Where one side's data for a piece lies: the layer of its chain that holds it.
private struct Side {
  var depth: Int
}

/// One range to read: from one side (checked for zeros) or both (compared).
private struct Piece {
  var range: Range<Int64>
  /// Where the run holding this piece starts: mismatch offsets count sectors from here.
  var runStart: Int64
  var first: Side?
  var second: Side?
}

/// Where qemu's status runs of a disk end at an end: its block status flags a run that
/// reaches the end of the image (EOF), and strict mode compares that flag too. A run that
/// no layer holds carries the bottom layer's flag, which reaches the bottom layer's end.
private struct RunEnds {
  /// Where the last run of the whole disk starts.
  var last: Int64
  /// The bottom layer's size (in sectors) and where the disk's last run before it starts,
  /// for a bottom layer shorter than the disk.
  var bottom: (size: Int64, last: Int64)?
  let bottomDepth: Int

  init(of chain: Chain, size: Int64, walk: Walk) throws {
    last = try walk.lastRunStart(chain, size: size)
    bottomDepth = chain.layers.count - 1
    let bottomSize = roundedUp(chain.layers[bottomDepth].virtualSize, to: Comparison.sector) ?? size
    if bottomDepth > 0 && bottomSize < size && bottomSize > 0 {
      bottom = (bottomSize, try walk.lastRunStart(chain, size: bottomSize))
    }
  }

  /// Whether qemu flags the run holding `at` (in `extent`) as reaching the end.
  func reachesEnd(_ extent: LayeredExtent, at: Int64) -> Bool {
    if at >= last { return true }
    guard let bottom, !extent.present, extent.depth == bottomDepth else { return false }
    return at >= bottom.last && at < bottom.size
  }
}

/// The state of one comparison: the ordered pipeline of read-and-compare units.
private final class Walk {
  let comparison: Comparison
  let total: Int64
  let pipeline: OrderedPipeline<[Piece], Int64?>
  let buffers: BufferPool
  /// Bytes of the disk whose fate is settled (skipped or compared), in disk order.
  var done: Int64 = 0
  /// Ends of the units in flight, oldest first, for progress.
  var inFlight: [Int64] = []

  init(comparison: Comparison, total: Int64) {
    self.comparison = comparison
    self.total = total
    let buffers = BufferPool(size: Comparison.unitSize, limit: 4 * max(comparison.threads, 1) + 4)
    self.buffers = buffers
    let first = comparison.first
    let second = comparison.second
    pipeline = OrderedPipeline(threads: comparison.threads, capacity: 2 * max(comparison.threads, 1) + 2) { pieces in
      try Walk.check(pieces, first: first, second: second, buffers: buffers)
    }
  }

  /// Compares `0..<end`, where both disks exist. Returns the first finding, or nil.
  func commonPart(size1: Int64, size2: Int64, end: Int64) throws -> ComparisonOutcome? {
    let ends1 = comparison.strict ? try RunEnds(of: comparison.first, size: size1, walk: self) : nil
    let ends2 = comparison.strict ? try RunEnds(of: comparison.second, size: size2, walk: self) : nil
    var window = AdaptiveWindow(minimum: 64 << 20)
    var position: Int64 = 0
    var unit: [Piece] = []
    var unitBytes = 0
    while position < end {
      let range = window.range(from: position, to: end)
      let extents1 = try extents(of: comparison.first, in: range)
      let extents2 = try extents(of: comparison.second, in: range)
      window.adjust(after: max(extents1.count, extents2.count))
      var index1 = 0
      var index2 = 0
      var at = range.lowerBound
      while at < range.upperBound {
        while extents1[index1].range.upperBound <= at { index1 += 1 }
        while extents2[index2].range.upperBound <= at { index2 += 1 }
        let a = extents1[index1]
        let b = extents2[index2]
        let piece = at..<min(a.range.upperBound, b.range.upperBound)
        if let ends1, let ends2, status(a, eof: ends1.reachesEnd(a, at: at)) != status(b, eof: ends2.reachesEnd(b, at: at)) {
          if let offset = try flush(&unit, &unitBytes, draining: true) { return .contentMismatch(offset: offset) }
          return .statusMismatch(offset: at)
        }
        if a.kind == .data || b.kind == .data {
          let runStart = max(a.range.lowerBound, b.range.lowerBound)
          let sides = (a.kind == .data ? Side(depth: a.depth) : nil, b.kind == .data ? Side(depth: b.depth) : nil)
          var start = piece.lowerBound
          while start < piece.upperBound {
            let room = Int64(Comparison.unitSize - unitBytes)
            let stop = min(piece.upperBound, start + room)
            unit.append(Piece(range: start..<stop, runStart: runStart, first: sides.0, second: sides.1))
            unitBytes += Int(stop - start)
            // Many small pieces make one unit too; a unit of thousands of 4 KiB extents
            // costs one queue round trip, not thousands.
            if unitBytes >= Comparison.unitSize || unit.count >= 1024 {
              if let offset = try flush(&unit, &unitBytes, draining: false) { return .contentMismatch(offset: offset) }
            }
            start = stop
          }
        } else if unit.isEmpty && pipeline.pending == 0 {
          advance(to: piece.upperBound)
        }
        at = piece.upperBound
      }
      position = range.upperBound
    }
    if let offset = try flush(&unit, &unitBytes, draining: true) { return .contentMismatch(offset: offset) }
    advance(to: end)
    return nil
  }

  /// Checks that the larger disk reads zeros over `start..<end`, past the smaller one's end.
  func tail(of chain: Chain, from start: Int64, to end: Int64) throws -> Int64? {
    var window = AdaptiveWindow(minimum: 64 << 20)
    var position = start
    var unit: [Piece] = []
    var unitBytes = 0
    let isFirst = chain === comparison.first
    while position < end {
      let range = window.range(from: position, to: end)
      let extents = try self.extents(of: chain, in: range)
      window.adjust(after: extents.count)
      for extent in extents {
        guard extent.kind == .data else {
          if unit.isEmpty && pipeline.pending == 0 { advance(to: extent.range.upperBound) }
          continue
        }
        let side = Side(depth: extent.depth)
        var at = extent.range.lowerBound
        while at < extent.range.upperBound {
          let stop = min(extent.range.upperBound, at + Int64(Comparison.unitSize - unitBytes))
          unit.append(
            Piece(
              range: at..<stop, runStart: max(start, extent.range.lowerBound), first: isFirst ? side : nil,
              second: isFirst ? nil : side))
          unitBytes += Int(stop - at)
          if unitBytes >= Comparison.unitSize || unit.count >= 1024 {
            if let offset = try flush(&unit, &unitBytes, draining: false) { return offset }
          }
          at = stop
        }
      }
      position = range.upperBound
    }
    if let offset = try flush(&unit, &unitBytes, draining: true) { return offset }
    advance(to: end)
    return nil
  }

  /// Submits the unit being built (if any); takes finished results while the pipeline is
  /// full, or all of them when `draining`. Returns the first mismatch in disk order.
  private func flush(_ unit: inout [Piece], _ unitBytes: inout Int, draining: Bool) throws -> Int64? {
    if !unit.isEmpty {
      pipeline.submit(unit)
      inFlight.append(unit.last!.range.upperBound)
      unit = []
      unitBytes = 0
    }
    while pipeline.pending > 0 && (draining || pipeline.isFull) {
      let result: Int64?
      do {
        result = try pipeline.takeNext()
      } catch let failure as ComparisonFailure {
        throw failure
      } catch {
        throw ComparisonFailure(step: .read, cause: error)
      }
      if let offset = result { return offset }
      advance(to: inFlight.removeFirst())
    }
    return nil
  }

  private func advance(to position: Int64) {
    guard position > done else { return }
    done = position
    comparison.progress?(done, total)
  }

  /// The chain's extents of `range`, with qemu's allocation status where it differs from
  /// `map`'s: zeros past the end of a shorter backing file count as allocated by the layer
  /// above it (qemu says so in `bdrv_block_status_above`). The range may reach past the
  /// disk's end into the last sector: that tail reads zeros, and qemu reports it as a raw
  /// file's hole (allocated, zero, at the same offset in the file).
  private func extents(of chain: Chain, in range: Range<Int64>) throws -> [LayeredExtent] {
    var extents = try allocation { try chain.extents(in: range) }
    // Unallocated all the way down answers from the bottom layer; a shallower answer
    // that is neither data nor present is a backing file's end.
    for index in extents.indices where !extents[index].present && extents[index].depth < chain.layers.count - 1 {
      extents[index].present = true
    }
    if range.upperBound > chain.virtualSize, var last = extents.last, last.range.lowerBound >= chain.virtualSize {
      last.present = true
      last.hostOffset = last.range.lowerBound
      extents[extents.count - 1] = last
    }
    return extents
  }

  private func allocation<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch { throw ComparisonFailure(step: .allocation, cause: error) }
  }

  /// qemu's block status flags for an extent: allocated, zero, data, offset valid, and
  /// whether the run reaches the end of the disk.
  private func status(_ extent: LayeredExtent, eof: Bool) -> [Bool] {
    [extent.present, extent.kind != .data, extent.kind == .data, extent.hostOffset != nil, eof]
  }

  /// Where the last run of the disk (extents of one kind, merged) starts: qemu flags a
  /// status that reaches the end of the disk, and strict mode compares that flag too.
  func lastRunStart(_ chain: Chain, size: Int64) throws -> Int64 {
    var span: Int64 = 64 << 20
    while true {
      let start = max(0, size - span)
      let extents = try self.extents(of: chain, in: start..<size)
      guard var last = extents.last else { return size }
      for extent in extents.dropLast().reversed() {
        guard extent.canMerge(with: last) else { break }
        last.range = extent.range.lowerBound..<last.range.upperBound
      }
      if last.range.lowerBound > start || start == 0 { return last.range.lowerBound }
      span *= 2
    }
  }

  /// Reads and checks one unit on a worker thread. Returns the first mismatch's offset.
  static func check(_ pieces: [Piece], first: Chain, second: Chain, buffers: BufferPool) throws -> Int64? {
    let one = buffers.take(Comparison.unitSize)
    let two = buffers.take(Comparison.unitSize)
    defer {
      buffers.give(one)
      buffers.give(two)
    }
    for piece in pieces {
      let count = Int(piece.range.count)
      let a = UnsafeMutableRawBufferPointer(rebasing: one[0..<count])
      let b = UnsafeMutableRawBufferPointer(rebasing: two[0..<count])
      let differing: Int?
      switch (piece.first, piece.second) {
      case let (x?, y?):
        try read(first, x, into: a, at: piece.range.lowerBound)
        try read(second, y, into: b, at: piece.range.lowerBound)
        differing = firstDifference(UnsafeRawBufferPointer(a), UnsafeRawBufferPointer(b))
      case let (x?, nil):
        try read(first, x, into: a, at: piece.range.lowerBound)
        differing = firstNonZero(UnsafeRawBufferPointer(a))
      case let (nil, y?):
        try read(second, y, into: b, at: piece.range.lowerBound)
        differing = firstNonZero(UnsafeRawBufferPointer(b))
      case (nil, nil):
        differing = nil
      }
      if let index = differing {
        let byte = piece.range.lowerBound + Int64(index)
        return piece.runStart + (byte - piece.runStart) / Comparison.sector * Comparison.sector
      }
    }
    return nil
  }

  /// Reads from the layer that holds the bytes; the range lies inside one extent of it.
  private static func read(_ chain: Chain, _ side: Side, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    let layer = chain.layers[side.depth]
    // Past the end of the layer (a disk rounded up to sectors): zeros.
    let inside = Int(max(0, min(Int64(buffer.count), layer.virtualSize - offset)))
    do {
      if inside > 0 { try layer.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inside]), at: offset) }
    } catch {
      throw ComparisonFailure(step: .read, cause: error)
    }
    if inside < buffer.count {
      UnsafeMutableRawBufferPointer(rebasing: buffer[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
  }
}

/// The index of the first byte where `a` and `b` differ, or nil. Whole 64 KiB blocks are
/// compared with `memcmp` (vectorised by libc); only a block that differs is searched.
func firstDifference(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int? {
  let count = min(a.count, b.count)
  guard count > 0, let x = a.baseAddress, let y = b.baseAddress else { return nil }
  let block = 64 << 10
  var start = 0
  while start < count {
    let length = min(block, count - start)
    if memcmp(x + start, y + start, length) != 0 {
      var low = start
      var length = length
      // Halve the differing span with memcmp until it is small, then look byte by byte.
      while length > 64 {
        let half = length / 2
        if memcmp(x + low, y + low, half) != 0 { length = half } else { low += half; length -= half }
      }
      for index in low..<low + length where a[index] != b[index] { return index }
    }
    start += length
  }
  return nil
}

/// The index of the first non-zero byte of `bytes`, or nil.
func firstNonZero(_ bytes: UnsafeRawBufferPointer) -> Int? {
  let block = 64 << 10
  var start = 0
  while start < bytes.count {
    let slice = UnsafeRawBufferPointer(rebasing: bytes[start..<min(bytes.count, start + block)])
    if !isAllZero(slice) {
      var low = start
      var length = slice.count
      while length > 64 {
        let half = length / 2
        if !isAllZero(UnsafeRawBufferPointer(rebasing: bytes[low..<low + half])) { length = half } else { low += half; length -= half }
      }
      for index in low..<low + length where bytes[index] != 0 { return index }
    }
    start += slice.count
  }
  return nil
}

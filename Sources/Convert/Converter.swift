import DiskImage
import Foundation

/// How a conversion runs.
public struct ConvertOptions {
  /// Worker threads that read, detect zeros and compress (`-m`).
  public var threads: Int = max(2, ProcessInfo.processInfo.activeProcessorCount)
  /// `-S`: blocks of this many bytes that are all zero are not written; 0 writes every
  /// byte, holes included.
  public var sparseSize: Int = 4096
  /// The virtual-disk span one work unit covers (rounded up to the writer's granularity).
  public var unitSize: Int = 2 << 20
  /// How much of the virtual disk is mapped at a time.
  public var windowSize: Int64 = 1 << 30
  /// Stop descending the chain at this layer: what the layers above leave unallocated
  /// is the output's backing file's business (`-B` naming a layer of the chain).
  public var stopDepth: Int?
  /// `-B` naming a file that is not a layer of the source: the output's backing file, read
  /// as a chain. Clusters where the source reads the same as it are left to it; the rest
  /// is stored (as zero clusters where the source reads zero).
  public var compareBase: Chain?
  /// Called with (bytes done, bytes total) as the work proceeds, from the writing thread.
  public var progress: ((Int64, Int64) -> Void)?

  public init() {}
}

/// What a conversion did, for the summary line.
public struct ConvertStatistics: Equatable {
  public var virtualSize: Int64 = 0
  /// Bytes read from the layers of the source.
  public var bytesRead: Int64 = 0
  /// Bytes handed to the writer as data.
  public var bytesWritten: Int64 = 0
  /// Bytes read that turned out to be zero blocks and were not written.
  public var zeroBytesSkipped: Int64 = 0
  /// Bytes the map said were holes or zeros: never read.
  public var holeBytes: Int64 = 0
  /// Bytes left to the output's backing file.
  public var backingBytes: Int64 = 0
}

/// The engine: maps the source chain window by window, reads only what is data, drops
/// zero blocks, and hands the writer runs of data and zeros in virtual-disk order.
public final class Converter {
  let chain: Chain
  let writer: ImageWriter
  let options: ConvertOptions

  public init(chain: Chain, writer: ImageWriter, options: ConvertOptions = ConvertOptions()) {
    self.chain = chain
    self.writer = writer
    self.options = options
  }

  /// A piece of a work unit: where its bytes come from.
  enum Source: Equatable {
    case layer(Int)  // read from this layer of the chain
    case zero  // reads as zero; the writer must make it so
    case backing  // left to the output's backing file
    case chain  // read through the whole chain (backing content the writer must store)
    case compare  // read through the chain, keep only granules that differ from `compareBase`
  }

  /// The depth that marks ranges to compare with `compareBase` in a plan's extents.
  static let compareDepth = -2

  struct Segment {
    var range: Range<Int64>
    var source: Source
  }

  /// One step for the writer, in disk order: runs to pass on as they are, or a unit whose
  /// data a worker must read first.
  enum Item {
    case runs([Run])
    case unit([Segment])
  }

  enum RunKind { case data, zero, backing }

  struct Run {
    var range: Range<Int64>
    var kind: RunKind
    /// For zero runs: found by scanning data that was read (not a hole in the map).
    var scanned = false
  }

  /// A unit after a worker read it: the bytes and how they split into data and zeros.
  final class FilledUnit {
    let start: Int64
    /// The unit's bytes; only the first `length` belong to it.
    let buffer: UnsafeMutableRawBufferPointer
    let length: Int
    let pool: BufferPool
    let runs: [Run]
    let bytesRead: Int64
    /// What a `PreparingImageWriter` made of the unit on the worker thread.
    var prepared: AnyObject?

    init(
      start: Int64, buffer: UnsafeMutableRawBufferPointer, length: Int, pool: BufferPool, runs: [Run],
      bytesRead: Int64
    ) {
      self.start = start
      self.buffer = buffer
      self.length = length
      self.pool = pool
      self.runs = runs
      self.bytesRead = bytesRead
    }

    deinit { pool.give(buffer) }
  }

  /// Runs the conversion, then `writer.finish()`. On any error, `writer.abandon()`.
  @discardableResult
  public func run() throws -> ConvertStatistics {
    do {
      let statistics = try convert()
      try writer.finish()
      return statistics
    } catch {
      writer.abandon()
      throw error
    }
  }

  private func convert() throws -> ConvertStatistics {
    var statistics = ConvertStatistics()
    let total = chain.virtualSize
    statistics.virtualSize = total
    let granularity = Int64(max(writer.granularity, 1))
    let unit = (Int64(options.unitSize) + granularity - 1) / granularity * granularity
    let window = max(options.windowSize / unit, 1) * unit
    let sparseSize = options.sparseSize

    // Units in the pipeline, results waiting, and one per worker being filled. Four units
    // per worker may be in flight: results are taken in disk order, and with only two a
    // worker that finished quick units (random clusters skip compression) sat idle behind
    // one still compressing text (zstd conversion of W1: 10% faster with four).
    let pool = BufferPool(size: Int(unit), limit: options.threads * 5 + 2)
    let pipeline = OrderedPipeline<[Segment], FilledUnit>(
      threads: options.threads, capacity: options.threads * 4
    ) { [chain, writer, compareBase = options.compareBase] segments in
      let filled = try Converter.fill(
        segments, chain: chain, sparseSize: sparseSize, pool: pool, base: compareBase, granularity: granularity)
      if let preparing = writer as? PreparingImageWriter {
        filled.prepared = try preparing.prepare(
          UnsafeRawBufferPointer(rebasing: filled.buffer[0..<filled.length]), at: filled.start,
          dataRanges: filled.runs.filter { $0.kind == .data }.map(\.range))
      }
      return filled
    }
    defer { pipeline.shutdown() }

    // Items waiting for the writer, in disk order; units are placeholders for results.
    var waiting: [Item] = []
    var waitingHead = 0
    var done: Int64 = 0

    func writeRuns(_ runs: [Run], from filled: FilledUnit?) throws {
      for run in runs {
        switch run.kind {
        case .data:
          let unit = filled!
          if unit.prepared != nil {
            statistics.bytesWritten += Int64(run.range.count)
            break
          }
          let slice = UnsafeRawBufferPointer(
            rebasing: unit.buffer[Int(run.range.lowerBound - unit.start)..<Int(run.range.upperBound - unit.start)])
          try writer.write(slice, at: run.range.lowerBound)
          statistics.bytesWritten += Int64(run.range.count)
        case .zero:
          try writer.writeZeroes(run.range)
          if run.scanned { statistics.zeroBytesSkipped += Int64(run.range.count) } else {
            statistics.holeBytes += Int64(run.range.count)
          }
        case .backing:
          statistics.backingBytes += Int64(run.range.count)
        }
        done += Int64(run.range.count)
      }
      if let prepared = filled?.prepared { try (writer as! PreparingImageWriter).commit(prepared) }
      options.progress?(done, total)
    }

    func drainOne() throws {
      let item = waiting[waitingHead]
      waitingHead += 1
      switch item {
      case .runs(let runs): try writeRuns(runs, from: nil)
      case .unit:
        let filled = try pipeline.takeNext()
        statistics.bytesRead += filled.bytesRead
        try writeRuns(filled.runs, from: filled)
      }
      if waitingHead > 1024 && waitingHead * 2 > waiting.count {
        waiting.removeFirst(waitingHead)
        waitingHead = 0
      }
    }

    var windowStart: Int64 = 0
    while windowStart < total {
      let windowEnd = min(total, windowStart + window)
      let extents =
        if let base = options.compareBase {
          try Converter.comparePlan(
            source: chain, base: base, range: windowStart..<windowEnd, granularity: granularity)
        } else {
          try chain.extents(in: windowStart..<windowEnd, stopDepth: options.stopDepth)
        }
      for item in Converter.items(
        extents, unit: unit, granularity: granularity, writeZeroBlocks: sparseSize == 0)
      {
        if case .unit(let segments) = item {
          while pipeline.isFull { try drainOne() }
          pipeline.submit(segments)
        }
        waiting.append(item)
        while waiting.count - waitingHead > 4096 { try drainOne() }
      }
      windowStart = windowEnd
    }
    while waitingHead < waiting.count { try drainOne() }
    return statistics
  }

  /// Cuts a window's extents into writer steps: each unit-sized, unit-aligned chunk of the
  /// disk that holds any data becomes one unit covering the whole chunk (so a unit never
  /// splits a cluster); chunks without data pass straight to the writer as runs.
  static func items(
    _ extents: [LayeredExtent], unit: Int64, granularity: Int64, writeZeroBlocks: Bool
  ) -> [Item] {
    var items: [Item] = []
    var chunk: [Segment] = []
    var chunkHasData = false
    var chunkEnd: Int64 = -1

    func appendRuns(_ runs: [Run]) {
      if case .runs(let previous)? = items.last {
        items[items.count - 1] = .runs(merge(previous + runs))
      } else {
        items.append(.runs(merge(runs)))
      }
    }

    func flush() {
      guard !chunk.isEmpty else { return }
      if granularity > 1, chunk.contains(where: { $0.source == .backing }),
        chunk.contains(where: { $0.source != .backing })
      {
        chunk = Converter.fillMixedGranules(chunk, granularity: granularity)
        chunkHasData = chunkHasData || chunk.contains { $0.source == .chain }
      }
      if chunkHasData {
        items.append(.unit(chunk))
      } else {
        appendRuns(chunk.map { Run(range: $0.range, kind: $0.source == .backing ? .backing : .zero) })
      }
      chunk = []
      chunkHasData = false
    }

    for extent in extents {
      let source: Source
      switch extent.kind {
      case .data: source = extent.depth == compareDepth ? .compare : .layer(extent.depth)
      case .zero: source = writeZeroBlocks ? .layer(-1) : .zero
      case .unallocated: source = .backing
      }
      var position = extent.range.lowerBound
      while position < extent.range.upperBound {
        if position >= chunkEnd {
          flush()
          chunkEnd = (position / unit + 1) * unit
        }
        // Whole chunks without data go to the writer as one run: the cost follows the
        // extents, not the size of the disk.
        if source == .zero || source == .backing, chunk.isEmpty, position % unit == 0 {
          let wholeEnd = extent.range.upperBound / unit * unit
          if wholeEnd > position {
            appendRuns([Run(range: position..<wholeEnd, kind: source == .backing ? .backing : .zero)])
            position = wholeEnd
            chunkEnd = wholeEnd
            continue
          }
        }
        let end = min(extent.range.upperBound, chunkEnd)
        if source != .zero && source != .backing { chunkHasData = true }
        chunk.append(Segment(range: position..<end, source: source))
        position = end
      }
    }
    flush()
    return items
  }

  /// A writer stores whole granules (clusters): one cannot be partly the backing file's and
  /// partly the output's. In a granule that mixes both, the backing part is read through the
  /// chain and stored too.
  static func fillMixedGranules(_ segments: [Segment], granularity: Int64) -> [Segment] {
    var mixed = Set<Int64>()
    var owners: [Int64: (backing: Bool, other: Bool)] = [:]
    for segment in segments {
      var granule = segment.range.lowerBound / granularity
      while granule * granularity < segment.range.upperBound {
        var owner = owners[granule] ?? (false, false)
        if segment.source == .backing { owner.backing = true } else { owner.other = true }
        owners[granule] = owner
        if owner.backing && owner.other { mixed.insert(granule) }
        granule += 1
      }
    }
    guard !mixed.isEmpty else { return segments }
    var result: [Segment] = []
    for segment in segments {
      guard segment.source == .backing else {
        result.append(segment)
        continue
      }
      var position = segment.range.lowerBound
      while position < segment.range.upperBound {
        let granule = position / granularity
        let end = min(segment.range.upperBound, (granule + 1) * granularity)
        let source: Source = mixed.contains(granule) ? .chain : .backing
        if let last = result.last, last.source == source, last.range.upperBound == position {
          result[result.count - 1].range = last.range.lowerBound..<end
        } else {
          result.append(Segment(range: position..<end, source: source))
        }
        position = end
      }
    }
    return result
  }

  static func merge(_ runs: [Run]) -> [Run] {
    var merged: [Run] = []
    for run in runs {
      if let last = merged.last, last.kind == run.kind, last.scanned == run.scanned,
        last.range.upperBound == run.range.lowerBound
      {
        merged[merged.count - 1].range = last.range.lowerBound..<run.range.upperBound
      } else {
        merged.append(run)
      }
    }
    return merged
  }

  /// A worker's job: read a unit's data segments, then split them into data and zero runs
  /// at `sparseSize` blocks aligned to the disk. Segments known to be zero are not read.
  static func fill(
    _ segments: [Segment], chain: Chain, sparseSize: Int, pool: BufferPool, base: Chain? = nil,
    granularity: Int64 = 1
  ) throws -> FilledUnit {
    let start = segments.first!.range.lowerBound
    let end = segments.last!.range.upperBound
    let buffer = pool.take(Int(end - start))
    var runs: [Run] = []
    var bytesRead: Int64 = 0
    do {
      for segment in segments {
        let slice = UnsafeMutableRawBufferPointer(
          rebasing: buffer[Int(segment.range.lowerBound - start)..<Int(segment.range.upperBound - start)])
        switch segment.source {
        case .layer, .chain:
          if case .layer(let depth) = segment.source, depth >= 0 {
            try chain.layers[depth].read(into: slice, at: segment.range.lowerBound)
            bytesRead += Int64(slice.count)
          } else if segment.source == .chain {
            try chain.read(into: slice, at: segment.range.lowerBound)
            bytesRead += Int64(slice.count)
          } else {
            slice.initializeMemory(as: UInt8.self, repeating: 0)
          }
          for piece in zeroRuns(UnsafeRawBufferPointer(slice), at: segment.range.lowerBound, blockSize: sparseSize) {
            runs.append(Run(range: piece.range, kind: piece.isZero ? .zero : .data, scanned: true))
          }
        case .compare:
          try chain.read(into: slice, at: segment.range.lowerBound)
          bytesRead += Int64(slice.count)
          runs += try compareWithBase(
            slice, at: segment.range.lowerBound, base: base!, granularity: granularity, sparseSize: sparseSize)
        case .zero:
          runs.append(Run(range: segment.range, kind: .zero))
        case .backing:
          runs.append(Run(range: segment.range, kind: .backing))
        }
      }
    } catch {
      pool.give(buffer)
      throw error
    }
    return FilledUnit(
      start: start, buffer: buffer, length: Int(end - start), pool: pool, runs: merge(runs), bytesRead: bytesRead)
  }
}

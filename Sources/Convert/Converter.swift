import DiskImage
import FoundationEssentials

/// What the output's backing file is, as the engine sees it (`-B`).
public enum OutputBacking {
  /// No backing file: the output holds the whole disk.
  case none
  /// The backing file is this layer of the source's chain: what the layers above it leave
  /// unallocated is the backing file's business.
  case chainLayer(Int)
  /// The backing file is not a layer of the source: it is read as this chain, and clusters
  /// where the source reads the same as it are left to it; the rest is stored (as zero
  /// clusters where the source reads zero).
  case compared(Chain)
}

/// How a conversion runs.
public struct ConvertOptions {
  /// Worker threads that read, detect zeros and compress (`-m`): by default the number of
  /// cores, at least 2 and at most 8 (qemu-img's default -m), so that the units in flight
  /// (`capacity`) stay within their memory budget on any machine.
  public var threads: Int = defaultThreads
  /// The cores, at least 2 and at most 8.
  public static var defaultThreads: Int { min(8, max(2, ProcessInfo.processInfo.activeProcessorCount)) }
  /// `-S`: blocks of this many bytes that are all zero are not written; 0 writes every
  /// byte, holes included.
  public var sparseSize: Int = 4096
  /// The virtual-disk span one work unit covers (rounded up to the writer's granularity).
  public var unitSize: Int = 2 << 20
  /// How much of the virtual disk is mapped at a time, at first: windows grow where the
  /// map is sparse and shrink back where it is dense (`AdaptiveWindow`).
  public var windowSize: Int64 = 1 << 30
  /// The output's backing file (`-B`).
  public var backing: OutputBacking = .none
  /// How data that lies plainly in a source file reaches a writer that can take it from
  /// there (`CopyingImageWriter`): shared extents, a kernel copy, or written (`--copy-mode`).
  public var copyMode: CopyMode = .auto
  /// Called with (bytes done, bytes total) as the work proceeds, from the writing thread.
  public var progress: ((Int64, Int64) -> Void)?
  /// Asked after each unit is written: true stops the conversion with `ConversionCancelled`
  /// (the writer abandons its output).
  public var isCancelled: (() -> Bool)?

  public init() {}
}

/// What a conversion did, for the summary line.
public struct ConvertStatistics: Equatable {
  public var virtualSize: Int64 = 0
  /// Bytes read from the layers of the source (for a sequential source: its data bytes).
  public var bytesRead: Int64 = 0
  /// Bytes handed to the writer as data.
  public var bytesWritten: Int64 = 0
  /// Of `bytesWritten`: bytes the output shares with the source (cloned extents).
  public var bytesCloned: Int64 = 0
  /// Of `bytesWritten`: bytes the kernel copied from the source (copy_file_range).
  public var bytesCopied: Int64 = 0
  /// Of `bytesWritten`: written from the source's page cache, where the engine checked
  /// them mapped (`--copy-mode=auto` on ext4 and tmpfs).
  public var bytesFromPageCache: Int64 = 0
  /// Of `bytesFromPageCache`: sent to the disk from there without a copy (O_DIRECT, on ext4).
  public var bytesDirect: Int64 = 0
  /// Of the bytes written from memory (neither cloned, copied nor from the page cache):
  /// sent to the disk from the unit's buffer without a copy (O_DIRECT, on ext4).
  public var bytesDirectFromMemory: Int64 = 0
  /// Bytes read that turned out to be zero blocks and were not written.
  public var zeroBytesSkipped: Int64 = 0
  /// Bytes the map said were holes or zeros: never read.
  public var holeBytes: Int64 = 0
  /// Bytes the map said were zeros and were written as data all the same (`-S 0`).
  public var holeBytesWritten: Int64 = 0
  /// Bytes left to the output's backing file.
  public var backingBytes: Int64 = 0
  /// For a sequential source: the bytes of input it consumed, headers included.
  public var sourceBytes: Int64?
}

/// Where a conversion's disk comes from.
public enum ConversionInput {
  /// Images read at any offset, layer by layer.
  case chain(Chain)
  /// An image read from start to end (a stream from a pipe).
  case sequential(SequentialImageReader)

  public var virtualSize: Int64 {
    switch self {
    case .chain(let chain): return chain.virtualSize
    case .sequential(let reader): return reader.virtualSize
    }
  }

  /// The name of the image the user named (or "standard input").
  public var name: String {
    switch self {
    case .chain(let chain): return chain.top.path
    case .sequential(let reader): return reader.name
    }
  }
}

/// The engine: takes the source's map window by window (or a sequential source's pieces
/// as they come), reads only what is data, drops zero blocks, and hands the writer runs of
/// data and zeros in virtual-disk order. Worker threads read, detect zeros and prepare
/// (compress); one thread writes, in order, so the output is the same bytes whatever the
/// thread count.
/// A conversion stopped because `ConvertOptions.isCancelled` said so.
public struct ConversionCancelled: Error, CustomStringConvertible {
  public init() {}
  public var description: String { "the conversion was cancelled" }
}

public final class Converter {
  let input: ConversionInput
  let writer: ImageWriter
  let options: ConvertOptions
  /// The source files mapped for zero detection, while a conversion runs.
  private var mappings: [FileMapping?] = []

  public init(input: ConversionInput, writer: ImageWriter, options: ConvertOptions = ConvertOptions()) {
    self.input = input
    self.writer = writer
    self.options = options
  }

  public convenience init(chain: Chain, writer: ImageWriter, options: ConvertOptions = ConvertOptions()) {
    self.init(input: .chain(chain), writer: writer, options: options)
  }

  /// A piece of a work unit: where its bytes come from.
  enum Source: Equatable {
    /// Read from this layer of the chain.
    case layer(Int)
    /// Reads as zero; the writer must make it so.
    case zero
    /// Reads as zero, and is written as data all the same (`-S 0`).
    case zeroFilled
    /// Left to the output's backing file.
    case backing
    /// Read through the whole chain (backing content the writer must store).
    case chain
    /// Read through the chain; only granules that differ from the compared base are kept.
    case compare
    /// Already in the unit's buffer: a sequential source's data.
    case received

    /// Whether the unit's buffer must hold bytes for it.
    var hasData: Bool { self != .zero && self != .backing }
  }

  struct Segment: RangeRun {
    var range: Range<Int64>
    var source: Source
    /// For a layer's data the kernel may copy: where it starts in the layer's plain host
    /// file (`ImageReader.plainHostFile`); nil otherwise.
    var hostOffset: Int64? = nil
    func canMerge(with next: Segment) -> Bool {
      source == next.source && range.upperBound == next.range.lowerBound
        && hostOffsetsContinue(hostOffset, length: Int64(range.count), next.hostOffset)
    }
  }

  /// A run of a unit's data that lies plainly in a source file.
  struct HostPiece {
    var range: Range<Int64>
    /// Where the piece lies in its file, and the mapping `mapped` lies in (when mapped).
    var bytes: HostBytes
    /// The piece's bytes where they lie mapped from the source file (read there, not
    /// copied into the unit's buffer), or nil when they are in the buffer.
    var mapped: UnsafeRawBufferPointer?
    /// The mapping `mapped` lies in.
    var mapping: FileMapping? { bytes.mapping }
  }

  /// One step for the writer, in disk order: runs to pass on as they are, or a unit whose
  /// data a worker must read (or scan) first.
  enum Item {
    case runs([Run])
    case unit([Segment])
  }

  enum RunKind { case data, zero, backing }

  struct Run: RangeRun {
    var range: Range<Int64>
    var kind: RunKind
    /// For zero runs: found by scanning data that was read (not a hole in the map).
    var scanned = false

    func canMerge(with next: Run) -> Bool {
      kind == next.kind && scanned == next.scanned && range.upperBound == next.range.lowerBound
    }
  }

  /// A unit for a worker: its segments, and its buffer when the bytes are already there.
  /// How far ahead of the unit being queued cold mapped data is asked for (`prefetch`).
  /// Cold W1 raw -> raw on ext4: 1.30-1.40 s with 8 MiB, 1.04-1.16 with 32, 1.03-1.23 with
  /// 128 (3 alternating runs each). Prefetched pages are in the page cache, not mapped:
  /// they do not count in the process's memory.
  static let prefetchAhead: Int64 = 32 << 20

  struct Job {
    var segments: [Segment]
    var buffer: UnsafeMutableRawBufferPointer?
  }

  /// A unit after a worker read it: the bytes and how they split into data and zeros.
  final class FilledUnit: KeptMemory {
    let start: Int64
    /// The unit's bytes; only the first `length` belong to it.
    let buffer: UnsafeMutableRawBufferPointer
    let length: Int
    let pool: BufferPool
    let runs: [Run]
    let bytesRead: Int64
    /// Bytes the map said were zeros, filled in to be written as data (`-S 0`).
    var filledBytes: Int64 = 0
    /// Where the unit's data lies plainly in source files, in disk order (only when the
    /// writer can take it from there).
    var hostPieces: [HostPiece] = []
    /// What a `PreparingImageWriter` made of the unit on the worker thread.
    var prepared: AnyObject?
    /// The unit's bytes where they lie mapped from one source file, in place of `buffer`
    /// (only its data ranges are valid there), when `fill` was asked for the whole unit.
    var mappedUnit: UnsafeRawBufferPointer?

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

    var keptBytes: Int { buffer.count }
  }

  /// Runs the conversion, then checks a sequential source's end, then `writer.finish()`.
  /// On any error, `writer.abandon()`.
  @discardableResult
  public func run() throws -> ConvertStatistics {
    defer { mappings = [] }
    do {
      var statistics = try convert()
      if case .sequential(let reader) = input {
        try reader.finish()
        statistics.sourceBytes = reader.bytesConsumed
      }
      try writer.finish()
      return statistics
    } catch {
      writer.abandon()
      // A mapped source that shrank under us makes reads, copies and clones fail in ways
      // that name the output; the cause is the source.
      if let truncation = mappings.lazy.compactMap({ $0?.truncation() }).first { throw truncation }
      throw error
    }
  }

  private func convert() throws -> ConvertStatistics {
    var statistics = ConvertStatistics()
    let total = input.virtualSize
    statistics.virtualSize = total
    let granularity = Int64(max(writer.granularity, 1))
    let sparseSize = options.sparseSize
    var unit = (Int64(max(options.unitSize, 1)) + granularity - 1) / granularity * granularity
    // Units that are a whole number of zero blocks judge every block whole; when the two
    // sizes have no small common multiple, a block cut by a unit boundary is judged in parts.
    if sparseSize > 0 {
      let common = unit / gcd(unit, Int64(sparseSize)) * Int64(sparseSize)
      if common <= 32 << 20 { unit = common }
    }
    let window = AdaptiveWindow(minimum: max(options.windowSize / unit, 1) * unit)

    // Units in the pipeline, results waiting, and one per worker being filled. Four units
    // per worker may be in flight: results are taken in disk order, and with only two a
    // worker that finished quick units (random clusters skip compression) sat idle behind
    // one still compressing text (zstd conversion of W1: 10% faster with four).
    // A target that keeps units until the server has them (NBD, up to 16 MiB in flight)
    // gives them back late: the pool keeps that many more rather than free and fault in
    // fresh ones.
    let pool = BufferPool(size: Int(unit), limit: options.threads * 5 + 2 + Int((16 << 20) / unit))
    let chain: Chain? = if case .chain(let chain) = input { chain } else { nil }
    let base: Chain? = if case .compared(let base) = options.backing { base } else { nil }
    let copying = writer as? CopyingImageWriter
    let copyingPreparer = writer as? CopyingPreparingImageWriter
    let copyMode = options.copyMode
    // Workers check the data a writer may take by the kernel where it lies mapped. A
    // writer that prepares units reads them as one buffer: it gets the mapping itself
    // for units whose data lies in one source file at one shift (`wholeUnitMapping`).
    let mapSources =
      options.copyMode != .rw
      && ((copying?.copies(in: copyMode) ?? false) || (copyingPreparer?.copies(in: copyMode) ?? false))
    let preparing = writer is PreparingImageWriter
    // The source pages the workers map to check stay mapped until their unit is written
    // (a writer may store them from the mapping: `writesMappedBytes`), and are dropped
    // then, in runs (`release`): one madvise per run, not per unit, and each is a TLB
    // shootdown. Dropped per unit on the workers, where the kernel clones or copies from
    // the file, W1 raw -> raw on XFS took 0.061 s, now 0.053 (medians of 9). At most
    // 8 MiB of them wait for the writer (`mappedLimit`). (Not where `spanning` is set.)
    // One mapping per layer file, made once; kept (so the pointers stay valid) until the end.
    let mappings: [FileMapping?] =
      mapSources ? (chain?.layers.map { $0.plainHostFile.flatMap { FileMapping(file: $0) } } ?? []) : []
    self.mappings = mappings
    // A sequential source's own check of its data (the stream's checksum) runs on the
    // workers with the zero scan, so the thread that reads the source only moves bytes.
    var checkReceived: ((UnsafeRawBufferPointer, Int64) -> Void)?
    if case .sequential(let reader) = input, let deferring = reader as? DeferredCheckSequentialReader {
      deferring.deferDataChecks()
      checkReceived = { deferring.checkData($0, at: $1) }
    }
    let releaser = PageReleaser()
    // Units hold their buffers (and their compressed or prepared output) until written: up
    // to 20 MiB of them wait, or two more than the workers when -m asks for more than 8,
    // so memory does not grow with the cores (with -m 8 and four per worker,
    // --copy-mode=rw of dense data peaked at 87 MiB; W4 zstd -> raw at 126). With a budget
    // of 32 MiB, W4 zstd -> raw peaked at 49 MiB with -m 2 (8 units), 65 with -m 4 and 8
    // (16 units): each unit is its 2 MiB buffer. With 24 MiB and decompressed units going
    // to the disk from their buffers (`DirectLane` keeps up to 4 MiB of units), a zstd
    // qcow2 of W1 to raw with -m 8 peaked at 66 MiB; with 20, at 61-63 (no slower).
    let capacity = min(options.threads * 4, max(options.threads + 2, Int((20 << 20) / unit)))
    // Data checked where it lies mapped stays mapped until it is written: at most 8 MiB of
    // it waits (`mappedBytes`), whatever the thread count. The workers only look for zero
    // blocks in it, far quicker than the writing thread writes it. W1 qcow2 -> raw on ext4
    // peaked at 44 MiB against 51 with 16 MiB (medians of 13, no slower), and -m 8 of
    // dense data at 47 against 108. Compressed units hold no mapped data: they still fill
    // the pipeline, so many workers can decompress at once. Where the writer clones or
    // the kernel copies (it never writes the mapped bytes), 8 MiB left the workers waiting
    // for jobs while the writing thread waited for the oldest unit (`perf` sched_switch
    // stacks): with 16 MiB, W1 raw -> qcow2 on XFS took 0.046 s against 0.051. Raw output
    // there goes further (`spanning`, below).
    let writesMapped =
      copying?.writesMappedBytes(in: copyMode) ?? copyingPreparer?.writesMappedBytes(in: copyMode) ?? true
    // Where the writer takes nothing from the mapped pages (it clones, or the kernel
    // copies from the file) and prepares nothing from them, a worker drops the pages it
    // checked as soon as it has, and a unit goes on past the unit size while it holds
    // only such data and zeros (`Spanning`): up to 16 MiB of it with 2 threads, 32 MiB
    // shared by the threads, so that the pages being checked stay under 32 MiB. Those
    // pages then hold no memory while the units wait for the writer: 64 MiB of them may
    // wait. Before, W1 raw -> raw on XFS went in 1,100 units of at most 2 MiB, each
    // handed between threads twice, their pages mapped until written: 45 ms against 35-37
    // now, in alternating runs where `qemu-img convert -C` took 33-37 (medians of 7),
    // peaking at 36 MiB against 30-39 (8 MiB units: 37 ms, 16: 35, 32: 35).
    let spanning: Spanning? =
      mapSources && !writesMapped && !preparing
      ? Spanning(
        data: max(unit, min(16 << 20, (32 << 20) / Int64(max(options.threads, 1)))),
        layers: Set(mappings.indices.filter { mappings[$0] != nil }))
      : nil
    let mappedLimit: Int64 = spanning != nil ? 64 << 20 : (writesMapped ? 8 : 16) << 20
    let pipeline = OrderedPipeline<Job, FilledUnit>(
      threads: options.threads, capacity: capacity
    ) { [writer, checkReceived] job in
      releaser.drain()
      let filled = try Converter.fill(
        job, chain: chain, sparseSize: sparseSize, pool: pool, base: base, granularity: granularity,
        mappings: mappings, wholeUnit: preparing, checkReceived: checkReceived)
      if spanning != nil { Converter.release(filled.hostPieces) }
      if let preparing = writer as? PreparingImageWriter {
        filled.prepared = try preparing.prepare(
          filled.mappedUnit ?? UnsafeRawBufferPointer(rebasing: filled.buffer[0..<filled.length]), at: filled.start,
          dataRanges: filled.runs.filter { $0.kind == .data }.map(\.range))
      }
      return filled
    }
    defer {
      pipeline.shutdown()
      withExtendedLifetime(mappings) {}
    }

    // Items waiting for the writer, in disk order; units are placeholders for results.
    var waiting: [Item] = []
    var waitingHead = 0
    // The mapped bytes of each unit in the pipeline, in disk order, and their sum.
    var mappedInFlight: [Int64] = []
    var mappedHead = 0
    var mappedWaiting: Int64 = 0
    var done: Int64 = 0

    // Zero runs that touch become one call, whether the map or a scan found them and
    // whatever unit they came from: a writer that must act on zeros (a backing file to
    // hide, an NBD server) gets few large requests.
    var zeros: Range<Int64>?
    func flushZeros() throws {
      if let range = zeros { try writer.writeZeroes(range) }
      zeros = nil
    }

    func writeRuns(_ runs: [Run], from filled: FilledUnit?) throws {
      for run in runs {
        if run.kind != .zero { try flushZeros() }
        switch run.kind {
        case .data:
          let unit = filled!
          statistics.bytesWritten += Int64(run.range.count)
          if unit.prepared != nil { break }
          func bytes(_ range: Range<Int64>) -> UnsafeRawBufferPointer {
            if let piece = unit.hostPieces.first(where: { $0.range.contains(range.lowerBound) }),
              let mapped = piece.mapped
            {
              return UnsafeRawBufferPointer(
                rebasing: mapped[Int(range.lowerBound - piece.range.lowerBound)..<Int(range.upperBound - piece.range.lowerBound)])
            }
            return UnsafeRawBufferPointer(
              rebasing: unit.buffer[Int(range.lowerBound - unit.start)..<Int(range.upperBound - unit.start)])
          }
          // Bytes outside the host pieces are in the unit's buffer, which lives as long as
          // the unit: a target that sends them later (an NBD server, the direct lane)
          // keeps the unit rather than a copy.
          func writeFromBuffer(_ range: Range<Int64>) throws {
            guard let copying else {
              try writer.write(bytes(range), at: range.lowerBound, keeping: unit)
              return
            }
            let tally = try copying.write(bytes(range), at: range.lowerBound, keeping: unit, mode: copyMode)
            statistics.bytesDirectFromMemory += tally.directFromMemory
          }
          guard let copying, !unit.hostPieces.isEmpty else {
            try writeFromBuffer(run.range)
            break
          }
          // The parts that lie in a source file go by the kernel; the rest is written.
          var position = run.range.lowerBound
          for piece in unit.hostPieces
          where piece.range.upperBound > position && piece.range.lowerBound < run.range.upperBound {
            let part = max(piece.range.lowerBound, position)..<min(piece.range.upperBound, run.range.upperBound)
            if part.lowerBound > position {
              try writeFromBuffer(position..<part.lowerBound)
            }
            let tally = try copying.write(
              bytes(part), at: part.lowerBound,
              from: piece.bytes.advanced(by: part.lowerBound - piece.range.lowerBound),
              mode: copyMode)
            statistics.bytesCloned += tally.cloned
            statistics.bytesCopied += tally.copied
            statistics.bytesFromPageCache += tally.fromPageCache
            statistics.bytesDirect += tally.direct
            position = part.upperBound
          }
          if position < run.range.upperBound {
            try writeFromBuffer(position..<run.range.upperBound)
          }
        case .zero:
          if let open = zeros, open.upperBound == run.range.lowerBound {
            zeros = open.lowerBound..<run.range.upperBound
          } else {
            try flushZeros()
            zeros = run.range
          }
          if run.scanned { statistics.zeroBytesSkipped += Int64(run.range.count) } else {
            statistics.holeBytes += Int64(run.range.count)
          }
        case .backing:
          statistics.backingBytes += Int64(run.range.count)
        }
        done += Int64(run.range.count)
      }
      if let prepared = filled?.prepared {
        try flushZeros()
        if let copyingPreparer, let filled {
          // The unit's buffer lives as long as the unit; a unit checked where it lies
          // mapped has none to keep.
          let tally = try copyingPreparer.commit(
            prepared, sources: filled.hostPieces.map { ($0.range, $0.bytes) },
            keeping: filled.mappedUnit == nil ? filled : nil, mode: copyMode)
          statistics.bytesCloned += tally.cloned
          statistics.bytesCopied += tally.copied
          statistics.bytesFromPageCache += tally.fromPageCache
          statistics.bytesDirect += tally.direct
          statistics.bytesDirectFromMemory += tally.directFromMemory
        } else {
          try (writer as! PreparingImageWriter).commit(prepared)
        }
      }
      options.progress?(done, total)
      if options.isCancelled?() == true { throw ConversionCancelled() }
    }

    // Written pages leave the page tables in runs of up to 8 MiB of data, not unit by
    // unit: each call interrupts the workers' processors to flush their TLBs (runs of
    // 4 MiB saved about 1 MiB of peak and were no faster). The workers drop them,
    // as they take their next unit: the writing thread, the one that limits a conversion
    // where nothing can be shared, only notes them.
    var released: (mapping: FileMapping, start: UnsafeRawPointer, end: UnsafeRawPointer, bytes: Int)?
    func releaseOpenRun() {
      if let open = released {
        releaser.post(open.mapping, UnsafeRawBufferPointer(start: open.start, count: open.end - open.start))
      }
      released = nil
    }
    func release(_ piece: HostPiece) {
      guard let mapped = piece.mapped, let mapping = piece.mapping, let start = mapped.baseAddress else { return }
      // A run goes on over a gap ahead of it (a hole between extents): dropping the page
      // tables of a range that maps nothing costs nothing, and each call costs a TLB
      // shootdown on every processor the workers run on (W1 on XFS: 1,100 calls, 28% of
      // the samples). A page of a later unit in the gap faults back in when touched.
      // A run counts what its pieces keep mapped: a fault maps the cached pages of the
      // aligned 64 KiB block around it (`FileMapping.faultAround`), so 4 KiB extents (W2)
      // keep 16 times their bytes.
      let block = FileMapping.faultAround
      let footprint =
        (Int(bitPattern: start + mapped.count) + block - 1) / block * block - Int(bitPattern: start) / block * block
      let gapBound = 256 << 20
      if let open = released, open.mapping === mapping, start >= open.end, start - open.end < gapBound,
        open.bytes < 8 << 20
      {
        released!.end = start + mapped.count
        released!.bytes += footprint
        return
      }
      releaseOpenRun()
      released = (mapping, start, start + mapped.count, footprint)
    }
    defer {
      releaseOpenRun()
      releaser.drain()
    }

    func drainOne() throws {
      let item = waiting[waitingHead]
      waitingHead += 1
      switch item {
      case .runs(let runs): try writeRuns(runs, from: nil)
      case .unit:
        let filled = try pipeline.takeNext()
        mappedWaiting -= mappedInFlight[mappedHead]
        mappedHead += 1
        if mappedHead > 1024 && mappedHead * 2 > mappedInFlight.count {
          mappedInFlight.removeFirst(mappedHead)
          mappedHead = 0
        }
        statistics.bytesRead += filled.bytesRead
        statistics.holeBytesWritten += filled.filledBytes
        try writeRuns(filled.runs, from: filled)
        if spanning == nil {
          for piece in filled.hostPieces { release(piece) }
        }
      }
      if waitingHead > 1024 && waitingHead * 2 > waiting.count {
        waiting.removeFirst(waitingHead)
        waitingHead = 0
      }
    }

    /// The bytes of a unit the workers check where they lie mapped.
    func mappedBytes(_ segments: [Segment]) -> Int64 {
      segments.reduce(0) { total, segment in
        guard case .layer(let depth) = segment.source, segment.hostOffset != nil, depth < mappings.count,
          mappings[depth] != nil
        else { return total }
        return total + Int64(segment.range.count)
      }
    }

    /// A unit the workers will check where it lies mapped, whose first page is not in the
    /// page cache: its data is asked for now, as it is queued, so that the units in the
    /// pipeline are read together in large requests while the workers check the ones
    /// before (`FileMapping.prefetch`), and further ahead (`prefetchAhead`). Cold W1 raw
    /// -> raw on ext4 took 2.6-4.3 s read fault by fault on the workers (qemu-img
    /// 1.3-3.5), 1.4-1.7 with each worker asking for its own unit, 1.04-1.16 now. One
    /// mincore per unit size of the disk decides (per segment, W2's 100,000 extents made
    /// 132,000 calls): a spanning unit (`Spanning`) is decided stretch by stretch, as
    /// its first page, read ahead with the unit before, says nothing of the rest.
    func prefetch(_ segments: [Segment]) {
      var cold = false
      var decidedUpTo = Int64.min  // the disk position the last decision covers
      for segment in segments {
        guard case .layer(let depth) = segment.source, let host = segment.hostOffset, depth < mappings.count,
          let mapping = mappings[depth]
        else { continue }
        if segment.range.lowerBound >= decidedUpTo {
          cold = !mapping.isCached(host)
          decidedUpTo = segment.range.lowerBound + unit
        }
        if cold { mapping.prefetch(host..<host + Int64(segment.range.count)) }
      }
    }

    /// Queues a step for the writer; a unit goes to the workers first.
    func enqueue(_ item: Item, buffer: UnsafeMutableRawBufferPointer? = nil, prefetched: Bool = false) throws {
      if case .unit(let segments) = item {
        let mapped = mapSources ? mappedBytes(segments) : 0
        if mapped > 0 && !prefetched { prefetch(segments) }
        while pipeline.isFull || (mappedWaiting > 0 && mappedWaiting + mapped > mappedLimit) { try drainOne() }
        pipeline.submit(Job(segments: segments, buffer: buffer))
        mappedInFlight.append(mapped)
        mappedWaiting += mapped
      }
      waiting.append(item)
      while waiting.count - waitingHead > 4096 { try drainOne() }
    }

    /// The layers whose data the writer may take from their files, for this window (none
    /// once the writer has found it cannot).
    func hostFiles() -> [ImageFile?] {
      guard let chain, copying?.copies(in: copyMode) ?? copyingPreparer?.copies(in: copyMode) ?? false else {
        return []
      }
      return chain.layers.map(\.plainHostFile)
    }

    switch input {
    case .chain(let chain):
      // The map of each window is read on a thread of its own, a few windows ahead; this
      // thread plans (which layers' files the writer may still take data from is its
      // writer's to say) and writes. A foreign backing file's comparison plan needs only
      // the two maps: it is made there whole.
      enum Mapped {
        case extents([LayeredExtent])
        case compared([Segment])
      }
      var windowStart: Int64 = 0
      var window = window
      let backing = options.backing
      let maps = Prefetcher<Mapped>(depth: 4) {
        guard windowStart < total else { return nil }
        let range = window.range(from: windowStart, to: total)
        windowStart = range.upperBound
        switch backing {
        case .compared(let base):
          let segments = try Converter.comparePlan(source: chain, base: base, range: range, granularity: granularity)
          window.adjust(after: segments.count)
          return .compared(segments)
        case .chainLayer(let depth):
          let extents = try chain.extents(in: range, stopDepth: depth)
          window.adjust(after: extents.count)
          return .extents(extents)
        case .none:
          let extents = try chain.extents(in: range)
          window.adjust(after: extents.count)
          return .extents(extents)
        }
      }
      defer { maps.stop() }
      while let mapped = try maps.take() {
        let segments: [Segment]
        switch mapped {
        case .compared(let planned): segments = planned
        case .extents(let extents):
          segments = Converter.plan(extents, writeZeroBlocks: sparseSize == 0, hostFiles: hostFiles())
        }
        let items = Converter.items(segments, unit: unit, granularity: granularity, spanning: spanning)
        guard mapSources else {
          for item in items { try enqueue(item) }
          continue
        }
        // Cold data is asked for up to `prefetchAhead` bytes ahead of the unit queued (as
        // `prefetch` says): more reads in flight together than the pipeline holds units.
        var ahead = 0  // items[..<ahead] were asked for
        var aheadBytes: Int64 = 0  // their mapped bytes not queued yet
        for (index, item) in items.enumerated() {
          while ahead < items.count && (ahead <= index || aheadBytes < Converter.prefetchAhead) {
            if case .unit(let segments) = items[ahead] {
              prefetch(segments)
              aheadBytes += mappedBytes(segments)
            }
            ahead += 1
          }
          if case .unit(let segments) = item { aheadBytes -= mappedBytes(segments) }
          try enqueue(item, prefetched: true)
        }
      }
    case .sequential(let reader):
      try Converter.takePieces(
        of: reader, unit: unit, sparseSize: sparseSize, pool: pool, enqueue: { try enqueue($0, buffer: $1) })
    }
    while waitingHead < waiting.count { try drainOne() }
    try flushZeros()
    return statistics
  }

  /// Takes a sequential source's pieces in order and cuts them into units, as `items` cuts
  /// a map: a unit's data is read into its buffer here (the source can only be read in
  /// order, on one thread), and the workers scan and prepare it. Zeros spanning whole
  /// units pass straight to the writer as one run.
  static func takePieces(
    of reader: SequentialImageReader, unit: Int64, sparseSize: Int, pool: BufferPool,
    enqueue: (Item, UnsafeMutableRawBufferPointer?) throws -> Void
  ) throws {
    let total = reader.virtualSize
    var position: Int64 = 0
    // Zeros the source gave past the unit being filled.
    var pendingZero: Range<Int64>?
    while position < total {
      let unitStart = position
      let unitEnd = unitStart + min(unit, total - unitStart)  // never past 2^63-1
      var segments: [Segment] = []
      var buffer: UnsafeMutableRawBufferPointer?
      var passedThrough = false
      while position < unitEnd {
        let piece: Extent
        if let zeros = pendingZero {
          piece = Extent(zeros, .zero)
          pendingZero = nil
        } else {
          let bytes = buffer ?? pool.take(Int(unit))
          buffer = bytes
          let room = UnsafeMutableRawBufferPointer(rebasing: bytes[Int(position - unitStart)..<Int(unitEnd - unitStart)])
          piece = try reader.next(limit: total - position, into: room)
          guard piece.range.lowerBound == position, !piece.range.isEmpty, piece.range.upperBound <= total,
            piece.kind != .data || piece.range.upperBound <= unitEnd
          else {
            throw ImageError.invalid(path: reader.name, "internal: the source answered \(piece) at \(position)")
          }
        }
        guard piece.kind == .zero else {
          segments.appendMerging(Segment(range: piece.range, source: .received))
          position = piece.range.upperBound
          continue
        }
        if segments.isEmpty, sparseSize > 0, piece.range.upperBound >= unitEnd {
          let wholeEnd =
            piece.range.upperBound == total ? total : unitStart + (piece.range.upperBound - unitStart) / unit * unit
          try enqueue(.runs([Run(range: unitStart..<wholeEnd, kind: .zero)]), nil)
          if piece.range.upperBound > wholeEnd { pendingZero = wholeEnd..<piece.range.upperBound }
          position = wholeEnd
          passedThrough = true
          break
        }
        let end = min(piece.range.upperBound, unitEnd)
        segments.appendMerging(Segment(range: position..<end, source: sparseSize == 0 ? .zeroFilled : .zero))
        if piece.range.upperBound > end { pendingZero = end..<piece.range.upperBound }
        position = end
      }
      if passedThrough || !segments.contains(where: { $0.source.hasData }) {
        if let buffer { pool.give(buffer) }
        if !passedThrough { try enqueue(.runs(segments.map { Run(range: $0.range, kind: .zero) }), nil) }
      } else {
        try enqueue(.unit(segments), buffer)
      }
    }
  }

  /// What the engine does with each extent of the layered map.
  /// Data of a layer whose entry in `hostFiles` is a file keeps its host offset, so the
  /// writer can take it from there.
  static func plan(_ extents: [LayeredExtent], writeZeroBlocks: Bool, hostFiles: [ImageFile?] = []) -> [Segment] {
    var result: [Segment] = []
    result.reserveCapacity(extents.count)
    for extent in extents {
      let source: Source
      var hostOffset: Int64?
      switch extent.kind {
      case .data:
        source = .layer(extent.depth)
        if extent.depth < hostFiles.count, hostFiles[extent.depth] != nil { hostOffset = extent.hostOffset }
      case .zero: source = writeZeroBlocks ? .zeroFilled : .zero
      case .unallocated: source = .backing
      }
      result.append(Segment(range: extent.range, source: source, hostOffset: hostOffset))
    }
    return result
  }

  /// Units that go on past a unit boundary while all they hold is data the workers check
  /// where it lies mapped (in `layers`) and zeros, until they hold `data` bytes of it or
  /// span `reach` of the disk: fewer, larger units where a unit costs only the scan.
  struct Spanning {
    var data: Int64
    var layers: Set<Int>
    static let reach: Int64 = 64 << 20

    func holds(_ segment: Segment) -> Bool {
      switch segment.source {
      case .zero: return true
      case .layer(let depth): return segment.hostOffset != nil && layers.contains(depth)
      default: return false
      }
    }
  }

  /// Cuts a window's plan into writer steps: each unit-sized, unit-aligned chunk of the
  /// disk that holds any data becomes one unit covering the whole chunk (so a unit never
  /// splits a cluster); chunks without data pass straight to the writer as runs.
  /// With `spanning`, a unit goes on past the chunk while it holds what `spanning` holds.
  static func items(_ plan: [Segment], unit: Int64, granularity: Int64, spanning: Spanning? = nil) -> [Item] {
    var items: [Item] = []
    var chunk: [Segment] = []
    var chunkEnd: Int64 = -1
    var chunkStart: Int64 = 0
    var chunkData: Int64 = 0
    var chunkSpans = true  // every segment of `chunk` is one `spanning` holds

    func appendRuns(_ runs: [Run]) {
      if case .runs(let previous)? = items.last {
        items[items.count - 1] = .runs((previous + runs).merged())
      } else {
        items.append(.runs(runs.merged()))
      }
    }

    func flush() {
      guard !chunk.isEmpty else { return }
      if granularity > 1, chunk.contains(where: { $0.source == .backing }),
        chunk.contains(where: { $0.source != .backing })
      {
        chunk = Converter.fillMixedGranules(chunk, granularity: granularity)
      }
      if chunk.contains(where: { $0.source.hasData }) {
        items.append(.unit(chunk))
      } else {
        appendRuns(chunk.map { Run(range: $0.range, kind: $0.source == .backing ? .backing : .zero) })
      }
      chunk = []
    }

    for step in plan {
      let source = step.source
      var position = step.range.lowerBound
      let spans = spanning?.holds(step) ?? false
      while position < step.range.upperBound {
        if position >= chunkEnd {
          if let spanning, spans, chunkSpans, !chunk.isEmpty, chunkData < spanning.data,
            position - chunkStart < Spanning.reach
          {
            chunkEnd = nextBoundary(after: position, step: unit, limit: Int64.max)
          } else {
            flush()
            chunkStart = position
            chunkData = 0
            chunkSpans = true
            chunkEnd = nextBoundary(after: position, step: unit, limit: Int64.max)
          }
        }
        // Whole chunks without data go to the writer as one run: the cost follows the
        // extents, not the size of the disk.
        if !source.hasData, chunk.isEmpty, position % unit == 0 {
          let wholeEnd = step.range.upperBound / unit * unit
          if wholeEnd > position {
            appendRuns([Run(range: position..<wholeEnd, kind: source == .backing ? .backing : .zero)])
            position = wholeEnd
            chunkEnd = wholeEnd
            continue
          }
        }
        let end = min(step.range.upperBound, chunkEnd)
        if source.hasData { chunkData += end - position }
        chunkSpans = chunkSpans && spans
        chunk.appendMerging(
          Segment(
            range: position..<end, source: source,
            hostOffset: step.hostOffset.map { $0 + position - step.range.lowerBound }))
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
        result.appendMerging(segment)
        continue
      }
      var position = segment.range.lowerBound
      while position < segment.range.upperBound {
        let granule = position / granularity
        let end = nextBoundary(after: position, step: granularity, limit: segment.range.upperBound)
        result.appendMerging(Segment(range: position..<end, source: mixed.contains(granule) ? .chain : .backing))
        position = end
      }
    }
    return result
  }

  /// A worker's job: read a unit's data segments (or take them from the job's buffer, and
  /// hand received bytes to `checkReceived`), then split them into data and zero runs at
  /// `sparseSize` blocks aligned to the disk. Segments known to be zero are not read.
  /// With `wholeUnit` (the writer reads the unit as one buffer), mapped data is used only
  /// when all of the unit's data lies in one mapped file at one shift: the mapping then
  /// stands for the whole unit (`FilledUnit.mappedUnit`); otherwise everything is read.
  static func fill(
    _ job: Job, chain: Chain?, sparseSize: Int, pool: BufferPool, base: Chain? = nil, granularity: Int64 = 1,
    mappings: [FileMapping?] = [], wholeUnit: Bool = false,
    checkReceived: ((UnsafeRawBufferPointer, Int64) -> Void)? = nil
  ) throws -> FilledUnit {
    let segments = job.segments
    let start = segments.first!.range.lowerBound
    let end = segments.last!.range.upperBound
    var mappings = mappings
    var mappedUnit: UnsafeRawBufferPointer?
    if wholeUnit && !mappings.isEmpty {
      mappedUnit = wholeUnitMapping(segments, mappings: mappings)
      if mappedUnit == nil { mappings = [] }
    }
    // Taken when a segment needs it: a unit whose data is all checked where it lies
    // mapped never touches its buffer, and a spanning unit (`Spanning`) may be larger
    // than the pool's buffers.
    var buffer = job.buffer
    func room(_ segment: Segment) -> UnsafeMutableRawBufferPointer {
      if buffer == nil { buffer = pool.take(Int(end - start)) }
      return UnsafeMutableRawBufferPointer(
        rebasing: buffer![Int(segment.range.lowerBound - start)..<Int(segment.range.upperBound - start)])
    }
    var runs: [Run] = []
    var bytesRead: Int64 = 0
    var filledBytes: Int64 = 0
    var hostPieces: [HostPiece] = []
    func scan(_ slice: UnsafeMutableRawBufferPointer, at offset: Int64) {
      for piece in zeroRuns(UnsafeRawBufferPointer(slice), at: offset, blockSize: sparseSize) {
        runs.append(Run(range: piece.range, kind: piece.isZero ? .zero : .data, scanned: true))
      }
    }
    do {
      for segment in segments {
        let count = Int64(segment.range.count)
        switch segment.source {
        case .layer(let depth):
          // Data the writer may take from the source file by the kernel is checked for
          // zeros where it lies in the page cache (mapped), not copied out first: only
          // the blocks the writer cannot clone are ever copied.
          if let host = segment.hostOffset, let file = chain!.layers[depth].plainHostFile {
            let scanned =
              depth < mappings.count
              ? try mappings[depth]?.zeroRuns(host..<host + count, at: segment.range.lowerBound, blockSize: sparseSize)
              : nil
            let mapped = scanned?.bytes
            if let scanned {
              for piece in scanned.runs {
                runs.append(Run(range: piece.range, kind: piece.isZero ? .zero : .data, scanned: true))
              }
            } else {
              let slice = room(segment)
              try chain!.layers[depth].read(into: slice, at: segment.range.lowerBound)
              scan(slice, at: segment.range.lowerBound)
            }
            bytesRead += count
            hostPieces.append(
              HostPiece(
                range: segment.range, bytes: HostBytes(file: file, offset: host, mapping: mapped == nil ? nil : mappings[depth]),
                mapped: mapped))
            break
          }
          let slice = room(segment)
          try chain!.layers[depth].read(into: slice, at: segment.range.lowerBound)
          bytesRead += count
          scan(slice, at: segment.range.lowerBound)
        case .chain:
          let slice = room(segment)
          try chain!.read(into: slice, at: segment.range.lowerBound)
          bytesRead += count
          scan(slice, at: segment.range.lowerBound)
        case .received:
          let slice = room(segment)
          bytesRead += count
          checkReceived?(UnsafeRawBufferPointer(slice), segment.range.lowerBound)
          scan(slice, at: segment.range.lowerBound)
        case .zeroFilled:
          let slice = room(segment)
          slice.initializeMemory(as: UInt8.self, repeating: 0)
          filledBytes += count
          scan(slice, at: segment.range.lowerBound)
        case .compare:
          let slice = room(segment)
          try chain!.read(into: slice, at: segment.range.lowerBound)
          bytesRead += count
          runs += try compareWithBase(
            slice, at: segment.range.lowerBound, base: base!, granularity: granularity, sparseSize: sparseSize)
        case .zero:
          runs.append(Run(range: segment.range, kind: .zero))
        case .backing:
          runs.append(Run(range: segment.range, kind: .backing))
        }
      }
    } catch {
      if let buffer { pool.give(buffer) }
      throw error
    }
    // A unit that needed no buffer still holds one of the pool's (never touched): the
    // writer reads only its host pieces then.
    let filled = FilledUnit(
      start: start, buffer: buffer ?? pool.take(min(Int(end - start), pool.size)), length: Int(end - start),
      pool: pool, runs: runs.merged(), bytesRead: bytesRead)
    filled.filledBytes = filledBytes
    filled.hostPieces = hostPieces
    filled.mappedUnit = mappedUnit
    return filled
  }

  /// Drops the page tables of a unit's mapped pieces (`FileMapping.release`), in runs:
  /// pieces that follow each other in the same mapping go in one call with the gap
  /// between them (a hole of the file, which maps nothing), as each call interrupts the
  /// other processors to flush their TLBs.
  static func release(_ pieces: [HostPiece]) {
    var open: (mapping: FileMapping, start: UnsafeRawPointer, end: UnsafeRawPointer)?
    func close() {
      if let run = open { run.mapping.release(UnsafeRawBufferPointer(start: run.start, count: run.end - run.start)) }
      open = nil
    }
    for piece in pieces {
      guard let mapped = piece.mapped, let mapping = piece.mapping, let start = mapped.baseAddress else { continue }
      if let run = open, run.mapping === mapping, start >= run.end, start - run.end < Int(Spanning.reach) {
        open!.end = start + mapped.count
      } else {
        close()
        open = (mapping, start, start + mapped.count)
      }
    }
    close()
  }

  /// The mapped bytes that hold the whole unit `segments` covers, when every data
  /// segment lies in the same layer's mapped file at the same shift from the disk (a raw
  /// source; a qcow2 whose clusters lie in order) and the rest is zeros or backing, which
  /// the writer does not read. Nil otherwise.
  static func wholeUnitMapping(_ segments: [Segment], mappings: [FileMapping?]) -> UnsafeRawBufferPointer? {
    var layer: Int?
    var shift: Int64?
    for segment in segments {
      switch segment.source {
      case .zero, .backing: continue
      case .layer(let depth):
        guard let host = segment.hostOffset, layer == nil || layer == depth,
          shift == nil || shift == host - segment.range.lowerBound
        else { return nil }
        layer = depth
        shift = host - segment.range.lowerBound
      default: return nil
      }
    }
    guard let layer, let shift, layer < mappings.count, let mapping = mappings[layer] else { return nil }
    let start = segments.first!.range.lowerBound + shift
    return mapping.window(start..<segments.last!.range.upperBound + shift)
  }
}

private func gcd(_ a: Int64, _ b: Int64) -> Int64 { b == 0 ? a : gcd(b, a % b) }

/// Mapped source pages the writing thread is done with, dropped from the page tables by
/// whichever worker takes a unit next (`FileMapping.release`).
final class PageReleaser: @unchecked Sendable {
  private let lock = Lock()
  private var pending: [(FileMapping, UnsafeRawBufferPointer)] = []

  func post(_ mapping: FileMapping, _ bytes: UnsafeRawBufferPointer) {
    lock.withLock { pending.append((mapping, bytes)) }
  }

  func drain() {
    let taken = lock.withLock {
      let all = pending
      pending.removeAll(keepingCapacity: true)
      return all
    }
    for (mapping, bytes) in taken { mapping.release(bytes) }
  }
}

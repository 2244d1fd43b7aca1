import DiskImage

/// What `measure` asks: the size of the file(s) `convert` would write with the same format
/// and options, for a source image or for an empty disk of a given size.
public struct MeasureRequest {
  /// The source image, as `convert` takes it; nil measures an empty disk of `size` bytes.
  public var source: String?
  /// `-f`.
  public var sourceFormat: String?
  /// The format of the source's backing file, when the source does not record it.
  public var sourceBackingFormat: String?
  /// `--size`: the virtual size of the empty disk measured when there is no source.
  public var size: Int64?
  /// `-O`.
  public var outputFormat: String
  /// `-o` and `-c`.
  public var writerOptions = WriterOptions()
  /// The name the output would have: multi-file outputs (a VMDK descriptor) record the
  /// names of their other files, which are made from it.
  public var outputName: String
  /// Threads and `-S`, as `convert` would use them.
  public var engine = ConvertOptions()
  /// Called with each warning an opened image gives.
  public var warn: (String) -> Void = { _ in }

  public init(source: String?, size: Int64? = nil, outputFormat: String, outputName: String? = nil) {
    self.source = source
    self.size = size
    self.outputFormat = outputFormat
    self.outputName = outputName ?? "disk.\(outputFormat)"
  }
}

/// The answer: byte counts as qemu-img measure names them.
public struct Measurement: Equatable {
  /// The length of the output `convert` writes for this source (the sum over its files);
  /// for a `--size` disk, of an empty image of that size.
  public var required: Int64
  /// The length of the output for a disk of the same size whose every byte is data that
  /// does not compress.
  public var fullyAllocated: Int64
  /// Where qemu-img prints its `bitmaps` line (qcow2 v3 output of a qcow2 v3 source): the
  /// bytes the source's persistent bitmaps take in the output. `convert` copies none, so 0.
  public var bitmaps: Int64?
}

/// Measures by doing the conversion: the real engine and the real writer run into targets
/// that keep no data, only the file length and the writer's own metadata it may read back.
/// So `required` is exact: the same decisions (zero blocks, clusters, grains, blocks, the
/// writer's layout) as `convert` makes. With `-c` the clusters are compressed for real, so
/// it stays exact. `fullyAllocated` runs the writer over a synthetic disk of incompressible
/// data, unit by unit as the engine would hand it (no source is read for it).
public func measure(_ request: MeasureRequest, resolver: Resolver) throws -> Measurement {
  let registry = resolver.registry
  let format = try registry.format(named: request.outputFormat, for: request.outputName)
  guard let create = format.create else {
    throw ImageError.usage(path: request.outputName, "lacuna cannot write \(format.name) images")
  }
  let input: ConversionInput?
  let virtualSize: Int64
  var bitmaps: Int64?
  if let source = request.source {
    var conversion = ConversionRequest(source: source, destination: request.outputName, outputFormat: request.outputFormat)
    conversion.sourceFormat = request.sourceFormat
    conversion.sourceBackingFormat = request.sourceBackingFormat
    let opened = try Conversion.openInput(conversion, resolver: resolver)
    if case .chain(let chain) = opened {
      for layer in chain.layers { for warning in layer.warnings { request.warn("\(layer.path): \(warning)") } }
    }
    input = opened
    virtualSize = opened.virtualSize
    if case .chain(let chain) = opened, format.name == "qcow2", chain.top.formatName == "qcow2",
      request.writerOptions.options["compat"].map({ $0 != "0.10" && $0 != "v2" }) ?? true,
      chain.top.formatSpecific.contains(where: { $0.0 == "compat" && $0.1 == .string("1.1") })
    {
      bitmaps = 0
    }
  } else {
    guard let size = request.size, size >= 0 else {
      throw ImageError.usage(path: request.outputName, "give a source image or a size")
    }
    input = nil
    virtualSize = size
  }

  func run(_ body: (ImageWriter) throws -> Void, compress: Bool, fullyAllocated: Bool = false) throws -> Int64 {
    let files = MeasuringFiles(outputName: request.outputName)
    var options = request.writerOptions
    options.compress = compress
    options.companions = files
    let target = files.main
    let writer = try create(target, virtualSize, options)
    if format.name == "raw" {
      // The raw writer sizes its file to the virtual disk whatever it holds: no need to
      // read the source to know that.
      writer.abandon()
      return virtualSize
    }
    if fullyAllocated, let known = writer as? FullyAllocatedLength {
      writer.abandon()
      return known.fullyAllocatedLength
    }
    let measured = MeasuringWriter.wrapping(writer, files: files)
    try body(measured)
    return files.totalLength
  }

  let required = try run({ writer in
    if let input {
      try Converter(input: input, writer: writer, options: request.engine).run()
    } else {
      try writeSynthetic(to: writer, virtualSize: virtualSize, options: request.engine, data: false)
    }
  }, compress: request.writerOptions.compress)
  // Incompressible data is stored as it is, so compression changes nothing in a disk of
  // it; not compressing saves trying on every cluster.
  let fullyAllocated = try run({ writer in
    try writeSynthetic(to: writer, virtualSize: virtualSize, options: request.engine, data: true)
  }, compress: false, fullyAllocated: true)
  return Measurement(required: required, fullyAllocated: fullyAllocated, bitmaps: bitmaps)
}

/// Hands `writer` a whole disk in disk order, as the engine would: all zeros (one run), or
/// all data, unit by unit, from one buffer of incompressible bytes reused for every unit.
func writeSynthetic(to writer: ImageWriter, virtualSize: Int64, options: ConvertOptions, data: Bool) throws {
  guard data else {
    if virtualSize > 0 { try writer.writeZeroes(0..<virtualSize) }
    try writer.finish()
    return
  }
  let unit = Converter.unitSize(granularity: writer.granularity, options: options)
  let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(unit, max(virtualSize, 1))), alignment: 4096)
  defer { buffer.deallocate() }
  // xorshift64: bytes no codec can shrink, the same on every run.
  var state: UInt64 = 0x9E37_79B9_7F4A_7C15
  let words = buffer.bindMemory(to: UInt64.self)
  for index in words.indices {
    state ^= state << 13
    state ^= state >> 7
    state ^= state << 17
    words[index] = state | 1
  }
  var position: Int64 = 0
  do {
    while position < virtualSize {
      let count = Int(min(unit, virtualSize - position))
      let bytes = UnsafeRawBufferPointer(rebasing: buffer[0..<count])
      if let preparing = writer as? PreparingImageWriter {
        try preparing.commit(try preparing.prepare(bytes, at: position, dataRanges: [position..<position + Int64(count)]))
      } else {
        try writer.write(bytes, at: position)
      }
      position += Int64(count)
    }
    try writer.finish()
  } catch {
    writer.abandon()
    throw error
  }
}

extension Converter {
  /// The span of one work unit for a writer of this granularity, as `convert` cuts them.
  static func unitSize(granularity: Int, options: ConvertOptions) -> Int64 {
    let granularity = Int64(max(granularity, 1))
    var unit = (Int64(max(options.unitSize, 1)) + granularity - 1) / granularity * granularity
    let sparseSize = Int64(options.sparseSize)
    if sparseSize > 0 {
      let common = unit / gcdOf(unit, sparseSize) * sparseSize
      if common <= 32 << 20 { unit = common }
    }
    return unit
  }
}

private func gcdOf(_ a: Int64, _ b: Int64) -> Int64 { b == 0 ? a : gcdOf(b, a % b) }

/// The files of one measured output: the one the writer is made on, and the companions it
/// creates (a VMDK descriptor's extent files).
final class MeasuringFiles: CompanionTargets {
  let outputName: String
  let main: MeasuringTarget
  private(set) var companions: [MeasuringTarget] = []
  /// The data buffer the writer is storing from, while it does: writes from it are counted,
  /// not kept (writers read back only what they made themselves).
  var dataWindow: UnsafeRawBufferPointer?

  init(outputName: String) {
    self.outputName = outputName.split(separator: "/").last.map(String.init) ?? outputName
    main = MeasuringTarget(name: outputName)
    main.files = self
  }

  func create(named name: String) throws -> ByteTarget {
    let target = MeasuringTarget(name: name)
    target.files = self
    companions.append(target)
    return target
  }

  func removeCommitted() {}

  var totalLength: Int64 { ([main] + companions).reduce(0) { $0 + $1.length } }
}

/// A target that keeps the length a file would have, and, for reading back, the bytes the
/// writer wrote from its own buffers (tables, headers), up to a bound: the oldest are
/// dropped past it, and reading dropped bytes is an error rather than a wrong answer.
/// Data the engine handed the writer is never copied.
final class MeasuringTarget: ByteTarget {
  let name: String
  weak var files: MeasuringFiles?
  private(set) var length: Int64 = 0
  var isSequential: Bool { false }

  private struct Piece {
    var offset: Int64
    var bytes: [UInt8]
  }
  /// Kept writes, oldest first (from `head`).
  private var pieces: [Piece] = []
  private var head = 0
  private var keptBytes = 0
  static let keptLimit = 64 << 20
  /// Ranges written whose bytes were not kept, merged where they touch.
  private var unkept: [Range<Int64>] = []

  init(name: String) { self.name = name }

  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard !bytes.isEmpty else { return }
    let range = offset..<offset + Int64(bytes.count)
    length = max(length, range.upperBound)
    if let window = files?.dataWindow, let base = bytes.baseAddress, let start = window.baseAddress,
      base >= start, base + bytes.count <= start + window.count
    {
      forget(range)
      return
    }
    pieces.append(Piece(offset: offset, bytes: Array(bytes)))
    keptBytes += bytes.count
    while keptBytes > Self.keptLimit && pieces.count - head > 1 {
      let oldest = pieces[head]
      forget(oldest.offset..<oldest.offset + Int64(oldest.bytes.count))
      keptBytes -= oldest.bytes.count
      pieces[head].bytes = []
      head += 1
    }
    if head > 1024 && head * 2 > pieces.count {
      pieces.removeFirst(head)
      head = 0
    }
  }

  private func forget(_ range: Range<Int64>) {
    if let last = unkept.last, last.upperBound >= range.lowerBound, last.lowerBound <= range.upperBound {
      unkept[unkept.count - 1] = min(last.lowerBound, range.lowerBound)..<max(last.upperBound, range.upperBound)
    } else {
      unkept.append(range)
    }
  }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
    let count = Int(max(0, min(Int64(buffer.count), length - offset)))
    guard count > 0 else { return 0 }
    let range = offset..<offset + Int64(count)
    buffer.initializeMemory(as: UInt8.self, repeating: 0)
    var covered: [Range<Int64>] = []
    for piece in pieces[head...] {
      let pieceRange = piece.offset..<piece.offset + Int64(piece.bytes.count)
      let overlap = pieceRange.clamped(to: range)
      guard !overlap.isEmpty else { continue }
      piece.bytes.withUnsafeBytes { source in
        UnsafeMutableRawBufferPointer(rebasing: buffer[Int(overlap.lowerBound - offset)..<Int(overlap.upperBound - offset)])
          .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[Int(overlap.lowerBound - piece.offset)..<Int(overlap.upperBound - piece.offset)]))
      }
      covered.append(overlap)
    }
    for lost in unkept {
      var missing = [lost.clamped(to: range)].filter { !$0.isEmpty }
      for part in covered {
        missing = missing.flatMap { piece -> [Range<Int64>] in
          let cut = piece.clamped(to: part)
          guard !cut.isEmpty else { return [piece] }
          return [piece.lowerBound..<cut.lowerBound, cut.upperBound..<piece.upperBound].filter { !$0.isEmpty }
        }
      }
      if let first = missing.first {
        throw ImageError.invalid(
          path: name, "internal (measure): the writer read back bytes at \(first) that were not kept")
      }
    }
    return count
  }

  func size() throws -> Int64 { length }
  func truncate(to size: Int64) throws { length = size }
  func allocate(_ range: Range<Int64>) throws { length = max(length, range.upperBound) }
  func punchHole(_ range: Range<Int64>) throws -> Bool { true }
  func writeZeroes(_ range: Range<Int64>) throws {}
  func flush() throws {}
  func commit() throws {}
  func abandon() {}
}

/// Passes the engine's calls to a writer, telling the targets which buffer holds the data
/// while the writer stores it.
class MeasuringWriter: ImageWriter {
  let inner: ImageWriter
  let files: MeasuringFiles

  static func wrapping(_ writer: ImageWriter, files: MeasuringFiles) -> ImageWriter {
    if let preparing = writer as? PreparingImageWriter {
      return MeasuringPreparingWriter(preparing, files: files)
    }
    return MeasuringWriter(writer, files: files)
  }

  init(_ inner: ImageWriter, files: MeasuringFiles) {
    self.inner = inner
    self.files = files
  }

  var granularity: Int { inner.granularity }

  func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    files.dataWindow = bytes
    defer { files.dataWindow = nil }
    try inner.write(bytes, at: offset)
  }

  func writeZeroes(_ range: Range<Int64>) throws { try inner.writeZeroes(range) }
  func finish() throws { try inner.finish() }
  func abandon() { inner.abandon() }
}

final class MeasuringPreparingWriter: MeasuringWriter, PreparingImageWriter {
  private final class Prepared {
    let bytes: UnsafeRawBufferPointer
    let inner: AnyObject
    init(bytes: UnsafeRawBufferPointer, inner: AnyObject) {
      self.bytes = bytes
      self.inner = inner
    }
  }

  private var preparing: PreparingImageWriter { inner as! PreparingImageWriter }

  init(_ inner: PreparingImageWriter, files: MeasuringFiles) { super.init(inner, files: files) }

  func prepare(_ bytes: UnsafeRawBufferPointer, at offset: Int64, dataRanges: [Range<Int64>]) throws -> AnyObject {
    Prepared(bytes: bytes, inner: try preparing.prepare(bytes, at: offset, dataRanges: dataRanges))
  }

  func commit(_ prepared: AnyObject) throws {
    let unit = prepared as! Prepared
    files.dataWindow = unit.bytes
    defer { files.dataWindow = nil }
    try preparing.commit(unit.inner)
  }
}

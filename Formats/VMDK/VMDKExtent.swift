import DiskImage

/// One extent of a VMDK's disk: a stretch of the virtual disk and where its bytes live.
struct VMDKExtent {
  /// Where an extent's bytes live.
  enum Storage {
    /// A hosted sparse extent file (KDMV), read by its own grain tables.
    case sparse(SparseExtentReader)
    /// Raw bytes of `source` from byte `offset` on (FLAT and VMFS extents).
    case flat(ByteSource, offset: Int64)
    /// No file: reads as zeros.
    case zero
  }

  /// The extent line as the descriptor has it.
  var line: VMDKDescriptor.ExtentLine
  /// Where the extent starts in the virtual disk, in bytes.
  var start: Int64
  var length: Int64
  var storage: Storage

  var range: Range<Int64> { start..<start + length }

  /// The file the extent reads, if any.
  var file: ByteSource? {
    switch storage {
    case .sparse(let reader): return reader.source
    case .flat(let source, _): return source
    case .zero: return nil
    }
  }

  /// The extents of `range` (relative to this extent), for a prefix of it, relative to
  /// this extent. A flat extent answers from its file's holes (as a raw file does), so the
  /// cost is that of SEEK_DATA/SEEK_HOLE over the range; a sparse one visits a bounded
  /// number of grain tables.
  func extents(in range: Range<Int64>) throws -> [Extent] {
    switch storage {
    case .sparse(let reader):
      return try reader.extents(in: range)
    case .zero:
      return [Extent(range, .zero)]
    case .flat(let source, let offset):
      let host = range.lowerBound + offset..<range.upperBound + offset
      guard let data = try source.dataRanges(in: host) else {
        return [Extent(range, .data, hostOffset: host.lowerBound)]
      }
      var result: [Extent] = []
      var position = host.lowerBound
      func append(_ hostRange: Range<Int64>, _ kind: ExtentKind) {
        result.append(
          Extent(hostRange.lowerBound - offset..<hostRange.upperBound - offset, kind, hostOffset: hostRange.lowerBound))
      }
      for run in data {
        if run.lowerBound > position { append(position..<run.lowerBound, .zero) }
        append(run, .data)
        position = run.upperBound
      }
      if position < host.upperBound { append(position..<host.upperBound, .zero) }
      return result
    }
  }

  /// Reads `buffer.count` bytes at `offset` (relative to this extent).
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    switch storage {
    case .sparse(let reader):
      try reader.read(into: buffer, at: offset)
    case .zero:
      buffer.initializeMemory(as: UInt8.self, repeating: 0)
    case .flat(let source, let hostOffset):
      try source.readExactly(into: buffer, at: hostOffset + offset, what: "data for extent offset \(hex(offset))")
    }
  }
}

import CLacunaSys
import FoundationEssentials
#if canImport(Glibc)
  import Glibc
#endif

/// True when every byte of `bytes` is zero. Uses a self-overlapping `memcmp`, which libc
/// vectorises, so it runs at memory speed.
@inline(__always)
public func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
  guard let base = bytes.baseAddress, bytes.count > 0 else { return true }
  return lacuna_is_zero(base, bytes.count) != 0
}

/// Splits `bytes`, which hold the virtual-disk range starting at `offset`, into runs of
/// zero and non-zero blocks. Blocks are `blockSize` bytes aligned to the virtual disk
/// (so the same disk gives the same runs however it is cut into work units); the first
/// and last blocks may be partial. A `blockSize` of 0 reports everything as data.
/// Returns ranges of the virtual disk with `true` for zero runs, adjacent runs merged.
public func zeroRuns(
  _ bytes: UnsafeRawBufferPointer, at offset: Int64, blockSize: Int
) -> [(range: Range<Int64>, isZero: Bool)] {
  guard let runs = guardedZeroRuns(bytes, at: offset, blockSize: blockSize) else {
    fatalError("reading a buffer at \(offset) faulted")
  }
  return runs
}

/// `zeroRuns`, or nil when reading `bytes` faulted: a mapped file truncated under us
/// (`FileMapping`). The blocks are judged in C, one call per run rather than per block.
func guardedZeroRuns(
  _ bytes: UnsafeRawBufferPointer, at offset: Int64, blockSize: Int
) -> [(range: Range<Int64>, isZero: Bool)]? {
  let end = offset + Int64(bytes.count)
  guard let base = bytes.baseAddress, bytes.count > 0 else { return [] }
  guard blockSize > 0 else { return [(offset..<end, false)] }
  var runs: [(range: Range<Int64>, isZero: Bool)] = []
  var position = offset
  let block = Int64(blockSize)
  while position < end {
    let first = nextBoundary(after: position, step: block, limit: end) - position
    var zero: Int32 = 0
    let length = lacuna_zero_prefix(
      base + Int(position - offset), Int(end - position), Int(first), blockSize, &zero)
    guard length > 0 else { return nil }
    runs.append((position..<position + length, zero != 0))
    position += length
  }
  return runs
}

/// The order-0 entropy of `bytes` in bits per byte: 8 for uniformly random data, lower the
/// more some byte values dominate. A cheap hint that data will not compress. `bytes` must
/// be shorter than 4 GiB.
public func byteEntropy(_ bytes: UnsafeRawBufferPointer) -> Double {
  byteEntropy(bytes, samples: 1, sampleSize: bytes.count)
}

/// The order-0 entropy of `samples` slices of `sampleSize` bytes spread evenly over `bytes`
/// (the first at its start, the last at its end), or of all of `bytes` when they are no
/// longer than the samples together. Eight 1 KiB samples read an eighth of a 64 KiB
/// cluster; on random data they measure about 7.98 bits per byte instead of 8.
public func byteEntropy(_ bytes: UnsafeRawBufferPointer, samples: Int, sampleSize: Int) -> Double {
  guard let base = bytes.baseAddress, bytes.count > 0, samples > 0, sampleSize > 0 else { return 0 }
  var counts = [UInt64](repeating: 0, count: 256)
  var total = 0
  counts.withUnsafeMutableBufferPointer { table in
    if samples * sampleSize >= bytes.count || samples == 1 {
      lacuna_byte_histogram(base, bytes.count, table.baseAddress!)
      total = bytes.count
      return
    }
    let stride = (bytes.count - sampleSize) / (samples - 1)
    for sample in 0..<samples {
      lacuna_byte_histogram(base + sample * stride, sampleSize, table.baseAddress!)
      total += sampleSize
    }
  }
  let totalBytes = Double(total)
  var entropy = 0.0
  for count in counts where count > 0 {
    let p = Double(count) / totalBytes
    entropy -= p * log2(p)
  }
  return entropy
}

/// Writes `bytes`, which hold the virtual disk from `offset`, into `target` through a map of
/// fixed-size units (qcow2 clusters, VMDK grains, VDI blocks): `hostOffset(unit)` says where
/// unit number `unit` starts in the file, allocating it when it has no place yet. Pieces
/// that lie one after the other in the file (units allocated in disk order) go out as one
/// write. The mirror of `GatheredReads`, for writers.
public func writeThroughUnits(
  _ bytes: UnsafeRawBufferPointer, at offset: Int64, unitSize: Int64, to target: ByteTarget,
  hostOffset: (_ unit: Int64) throws -> Int64
) throws {
  var pending: (from: Int, host: Int64, count: Int)?
  var position = 0
  while position < bytes.count {
    let virtual = offset + Int64(position)
    let unit = virtual / unitSize
    let inUnit = virtual - unit * unitSize
    let count = Int(min(Int64(bytes.count - position), unitSize - inUnit))
    let host = try hostOffset(unit) + inUnit
    if let run = pending, run.host + Int64(run.count) == host {
      pending!.count += count
    } else {
      if let run = pending {
        try target.write(UnsafeRawBufferPointer(rebasing: bytes[run.from..<run.from + run.count]), at: run.host)
      }
      pending = (position, host, count)
    }
    position += count
  }
  if let run = pending {
    try target.write(UnsafeRawBufferPointer(rebasing: bytes[run.from..<run.from + run.count]), at: run.host)
  }
}

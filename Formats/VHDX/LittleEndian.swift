/// Reads little-endian integers from a byte array by offset; nil when the input runs
/// short. VHDX stores every integer little-endian.
struct LittleEndianReader {
  let bytes: [UInt8]
  init(_ bytes: [UInt8]) { self.bytes = bytes }

  func integer<T: FixedWidthInteger>(at offset: Int, as: T.Type = T.self) -> T? {
    let size = MemoryLayout<T>.size
    guard offset >= 0, offset <= bytes.count - size else { return nil }
    var value: T = 0
    for i in stride(from: size - 1, through: 0, by: -1) { value = (value << 8) | T(bytes[offset + i]) }
    return value
  }

  func uint64(at offset: Int) -> UInt64? { integer(at: offset) }
  func uint32(at offset: Int) -> UInt32? { integer(at: offset) }
  func uint16(at offset: Int) -> UInt16? { integer(at: offset) }

  /// `count` bytes at `offset`, or nil when they are not all there.
  func slice(at offset: Int, count: Int) -> [UInt8]? {
    guard offset >= 0, count >= 0, offset <= bytes.count - count else { return nil }
    return Array(bytes[offset..<offset + count])
  }

  /// Whether the bytes at `offset` spell `ascii` exactly.
  func matches(_ ascii: String, at offset: Int) -> Bool {
    slice(at: offset, count: ascii.utf8.count) == Array(ascii.utf8)
  }

  /// The GUID stored at `offset` (Microsoft layout).
  func guid(at offset: Int) -> GUID? { slice(at: offset, count: 16).map(GUID.init(bytes:)) }
}

/// Stores `value` little-endian at `offset` of `bytes` (tests build images with it).
func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
  for i in 0..<MemoryLayout<T>.size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (i * 8)) }
}

/// Reads little-endian integers from a byte array by offset; nil when the input runs short.
/// VMDK's binary fields are all little-endian; nothing is overlaid on raw memory.
struct LittleEndianReader {
  let bytes: [UInt8]
  let base: Int

  init(_ bytes: [UInt8], base: Int = 0) {
    self.bytes = bytes
    self.base = base
  }

  func integer<T: FixedWidthInteger>(at offset: Int, as: T.Type = T.self) -> T? {
    let size = MemoryLayout<T>.size
    let start = base + offset
    guard offset >= 0, start + size <= bytes.count else { return nil }
    var value: T = 0
    for i in stride(from: size - 1, through: 0, by: -1) { value = (value << 8) | T(bytes[start + i]) }
    return value
  }

  func uint64(at offset: Int) -> UInt64? { integer(at: offset) }
  func uint32(at offset: Int) -> UInt32? { integer(at: offset) }
  func uint16(at offset: Int) -> UInt16? { integer(at: offset) }
  func uint8(at offset: Int) -> UInt8? { integer(at: offset) }
}

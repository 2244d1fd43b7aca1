/// Reads big-endian integers from a byte array by offset; nil when the input runs short.
/// Nothing is ever overlaid on raw memory.
public struct BigEndianReader {
  public let bytes: [UInt8]
  public init(_ bytes: [UInt8]) { self.bytes = bytes }

  public func integer<T: FixedWidthInteger>(at offset: Int, as: T.Type = T.self) -> T? {
    let size = MemoryLayout<T>.size
    guard offset >= 0, offset + size <= bytes.count else { return nil }
    var value: T = 0
    for i in 0..<size { value = (value << 8) | T(bytes[offset + i]) }
    return value
  }

  public func uint64(at offset: Int) -> UInt64? { integer(at: offset) }
  public func uint32(at offset: Int) -> UInt32? { integer(at: offset) }
  public func uint16(at offset: Int) -> UInt16? { integer(at: offset) }
  public func uint8(at offset: Int) -> UInt8? { integer(at: offset) }

  public func slice(at offset: Int, count: Int) -> ArraySlice<UInt8>? {
    guard offset >= 0, count >= 0, offset + count <= bytes.count else { return nil }
    return bytes[offset..<offset + count]
  }
}

/// Appends big-endian integers to a byte array.
public struct BigEndianWriter {
  public var bytes: [UInt8] = []
  public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

  public mutating func append<T: FixedWidthInteger>(_ value: T) {
    let size = MemoryLayout<T>.size
    for i in stride(from: size - 1, through: 0, by: -1) { bytes.append(UInt8(truncatingIfNeeded: value >> (i * 8))) }
  }

  public mutating func append(contentsOf data: some Sequence<UInt8>) { bytes.append(contentsOf: data) }

  /// Stores `value` big-endian at `offset` of `bytes` (which must be long enough).
  @inlinable public static func store<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
    let size = MemoryLayout<T>.size
    for i in 0..<size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> ((size - 1 - i) * 8)) }
  }
}

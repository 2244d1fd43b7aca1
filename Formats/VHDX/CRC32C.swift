/// CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, initial value and final xor
/// 0xFFFFFFFF; "123456789" gives 0xE3069283. VHDX stores it little-endian in headers,
/// region tables and log entries, computed with the checksum field taken as zero.
enum CRC32C {
  /// One entry per byte value, the classic byte-at-a-time table.
  static let table: [UInt32] = (0..<256).map { byte in
    var crc = UInt32(byte)
    for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    return crc
  }

  /// The checksum of `bytes`, with the four bytes at `zeroing` (if given) read as zero.
  static func checksum(_ bytes: [UInt8], zeroing field: Int? = nil) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    table.withUnsafeBufferPointer { table in
      bytes.withUnsafeBufferPointer { input in
        for index in 0..<input.count {
          var byte = input[index]
          if let field, index >= field, index < field + 4 { byte = 0 }
          crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8)
        }
      }
    }
    return crc ^ 0xFFFF_FFFF
  }
}

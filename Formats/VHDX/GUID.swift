/// A GUID as VHDX stores it: Microsoft's mixed-endian layout (u32, u16, u16 little-endian,
/// then 8 bytes as they are). Printed and parsed in the usual text form.
struct GUID: Hashable, CustomStringConvertible {
  /// The 16 bytes as stored in the file.
  let bytes: [UInt8]

  init(bytes: [UInt8]) { self.bytes = bytes }

  /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, with or without braces; nil otherwise.
  init?(_ text: String) {
    var hex = Substring(text)
    if hex.first == "{" && hex.last == "}" { hex = hex.dropFirst().dropLast() }
    let groups = hex.split(separator: "-", omittingEmptySubsequences: false)
    guard groups.map(\.count) == [8, 4, 4, 4, 12] else { return nil }
    var values: [UInt8] = []
    let digits = Array(groups.joined())
    guard digits.allSatisfy(\.isHexDigit) else { return nil }
    for index in stride(from: 0, to: 32, by: 2) {
      guard let byte = UInt8(String(digits[index..<index + 2]), radix: 16) else { return nil }
      values.append(byte)
    }
    // The first three groups are little-endian in the file.
    bytes = [values[3], values[2], values[1], values[0], values[5], values[4], values[7], values[6]] + values[8..<16]
  }

  var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

  var description: String {
    func hex(_ range: [Int]) -> String {
      range.map { index in
        let byte = bytes[index]
        return (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
      }.joined()
    }
    return "\(hex([3, 2, 1, 0]))-\(hex([5, 4]))-\(hex([7, 6]))-\(hex([8, 9]))-\(hex(Array(10..<16)))"
  }

  static let bat = GUID("2DC27766-F623-4200-9D64-115E9BFD4A08")!
  static let metadata = GUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")!
  static let fileParameters = GUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")!
  static let virtualDiskSize = GUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")!
  static let page83Data = GUID("BECA12AB-B2E6-4523-93EF-C309E000C746")!
  static let logicalSectorSize = GUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")!
  static let physicalSectorSize = GUID("CDA348C7-445D-4471-9CC9-E9885251C556")!
  static let parentLocator = GUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")!
  static let vhdxParentLocatorType = GUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")!
}

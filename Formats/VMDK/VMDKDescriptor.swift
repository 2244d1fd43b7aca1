import DiskImage

/// A VMDK's text descriptor, embedded in a sparse file or a file of its own: the header keys
/// (`CID`, `parentCID`, `createType`, `parentFileNameHint`) and the extent lines. The disk
/// database (`ddb.*`) is not needed to read the disk and is skipped.
///
/// Grammar: lines end in LF (CRLF accepted); `#` starts a comment; `key=value` with the
/// value optionally in double quotes; extent lines are `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
/// The text ends at the first NUL (of the reserved sectors, for an embedded one).
struct VMDKDescriptor {
  /// One extent line.
  struct ExtentLine: Equatable {
    var access: String
    var sectors: UInt64
    var type: String
    var fileName: String?
    /// Sectors into the file where a FLAT extent starts.
    var offset: UInt64?
  }

  var createType: String?
  var contentID: UInt32?
  var parentContentID: UInt32?
  var parentFileNameHint: String?
  var extents: [ExtentLine] = []

  /// The parent CID of a disk that has no parent.
  static let noParent: UInt32 = 0xffff_ffff
  /// The first line of a descriptor file.
  static let signature = "# Disk DescriptorFile"
  /// A descriptor file is read whole; VMware's are a few hundred bytes. These bounds keep a
  /// hostile one from costing more than a moment (1024 extents of 2 GiB are 2 TiB).
  static let maximumFileBytes: Int64 = 1 << 20
  static let maximumLines = 10_000
  static let maximumExtents = 1024

  /// True when `header` (a file's first bytes) is a descriptor file: its first line that
  /// is not blank is `# Disk DescriptorFile`.
  static func isDescriptorFile(_ header: [UInt8]) -> Bool {
    let start = header.firstIndex { ![0x20, 0x09, 0x0a, 0x0d].contains($0) } ?? header.endIndex
    return header[start...].starts(with: Array(signature.utf8))
  }

  /// Parses the descriptor text in `bytes` (for an embedded one, the reserved sectors, NUL
  /// padded). `embedded` only changes how errors name the text.
  static func parse(_ bytes: [UInt8], path: String, embedded: Bool = true) throws -> VMDKDescriptor {
    var descriptor = VMDKDescriptor()
    let name = embedded ? "embedded descriptor" : "descriptor"
    // Split on the LF bytes: as Characters, "\r\n" is one and would never match "\n".
    let lines = bytes.prefix { $0 != 0 }.split(separator: 0x0a, omittingEmptySubsequences: false)
    guard lines.count <= maximumLines else {
      throw ImageError.invalid(path: path, "the \(name) has \(lines.count) lines, more than \(maximumLines)")
    }
    for (number, rawLine) in lines.enumerated() {
      let line = String(decoding: rawLine, as: UTF8.self).trimmingWhitespace()
      if line.isEmpty || line.hasPrefix("#") { continue }
      func invalid(_ message: String) -> ImageError {
        .invalid(path: path, "\(name) line \(number + 1) (\(line.prefix(80))): \(message)")
      }
      let firstWord = line.prefix { !$0.isWhitespace }
      if ["RW", "RDONLY", "NOACCESS"].contains(firstWord) {
        guard descriptor.extents.count < maximumExtents else {
          throw ImageError.invalid(path: path, "the \(name) names more than \(maximumExtents) extents")
        }
        descriptor.extents.append(try parseExtent(line, invalid: invalid))
        continue
      }
      guard let equals = line.firstIndex(of: "=") else { continue }
      let key = line[..<equals].trimmingWhitespace()
      let value = unquoted(line[line.index(after: equals)...].trimmingWhitespace())
      switch key {
      case "createType": descriptor.createType = value
      case "CID": descriptor.contentID = try parseContentID(value, invalid: invalid)
      case "parentCID": descriptor.parentContentID = try parseContentID(value, invalid: invalid)
      case "parentFileNameHint": descriptor.parentFileNameHint = value
      default: continue
      }
    }
    return descriptor
  }

  /// `RW 2048 SPARSE "x.vmdk"`: access, sectors, type, then an optional quoted file name
  /// and, for flat extents, an offset in sectors.
  private static func parseExtent(_ line: Substring, invalid: (String) -> ImageError) throws -> ExtentLine {
    var rest = line[...]
    func word() -> Substring {
      rest = rest.drop { $0.isWhitespace }
      let found = rest.prefix { !$0.isWhitespace }
      rest = rest.dropFirst(found.count)
      return found
    }
    let access = word()
    let sectorsText = word()
    guard let sectors = UInt64(sectorsText) else {
      throw invalid("the extent's size '\(sectorsText.prefix(40))' is not a number of sectors")
    }
    let type = word()
    guard !type.isEmpty else { throw invalid("the extent line has no type") }
    rest = rest.drop { $0.isWhitespace }
    var fileName: String?
    if rest.first == "\"" {
      let afterQuote = rest.dropFirst()
      guard let close = afterQuote.firstIndex(of: "\"") else { throw invalid("the extent's file name has no closing quote") }
      fileName = String(afterQuote[..<close])
      rest = afterQuote[afterQuote.index(after: close)...]
    }
    var offset: UInt64?
    let offsetText = word()
    if !offsetText.isEmpty {
      guard let value = UInt64(offsetText) else {
        throw invalid("the extent's offset '\(offsetText.prefix(40))' is not a number of sectors")
      }
      offset = value
    }
    guard word().isEmpty else { throw invalid("the extent line has more fields than ACCESS SECTORS TYPE \"FILE\" OFFSET") }
    return ExtentLine(access: String(access), sectors: sectors, type: String(type), fileName: fileName, offset: offset)
  }

  /// A CID: up to 8 hexadecimal digits.
  private static func parseContentID(_ value: String, invalid: (String) -> ImageError) throws -> UInt32 {
    guard (1...8).contains(value.count), let id = UInt32(value, radix: 16) else {
      throw invalid("'\(value.prefix(40))' is not a content ID (up to 8 hexadecimal digits)")
    }
    return id
  }

  private static func unquoted(_ value: Substring) -> String {
    if value.count >= 2, value.first == "\"", value.last == "\"" { return String(value.dropFirst().dropLast()) }
    return String(value)
  }
}

extension StringProtocol where SubSequence == Substring {
  /// The text without leading and trailing spaces, tabs and line ends.
  func trimmingWhitespace() -> Substring {
    let start = firstIndex { !$0.isWhitespace } ?? endIndex
    let end = lastIndex { !$0.isWhitespace }.map { index(after: $0) } ?? start
    return self[start..<Swift.max(start, end)]
  }
}

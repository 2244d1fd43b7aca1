import DiskImage

/// lacuna's sparse stream: a virtual disk as a sequence of "data: N bytes follow" and
/// "zero: N bytes" records, for pipes (ssh, netcat, a backup stream). Holes cost a
/// 26-byte record header; an end record carries a CRC-32 of the whole disk, so a cut or
/// damaged stream is detected. The byte layout is in README.md beside this file.
///
/// A stream is sequential: it is written by `SparseStreamWriter` (any `ImageWriter`
/// consumer, such as the conversion engine, can drive it) and read by `StreamReceiver`, a
/// `SequentialImageReader` whose pieces the engine takes in order. It is not an
/// `ImageReader`: the random-access interface would need the whole stream first.
public enum SparseStream {
  /// The first line of every stream: the magic, a space, the version, a newline.
  public static let magicLine: [UInt8] = Array("LACUNA-STREAM 1\n".utf8)
  /// What every version's first line starts with.
  public static let magicPrefix: [UInt8] = Array("LACUNA-STREAM ".utf8)
  /// The version this code reads and writes.
  public static let version = 1

  /// The stream format for the registry. It probes by its magic line, is read from start
  /// to end only (the engine takes it as a sequential source), and is written in order, so
  /// it may go to a pipe.
  public static let format = ImageFormat(
    name: "stream", probeLength: magicPrefix.count, probe: { $0.starts(with: magicPrefix) },
    capabilities: [.sequentialOutput],
    openSequential: { input in try StreamReceiver(input: input) },
    create: { target, size, options in try SparseStreamWriter(output: target, virtualSize: size, options: options) })

  /// True when `header` (the first bytes of a file) is a stream of any version.
  public static func isStream(_ header: [UInt8]) -> Bool { header.starts(with: magicPrefix) }
}

/// One record of a stream, as its 26-byte header states it:
/// `KIND` (4 ASCII capitals), a space, 20 decimal digits, a newline.
public enum StreamRecord: Equatable {
  /// `SIZE n`: the virtual size in bytes; the second line of a stream, and only there.
  case size(Int64)
  /// `DATA n`: the next n bytes of the disk follow, as they are.
  case data(Int64)
  /// `ZERO n`: the next n bytes of the disk read as zero; nothing follows.
  case zero(Int64)
  /// `DONE n`: the end; n is the CRC-32 of the whole virtual disk.
  case done(UInt32)

  /// Bytes in every record header.
  public static let headerLength = 26
  static let digitCount = 20

  var kind: String {
    switch self {
    case .size: return "SIZE"
    case .data: return "DATA"
    case .zero: return "ZERO"
    case .done: return "DONE"
    }
  }

  var value: UInt64 {
    switch self {
    case .size(let n), .data(let n), .zero(let n): return UInt64(n)
    case .done(let crc): return UInt64(crc)
    }
  }

  /// Writes the 26-byte header at `target` (which must have room for it).
  public func encode(into target: UnsafeMutableRawPointer) {
    var bytes = Array(kind.utf8) + [0x20]
    let digits = Array(String(value).utf8)
    bytes += [UInt8](repeating: 0x30, count: StreamRecord.digitCount - digits.count) + digits + [0x0a]
    bytes.withUnsafeBytes { target.copyMemory(from: $0.baseAddress!, byteCount: StreamRecord.headerLength) }
  }

  /// The 26-byte header as bytes.
  public var encoded: [UInt8] {
    [UInt8](unsafeUninitializedCapacity: StreamRecord.headerLength) { buffer, count in
      encode(into: UnsafeMutableRawPointer(buffer.baseAddress!))
      count = StreamRecord.headerLength
    }
  }

  /// Parses a 26-byte header strictly: four capitals of a known kind, one space, exactly
  /// 20 digits, a newline. Returns what is wrong instead, as a message.
  public static func decode(_ bytes: UnsafeRawBufferPointer) -> Result<StreamRecord, DecodeFailure> {
    guard bytes.count == headerLength, bytes[4] == 0x20, bytes[25] == 0x0a,
      bytes[5..<25].allSatisfy({ (0x30...0x39).contains($0) })
    else {
      return .failure(DecodeFailure("expected KIND, a space, 20 digits and a newline, found \(quoted(bytes))"))
    }
    var value: UInt64 = 0
    for digit in bytes[5..<25] {
      let (times, overflow1) = value.multipliedReportingOverflow(by: 10)
      let (sum, overflow2) = times.addingReportingOverflow(UInt64(digit - 0x30))
      guard !overflow1, !overflow2, sum <= UInt64(Int64.max) else {
        return .failure(DecodeFailure("the number in \(quoted(bytes)) is larger than 2^63-1"))
      }
      value = sum
    }
    switch String(decoding: bytes[0..<4], as: UTF8.self) {
    case "SIZE": return .success(.size(Int64(value)))
    case "DATA": return .success(.data(Int64(value)))
    case "ZERO": return .success(.zero(Int64(value)))
    case "DONE":
      guard value <= UInt64(UInt32.max) else {
        return .failure(DecodeFailure("the checksum in \(quoted(bytes)) is larger than 2^32-1"))
      }
      return .success(.done(UInt32(value)))
    default:
      return .failure(DecodeFailure("expected a record kind SIZE, DATA, ZERO or DONE, found \(quoted(bytes))"))
    }
  }

  public struct DecodeFailure: Error, Equatable {
    public var message: String
    init(_ message: String) { self.message = message }
  }

  /// The bytes as a quoted string, with anything unprintable as \xNN.
  static func quoted(_ bytes: UnsafeRawBufferPointer) -> String {
    var text = "\""
    for byte in bytes {
      switch byte {
      case 0x0a: text += "\\n"
      case 0x22, 0x5c: text += "\\" + String(UnicodeScalar(byte))
      case 0x20...0x7e: text += String(UnicodeScalar(byte))
      default: text += "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
      }
    }
    return text + "\""
  }
}

#if canImport(Glibc)
  import Glibc
#endif

/// The one error type of the image layer. Every case names the file; the description is
/// one line: `path: what failed: why`.
public enum ImageError: Error, CustomStringConvertible, Equatable {
  /// A system call failed. `operation` says what we were doing ("read 65536 bytes at 0x10000").
  case system(path: String, operation: String, errno: Int32)
  /// The file is damaged or is not what it claims: expected against found.
  case invalid(path: String, String)
  /// The file is valid but uses something lacuna does not do.
  case unsupported(path: String, String)
  /// The user asked for something that cannot be done with this file.
  case usage(path: String, String)
  /// One of the above, with advice on what to do about it after a "; ".
  indirect case advised(ImageError, advice: String)

  /// The same error, naming `path` instead.
  public func naming(_ path: String) -> ImageError {
    switch self {
    case .system(_, let operation, let code): return .system(path: path, operation: operation, errno: code)
    case .invalid(_, let message): return .invalid(path: path, message)
    case .unsupported(_, let message): return .unsupported(path: path, message)
    case .usage(_, let message): return .usage(path: path, message)
    case .advised(let error, let advice): return .advised(error.naming(path), advice: advice)
    }
  }

  public var path: String {
    switch self {
    case .system(let path, _, _), .invalid(let path, _), .unsupported(let path, _),
      .usage(let path, _):
      return path
    case .advised(let error, _): return error.path
    }
  }

  /// One line, whatever the path and the message hold: strings taken from an image (a
  /// feature name, a backing name) may carry control characters, which are escaped here so
  /// an error never splits over lines or sends escape sequences to the terminal.
  public var description: String {
    switch self {
    case .system(let path, let operation, let code):
      return escapingControlCharacters("\(path): \(operation): \(String(cString: strerror(code)))")
    case .invalid(let path, let message), .unsupported(let path, let message),
      .usage(let path, let message):
      return escapingControlCharacters("\(path): \(message)")
    case .advised(let error, let advice):
      return error.description + "; " + escapingControlCharacters(advice)
    }
  }
}

/// `text` with every control character (C0, DEL, C1) written as `\n`, `\t` or `\u{XX}`, so
/// it prints on one line and cannot drive the terminal.
public func escapingControlCharacters(_ text: String) -> String {
  guard text.unicodeScalars.contains(where: isControl) else { return text }
  var result = ""
  for scalar in text.unicodeScalars {
    switch scalar {
    case "\n": result += "\\n"
    case "\t": result += "\\t"
    case "\r": result += "\\r"
    case _ where isControl(scalar): result += "\\u{" + String(scalar.value, radix: 16) + "}"
    default: result.unicodeScalars.append(scalar)
    }
  }
  return result
}

private func isControl(_ scalar: Unicode.Scalar) -> Bool {
  scalar.value < 0x20 || (0x7f...0x9f).contains(scalar.value)
}

/// Formats a byte offset the way error messages and the human `map` output show them.
public func hex(_ value: Int64) -> String { "0x" + String(value, radix: 16) }
public func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }

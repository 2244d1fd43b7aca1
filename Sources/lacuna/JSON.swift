import DiskImage

/// Renders values as qemu-img prints its JSON: objects with four-space indents, keys in
/// the order given, so scripts written against qemu-img parse ours.
func renderJSON(_ value: InfoValue, indent: Int = 0) -> String {
  let pad = String(repeating: " ", count: indent)
  let innerPad = String(repeating: " ", count: indent + 4)
  switch value {
  case .string(let text): return quoteJSON(text)
  case .integer(let number): return String(number)
  case .bool(let flag): return flag ? "true" : "false"
  case .array(let items):
    if items.isEmpty { return "[]" }
    return "[\n" + items.map { innerPad + renderJSON($0, indent: indent + 4) }.joined(separator: ",\n")
      + "\n" + pad + "]"
  case .object(let fields):
    if fields.isEmpty { return "{}" }
    return "{\n"
      + fields.map { innerPad + quoteJSON($0.0) + ": " + renderJSON($0.1, indent: indent + 4) }
      .joined(separator: ",\n") + "\n" + pad + "}"
  }
}

/// A JSON string literal.
func quoteJSON(_ text: String) -> String {
  var out = "\""
  for scalar in text.unicodeScalars {
    switch scalar {
    case "\"": out += "\\\""
    case "\\": out += "\\\\"
    case "\n": out += "\\n"
    case "\r": out += "\\r"
    case "\t": out += "\\t"
    default:
      if scalar.value < 0x20 {
        out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count)
          + String(scalar.value, radix: 16)
      } else {
        out.unicodeScalars.append(scalar)
      }
    }
  }
  return out + "\""
}

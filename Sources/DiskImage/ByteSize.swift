/// Parses a size as qemu-img does: a number of bytes, or with a suffix k, M, G, T, P, E
/// (powers of 1024; upper or lower case; `b` for bytes); fractions such as `1.5G` are
/// rounded down to a byte. Nil when the text is not a size or does not fit in 63 bits.
/// Every size the project takes (`-S`, `create`'s size, `cluster_size=`) goes through here.
public func parseByteSize(_ text: String) -> Int64? {
  let units: [Character: Int64] = [
    "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60,
  ]
  var digits = Substring(text)
  var multiplier: Int64 = 1
  if let last = text.last, let unit = units[Character(last.lowercased())] {
    multiplier = unit
    digits = digits.dropLast()
  }
  guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII }) else { return nil }
  if let whole = Int64(digits), whole >= 0 {
    let (product, overflow) = whole.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : product
  }
  guard let value = Double(digits), value >= 0, value * Double(multiplier) < 9.2e18 else { return nil }
  return Int64(value * Double(multiplier))
}

/// The first multiple of `step` after `position`, or `limit` if that comes first; never
/// overflows, however close to 2^63 the disk ends (a stream may claim any size).
@inlinable public func nextBoundary(after position: Int64, step: Int64, limit: Int64) -> Int64 {
  let toBoundary = step - position % step
  return position + min(toBoundary, limit - position)
}

/// `value` rounded up to a multiple of `step`, or nil when that does not fit in 63 bits.
@inlinable public func roundedUp(_ value: Int64, to step: Int64) -> Int64? {
  let remainder = value % step
  guard remainder != 0 else { return value }
  let (result, overflow) = value.addingReportingOverflow(step - remainder)
  return overflow ? nil : result
}

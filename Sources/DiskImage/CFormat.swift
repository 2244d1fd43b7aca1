#if canImport(Glibc)
  import Glibc
#endif

/// `printf`-style formatting of numbers (the C library's `vsnprintf`).
public func cFormat(_ format: String, _ arguments: CVarArg...) -> String {
  withVaList(arguments) { list in
    var buffer = [CChar](repeating: 0, count: 128)
    let needed = Int(vsnprintf(&buffer, buffer.count, format, list))
    if needed >= buffer.count {
      buffer = [CChar](repeating: 0, count: needed + 1)
      return withVaList(arguments) { again in
        _ = vsnprintf(&buffer, buffer.count, format, again)
        return String(cString: buffer)
      }
    }
    return String(cString: buffer)
  }
}

// libFuzzer's entry points. The fuzzing build (script/fuzz: -DFUZZING,
// -sanitize=fuzzer,address) has no main of its own: libFuzzer's main parses its flags and
// calls these. Its command line is
//   lacuna-fuzz FORMAT [libFuzzer flags and corpus directories...]
//   lacuna-fuzz --formats        (the FORMAT names, one a line)
// LLVMFuzzerInitialize takes FORMAT off before libFuzzer reads the rest. libFuzzer's child
// processes (-fork, -jobs) start without FORMAT and find it in LACUNA_FUZZ_FORMAT, which
// is set for them.

import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// The format LLVMFuzzerTestOneInput fuzzes, chosen once before the first input.
nonisolated(unsafe) var fuzzedFormat: ImageFormat?

@_cdecl("LLVMFuzzerTestOneInput")
public func lacunaFuzzTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
  guard let format = fuzzedFormat else { fatalError("lacuna-fuzz: no format chosen") }
  fuzz(format, UnsafeRawBufferPointer(start: data, count: size))
  return 0
}

#if FUZZING
  @_cdecl("LLVMFuzzerInitialize")
  public func lacunaFuzzInitialize(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>
  ) -> CInt {
    let first = argc.pointee > 1 ? argv.pointee[1].map { String(cString: $0) } : nil
    listFormatsIfAsked(first)
    guard let format = chooseFormat(first) else {
      fputs("usage: lacuna-fuzz \(formatNames) [libFuzzer flags and corpus directories...]\n", stderr)
      exit(2)
    }
    if first == format.name {
      // Drop argv[1]; argv stays terminated by its null.
      for i in 1..<Int(argc.pointee) { argv.pointee[i] = argv.pointee[i + 1] }
      argc.pointee -= 1
    }
    return 0
  }
#endif

/// The format named by `argument`, else by LACUNA_FUZZ_FORMAT; remembered for
/// LLVMFuzzerTestOneInput and exported for child processes.
func chooseFormat(_ argument: String?) -> ImageFormat? {
  let environment = getenv("LACUNA_FUZZ_FORMAT").map { String(cString: $0) }
  guard let format = argument.flatMap(fuzzFormat(named:)) ?? environment.flatMap(fuzzFormat(named:)) else {
    return nil
  }
  fuzzedFormat = format
  setenv("LACUNA_FUZZ_FORMAT", format.name, 1)
  return format
}

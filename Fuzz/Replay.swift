// The plain build's main (every `swift build` links lacuna-fuzz this way, without
// libFuzzer): replays files through the same harness, to reproduce a finding without the
// fuzzing build or to check a fix.
//
//   lacuna-fuzz FORMAT FILE|DIRECTORY...      (a directory: each regular file in it)
//   lacuna-fuzz --formats                     (the FORMAT names, one a line)
//
// The fuzzing build (-DFUZZING) leaves this out: libFuzzer's main runs instead.

#if !FUZZING
  import DiskImage

  #if canImport(Glibc)
    import Glibc
  #endif

  @main
  enum Replay {
    static func main() {
      let arguments = CommandLine.arguments
      listFormatsIfAsked(arguments.dropFirst().first)
      guard arguments.count > 2, let format = chooseFormat(arguments[1]) else {
        fputs(
          "usage: lacuna-fuzz \(formatNames) FILE|DIRECTORY...\n"
            + "Runs each file through the fuzz harness; script/fuzz builds the libFuzzer version.\n",
          stderr)
        exit(2)
      }
      var files: [String] = []
      for path in arguments.dropFirst(2) {
        guard let kind = fileType(path) else {
          fputs("lacuna-fuzz: \(path): \(String(cString: strerror(errno)))\n", stderr)
          exit(1)
        }
        if kind == S_IFDIR {
          let prefix = path.hasSuffix("/") ? path : path + "/"
          files += directoryEntries(path).map { prefix + $0 }.filter { fileType($0) == S_IFREG }
        } else {
          files.append(path)
        }
      }
      for file in files {
        guard let bytes = readWholeFile(file) else {
          fputs("lacuna-fuzz: cannot read \(file): \(String(cString: strerror(errno)))\n", stderr)
          exit(1)
        }
        print("\(format.name): \(file) (\(bytes.count) bytes)")
        fflush(stdout)
        bytes.withUnsafeBytes { fuzz(format, $0) }
      }
      print("\(format.name): \(files.count) inputs, no findings")
    }

    static func fileType(_ path: String) -> mode_t? {
      var status = stat()
      return stat(path, &status) == 0 ? status.st_mode & S_IFMT : nil
    }

    /// The names in a directory, sorted, without the hidden ones.
    static func directoryEntries(_ path: String) -> [String] {
      guard let directory = opendir(path) else { return [] }
      defer { closedir(directory) }
      var names: [String] = []
      while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) {
          String(cString: $0.bindMemory(to: CChar.self).baseAddress!)
        }
        if !name.hasPrefix(".") { names.append(name) }
      }
      return names.sorted()
    }

    static func readWholeFile(_ path: String) -> [UInt8]? {
      let fd = open(path, O_RDONLY | O_CLOEXEC)
      guard fd >= 0 else { return nil }
      defer { close(fd) }
      var bytes: [UInt8] = []
      var chunk = [UInt8](repeating: 0, count: 1 << 16)
      while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return nil }
        if n == 0 { return bytes }
        bytes += chunk[0..<n]
      }
    }
  }
#endif

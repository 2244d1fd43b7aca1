import ArgumentParser
import CLacunaSys
import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

// Before anything is opened: a closed standard descriptor would be taken by an image.
if lacuna_ensure_standard_descriptors() != 0 {
  exit(1)
}

// Exit status: 0 success, 1 an image or I/O problem, 2 a usage error (as the issue and
// most Unix tools have it; swift-argument-parser's default for usage errors is 64).
do {
  // The plain forms of `convert` skip swift-argument-parser's reflection (QuickParse.swift).
  if let quick = QuickParse.command(CommandLine.arguments.dropFirst()) {
    try quick()
  } else {
    var command = try Lacuna.parseAsRoot()
    try command.run()
  }
} catch let error as ImageError {
  printError(error.description)
  if case .usage = error { exit(2) }
  exit(1)
} catch let error as CommandFailure {
  printError(error.message)
  exit(error.status)
} catch {
  let code = Lacuna.exitCode(for: error)
  if code == .success {
    // --version: the parser has the first line only; the rest asks the libraries, libnbd
    // among them, which is loaded for that and for NBD URIs only.
    if Lacuna.fullMessage(for: error) == versionLine {
      print(versionText())
      exit(0)
    }
    Lacuna.exit(withError: error)
  }
  let message = Lacuna.fullMessage(for: error)
  printError(message.isEmpty ? String(describing: error) : message, prefix: false)
  exit(code == .validationFailure ? 2 : code.rawValue)
}

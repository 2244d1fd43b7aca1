import ArgumentParser
import DiskImage
import Foundation
import Stream

#if canImport(Glibc)
  import Glibc
#endif

/// `convert`'s stream endpoints: `-` as the destination (standard output, `-O stream`
/// only) and a stream as the source (`-`, `-f stream`, or a file that starts with the
/// stream's magic), which is received record by record instead of being opened as a chain.
extension ConvertCommand {
  /// True when the source is a stream to receive rather than an image to open.
  func readsStream() throws -> Bool {
    if source == "-" {
      if let sourceFormat, sourceFormat != "stream" {
        throw ImageError.usage(path: "-", "standard input can only be read as a stream (-f stream), not as \(sourceFormat)")
      }
      return true
    }
    if let sourceFormat { return sourceFormat == SparseStream.format.name }
    // Probe as the registry does; errors opening the file are left to the chain to report.
    guard let file = try? ImageFile.openForReading(source) else { return false }
    var header = [UInt8](repeating: 0, count: SparseStream.magicPrefix.count)
    let n = try header.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
    return SparseStream.isStream(Array(header[0..<n]))
  }

  /// The output: standard output for `-` (a stream only, never a terminal), otherwise a
  /// temporary file beside the destination.
  func openOutput() throws -> OutputFile {
    guard destination == "-" else { return try OutputFile(creatingBeside: destination) }
    guard outputFormat == SparseStream.format.name else {
      throw ImageError.usage(
        path: "-", "only -O stream can be written to standard output (\(outputFormat) needs a file to seek in)")
    }
    if isatty(STDOUT_FILENO) != 0 {
      throw ImageError.usage(path: "-", "standard output is a terminal; send the stream into a pipe or a file")
    }
    return OutputFile(standardOutput: ())
  }

  /// Receives a stream into any output format, sparse, as it reads; checks its end record
  /// and checksum before the output is made visible.
  func receiveStream() throws {
    let started = Date()
    guard let outputFormatEntry = registry.format(named: outputFormat) else {
      throw ImageError.usage(
        path: destination, "unknown output format '\(outputFormat)' (known: \(registry.names.joined(separator: ", ")))")
    }
    guard let create = outputFormatEntry.create else {
      throw ImageError.usage(path: destination, "lacuna cannot write \(outputFormat) images")
    }
    var writerOptions = WriterOptions(options: try parseOptions(options), compress: compress)
    let (backing, _) = try takeBackingOptions(&writerOptions.options, backing: self.backing, format: self.backingFormat)
    if backing != nil || sourceBackingFormat != nil {
      throw ImageError.usage(path: source, "a stream carries a whole, flattened disk: -B and --source-backing-format do not apply")
    }

    let inputFile: ImageFile?
    let input: StreamInput
    if source == "-" {
      if isatty(STDIN_FILENO) != 0 {
        throw ImageError.usage(path: "-", "standard input is a terminal; pipe a stream into it")
      }
      inputFile = nil
      input = StreamInput(descriptor: STDIN_FILENO, name: "standard input")
    } else {
      let file = try ImageFile.openForReading(source)
      if let target = FileIdentity.of(path: destination), try file.identity() == target {
        throw ImageError.usage(path: destination, "the output is the same file as the input; refusing to overwrite it")
      }
      inputFile = file
      input = StreamInput(descriptor: file.descriptor, name: source)
    }
    let receiver = try StreamReceiver(input: input)

    let output = try openOutput()
    output.synchronizes = cacheMode != .unsafe
    let writer: ImageWriter
    do {
      writer = try create(output, receiver.virtualSize, writerOptions)
    } catch {
      output.abandon()
      throw error
    }
    let format = progressFormat ?? (progress ? .bar : nil)
    let meter = quiet ? nil : format.map { ProgressMeter(format: $0, toStandardError: destination == "-") }
    let statistics = try receiver.run(
      into: writer, sparseSize: Int(parseSize(sparseSize)!),
      progress: meter.map { meter in { meter.update(done: $0, total: $1) } })
    meter?.finish()
    withExtendedLifetime(inputFile) {}
    if summary && !quiet {
      let seconds = Date().timeIntervalSince(started)
      printError(
        "received \(input.name) into \(destination): \(statistics.virtualSize) bytes virtual, "
          + "\(statistics.streamBytes) stream bytes, \(statistics.dataBytes) data, "
          + "\(statistics.zeroRecordBytes) in zero records, \(statistics.bytesWritten) written, "
          + "\(statistics.zeroBytesSkipped) zero bytes skipped, " + String(format: "%.3f s", seconds),
        prefix: false)
    }
  }
}

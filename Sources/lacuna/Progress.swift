import ArgumentParser
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// `--progress=bar|json`.
enum ProgressFormat: String, ExpressibleByArgument, CaseIterable {
  /// qemu-img's `-p` display: "    (42.00/100%)" rewritten in place.
  case bar
  /// One JSON object per line, for programs that drive lacuna (as oVirt and Incus asked
  /// of qemu-img): {"bytes-done": N, "bytes-total": N, "elapsed": S}.
  case json
}

/// Shows how far a conversion got, at most ten times a second and once at the end. Goes to
/// standard output, as qemu-img's does, unless that carries the image (destination `-`).
final class ProgressMeter {
  private let format: ProgressFormat
  private let stream: UnsafeMutablePointer<FILE>
  private let started = Date()
  private var lastTime = Date.distantPast
  private var lastDone: Int64 = -1
  private var lastTotal: Int64 = 0

  init(format: ProgressFormat, toStandardError: Bool) {
    self.format = format
    self.stream = toStandardError ? stderr : stdout
  }

  func update(done: Int64, total: Int64) {
    let now = Date()
    lastTotal = total
    guard done != lastDone, done >= total || now.timeIntervalSince(lastTime) >= 0.1 else { return }
    lastTime = now
    lastDone = done
    let elapsed = now.timeIntervalSince(started)
    switch format {
    case .bar:
      let percent = total == 0 ? 100 : Double(done) * 100 / Double(total)
      fputs(String(format: "    (%.2f/100%%)\r", percent), stream)
    case .json:
      fputs(
        "{\"bytes-done\": \(done), \"bytes-total\": \(total), \"elapsed\": \(String(format: "%.3f", elapsed))}\n",
        stream)
    }
    fflush(stream)
  }

  /// Shows the final state (everything done) and ends the bar's line.
  func finish() {
    update(done: lastTotal, total: lastTotal)
    if format == .bar { fputs("\n", stream) }
    fflush(stream)
  }
}

import ArgumentParser
import DiskImage
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// `--progress=bar|json`.
enum ProgressFormat: String, ExpressibleByArgument, CaseIterable {
  /// On a terminal, a bar with bytes done and total, rate and time left, redrawn in place
  /// on one line; elsewhere (a log, a pipe) qemu-img's `-p` display, "    (42.00/100%)"
  /// rewritten in place, so scripts that read it keep working.
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
  /// True when the bar goes to a terminal: then it is drawn for a person.
  private let onTerminal: Bool
  /// Recent (time, bytes done) samples, a few seconds' worth: the rate is taken over them,
  /// so it follows the transfer as it speeds up or slows down.
  private var samples: [(time: Date, done: Int64)] = []

  init(format: ProgressFormat, toStandardError: Bool) {
    self.format = format
    self.stream = toStandardError ? stderr : stdout
    self.onTerminal = isatty(fileno(toStandardError ? stderr : stdout)) != 0
  }

  func update(done: Int64, total: Int64) {
    let now = Date()
    lastTotal = total
    guard done != lastDone, done >= total || now.timeIntervalSince(lastTime) >= 0.1 else { return }
    lastTime = now
    lastDone = done
    let elapsed = now.timeIntervalSince(started)
    switch format {
    case .bar where onTerminal:
      fputs("\r" + terminalLine(done: done, total: total, now: now) + "\u{1B}[K", stream)
    case .bar:
      let percent = total == 0 ? 100 : Double(done) * 100 / Double(total)
      fputs(cFormat("    (%.2f/100%%)\r", percent), stream)
    case .json:
      fputs(
        "{\"bytes-done\": \(done), \"bytes-total\": \(total), \"elapsed\": \(cFormat("%.3f", elapsed))}\n",
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

  /// One line for a person: "[=====>     ]  42%  1.50 GiB / 16 GiB  230 MiB/s  0:58 left",
  /// fitted to the terminal's width; once done, the time it took instead of the time left.
  private func terminalLine(done: Int64, total: Int64, now: Date) -> String {
    samples.append((now, done))
    while samples.count > 2, now.timeIntervalSince(samples[0].time) > 5 { samples.removeFirst() }
    let first = samples.count > 1 ? samples[0] : (time: started, done: Int64(0))
    let seconds = now.timeIntervalSince(first.time)
    let rate = seconds > 0 ? Double(done - first.done) / seconds : 0
    let fraction = total == 0 ? 1 : min(1, Double(done) / Double(total))
    var text = cFormat(" %3d%%  ", Int(fraction * 100)) + humanSize(done) + " / " + humanSize(total)
    if done >= total {
      text += "  " + humanSize(Int64(Double(done) / max(now.timeIntervalSince(started), 0.001))) + "/s"
      text += "  in " + clock(now.timeIntervalSince(started))
    } else if rate > 0 {
      text += "  " + humanSize(Int64(rate)) + "/s  " + clock(Double(total - done) / rate) + " left"
    } else {
      text += "  --/s"
    }
    let width = min(40, max(10, terminalColumns() - text.count - 3))
    let filled = Int(fraction * Double(width))
    let bar = String(repeating: "=", count: filled)
      + (filled < width ? ">" + String(repeating: " ", count: width - filled - 1) : "")
    return "[" + bar + "]" + text
  }

  /// The terminal's width in columns (80 when it does not say).
  private func terminalColumns() -> Int {
    var size = winsize()
    guard ioctl(fileno(stream), UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0 else { return 80 }
    return Int(size.ws_col)
  }
}

/// A duration as m:ss, or h:mm:ss from an hour on.
private func clock(_ seconds: Double) -> String {
  let whole = Int(min(max(seconds, 0), 359_999).rounded())
  let (hours, minutes, rest) = (whole / 3600, whole / 60 % 60, whole % 60)
  return hours > 0
    ? cFormat("%d:%02d:%02d", hours, minutes, rest) : cFormat("%d:%02d", minutes, rest)
}

import DiskImage
import FoundationEssentials

/// Runs `next` on a thread of its own, up to `depth` results ahead of the taker, and hands
/// the results back in order. The engine asks the source's map for the next windows here
/// while its writing thread writes: on ext4, the writing thread is the bottleneck, and the
/// SEEK_DATA/SEEK_HOLE walk of W1 (about 1,850 calls) took a seventh of its system-call
/// time (strace -T).
final class Prefetcher<Value> {
  private let lock = Lock()
  private var ready: [Result<Value?, Error>] = []
  private var readyHead = 0
  private var stopping = false
  private var running = true
  private let depth: Int

  /// `next` returns nil after the last value; it runs on the prefetching thread only.
  init(depth: Int, next: @escaping () throws -> Value?) {
    self.depth = max(depth, 1)
    startThread { [self] in self.loop(next) }
  }

  /// The next value, waiting for it; nil after the last one (and ever after). An error
  /// `next` threw is thrown here, in its place, and ends the values.
  func take() throws -> Value? {
    let result: Result<Value?, Error> = lock.withLock {
      while readyHead >= ready.count && running { lock.wait() }
      // The thread ended (after the last value, an error, or `stop`) with nothing left.
      if readyHead >= ready.count { return .success(nil) }
      let result = ready[readyHead]
      readyHead += 1
      if readyHead > 64 && readyHead * 2 > ready.count {
        ready.removeFirst(readyHead)
        readyHead = 0
      }
      lock.broadcast()
      return result
    }
    return try result.get()
  }

  /// Stops the thread (after the value it is making) and waits for it.
  func stop() {
    lock.withLock {
      stopping = true
      lock.broadcast()
      while running { lock.wait() }
    }
  }

  private func loop(_ next: () throws -> Value?) {
    while true {
      let stop = lock.withLock {
        while !stopping && ready.count - readyHead >= depth { lock.wait() }
        return stopping
      }
      if stop { break }
      let result = Result { try next() }
      let last = lock.withLock {
        ready.append(result)
        lock.broadcast()
        if case .success(let value) = result { return value == nil }
        return true
      }
      if last { break }
    }
    lock.withLock {
      running = false
      lock.broadcast()
    }
  }
}

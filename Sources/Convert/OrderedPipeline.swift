import DiskImage
import FoundationEssentials

/// Runs jobs on threads the engine owns (blocking I/O must not sit on Swift's cooperative
/// pool) and hands results back in submission order, so the output is the same bytes
/// whatever the thread count. At most `capacity` jobs are queued or finished-but-unread,
/// which bounds memory by the work in flight, never by the size of the disk.
final class OrderedPipeline<Input, Output> {
  private let lock = Lock()
  /// Where the taking thread waits for the result it needs next; a worker that finishes
  /// another wakes nobody. (With one condition for everything, each finished job woke
  /// the taker and the idle workers alike, to find nothing to do: 1,700 context switches
  /// in a 50 ms conversion.)
  private let resultReady = Lock.Condition()
  private var takerWaiting = false
  private var queue: [(Int, Input)] = []
  private var queueHead = 0
  private var finished: [Int: Result<Output, Error>] = [:]
  private var nextSubmit = 0
  private var nextTake = 0
  private var stopping = false
  private var running = 0
  private let capacity: Int
  private let work: (Input) throws -> Output

  init(threads: Int, capacity: Int, work: @escaping (Input) throws -> Output) {
    self.capacity = max(capacity, 1)
    self.work = work
    running = max(threads, 1)
    for _ in 0..<running {
      startThread { [self] in self.workerLoop() }
    }
  }

  /// Number of submitted jobs whose result has not been taken yet.
  var pending: Int { lock.withLock { nextSubmit - nextTake } }

  var isFull: Bool { pending >= capacity }

  /// Queues a job. The caller keeps `pending` under `capacity` by taking results.
  func submit(_ input: Input) {
    lock.withLock {
      queue.append((nextSubmit, input))
      nextSubmit += 1
      // Only workers wait while the submitting thread runs: wake one for the new job.
      lock.signal()
    }
  }

  /// The result of the oldest job not yet taken, waiting for it if needed.
  func takeNext() throws -> Output {
    let result = lock.withLock {
      while finished[nextTake] == nil {
        takerWaiting = true
        lock.wait(for: resultReady)
        takerWaiting = false
      }
      let result = finished.removeValue(forKey: nextTake)!
      nextTake += 1
      return result
    }
    return try result.get()
  }

  /// Stops the workers and waits for them; queued jobs are dropped.
  func shutdown() {
    lock.withLock {
      stopping = true
      queue.removeAll()
      queueHead = 0
      lock.broadcast()
      while running > 0 { lock.wait() }
    }
  }

  private func workerLoop() {
    while let (sequence, input) = nextJob() {
      let result = Result { try work(input) }
      lock.withLock {
        finished[sequence] = result
        if takerWaiting && sequence == nextTake { resultReady.signal() }
      }
    }
    lock.withLock {
      running -= 1
      lock.broadcast()
    }
  }

  /// The next queued job, waiting for one; nil once the pipeline stops.
  private func nextJob() -> (Int, Input)? {
    lock.withLock {
      while !stopping && queueHead >= queue.count { lock.wait() }
      if stopping { return nil }
      let job = queue[queueHead]
      queueHead += 1
      if queueHead > 64 && queueHead * 2 > queue.count {
        queue.removeFirst(queueHead)
        queueHead = 0
      }
      return job
    }
  }
}

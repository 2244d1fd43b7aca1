import Foundation

/// Runs jobs on threads the engine owns (blocking I/O must not sit on Swift's cooperative
/// pool) and hands results back in submission order, so the output is the same bytes
/// whatever the thread count. At most `capacity` jobs are queued or finished-but-unread,
/// which bounds memory by the work in flight, never by the size of the disk.
final class OrderedPipeline<Input, Output> {
  private let condition = NSCondition()
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
      let thread = Thread { [self] in self.workerLoop() }
      thread.stackSize = 1 << 20
      thread.start()
    }
  }

  /// Number of submitted jobs whose result has not been taken yet.
  var pending: Int {
    condition.lock()
    defer { condition.unlock() }
    return nextSubmit - nextTake
  }

  var isFull: Bool { pending >= capacity }

  /// Queues a job. The caller keeps `pending` under `capacity` by taking results.
  func submit(_ input: Input) {
    condition.lock()
    queue.append((nextSubmit, input))
    nextSubmit += 1
    condition.signal()
    condition.unlock()
  }

  /// The result of the oldest job not yet taken, waiting for it if needed.
  func takeNext() throws -> Output {
    condition.lock()
    defer { condition.unlock() }
    while finished[nextTake] == nil { condition.wait() }
    let result = finished.removeValue(forKey: nextTake)!
    nextTake += 1
    return try result.get()
  }

  /// Stops the workers and waits for them; queued jobs are dropped.
  func shutdown() {
    condition.lock()
    stopping = true
    queue.removeAll()
    queueHead = 0
    condition.broadcast()
    while running > 0 { condition.wait() }
    condition.unlock()
  }

  private func workerLoop() {
    condition.lock()
    while true {
      while !stopping && queueHead >= queue.count { condition.wait() }
      if stopping { break }
      let (sequence, input) = queue[queueHead]
      queueHead += 1
      if queueHead > 64 && queueHead * 2 > queue.count {
        queue.removeFirst(queueHead)
        queueHead = 0
      }
      condition.unlock()
      let result = Result { try work(input) }
      condition.lock()
      finished[sequence] = result
      condition.broadcast()
    }
    running -= 1
    condition.broadcast()
    condition.unlock()
  }
}

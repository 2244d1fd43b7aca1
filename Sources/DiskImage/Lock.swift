#if canImport(Glibc)
  import Glibc
#endif

/// The one lock of the project: a `pthread_mutex_t` with a condition variable, kept at
/// fixed addresses. `withLock` for mutual exclusion; `wait`/`broadcast`/`signal` (with the
/// lock held) for the threads that hand work to each other.
public final class Lock: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let condition: UnsafeMutablePointer<pthread_cond_t>

  public init() {
    mutex = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
    condition = .allocate(capacity: 1)
    pthread_cond_init(condition, nil)
  }

  deinit {
    pthread_cond_destroy(condition)
    condition.deallocate()
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  public func withLock<T>(_ body: () throws -> T) rethrows -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body()
  }

  /// Waits for a `broadcast`; call only inside `withLock`. Wake-ups may be spurious: wait
  /// in a loop on the condition that matters.
  public func wait() { pthread_cond_wait(condition, mutex) }

  /// Wakes every thread waiting in `wait`.
  public func broadcast() { pthread_cond_broadcast(condition) }

  /// Wakes one thread waiting in `wait` (call it when any one waiter can take what came).
  public func signal() { pthread_cond_signal(condition) }

  /// A second condition under the same lock, for a thread that waits for something other
  /// than what the others wait for (so that waking it wakes no one else).
  public final class Condition: @unchecked Sendable {
    fileprivate let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
      condition = .allocate(capacity: 1)
      pthread_cond_init(condition, nil)
    }

    deinit {
      pthread_cond_destroy(condition)
      condition.deallocate()
    }

    /// Wakes one thread waiting on this condition; call with the lock held.
    public func signal() { pthread_cond_signal(condition) }
  }

  /// Waits until `condition` is signalled; call only inside `withLock`, in a loop.
  public func wait(for condition: Condition) { pthread_cond_wait(condition.condition, mutex) }
}

/// Starts `body` on a new detached thread with a stack of `stackSize` bytes (POSIX threads:
/// the engine's threads block on I/O, so they are not Swift's cooperative pool's).
public func startThread(stackSize: Int = 1 << 20, _ body: @escaping () -> Void) {
  final class Box {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
  }
  var attributes = pthread_attr_t()
  pthread_attr_init(&attributes)
  defer { pthread_attr_destroy(&attributes) }
  pthread_attr_setstacksize(&attributes, stackSize)
  pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
  let context = Unmanaged.passRetained(Box(body)).toOpaque()
  var thread = pthread_t()
  let result = pthread_create(
    &thread, &attributes,
    { context in
      Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().body()
      return nil
    }, context)
  precondition(result == 0, "pthread_create failed: \(result)")
}

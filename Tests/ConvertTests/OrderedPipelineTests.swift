import DiskImage
import Foundation
import XCTest

@testable import Convert

/// The engine's pipeline: jobs done on worker threads in any order, results taken in the
/// order submitted. The taker waits on its own condition and is woken only by the job it
/// needs, so a lost wake-up would hang here: each taking runs against a deadline on a
/// watchdog thread, which fails the test instead.
final class OrderedPipelineTests: XCTestCase {
  func testResultsComeInOrderWhateverOrderJobsFinishIn() throws {
    for threads in [1, 2, 3, 8] {
      // Job i sleeps a little, longer for some: later jobs often finish first.
      let pipeline = OrderedPipeline<Int, Int>(threads: threads, capacity: 6) { job in
        if job % 7 == 0 { usleep(UInt32(200 + (job * 37) % 500)) } else if job % 3 == 0 { usleep(50) }
        return job * 2
      }
      let finished = Lock()
      var done = false
      let watchdog = DispatchSemaphore(value: 0)
      startThread {
        if watchdog.wait(timeout: .now() + 60) == .timedOut {
          finished.withLock { if !done { fatalError("OrderedPipeline: no result for 60 s with \(threads) threads (lost wake-up)") } }
        }
      }
      var next = 0
      var taken: [Int] = []
      for job in 0..<1500 {
        while pipeline.isFull {
          taken.append(try pipeline.takeNext())
          next += 1
        }
        pipeline.submit(job)
      }
      while next < 1500 {
        taken.append(try pipeline.takeNext())
        next += 1
      }
      pipeline.shutdown()
      finished.withLock { done = true }
      watchdog.signal()
      XCTAssertEqual(taken, (0..<1500).map { $0 * 2 }, "\(threads) threads")
    }
  }

  func testAFailedJobIsThrownInItsPlace() throws {
    struct Failure: Error, Equatable { let job: Int }
    let pipeline = OrderedPipeline<Int, Int>(threads: 2, capacity: 4) { job in
      if job == 5 { throw Failure(job: job) }
      return job
    }
    for job in 0..<8 { if !pipeline.isFull { pipeline.submit(job) } else { break } }
    var results: [Int] = []
    var failure: Error?
    for _ in 0..<4 {
      do { results.append(try pipeline.takeNext()) } catch { failure = error }
    }
    pipeline.submit(4)
    pipeline.submit(5)
    results.append(try pipeline.takeNext())
    XCTAssertThrowsError(try pipeline.takeNext()) { XCTAssertEqual($0 as? Failure, Failure(job: 5)) }
    pipeline.shutdown()
    XCTAssertNil(failure)
    XCTAssertEqual(results, [0, 1, 2, 3, 4])
  }
}

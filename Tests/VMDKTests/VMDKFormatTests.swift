import VMDK
import XCTest

final class VMDKFormatTests: XCTestCase {
  func testName() { XCTAssertEqual(VMDK.format.name, "vmdk") }
}

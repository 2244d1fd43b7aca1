import VDI
import XCTest

final class VDIFormatTests: XCTestCase {
  func testName() { XCTAssertEqual(VDI.format.name, "vdi") }
}

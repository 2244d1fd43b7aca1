import VHD
import XCTest

final class VHDFormatTests: XCTestCase {
  func testNameIsQemus() { XCTAssertEqual(VHD.format.name, "vpc") }
}

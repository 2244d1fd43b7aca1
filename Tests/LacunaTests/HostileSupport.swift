import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
  import Glibc
#endif

/// A copy of an image in memory whose big-endian fields a test changes before writing it out.
/// Offsets follow qemu's docs/interop/qcow2.txt.
struct PatchableImage {
  var bytes: [UInt8]

  init(fixture name: String) throws {
    bytes = [UInt8](try Data(contentsOf: fixturesDirectory.appendingPathComponent(name)))
  }

  init(bytes: [UInt8]) { self.bytes = bytes }

  func uint32(at offset: Int) -> UInt32 {
    bytes[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) }
  }

  func uint64(at offset: Int) -> UInt64 {
    bytes[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) }
  }

  mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    let width = MemoryLayout<T>.size
    if offset + width > bytes.count { bytes += [UInt8](repeating: 0, count: offset + width - bytes.count) }
    for index in 0..<width {
      bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * (width - 1 - index)))
    }
  }

  mutating func replace(at offset: Int, with data: [UInt8]) {
    if offset + data.count > bytes.count { bytes += [UInt8](repeating: 0, count: offset + data.count - bytes.count) }
    bytes.replaceSubrange(offset..<offset + data.count, with: data)
  }

  // Header fields.
  var clusterBits: Int { Int(uint32(at: 20)) }
  var clusterSize: Int { 1 << clusterBits }
  var l1Offset: Int { Int(uint64(at: 40)) }
  static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
  static let copied: UInt64 = 1 << 63
  static let compressed: UInt64 = 1 << 62

  /// Where the L2 entry for the cluster holding `virtualOffset` sits in the file (plain L2).
  func l2EntryOffset(virtualOffset: Int) -> Int {
    let entries = clusterSize / 8
    let cluster = virtualOffset / clusterSize
    let l1Entry = uint64(at: l1Offset + 8 * (cluster / entries))
    precondition(l1Entry & Self.offsetMask != 0, "no L2 table there")
    return Int(l1Entry & Self.offsetMask) + 8 * (cluster % entries)
  }

  func l2Entry(virtualOffset: Int) -> UInt64 { uint64(at: l2EntryOffset(virtualOffset: virtualOffset)) }

  mutating func setL2Entry(virtualOffset: Int, _ value: UInt64) {
    set(value, at: l2EntryOffset(virtualOffset: virtualOffset))
  }

  /// Appends `data` at the next 512-byte boundary; returns where it starts.
  mutating func append(_ data: [UInt8]) -> Int {
    let start = (bytes.count + 511) / 512 * 512
    replace(at: start, with: data)
    return start
  }

  /// Makes the cluster at virtual offset 0 a compressed cluster holding `stream`, stored at
  /// the end of the file; the entry's sector count covers the whole stream.
  mutating func setCompressedCluster(virtualOffset: Int = 0, stream: [UInt8]) {
    let host = append(stream)
    bytes += [UInt8](repeating: 0, count: (512 - bytes.count % 512) % 512)
    let offsetBits = 62 - (clusterBits - 8)
    let extraSectors = UInt64((stream.count + 511) / 512 - 1)
    precondition(extraSectors < 1 << (62 - offsetBits), "the stream is too long for one compressed entry")
    setL2Entry(virtualOffset: virtualOffset, Self.compressed | extraSectors << UInt64(offsetBits) | UInt64(host))
  }

  /// Sets the backing file name (kept where the image has it, at the recorded offset).
  mutating func setBackingName(_ name: String) {
    let offset = Int(uint64(at: 8))
    precondition(offset != 0)
    let data = Array(name.utf8)
    replace(at: offset, with: data)
    set(UInt32(data.count), at: 16)
  }

  func write(to url: URL) throws { try Data(bytes).write(to: url) }
}

/// Compressed streams made by hand, so the tests can say exactly what each one holds.
enum HandMadeStream {
  /// Raw deflate of `count` bytes of `byte` in stored (uncompressed) blocks.
  static func deflateStored(count: Int, byte: UInt8 = 0x5a) -> [UInt8] {
    var out: [UInt8] = []
    var left = count
    repeat {
      let chunk = min(left, 65535)
      left -= chunk
      out.append(left == 0 ? 1 : 0)  // BFINAL, BTYPE 00 (stored), then padding to the byte
      out += [UInt8(chunk & 0xff), UInt8(chunk >> 8), UInt8(~chunk & 0xff), UInt8((~chunk >> 8) & 0xff)]
      out += [UInt8](repeating: byte, count: chunk)
    } while left > 0
    return out
  }

  /// Raw deflate, fixed Huffman codes: one literal zero, then `matches` copies of 258
  /// bytes at distance 1. 13 bits per 258 bytes: a small stream that expands enormously.
  static func deflateBomb(matches: Int) -> [UInt8] {
    var writer = BitWriter()
    writer.bits(1, count: 1)  // BFINAL
    writer.bits(1, count: 2)  // BTYPE 01: fixed Huffman
    writer.code(0b0011_0000, length: 8)  // literal 0
    for _ in 0..<matches {
      writer.code(0b1100_0101, length: 8)  // length symbol 285: 258 bytes
      writer.code(0, length: 5)  // distance code 0: distance 1
    }
    writer.code(0, length: 7)  // end of block (symbol 256)
    return writer.bytes
  }

  /// One zstd frame of RLE blocks of `byte`, one per entry of `blocks` (each at most 128 KiB).
  static func zstdRLE(blocks: [Int], byte: UInt8 = 0x5a) -> [UInt8] {
    var out: [UInt8] = [0x28, 0xb5, 0x2f, 0xfd]  // magic
    out.append(0x00)  // no content size, no checksum, not single-segment
    out.append(0x38)  // window descriptor: exponent 7, 128 KiB window
    for (index, size) in blocks.enumerated() {
      let last = index == blocks.count - 1 ? 1 : 0
      let header = last | 1 << 1 | size << 3  // block type 1: RLE
      out += [UInt8(header & 0xff), UInt8((header >> 8) & 0xff), UInt8((header >> 16) & 0xff), byte]
    }
    return out
  }

  /// A zstd frame header that claims a 1 TiB single-segment frame (so a 1 TiB window).
  static func zstdHugeWindow() -> [UInt8] {
    var out: [UInt8] = [0x28, 0xb5, 0x2f, 0xfd, 0xe0]  // 8-byte content size, single segment
    let size: UInt64 = 1 << 40
    out += (0..<8).map { UInt8(truncatingIfNeeded: size >> (8 * $0)) }
    let header = 1 | 1 << 1 | 4096 << 3  // last block, RLE, 4 KiB
    out += [UInt8(header & 0xff), UInt8((header >> 8) & 0xff), UInt8(header >> 16), 0]
    return out
  }

  struct BitWriter {
    var bytes: [UInt8] = []
    var used = 8

    /// Appends `count` bits of `value`, least significant first (deflate's header fields).
    mutating func bits(_ value: UInt32, count: Int) {
      for index in 0..<count {
        if used == 8 {
          bytes.append(0)
          used = 0
        }
        if value >> UInt32(index) & 1 != 0 { bytes[bytes.count - 1] |= 1 << UInt8(used) }
        used += 1
      }
    }

    /// Appends a Huffman code, most significant bit first, as deflate packs them.
    mutating func code(_ value: UInt32, length: Int) {
      for index in stride(from: length - 1, through: 0, by: -1) { bits(value >> UInt32(index) & 1, count: 1) }
    }
  }
}

/// A run of the built binary with a time limit and an address-space limit, so a hang or a
/// huge allocation shows as a failure instead of stalling or swapping the machine.
func runLacunaBounded(
  _ arguments: [String], in directory: URL? = nil, seconds: Double = 60, environment: [String: String] = [:],
  shellPrefix: String = ""
) throws -> (outcome: Outcome, timedOut: Bool) {
  let binary = try lacunaBinary()
  // ASAN and TSAN builds reserve terabytes of shadow memory; script/sanitize turns this off.
  let limit = ProcessInfo.processInfo.environment["LACUNA_TEST_MEMORY_LIMIT_KIB"] ?? "1048576"
  let memory = limit == "0" ? "" : "ulimit -v \(limit); "
  let process = Process()
  process.executableURL = URL(fileURLWithPath: "/bin/sh")
  process.arguments = ["-c", memory + shellPrefix + "exec \"$0\" \"$@\"", binary] + arguments
  if let directory { process.currentDirectoryURL = directory }
  if !environment.isEmpty {
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
  }
  final class Flag: @unchecked Sendable { var value = false }
  let timedOut = Flag()
  var watchdog: DispatchWorkItem?
  let outcome = try runToCompletion(process) { process in
    let pid = process.processIdentifier
    let item = DispatchWorkItem {
      timedOut.value = true
      kill(pid, SIGKILL)
    }
    DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: item)
    watchdog = item
  }
  watchdog?.cancel()
  return (outcome, timedOut.value)
}

/// Every regular file in a directory with its bytes, to check that inputs stay unchanged.
func snapshotFiles(_ directory: URL) throws -> [String: Data] {
  var result: [String: Data] = [:]
  for name in listing(directory) {
    result[name] = try Data(contentsOf: directory.appendingPathComponent(name))
  }
  return result
}

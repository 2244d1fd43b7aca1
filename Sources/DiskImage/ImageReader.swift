/// How an image names its backing file: the name as recorded, and the format if recorded.
public struct BackingReference: Sendable, Equatable {
  /// The name exactly as the image stores it (relative names resolve against the
  /// directory of the image that holds them).
  public var name: String
  /// The recorded format name, or nil when the image does not say.
  public var format: String?

  public init(name: String, format: String?) {
    self.name = name
    self.format = format
  }
}

/// One layer of a virtual disk, read-only.
///
/// The hierarchy: a format's reader answers for itself alone (`extents`, `read`); the
/// engine stacks readers into a chain and asks each layer only about what the layers above
/// left `unallocated`. Readers must allow `read` and `extents` from several threads at once.
public protocol ImageReader: AnyObject {
  /// Where this layer's bytes live.
  var source: ByteSource { get }
  /// The format's name as `-f` takes it ("raw", "qcow2").
  var formatName: String { get }
  /// The size of the virtual disk in bytes, exact (no rounding to sectors).
  var virtualSize: Int64 { get }
  /// The backing file the image names, if any.
  var backing: BackingReference? { get }
  /// The cluster size, for formats that have one (reported by `info`).
  var clusterSize: Int? { get }
  /// Whether the image says it was not closed cleanly.
  var isDirty: Bool { get }
  /// Warnings to print once when the image is opened (a corrupt bit, say).
  var warnings: [String] { get }
  /// The format's own facts for `info` (`format-specific.data` in qemu-img's JSON).
  var formatSpecific: [(String, InfoValue)] { get }
  /// Other files this layer reads its disk from (a VMDK descriptor's extents), opened
  /// through a CompanionOpener: an output may not be one of them either.
  var companionSources: [ByteSource] { get }
  /// Checks that `parent`, opened from `backing`, is the image this one was made from, where
  /// the format records that (a VHD's parent unique id, a VHDX's parent linkage): a changed
  /// or substituted parent would give a disk nobody ever had. Throws naming this image.
  func checkBacking(_ parent: ImageReader) throws
  /// The internal snapshots the image holds (qcow2's snapshot table), for `info`.
  var snapshots: [SnapshotInfo] { get }
  /// This image's disk as one of its internal snapshots left it (`convert -l`): a reader
  /// of the same file and backing file that answers from the snapshot's tables. Throws
  /// naming the image when no snapshot matches or the format keeps none.
  func opening(snapshot: SnapshotSelector) throws -> ImageReader
  /// The file whose bytes the `hostOffset` of this layer's data extents point at, stored
  /// plainly (no compression, no encryption), so the kernel can copy or share them; nil
  /// where there is none.
  var plainHostFile: ImageFile? { get }

  /// Contiguous extents that cover a prefix of `range`, in order, starting at
  /// `range.lowerBound`. The range is a hint: an implementation may answer for less
  /// (callers loop) but must answer for something. `range` lies within the virtual size.
  func extents(in range: Range<Int64>) throws -> [Extent]

  /// Reads `buffer.count` bytes of the virtual disk at `offset`. Valid over ranges this
  /// layer reports as `data` or `zero`; unallocated parts read as zeros.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws
}

extension ImageReader {
  public var clusterSize: Int? { nil }
  public var isDirty: Bool { false }
  public var warnings: [String] { [] }
  public var formatSpecific: [(String, InfoValue)] { [] }
  public var companionSources: [ByteSource] { [] }
  public func checkBacking(_ parent: ImageReader) throws {}
  public var snapshots: [SnapshotInfo] { [] }
  public var plainHostFile: ImageFile? { nil }
  public func opening(snapshot: SnapshotSelector) throws -> ImageReader {
    throw ImageError.unsupported(
      path: path, "\(formatName) images hold no internal snapshots; cannot read snapshot \(snapshot)")
  }
  public var path: String { source.name }

  /// Refuses a read that does not lie inside the virtual disk; every reader's `read`
  /// starts with this, so a read past the end is an error, never zeros.
  public func checkInside(_ count: Int, at offset: Int64) throws {
    guard offset >= 0, count >= 0, offset <= virtualSize - Int64(count) else {
      throw ImageError.usage(
        path: path, "read of \(count) bytes at \(hex(offset)) is outside the virtual disk (size \(hex(virtualSize)))")
    }
  }

  /// Every extent of `range`, looping over `extents(in:)` until the range is covered.
  public func allExtents(in range: Range<Int64>) throws -> [Extent] {
    var result: [Extent] = []
    var position = range.lowerBound
    while position < range.upperBound {
      let answer = try extents(in: position..<range.upperBound)
      guard let first = answer.first, first.range.lowerBound == position, first.length > 0 else {
        throw ImageError.invalid(path: path, "internal: no extent answered at \(hex(position))")
      }
      for extent in answer {
        let clipped = Extent(
          extent.range.clamped(to: position..<range.upperBound), extent.kind,
          hostOffset: extent.hostOffset.map { $0 + (max(position, extent.range.lowerBound) - extent.range.lowerBound) },
          isHostHole: extent.isHostHole)
        guard clipped.range.lowerBound == position, clipped.length > 0 else { break }
        result.appendMerging(clipped)
        position = clipped.range.upperBound
      }
    }
    return result
  }
}

/// A value in `info` output: what qemu-img prints as JSON.
public enum InfoValue: Sendable, Equatable {
  case string(String)
  case integer(Int64)
  case bool(Bool)
  case object([(String, InfoValue)])
  case array([InfoValue])

  public static func == (a: InfoValue, b: InfoValue) -> Bool {
    switch (a, b) {
    case let (.string(x), .string(y)): return x == y
    case let (.integer(x), .integer(y)): return x == y
    case let (.bool(x), .bool(y)): return x == y
    case let (.array(x), .array(y)): return x == y
    case let (.object(x), .object(y)):
      return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    default: return false
    }
  }
}

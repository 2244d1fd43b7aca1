import DiskImage

/// A range of the virtual disk as the whole chain sees it.
public struct LayeredExtent: RangeRun, Equatable, CustomStringConvertible {
  public var range: Range<Int64>
  /// `.data` or `.zero` as the layer at `depth` answered. `.unallocated` appears only when
  /// the walk was told to stop above a layer (`stopDepth`): the range is that layer's.
  public var kind: ExtentKind
  /// False where no layer holds the range (it reads as zero) or it lies past the end of a
  /// shorter backing file, and for `.unallocated`; `map` prints it as `present`.
  public var present: Bool
  /// The index of the layer that answered (for unallocated: the deepest layer asked).
  public var depth: Int
  /// Where the bytes sit in that layer's file, when they sit there plainly.
  public var hostOffset: Int64?
  /// Data in the layer whose host bytes are a hole (`Extent.isHostHole`): `.zero` here.
  public var isHostHole = false

  public var description: String {
    (present ? "" : "~") + "\(kind)[\(range.lowerBound)..<\(range.upperBound)]@\(depth)" + (hostOffset.map { "+\($0)" } ?? "")
  }

  /// Same kind, presence and layer, touching, host offsets contiguous.
  public func canMerge(with next: LayeredExtent) -> Bool {
    kind == next.kind && present == next.present && depth == next.depth && isHostHole == next.isHostHole
      && range.upperBound == next.range.lowerBound
      && hostOffsetsContinue(hostOffset, length: length, next.hostOffset)
  }
}

extension Chain {
  /// The extents of `range` through the chain: ask the top layer; pass only what it leaves
  /// unallocated to the next layer down. A layer shorter than the one above reads as zeros
  /// past its end. Stops descending at `stopDepth` (exclusive): what is unallocated in the
  /// layers above it is reported `unallocated` (used for `-B` with a layer of the chain).
  public func extents(in range: Range<Int64>, stopDepth: Int? = nil) throws -> [LayeredExtent] {
    var result: [LayeredExtent] = []
    if stopDepth == 0 {
      // The output's backing file is the source itself: all of it is the backing's.
      return [LayeredExtent(range: range, kind: .unallocated, present: false, depth: 0, hostOffset: nil)]
    }
    try collect(range, depth: 0, limit: stopDepth ?? layers.count, into: &result)
    return result
  }

  private func collect(
    _ range: Range<Int64>, depth: Int, limit: Int, into result: inout [LayeredExtent]
  ) throws {
    let layer = layers[depth]
    let inside = range.clamped(to: 0..<layer.virtualSize)
    if !inside.isEmpty {
      for extent in try layer.allExtents(in: inside) {
        if extent.kind != .unallocated {
          result.appendMerging(
            LayeredExtent(
              range: extent.range, kind: extent.kind, present: true, depth: depth, hostOffset: extent.hostOffset,
              isHostHole: extent.isHostHole))
        } else if depth + 1 < limit {
          try collect(extent.range, depth: depth + 1, limit: limit, into: &result)
        } else {
          // Cut short by stopDepth: the layer below owns it. At the bottom: nobody does.
          let cut = limit < layers.count
          // qemu-img map reports a host offset for an unallocated subcluster of an allocated
          // cluster (extended L2); keep what the layer said.
          result.appendMerging(
            LayeredExtent(
              range: extent.range, kind: cut ? .unallocated : .zero, present: false, depth: depth,
              hostOffset: cut ? nil : extent.hostOffset))
        }
      }
    }
    // Past this layer's end: zeros, answered by the layer above it (as qemu-img map does).
    if range.upperBound > layer.virtualSize {
      let past = max(range.lowerBound, layer.virtualSize)..<range.upperBound
      result.appendMerging(LayeredExtent(range: past, kind: .zero, present: false, depth: max(0, depth - 1), hostOffset: nil))
    }
  }

  /// Reads `buffer.count` bytes of the virtual disk at `offset` through the chain.
  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    let range = offset..<offset + Int64(buffer.count)
    for extent in try extents(in: range) {
      let slice = UnsafeMutableRawBufferPointer(
        rebasing: buffer[Int(extent.range.lowerBound - offset)..<Int(extent.range.upperBound - offset)])
      if extent.kind == .data {
        try layers[extent.depth].read(into: slice, at: extent.range.lowerBound)
      } else {
        slice.initializeMemory(as: UInt8.self, repeating: 0)
      }
    }
  }
}

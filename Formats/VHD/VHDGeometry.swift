/// A disk's cylinders, heads and sectors per track, as a VHD footer records them. Virtual
/// PC (and qemu for a footer whose creator is `qemu`) sizes the disk by their product.
struct VHDGeometry: Equatable, CustomStringConvertible {
  var cylinders: Int
  var heads: Int
  var sectorsPerTrack: Int

  /// 65535 cylinders, 16 heads, 255 sectors per track (about 127 GiB): the largest geometry
  /// the footer can hold. A footer that records it says its current size is the truth.
  static let maximum = VHDGeometry(cylinders: 65535, heads: 16, sectorsPerTrack: 255)

  /// The number of 512-byte sectors the geometry describes.
  var sectors: Int64 { Int64(cylinders) * Int64(heads) * Int64(sectorsPerTrack) }

  var description: String { "\(cylinders)/\(heads)/\(sectorsPerTrack)" }

  /// The geometry the VHD specification's appendix gives a disk of `totalSectors` (qemu's
  /// `calculate_geometry`): usually a little smaller than the disk, never larger than
  /// `maximum`. All divisions truncate.
  init(approximating totalSectors: Int64) {
    let total = min(max(totalSectors, 0), VHDGeometry.maximum.sectors)
    var sectorsPerTrack: Int64
    var heads: Int64
    var cylindersTimesHeads: Int64
    if total >= 65535 * 16 * 63 {
      sectorsPerTrack = 255
      heads = 16
      cylindersTimesHeads = total / sectorsPerTrack
    } else {
      sectorsPerTrack = 17
      cylindersTimesHeads = total / sectorsPerTrack
      heads = max((cylindersTimesHeads + 1023) / 1024, 4)
      // qemu keeps heads in a byte, so more than 255 wraps; every wrapped value also fails
      // the first test below (cylindersTimesHeads is then far above heads * 1024), so the
      // outcome is the same as with the true number.
      if cylindersTimesHeads >= heads * 1024 || heads > 16 {
        sectorsPerTrack = 31
        heads = 16
        cylindersTimesHeads = total / sectorsPerTrack
      }
      if cylindersTimesHeads >= heads * 1024 {
        sectorsPerTrack = 63
        heads = 16
        cylindersTimesHeads = total / sectorsPerTrack
      }
    }
    self.init(
      cylinders: Int(cylindersTimesHeads / heads), heads: Int(heads), sectorsPerTrack: Int(sectorsPerTrack))
  }

  init(cylinders: Int, heads: Int, sectorsPerTrack: Int) {
    self.cylinders = cylinders
    self.heads = heads
    self.sectorsPerTrack = sectorsPerTrack
  }

  /// The geometry qemu-img gives a new disk of `totalSectors`: the specification's geometry
  /// for `totalSectors`, `totalSectors + 1`, ... until its product covers the disk, so a
  /// conversion rounds up instead of cutting the disk short. Past `maximum` it is `maximum`
  /// (and the footer's current size then says how large the disk is).
  static func covering(_ totalSectors: Int64) -> VHDGeometry {
    let total = min(max(totalSectors, 0), maximum.sectors)
    var geometry = VHDGeometry(cylinders: 0, heads: 0, sectorsPerTrack: 0)
    // A few thousand tries at most (the product grows by whole cylinders of at most 16 * 255
    // sectors); at worst the candidate reaches `maximum.sectors`, whose geometry is `maximum`.
    var candidate = total
    while geometry.sectors < total {
      geometry = VHDGeometry(approximating: candidate)
      candidate += 1
    }
    return geometry
  }
}

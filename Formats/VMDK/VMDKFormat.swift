import DiskImage

/// VMware's VMDK, read: single-file sparse disks (monolithicSparse and streamOptimized),
/// which start with the sparse extent magic "KDMV" and embed their descriptor. Text
/// descriptors, split, flat and ESX (COWD) disks are not probed here.
public enum VMDK {
  /// "KDMV", the first four bytes of a hosted sparse extent (little-endian 0x564d444b).
  public static let magic: [UInt8] = SparseExtentHeader.magic

  public static let format = ImageFormat(
    name: "vmdk", probeLength: 4, probe: { $0.starts(with: magic) },
    open: { source in try VMDKReader(source: source) })
}

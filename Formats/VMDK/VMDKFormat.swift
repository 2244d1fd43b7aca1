import DiskImage

/// VMware's VMDK, written in every subformat qemu-img writes (`VMDKWriter`, `VMDKStreamWriter`), and read: single-file sparse disks (monolithicSparse, streamOptimized), which
/// start with the sparse extent magic "KDMV" and embed their descriptor, and descriptor
/// files (first line `# Disk DescriptorFile`) whose extents are other files, opened through
/// the caller's `CompanionOpener`. ESX sparse (COWD, seSparse) extents are not read.
public enum VMDK {
  /// "KDMV", the first four bytes of a hosted sparse extent (little-endian 0x564d444b).
  public static let magic: [UInt8] = SparseExtentHeader.magic

  public static let format = ImageFormat(
    name: "vmdk", probeLength: 1024,
    probe: { $0.starts(with: magic) || VMDKDescriptor.isDescriptorFile($0) },
    capabilities: [.backingFile, .compression],
    openWithCompanions: { source, companions in try VMDKReader(source: source, companions: companions) },
    create: { target, size, options in try VMDKWriter.create(target: target, virtualSize: size, options: options) })
}

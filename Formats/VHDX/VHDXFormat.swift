import DiskImage

/// Microsoft's VHDX (MS-VHDX 1.0), read and written; differencing images name their parent.
public enum VHDX {
  /// "vhdxfile", the file type identifier at offset 0.
  public static let magic: [UInt8] = Array("vhdxfile".utf8)

  public static let format = ImageFormat(
    name: "vhdx", probeLength: 8, probe: { $0.starts(with: magic) },
    capabilities: [.backingFile],
    open: { source in try VHDXReader(source: source) },
    create: { target, size, options in try VHDXWriter.create(target: target, virtualSize: size, options: options) })
}

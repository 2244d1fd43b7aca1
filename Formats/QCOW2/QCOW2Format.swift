import DiskImage

/// qcow2 images, versions 2 (compat 0.10) and 3 (compat 1.1), read and written.
public enum QCOW2 {
  /// "QFI\xfb", the first four bytes of every qcow2 file.
  public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]

  public static let format = ImageFormat(
    name: "qcow2", probeLength: 4, probe: { $0.starts(with: magic) },
    capabilities: [.backingFile, .compression],
    open: { source in try QCOW2Reader(source: source) },
    create: { target, size, options in
      try QCOW2Writer.create(target: target, virtualSize: size, options: options)
    })
}

import DiskImage

/// qcow2 images (placeholder until the reader lands).
public enum QCOW2 {
  public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]
  public static let format = ImageFormat(
    name: "qcow2", probeLength: 4, probe: { $0.starts(with: magic) },
    open: { file in throw ImageError.unsupported(path: file.path, "qcow2 reading is not implemented yet") })
}

import DiskImage

/// Raw images: the virtual disk byte for byte, holes and all.
public enum Raw {
  public static let format = ImageFormat(
    name: "raw",
    open: { file in try RawReader(file: file) },
    create: { output, size, options in try RawWriter(output: output, virtualSize: size, options: options) })
}

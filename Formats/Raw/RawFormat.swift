import DiskImage

/// Raw images: the virtual disk byte for byte, holes and all.
public enum Raw {
  public static let format = ImageFormat(
    name: "raw", capabilities: [.sparsifyInPlace, .inPlace],
    open: { source in try RawReader(source: source) },
    create: { target, size, options in try RawWriter(target: target, virtualSize: size, options: options) })
}

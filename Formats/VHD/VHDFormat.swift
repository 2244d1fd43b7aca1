import DiskImage

/// Microsoft's VHD (qemu's name: vpc): fixed, dynamic and differencing images read;
/// fixed and dynamic images written.
public enum VHD {
  /// "conectix", the cookie of the footer: at offset 0 of a dynamic or differencing VHD
  /// (the footer copy), in the last 512 bytes of every VHD.
  public static let cookie: [UInt8] = VHDFooter.cookie

  public static let format = ImageFormat(
    name: "vpc", probeLength: 8, probe: { $0.starts(with: cookie) },
    // A fixed VHD has no header: its mark is the footer, the file's last 512 bytes.
    probeTrailer: { $0.count == VHDFooter.length && $0.starts(with: cookie) },
    open: { source in try VHDReader(source: source) },
    create: { target, size, options in
      try VHDWriter.create(target: target, virtualSize: size, options: options)
    })
}

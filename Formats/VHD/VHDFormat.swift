import DiskImage

/// Microsoft's VHD (qemu's name: vpc): fixed, dynamic and differencing images, read.
public enum VHD {
  public static let format = ImageFormat(name: "vpc")
}

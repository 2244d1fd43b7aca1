import DiskImage

/// VirtualBox's VDI, read.
public enum VDI {
  public static let format = ImageFormat(name: "vdi")
}

import DiskImage

/// VMware's VMDK, read.
public enum VMDK {
  public static let format = ImageFormat(name: "vmdk")
}

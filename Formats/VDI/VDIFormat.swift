import DiskImage

/// VirtualBox's VDI, version 1.1: dynamic, fixed and differencing (snapshot) images read;
/// dynamic and fixed (`static=on`) images written.
public enum VDI {
  /// 0xbeda107f, stored little-endian at offset 0x40, after the 64-byte informational text.
  public static let signature: [UInt8] = [0x7f, 0x10, 0xda, 0xbe]
  /// Where the signature sits: the text before it varies by VirtualBox brand and is never
  /// used for detection.
  public static let signatureOffset = 0x40

  public static let format = ImageFormat(
    name: "vdi", probeLength: signatureOffset + signature.count,
    probe: { header in
      header.count >= signatureOffset + signature.count
        && Array(header[signatureOffset..<signatureOffset + signature.count]) == signature
    },
    openWithCompanions: { source, companions in
      // A differencing image's parent is found by UUID among the .vdi files around it: that
      // opens other files, which an untrusted image may not make lacuna do.
      try VDIReader(source: source, parentDirectories: [".", ".."]) {
        try companions.checkMaySearch(heldBy: source, for: "its parent (by UUID, among the .vdi files beside it and one folder up)")
      }
    },
    create: { target, size, options in
      try VDIWriter(target: target, virtualSize: size, options: options)
    })
}

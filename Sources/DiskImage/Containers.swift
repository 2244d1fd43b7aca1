/// Files that are recognisably some container lacuna does not read: other disk-image
/// formats, encrypted volumes, compressed files and archives. Probing such a file as a raw
/// disk would give a "disk" made of the container's bytes, with exit 0; probing refuses it
/// by name instead, and `-f raw` copies the bytes when that is really what is wanted.
///
/// Formats that lacuna reads are claimed by their own `probe` first; this list only
/// answers for what no format claimed.
public enum Containers {
  /// How many leading bytes `recognize` looks at.
  public static let headerLength = 4096

  /// What `header` (the file's first bytes) and `trailer` (its last 512 bytes, or fewer)
  /// say the file is, as a phrase ("a VHDX image"), or nil when nothing is recognised.
  public static func recognize(header: [UInt8], trailer: [UInt8]) -> String? {
    func at(_ offset: Int, _ bytes: [UInt8]) -> Bool {
      header.count >= offset + bytes.count && Array(header[offset..<offset + bytes.count]) == bytes
    }
    func at(_ offset: Int, _ text: String) -> Bool { at(offset, Array(text.utf8)) }

    if at(0, "KDMV") { return "a VMDK image (sparse extent)" }
    if at(0, "COWD") { return "a VMDK image (ESX COWD sparse extent)" }
    if isVMDKDescriptor(header) { return "a VMDK descriptor" }
    if at(0, "vhdxfile") { return "a VHDX image" }
    if at(0, "conectix") { return "a VHD image" }
    if trailer.starts(with: Array("conectix".utf8)) { return "a fixed VHD image (footer in the last 512 bytes)" }
    // qemu's 511-byte footers (images it made long ago) put the cookie one byte later.
    if trailer.count == 512, Array(trailer[1..<9]) == Array("conectix".utf8) {
      return "a fixed VHD image (footer in the last 511 bytes)"
    }
    if at(0x40, [0x7f, 0x10, 0xda, 0xbe]) { return "a VDI (VirtualBox) image" }
    if at(0, [0x51, 0x45, 0x44, 0x00]) { return "a QED image" }
    if at(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) { return "a LUKS encrypted volume" }
    if at(0, "WithoutFreeSpace") || at(0, "WithouFreSpacExt") { return "a Parallels image" }
    if at(0, "Bochs Virtual HD Image") { return "a Bochs image" }
    if at(0, "#!/bin/sh"), String(decoding: header.prefix(64), as: UTF8.self).contains("#V2.0 Format") {
      return "a cloop compressed image"
    }
    if trailer.count == 512, trailer.starts(with: Array("koly".utf8)) { return "an Apple disk image (DMG)" }
    if at(0, [0x45, 0x56, 0x46, 0x09, 0x0d, 0x0a, 0xff, 0x00]) || at(0, [0x45, 0x56, 0x46, 0x32, 0x0d, 0x0a, 0x81, 0x00]) {
      return "an EnCase evidence file (EWF, E01)"
    }
    // What a download leaves compressed or packed (an OVA is a tar archive).
    if at(0, [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) { return "an xz-compressed file" }
    if at(0, [0x28, 0xb5, 0x2f, 0xfd]) { return "a zstd-compressed file" }
    if at(0, [0x1f, 0x8b, 0x08]) { return "a gzip-compressed file" }
    if at(0, "BZh"), header.count > 3, (0x31...0x39).contains(header[3]), at(4, [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]) {
      return "a bzip2-compressed file"
    }
    if at(257, "ustar") { return "a tar archive (an OVA is one: extract the disk from it first)" }
    if at(0, [0x50, 0x4b, 0x03, 0x04]) { return "a zip archive" }
    return nil
  }

  /// A text descriptor: its first non-blank line is the `# Disk DescriptorFile` comment.
  private static func isVMDKDescriptor(_ header: [UInt8]) -> Bool {
    let marker = Array("# Disk DescriptorFile".utf8)
    var index = 0
    while index < header.count, [0x20, 0x09, 0x0a, 0x0d].contains(header[index]) { index += 1 }
    return header.count - index >= marker.count && Array(header[index..<index + marker.count]) == marker
  }
}

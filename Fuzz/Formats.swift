// The formats lacuna-fuzz can fuzz, by the name script/fuzz takes. A format with an
// ImageReader or a SequentialImageReader is added here (and its seeds to script/fuzz).

import DiskImage
import QCOW2
import Raw
import Stream
import VDI
import VHD
import VHDX
import VMDK

#if canImport(Glibc)
  import Glibc
#endif

let fuzzFormats: [ImageFormat] = [QCOW2.format, Raw.format, SparseStream.format, VHD.format, VMDK.format, VDI.format, VHDX.format]

/// "qcow2|raw", for usage lines.
var formatNames: String { fuzzFormats.map(\.name).joined(separator: "|") }

func fuzzFormat(named name: String) -> ImageFormat? {
  fuzzFormats.first { $0.name == name }
}

/// `lacuna-fuzz --formats` prints the names, one a line (script/fuzz-all runs each).
func listFormatsIfAsked(_ argument: String?) {
  guard argument == "--formats" else { return }
  for format in fuzzFormats { print(format.name) }
  exit(0)
}

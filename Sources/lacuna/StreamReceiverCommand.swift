import ArgumentParser
import Stream

#if canImport(Glibc)
  import Glibc
#endif

struct StreamReceiverCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "stream-receiver",
    abstract: "Print a POSIX shell script that receives a stream where lacuna is not installed.",
    discussion: """
      The script reads a stream (lacuna convert -O stream ... -) on standard input and \
      writes a sparse raw image with only sh, head, truncate and mv. It writes OUTPUT.part \
      and renames it once the stream's end record has arrived; a cut or malformed stream \
      exits 1 and leaves nothing. It does not verify the checksum (lacuna convert -f \
      stream does).

      Examples:
        lacuna stream-receiver > receive.sh
        lacuna convert -O stream disk.qcow2 - | sh receive.sh disk.img
        lacuna convert -O stream disk.qcow2 - | ssh host sh receive.sh disk.img
      """)

  func run() throws {
    fputs(SparseStream.shellReceiver(version: Lacuna.version), stdout)
    fflush(stdout)
  }
}

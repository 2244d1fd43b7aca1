import DiskImage

#if canImport(Glibc)
  import Glibc
#endif

/// The companion files of an output (a VMDK descriptor's extent files), made beside it
/// under the rules of the output itself: each is written to a file that appears only when
/// committed; none may be an input of the conversion, the output, or anything but a
/// regular file or a new name.
public final class OutputCompanions: CompanionTargets {
  /// The output as the user named it, for errors.
  private let destination: String
  private let directory: String
  public let outputName: String
  private let inputs: Set<FileIdentity>
  private let synchronizes: Bool
  private var made: [OutputFile] = []
  private var names: Set<String> = []

  /// Companions of the output `destination`; `inputs` are the files the conversion reads.
  public init(destination: String, inputs: Set<FileIdentity>, synchronizes: Bool) throws {
    self.destination = destination
    let (finalPath, _) = try OutputFile.checkDestination(destination)
    (directory, outputName) = splitPath(finalPath)
    self.inputs = inputs
    self.synchronizes = synchronizes
  }

  public func create(named name: String) throws -> ByteTarget {
    guard !name.isEmpty, !name.contains("/"), name != ".", name != "..", name != outputName else {
      throw ImageError.usage(path: destination, "cannot make a companion file named '\(name)'")
    }
    guard names.insert(name).inserted else {
      throw ImageError.usage(path: destination, "makes the companion file '\(name)' twice")
    }
    let path = directory.isEmpty ? name : directory + "/" + name
    let (_, existing) = try OutputFile.checkDestination(path)
    if let existing, existing.st_mode & S_IFMT == S_IFBLK {
      throw ImageError.usage(path: path, "is a block device; lacuna will not replace it with a file of \(destination)")
    }
    if let identity = FileIdentity.of(path: path), inputs.contains(identity) {
      throw ImageError.usage(
        path: path, "is an input of this conversion, and \(destination) would replace it; refusing to overwrite it")
    }
    let file = try OutputFile(creatingBeside: path)
    file.synchronizes = synchronizes
    made.append(file)
    return file
  }

  public func removeCommitted() {
    for file in made where file.isCommitted { unlink(file.finalPath) }
  }
}

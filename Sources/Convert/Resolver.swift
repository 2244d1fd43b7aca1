import DiskImage

/// The one place where names become images: the path the user gives, and every name an
/// image holds (backing files now; VMDK extent files and VHD/VHDX parent locators next).
/// It owns the rules: relative names resolve against the directory of the image that holds
/// them, names that are not plain file names are refused, chains deeper than `depthLimit`
/// are refused, and a loop is refused with the whole chain in the error. A policy for
/// untrusted images belongs here too.
public struct Resolver {
  /// How far names held by images are trusted.
  public enum Policy: Sendable {
    /// Names an image holds are followed, as qemu-img follows them.
    case trusted
    /// The image came from elsewhere: no file it names is opened (a backing file or
    /// extent named `/etc/shadow` is the classic attack). Only what the user named is read.
    case untrusted
  }

  public var registry: FormatRegistry
  /// The deepest chain followed; deeper ones are refused (a loop that evades the identity
  /// check, or a hostile image, must not exhaust file descriptors).
  public var depthLimit = 64
  public var policy = Policy.trusted
  /// `-U` (qemu-img's `--force-share`): read images without qemu's locks, even one a VM is
  /// writing (the copy may then be inconsistent).
  public var forceShare = false

  public init(registry: FormatRegistry) { self.registry = registry }

  /// Opens what `name` names for reading: a local file (or block device) today. An
  /// untrusted image is read only from a regular file.
  public func openSource(_ name: String) throws -> ByteSource {
    let file = try ImageFile.openForReading(name)
    if policy == .untrusted && file.isBlockDevice {
      throw ImageError.unsupported(path: name, "is a block device; an untrusted image is read only from a regular file")
    }
    if !forceShare { try file.lock(for: .reading) }
    return file
  }

  /// Opens the image the user named, as `format` or probed when nil.
  public func openImage(_ name: String, format: String?) throws -> ImageReader {
    // A format name that means nothing is the user's mistake whatever the file is.
    if let format { _ = try registry.format(named: format, for: name) }
    return try registry.open(try openSource(name), format: format)
  }

  /// The path a name held by the image at `referrer` stands for: absolute names stand,
  /// relative ones are taken from the directory of the image that holds them (as qemu
  /// does). Names that are not plain file names (URLs, `json:` specifications) are refused.
  public func resolve(_ name: String, heldBy referrer: String, what: String = "backing file") throws -> String {
    if policy == .untrusted {
      throw ImageError.unsupported(
        path: referrer, "names \(what) '\(name)'; an untrusted image may not make lacuna open other files")
    }
    if name.isEmpty {
      throw ImageError.invalid(path: referrer, "\(what) name is empty")
    }
    if name.hasPrefix("json:") || name.contains("://") {
      throw ImageError.unsupported(
        path: referrer, "\(what) '\(name)' is not a plain file name (URLs and json: are not supported)")
    }
    return Resolver.path(of: name, heldBy: referrer)
  }

  /// The path `name` stands for when the image at `referrer` holds it, without checks
  /// (for `info`, which prints what an image records).
  public static func path(of name: String, heldBy referrer: String) -> String {
    if name.hasPrefix("/") { return name }
    let directory = splitPath(referrer).directory
    return directory.isEmpty ? name : directory + "/" + name
  }

  /// Opens `name` and every backing file below it.
  ///
  /// - Parameters:
  ///   - format: `-f`; nil probes the top image by its magic.
  ///   - backingFormat: a format for the top image's backing file when the image does not
  ///     record one (images that do not record it are refused otherwise: probing a backing
  ///     file lets a guest's raw disk pose as qcow2).
  ///   - followBacking: false opens the top image alone.
  public func openChain(
    _ name: String, format: String?, backingFormat: String? = nil, followBacking: Bool = true
  ) throws -> Chain {
    let top = try openImage(name, format: format)
    return followBacking ? try openChain(above: top, name: name, backingFormat: backingFormat) : Chain(layers: [top])
  }

  /// Opens every backing file below `top`, an image opened from `name`.
  public func openChain(above top: ImageReader, name: String, backingFormat: String? = nil) throws -> Chain {
    var layers = [top]
    var names = [name]
    var seen: [FileIdentity: Int] = [:]
    if let identity = try layers[0].source.identity() { seen[identity] = 0 }
    while let reference = layers.last!.backing {
      let referrer = layers.last!
      if layers.count >= depthLimit {
        throw ImageError.invalid(
          path: name, "backing chain is deeper than \(depthLimit) layers (at \(referrer.path))")
      }
      let backingPath = try resolve(reference.name, heldBy: referrer.path)
      guard let format = reference.format ?? (layers.count == 1 ? backingFormat : nil) else {
        throw ImageError.usage(
          path: referrer.path,
          "backing file '\(reference.name)' has no recorded format; give it with -F (or record it: qemu-img rebase -u -F FMT)")
      }
      let source: ByteSource
      do {
        source = try openSource(backingPath)
      } catch let error as ImageError {
        if case .system(_, "open", let code) = error {
          throw ImageError.system(path: referrer.path, operation: "open backing file \(backingPath)", errno: code)
        }
        // Not the user's mistake but the image's: a backing file that is a directory or a
        // FIFO is a damaged chain (exit 1), not a usage error.
        if case .usage(let path, let message) = error {
          throw ImageError.invalid(path: referrer.path, "backing file \(path) \(message)")
        }
        throw error
      }
      if let identity = try source.identity() {
        if let earlier = seen[identity] {
          let loop = (names + [backingPath]).joined(separator: " -> ")
          throw ImageError.invalid(
            path: referrer.path,
            "backing file \(backingPath) loops back to \(names[earlier]), already in the chain (\(loop))")
        }
        seen[identity] = layers.count
      }
      do {
        layers.append(try registry.open(source, format: format))
      } catch ImageError.usage(_, let message) {
        throw ImageError.invalid(path: referrer.path, "backing file \(backingPath): \(message)")
      }
      names.append(backingPath)
    }
    return Chain(layers: layers)
  }
}

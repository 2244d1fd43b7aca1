import DiskImage

/// The one place where names become images: the path the user gives, and every name an
/// image holds (backing files now; VMDK extent files and VHD/VHDX parent locators next).
/// It owns the rules: relative names resolve against the directory of the image that holds
/// them, names that are not plain file names are refused, chains deeper than `depthLimit`
/// are refused, and a loop is refused with the whole chain in the error. A policy for
/// untrusted images belongs here too.
public struct Resolver: CompanionOpener {
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
  /// Storage reached by URIs (NBD exports), for names the user gives; nil reads files only.
  /// Names that images hold are never URIs (`resolve` refuses them).
  public var network: NetworkStorage?

  public init(registry: FormatRegistry) { self.registry = registry }

  /// True when `name` is a URI of the network storage rather than a path.
  public func isNetworkName(_ name: String) -> Bool { network?.handles(name) ?? false }

  /// Opens what `name` names for reading: a URI of the network storage, or a local file (or
  /// block device). An untrusted image is read only from a regular file or the URI the
  /// user gave.
  public func openSource(_ name: String) throws -> ByteSource {
    if let network, network.handles(name) { return try network.openSource(name) }
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
    return try registry.open(try openSource(name), format: format, companions: self)
  }

  /// Other files may be searched for what an image needs unless the image is untrusted.
  public func checkMaySearch(heldBy referrer: ByteSource, for what: String) throws {
    if policy == .untrusted {
      throw ImageError.unsupported(
        path: referrer.name, "needs other files searched for \(what); an untrusted image may not make lacuna open other files")
    }
  }

  /// Opens a file an image names as part of itself (a VMDK extent), by the same rules as a
  /// backing file: resolved against the image's directory, refused for an untrusted image,
  /// only regular files and block devices, and never the image itself.
  public func openCompanion(_ name: String, heldBy referrer: ByteSource, what: String) throws -> ByteSource {
    let path = try resolve(name, heldBy: referrer.name, what: what)
    let source: ByteSource
    do {
      source = try openSource(path)
    } catch let error as ImageError {
      if case .system(_, "open", let code) = error {
        throw ImageError.system(path: referrer.name, operation: "open \(what) \(path)", errno: code)
      }
      if case .usage(let path, let message) = error {
        throw ImageError.invalid(path: referrer.name, "\(what) \(path) \(message)")
      }
      throw error
    }
    if let identity = try source.identity(), try identity == referrer.identity() {
      throw ImageError.invalid(path: referrer.name, "names itself as \(what) '\(name)'")
    }
    return source
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

  /// Opens every backing file below `top`, an image opened from `name`. A problem with a
  /// backing file names the image the user gave and the chain down to the failing layer:
  /// `top.qcow2 -> a.qcow2: open backing file b.qcow2: No such file or directory`.
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
      let backingPath: String
      let source: ByteSource
      let layer: ImageReader
      do {
        backingPath = try resolve(reference.name, heldBy: referrer.path)
        guard let format = reference.format ?? (layers.count == 1 ? backingFormat : nil) else {
          throw ImageError.usage(
            path: referrer.path,
            "backing file '\(reference.name)' has no recorded format; give it with -F (or record it: qemu-img rebase -u -F FMT)")
        }
        source = try openBackingSource(backingPath, heldBy: referrer.path)
        if let identity = try source.identity(), seen[identity] != nil {
          throw ImageError.invalid(path: (names + [backingPath]).joined(separator: " -> "), "backing chain loops")
        }
        do {
          layer = try registry.open(source, format: format, companions: self)
        } catch ImageError.usage(_, let message) {
          throw ImageError.invalid(path: referrer.path, "backing file \(backingPath): \(message)")
        }
        try referrer.checkBacking(layer)
      } catch let error as ImageError {
        // Name the chain from the user's image down to the layer at fault.
        if error.path == referrer.path {
          throw names.count == 1 ? error : error.naming(names.joined(separator: " -> "))
        }
        if error.path.contains(" -> ") { throw error }
        throw error.naming((names + [error.path]).joined(separator: " -> "))
      }
      if let identity = try source.identity() { seen[identity] = layers.count }
      layers.append(layer)
      names.append(backingPath)
    }
    return Chain(layers: layers)
  }

  /// Opens a backing file; an open that fails, or a file that is not an image, is the
  /// referring image's problem (a damaged chain, exit 1), not a usage error.
  private func openBackingSource(_ path: String, heldBy referrer: String) throws -> ByteSource {
    do {
      return try openSource(path)
    } catch let error as ImageError {
      if case .system(_, "open", let code) = error {
        throw ImageError.system(path: referrer, operation: "open backing file \(path)", errno: code)
      }
      if case .usage(let path, let message) = error {
        throw ImageError.invalid(path: referrer, "backing file \(path) \(message)")
      }
      throw error
    }
  }
}

import DiskImage

/// A virtual disk as a stack of layers: `layers[0]` is the image the user named, each
/// next one the backing file of the one before.
public final class Chain {
  public let layers: [ImageReader]
  /// The deepest chain we follow; deeper ones are refused (a loop that evades the identity
  /// check, or a hostile image, must not exhaust file descriptors).
  public static let depthLimit = 64

  public var top: ImageReader { layers[0] }
  public var virtualSize: Int64 { top.virtualSize }

  public init(layers: [ImageReader]) {
    precondition(!layers.isEmpty)
    self.layers = layers
  }

  /// Opens `path` and every backing file below it.
  ///
  /// - Parameters:
  ///   - format: `-f`; nil probes the top image by its magic.
  ///   - backingFormat: a format to use for the top image's backing file when the image
  ///     does not record one (images that do not record it are refused otherwise: probing
  ///     a backing file lets a guest's raw disk pose as qcow2).
  ///   - followBacking: false opens the top image alone.
  public static func open(
    _ path: String, format: String?, registry: FormatRegistry,
    backingFormat: String? = nil, followBacking: Bool = true
  ) throws -> Chain {
    var layers = [try registry.open(path, format: format)]
    var seen: [FileIdentity: String] = [try layers[0].file.identity(): path]
    while followBacking, let reference = layers.last!.backing {
      let referrer = layers.last!
      if layers.count >= depthLimit {
        throw ImageError.invalid(
          path: path, "backing chain is deeper than \(depthLimit) layers (at \(referrer.path))")
      }
      try checkBackingName(reference.name, referrer: referrer.path)
      guard let format = reference.format ?? (layers.count == 1 ? backingFormat : nil) else {
        throw ImageError.usage(
          path: referrer.path,
          "backing file '\(reference.name)' has no recorded format; give it with -F (or record it: qemu-img rebase -u -F FMT)")
      }
      let backingPath = resolveBacking(reference.name, relativeTo: referrer.path)
      let reader: ImageReader
      do {
        reader = try registry.open(backingPath, format: format)
      } catch let error as ImageError {
        if case .system(_, "open", let code) = error {
          throw ImageError.system(path: referrer.path, operation: "open backing file \(backingPath)", errno: code)
        }
        throw error
      }
      let identity = try reader.file.identity()
      if let earlier = seen[identity] {
        throw ImageError.invalid(
          path: referrer.path, "backing file \(backingPath) loops back to \(earlier), already in the chain")
      }
      seen[identity] = backingPath
      layers.append(reader)
    }
    return Chain(layers: layers)
  }

  /// Backing names that are not plain file names (URLs, `json:` specifications) are refused.
  static func checkBackingName(_ name: String, referrer: String) throws {
    if name.isEmpty {
      throw ImageError.invalid(path: referrer, "backing file name is empty")
    }
    if name.hasPrefix("json:") || name.contains("://") {
      throw ImageError.unsupported(path: referrer, "backing file '\(name)' is not a plain file name (URLs and json: are not supported)")
    }
  }

  /// Resolves a backing name as qemu does: absolute names stand, relative ones are taken
  /// from the directory of the image that names them.
  public static func resolveBacking(_ name: String, relativeTo referrer: String) -> String {
    if name.hasPrefix("/") { return name }
    let directory = splitPath(referrer).directory
    return directory.isEmpty ? name : directory + "/" + name
  }

  /// The file identities of every layer, to refuse an output that is one of them.
  public func identities() throws -> Set<FileIdentity> {
    Set(try layers.map { try $0.file.identity() })
  }
}

import DiskImage

/// A virtual disk as a stack of layers: `layers[0]` is the image the user named, each
/// next one the backing file of the one before. `Resolver.openChain` opens one.
public final class Chain {
  public let layers: [ImageReader]

  public var top: ImageReader { layers[0] }
  public var virtualSize: Int64 { top.virtualSize }

  public init(layers: [ImageReader]) {
    precondition(!layers.isEmpty)
    self.layers = layers
  }

  /// The identities of the layers' files (and the companion files they read, such as VMDK
  /// extents) whose storage has one, to refuse an output that is one of them.
  public func identities() throws -> Set<FileIdentity> {
    Set(try layers.flatMap { [$0.source] + $0.companionSources }.compactMap { try $0.identity() })
  }
}

import DiskImage

/// What `create` asks for: a new, empty image, or an overlay on a backing file.
public struct CreationRequest {
  public var image: String
  public var format: String
  /// The virtual size; nil takes the backing file's.
  public var size: Int64?
  /// `-o`; the backing file is set from `backing`.
  public var writerOptions = WriterOptions()
  /// `-b`: the backing file to record, as it is to be recorded.
  public var backing: String?
  /// `-F`: its format; nil records the format it is found to have.
  public var backingFormat: String?

  public init(image: String, format: String, size: Int64?) {
    self.image = image
    self.format = format
    self.size = size
  }
}

/// Creates the image `request` describes: the backing file (if any) is opened through the
/// resolver, relative to the new image's directory; an image that is a file of that chain
/// is refused; the file appears only once complete. Returns the size and the backing file
/// recorded.
@discardableResult
public func createImage(
  _ request: CreationRequest, resolver: Resolver
) throws -> (virtualSize: Int64, backing: BackingReference?) {
  let format = try resolver.registry.format(named: request.format, for: request.image)
  guard let create = format.create else {
    throw ImageError.usage(path: request.image, "lacuna cannot create \(format.name) images")
  }
  _ = try OutputFile.checkDestination(request.image)
  var options = request.writerOptions
  var virtualSize = request.size
  var inputs = Set<FileIdentity>()
  if let backing = request.backing {
    try Conversion.requireBackingFile(format, path: request.image, registry: resolver.registry)
    let base = try resolver.openChain(Resolver.path(of: backing, heldBy: request.image), format: request.backingFormat)
    options.backing = BackingReference(name: backing, format: request.backingFormat ?? base.top.formatName)
    options.backingImage = base.top
    if virtualSize == nil { virtualSize = base.virtualSize }
    inputs = try base.identities()
    if let target = FileIdentity.of(path: request.image), inputs.contains(target) {
      throw ImageError.usage(
        path: request.image, "the new image is the same file as its backing chain; refusing to overwrite it")
    }
  }
  guard let size = virtualSize else {
    throw ImageError.usage(path: request.image, "give a size, or a backing file to take it from")
  }
  let target = try OutputFile(creatingBeside: request.image)
  options.companions = try OutputCompanions(destination: request.image, inputs: inputs, synchronizes: true)
  do {
    let writer = try create(target, size, options)
    try writer.finish()
  } catch {
    target.abandon()
    throw error
  }
  return (size, options.backing)
}

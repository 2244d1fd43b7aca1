import DiskImage

/// Reads a VMDK: the concatenation of the extents its descriptor lists. The descriptor is
/// either embedded in a single sparse file (monolithicSparse, streamOptimized: the file is
/// its own one extent) or a text file of its own whose extents are other files, opened
/// through a `CompanionOpener` (monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs). A delta
/// disk names its parent (`parentFileNameHint`); its unallocated grains are the parent's.
/// See README.md beside this file for the layout and every check.
public final class VMDKReader: ImageReader {
  public let source: ByteSource
  public var formatName: String { "vmdk" }
  public let virtualSize: Int64
  public let backing: BackingReference?
  public let clusterSize: Int?
  public let warnings: [String]
  public var companionSources: [ByteSource] { extentFiles }

  let descriptor: VMDKDescriptor
  /// The extents in disk order, each starting where the one before ends.
  let extents: [VMDKExtent]
  /// True when the descriptor is embedded in `source`, the only extent.
  let isSingleFile: Bool
  /// The distinct files the extents read (not `source` itself).
  private let extentFiles: [ByteSource]

  /// Opens a single-file sparse VMDK; a descriptor file needs `init(source:companions:)`.
  public convenience init(source: ByteSource) throws {
    try self.init(source: source, companions: NoCompanions())
  }

  /// Opens the VMDK in `source`, opening the files its descriptor names through `companions`.
  public init(source: ByteSource, companions: CompanionOpener) throws {
    self.source = source
    let path = source.name
    let head = try source.readBytes(count: Int(min(try source.size(), 1024)), at: 0, what: "the VMDK header")
    if head.starts(with: SparseExtentHeader.magic) {
      let sparse = try SparseExtentReader(source: source, needsDescriptor: true)
      let descriptor = try VMDKDescriptor.parse(try sparse.embeddedDescriptorBytes(), path: path)
      try Self.checkEmbedded(descriptor, capacity: sparse.layout.header.capacity, path: path)
      self.descriptor = descriptor
      extents = [VMDKExtent(line: descriptor.extents[0], start: 0, length: sparse.virtualSize, storage: .sparse(sparse))]
      isSingleFile = true
      extentFiles = []
      warnings = sparse.warnings
    } else if VMDKDescriptor.isDescriptorFile(head) {
      let size = try source.size()
      guard size <= VMDKDescriptor.maximumFileBytes else {
        throw ImageError.invalid(
          path: path, "the descriptor file is \(size) bytes, more than \(VMDKDescriptor.maximumFileBytes): it is not a VMDK descriptor")
      }
      let text = try source.readBytes(count: Int(size), at: 0, what: "the descriptor")
      let descriptor = try VMDKDescriptor.parse(text, path: path, embedded: false)
      try Self.checkDescriptorFile(descriptor, path: path)
      self.descriptor = descriptor
      (extents, extentFiles) = try Self.openExtents(descriptor, source: source, companions: companions)
      isSingleFile = false
      warnings = extents.flatMap { extent -> [String] in
        guard case .sparse(let reader) = extent.storage else { return [] }
        return reader.warnings.map { "extent file \(reader.path): \($0)" }
      }
    } else {
      throw ImageError.invalid(
        path: path, "the file is neither a VMDK sparse extent (magic KDMV) nor a descriptor file (\(VMDKDescriptor.signature))")
    }
    virtualSize = extents.last.map { $0.start + $0.length } ?? 0
    backing = try Self.parent(of: descriptor, path: path)
    let grainSizes = Set(extents.map { extent -> Int? in
      if case .sparse(let reader) = extent.storage { return reader.layout.grainBytes }
      return nil
    })
    clusterSize = grainSizes.count == 1 ? grainSizes.first! : nil
  }

  // MARK: - Checking the descriptor

  private static func requireHeaderKeys(_ descriptor: VMDKDescriptor, path: String, embedded: Bool) throws {
    let name = embedded ? "embedded descriptor" : "descriptor"
    guard descriptor.createType != nil else { throw ImageError.invalid(path: path, "the \(name) has no createType") }
    guard descriptor.parentContentID != nil, descriptor.contentID != nil else {
      throw ImageError.invalid(path: path, "the \(name) lacks a CID or a parentCID line")
    }
  }

  /// The descriptor of a single sparse file names that file as its one SPARSE extent.
  private static func checkEmbedded(_ descriptor: VMDKDescriptor, capacity: UInt64, path: String) throws {
    try requireHeaderKeys(descriptor, path: path, embedded: true)
    let createType = descriptor.createType!
    guard createType == "monolithicSparse" || createType == "streamOptimized" else {
      throw ImageError.unsupported(
        path: path,
        "VMDK createType \"\(createType)\" in a sparse file is not read (only monolithicSparse and streamOptimized)")
    }
    guard descriptor.extents.count <= 1 else {
      throw ImageError.unsupported(
        path: path, "the embedded descriptor names \(descriptor.extents.count) extents; a sparse file holds one")
    }
    guard let extent = descriptor.extents.first else {
      throw ImageError.invalid(path: path, "the embedded descriptor names no extent")
    }
    guard extent.type == "SPARSE" else {
      throw ImageError.unsupported(
        path: path, "the descriptor's extent is of type \(extent.type); only SPARSE is read in a single-file VMDK")
    }
    guard extent.sectors == capacity else {
      throw ImageError.invalid(
        path: path, "the descriptor's extent has \(extent.sectors) sectors, the header's capacity \(capacity)")
    }
  }

  /// createTypes whose extents are device-backed: not file images.
  static let deviceCreateTypes: Set<String> = [
    "vmfsRaw", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap", "fullDevice", "partitionedDevice",
  ]

  /// Checks a descriptor file's keys and every extent line before any file is opened, so a
  /// hostile descriptor is refused for what it says, not for what opening its files does.
  private static func checkDescriptorFile(_ descriptor: VMDKDescriptor, path: String) throws {
    try requireHeaderKeys(descriptor, path: path, embedded: false)
    let createType = descriptor.createType!
    if deviceCreateTypes.contains(createType) {
      throw ImageError.unsupported(path: path, "VMDK createType \"\(createType)\" is backed by a device, not files; it is not read")
    }
    guard !descriptor.extents.isEmpty else { throw ImageError.invalid(path: path, "the descriptor names no extent") }
    var total: UInt64 = 0
    for (index, line) in descriptor.extents.enumerated() {
      func refuse(_ message: String) -> ImageError {
        .invalid(path: path, "extent \(index + 1) (\(line.type) \(line.fileName.map { "\"\($0)\"" } ?? "")): \(message)")
      }
      guard line.access != "NOACCESS" else {
        throw ImageError.unsupported(path: path, "extent \(index + 1) is NOACCESS: its content may not be read")
      }
      guard line.sectors > 0 else { throw refuse("it has 0 sectors") }
      let (sum, overflow) = total.addingReportingOverflow(line.sectors)
      guard !overflow, sum <= UInt64(Int64.max / 512) else {
        throw ImageError.invalid(path: path, "the extents add up to more than 2^63 bytes: the sizes are absurd")
      }
      total = sum
      switch line.type {
      case "FLAT", "VMFS":
        guard line.fileName != nil else { throw refuse("it names no file") }
        if line.type == "VMFS", let offset = line.offset, offset != 0 {
          throw refuse("a VMFS extent has no offset, this one says \(offset)")
        }
        guard (line.offset ?? 0) <= UInt64(Int64.max / 512) - line.sectors else { throw refuse("its offset is absurd") }
      case "SPARSE":
        guard line.fileName != nil else { throw refuse("it names no file") }
        guard (line.offset ?? 0) == 0 else { throw refuse("a SPARSE extent has no offset, this one says \(line.offset!)") }
      case "ZERO":
        guard line.fileName == nil else { throw refuse("a ZERO extent names no file") }
      case "VMFSSPARSE", "SESPARSE":
        throw ImageError.unsupported(path: path, "extent \(index + 1) is \(line.type) (an ESX snapshot file), which is not read")
      case "VMFSRDM", "VMFSRAW":
        throw ImageError.unsupported(path: path, "extent \(index + 1) is \(line.type), a device, which is not read")
      default:
        throw ImageError.unsupported(path: path, "extent \(index + 1) has type \(line.type.prefix(40)), which is not read")
      }
      if let name = line.fileName {
        guard !name.isEmpty else { throw refuse("its file name is empty") }
        guard !name.hasPrefix("/") else {
          throw refuse("its file name is absolute; extent files are named relative to the descriptor")
        }
      }
    }
  }

  /// Opens every extent's file (each distinct name once) and checks it against its line.
  private static func openExtents(
    _ descriptor: VMDKDescriptor, source: ByteSource, companions: CompanionOpener
  ) throws -> (extents: [VMDKExtent], files: [ByteSource]) {
    let path = source.name
    var opened: [String: ByteSource] = [:]
    var files: [ByteSource] = []
    var sparseReaders: [String: SparseExtentReader] = [:]
    var extents: [VMDKExtent] = []
    var start: Int64 = 0
    for (index, line) in descriptor.extents.enumerated() {
      let length = Int64(line.sectors) * 512
      var file: ByteSource?
      if let name = line.fileName {
        if let known = opened[name] {
          file = known
        } else {
          let companion = try companions.openCompanion(name, heldBy: source, what: "extent file")
          opened[name] = companion
          files.append(companion)
          file = companion
        }
      }
      let storage: VMDKExtent.Storage
      switch line.type {
      case "ZERO":
        storage = .zero
      case "SPARSE":
        let name = line.fileName!
        let reader: SparseExtentReader
        if let known = sparseReaders[name] {
          reader = known
        } else {
          reader = try inExtentFile(file!, of: path) { try SparseExtentReader(source: file!, needsDescriptor: false) }
          sparseReaders[name] = reader
        }
        guard reader.layout.header.capacity == line.sectors else {
          throw ImageError.invalid(
            path: path,
            "extent \(index + 1) has \(line.sectors) sectors, but its extent file \(file!.name) has a capacity of \(reader.layout.header.capacity)")
        }
        storage = .sparse(reader)
      default:
        let offset = Int64(line.offset ?? 0) * 512
        let fileSize = try file!.size()
        guard fileSize - offset >= length else {
          throw ImageError.invalid(
            path: path,
            "extent file \(file!.name) is \(fileSize) bytes, shorter than extent \(index + 1) (\(length) bytes from byte \(offset))")
        }
        storage = .flat(file!, offset: offset)
      }
      extents.append(VMDKExtent(line: line, start: start, length: length, storage: storage))
      start += length
    }
    return (extents, files)
  }

  /// Runs `body` on an extent file, naming the descriptor in its errors: a damaged extent
  /// is the disk's problem, and the user named the descriptor.
  static func inExtentFile<T>(_ file: ByteSource, of descriptorPath: String, _ body: () throws -> T) throws -> T {
    do {
      return try body()
    } catch let error as ImageError {
      guard error.path != descriptorPath else { throw error }
      switch error {
      case .system(_, let operation, let code):
        throw ImageError.system(path: descriptorPath, operation: "extent file \(error.path): \(operation)", errno: code)
      case .unsupported(_, let message):
        throw ImageError.unsupported(path: descriptorPath, "extent file \(error.path): \(message)")
      default:
        throw ImageError.invalid(path: descriptorPath, "extent file \(error.path): \(error.description.dropFirst(error.path.count + 2))")
      }
    }
  }

  /// The parent a delta disk names: parentCID other than ffffffff and a parentFileNameHint.
  private static func parent(of descriptor: VMDKDescriptor, path: String) throws -> BackingReference? {
    let parentCID = descriptor.parentContentID ?? VMDKDescriptor.noParent
    switch (parentCID == VMDKDescriptor.noParent, descriptor.parentFileNameHint) {
    case (true, nil):
      return nil
    case (false, let hint?):
      guard !hint.isEmpty else { throw ImageError.invalid(path: path, "the descriptor's parentFileNameHint is empty") }
      return BackingReference(name: hint, format: "vmdk")
    case (true, let hint?):
      throw ImageError.invalid(
        path: path, "the descriptor names a parent (\"\(hint.prefix(200))\") but its parentCID is ffffffff (no parent)")
    case (false, nil):
      throw ImageError.invalid(
        path: path, "the descriptor's parentCID is \(hexCID(parentCID)) (a delta disk) but it names no parentFileNameHint")
    }
  }

  static func hexCID(_ cid: UInt32) -> String {
    let digits = String(cid, radix: 16)
    return String(repeating: "0", count: 8 - digits.count) + digits
  }

  /// The parent must be the VMDK this delta disk was made from: its CID is the parentCID
  /// recorded here. A parent written since has a new CID, and its disk is no longer the one
  /// this delta's grains were written over.
  public func checkBacking(_ parent: ImageReader) throws {
    guard let parent = parent as? VMDKReader else {
      throw ImageError.invalid(path: path, "the parent \(parent.path) is a \(parent.formatName) image, not a VMDK")
    }
    let expected = descriptor.parentContentID ?? VMDKDescriptor.noParent
    let found = parent.descriptor.contentID ?? 0
    guard found == expected else {
      throw ImageError.invalid(
        path: path,
        "the parent \(parent.path) has CID \(Self.hexCID(found)), but this delta disk's parentCID is \(Self.hexCID(expected)): the parent changed after the delta was made, or is another disk")
    }
  }

  /// `format-specific.data` as qemu-img 7.2 prints it, key for key.
  public var formatSpecific: [(String, InfoValue)] {
    let entries: [InfoValue] = extents.map { extent in
      var fields: [(String, InfoValue)] = []
      switch extent.storage {
      case .sparse(let reader):
        if reader.layout.header.isCompressed { fields.append(("compressed", .bool(true))) }
        fields += [
          ("virtual-size", .integer(extent.length)),
          ("filename", .string(reader.path)),
          ("cluster-size", .integer(Int64(reader.layout.grainBytes))),
          ("format", .string(isSingleFile ? "" : extent.line.type)),
        ]
      case .flat(let file, _):
        fields += [
          ("virtual-size", .integer(extent.length)), ("filename", .string(file.name)),
          ("format", .string(extent.line.type)),
        ]
      case .zero:
        fields += [("virtual-size", .integer(extent.length)), ("format", .string(extent.line.type))]
      }
      return .object(fields)
    }
    return [
      ("cid", .integer(Int64(descriptor.contentID ?? 0))),
      ("parent-cid", .integer(Int64(descriptor.parentContentID ?? VMDKDescriptor.noParent))),
      ("create-type", .string(descriptor.createType ?? "")),
      ("extents", .array(entries)),
    ]
  }

  // MARK: - Map and reads, by extent

  /// The index of the extent holding virtual offset `offset` (inside the disk).
  private func extentIndex(at offset: Int64) -> Int {
    var low = 0
    var high = extents.count - 1
    while low < high {
      let middle = (low + high + 1) / 2
      if extents[middle].start <= offset { low = middle } else { high = middle - 1 }
    }
    return low
  }

  /// Runs `body` on extent `extent`, naming the descriptor in errors from its file.
  private func inExtent<T>(_ extent: VMDKExtent, _ body: () throws -> T) throws -> T {
    guard let file = extent.file, !isSingleFile else { return try body() }
    return try Self.inExtentFile(file, of: path, body)
  }

  /// Answers from the one extent holding `range.lowerBound`: the work of one answer is that
  /// of one extent's (itself bounded); callers loop over the rest.
  public func extents(in range: Range<Int64>) throws -> [Extent] {
    let range = range.clamped(to: 0..<virtualSize)
    guard !range.isEmpty else { return [] }
    let extent = extents[extentIndex(at: range.lowerBound)]
    let local = range.clamped(to: extent.range)
    let answer = try inExtent(extent) {
      try extent.extents(in: local.lowerBound - extent.start..<local.upperBound - extent.start)
    }
    return answer.map {
      Extent($0.range.lowerBound + extent.start..<$0.range.upperBound + extent.start, $0.kind, hostOffset: $0.hostOffset,
        isHostHole: $0.isHostHole)
    }
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
    try checkInside(buffer.count, at: offset)
    var done = 0
    while done < buffer.count {
      let position = offset + Int64(done)
      let extent = extents[extentIndex(at: position)]
      let count = Int(min(Int64(buffer.count - done), extent.range.upperBound - position))
      let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + count])
      try inExtent(extent) { try extent.read(into: piece, at: position - extent.start) }
      done += count
    }
  }
}

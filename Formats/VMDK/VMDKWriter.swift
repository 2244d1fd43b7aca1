import DiskImage

/// Writes a VMDK of any subformat but streamOptimized (`VMDKStreamWriter`): one hosted
/// sparse file that embeds its descriptor (monolithicSparse), or a descriptor file and its
/// extent files (monolithicFlat `NAME-flat.vmdk`, twoGbMaxExtentSparse `NAME-s001.vmdk`...,
/// twoGbMaxExtentFlat `NAME-f001.vmdk`..., each at most 2 GiB), named and laid out as
/// qemu-img makes them. See README.md beside this file, "Writing".
///
/// Extent files are made through `WriterOptions.companions` as the engine reaches them, and
/// finished (their tables written) once it has passed them; `finish` commits them all, then
/// the descriptor. Until then none of them is visible; on any failure every one is taken
/// back, committed or not.
public final class VMDKWriter: ImageWriter {
  /// Where an extent's bytes go.
  enum Storage {
    case sparse(SparseExtentWriter)
    case flat(ByteTarget)

    var target: ByteTarget {
      switch self {
      case .sparse(let writer): return writer.target
      case .flat(let target): return target
      }
    }
  }

  /// An extent of the disk: where it lies, its file, and its storage once made.
  final class Extent {
    let start: Int64
    let length: Int64
    let fileName: String
    var storage: Storage?
    var finished = false
    init(start: Int64, length: Int64, fileName: String) {
      self.start = start
      self.length = length
      self.fileName = fileName
    }
  }

  let main: ByteTarget
  let settings: VMDKWriterSettings
  /// The virtual size rounded up to a sector, as qemu records it.
  let virtualSize: Int64
  let descriptor: VMDKDescriptorText
  let hasParent: Bool
  private let companions: CompanionTargets?
  private let extents: [Extent]
  /// The extent the last call went to; extents before it are finished.
  private var current = 0

  /// Makes the writer `VMDK.format.create` asks for: this one, or the streamOptimized one.
  static func create(target: ByteTarget, virtualSize: Int64, options: WriterOptions) throws -> ImageWriter {
    let settings = try VMDKWriterSettings(options, path: target.name)
    if settings.subformat == .streamOptimized {
      return try VMDKStreamWriter(target: target, virtualSize: virtualSize, settings: settings, options: options)
    }
    return try VMDKWriter(target: target, virtualSize: virtualSize, settings: settings, options: options)
  }

  init(target: ByteTarget, virtualSize requested: Int64, settings: VMDKWriterSettings, options: WriterOptions) throws {
    main = target
    self.settings = settings
    companions = options.companions
    let outputName = Self.outputName(target: target, companions: companions)
    let (size, planned) = try Self.plan(
      target: target, virtualSize: requested, settings: settings, options: options, outputName: outputName)
    virtualSize = size
    let hasParent = options.backing != nil
    self.hasParent = hasParent
    let subformat = settings.subformat
    let extents: [Extent]
    if subformat == .monolithicSparse {
      extents = [Extent(start: 0, length: size, fileName: outputName)]
    } else {
      extents = Self.extentFiles(subformat, virtualSize: size, outputName: outputName).map {
        Extent(start: $0.start, length: $0.length, fileName: $0.name)
      }
    }
    self.extents = extents
    var descriptor = planned
    descriptor.extents = extents.map { (UInt64($0.length / 512), subformat.isFlat ? "FLAT" : "SPARSE", $0.fileName) }
    self.descriptor = descriptor
    descriptorBytes = Array(descriptor.text.utf8)
    if subformat == .monolithicSparse {
      extents[0].storage = .sparse(
        try SparseExtentWriter(
          target: target, length: size, zeroedGrain: settings.zeroedGrain, hasParent: hasParent,
          descriptor: descriptorBytes))
    }
  }

  /// The descriptor as written: embedded, or the whole main file.
  private let descriptorBytes: [UInt8]

  public var granularity: Int { settings.subformat.isFlat ? 512 : VMDKWriterGeometry.grainBytes }

  /// The output's file name without its directory, which names the extent files.
  static func outputName(target: ByteTarget, companions: CompanionTargets?) -> String {
    if let companions { return companions.outputName }
    return String(target.name.split(separator: "/").last ?? "disk.vmdk")
  }

  /// The extent files of a multi-file subformat, named as qemu-img names them: the output's
  /// name cut at its last dot, `-flat`, `-sNNN` or `-fNNN`, then what followed the dot.
  static func extentFiles(
    _ subformat: VMDKSubformat, virtualSize: Int64, outputName: String
  ) -> [(start: Int64, length: Int64, name: String)] {
    let dot = outputName.lastIndex(of: ".")
    let prefix = dot.map { String(outputName[..<$0]) } ?? outputName
    let suffix = dot.map { String(outputName[$0...]) } ?? ""
    if subformat == .monolithicFlat { return [(0, virtualSize, prefix + "-flat" + suffix)] }
    let letter = subformat == .twoGbMaxExtentFlat ? "f" : "s"
    var result: [(Int64, Int64, String)] = []
    var start: Int64 = 0
    repeat {
      let length = min(VMDKWriterGeometry.splitExtentBytes, virtualSize - start)
      let number = String(result.count + 1)
      let padded = String(repeating: "0", count: max(0, 3 - number.count)) + number
      result.append((start, length, "\(prefix)-\(letter)\(padded)\(suffix)"))
      start += length
    } while start < virtualSize
    return result
  }

  /// Checks the size and the parent, and fills in the descriptor all writers share.
  static func plan(
    target: ByteTarget, virtualSize requested: Int64, settings: VMDKWriterSettings, options: WriterOptions,
    outputName: String
  ) throws -> (virtualSize: Int64, descriptor: VMDKDescriptorText) {
    let path = target.name
    // A sparse extent of capacity 0 is taken by qemu for a descriptor, and an extent line
    // of 0 sectors is refused by readers: a VMDK of 0 bytes cannot be read back.
    guard requested > 0 else {
      throw ImageError.usage(path: path, "virtual size \(requested): a VMDK must hold at least one sector (qemu-img cannot open an empty one)")
    }
    // A sparse extent's grain directory may have 32 Mi entries (qemu's limit, and the
    // reader's): 1 PiB. Split images are read back with at most 1024 extents: 2 TiB.
    let limit: Int64 = settings.subformat.isSplit ? 1024 * VMDKWriterGeometry.splitExtentBytes : 1 << 50
    guard requested <= limit else {
      throw ImageError.usage(
        path: path,
        "virtual size \(requested) is larger than a \(settings.subformat.rawValue) VMDK can hold (at most \(limit) bytes)")
    }
    let virtualSize = (requested + 511) / 512 * 512
    var descriptor = VMDKDescriptorText(
      contentID: VMDKDescriptorText.randomContentID(), createType: settings.subformat.rawValue, extents: [],
      hardwareVersion: settings.hardwareVersion, adapterType: settings.adapterType, toolsVersion: settings.toolsVersion,
      diskBytes: virtualSize)
    if let backing = options.backing {
      if let format = backing.format, format != "vmdk" {
        throw ImageError.usage(path: path, "the backing file of a VMDK must be a VMDK (-F vmdk), not \(format)")
      }
      guard let parent = options.backingImage else {
        throw ImageError.usage(path: path, "the backing file \(backing.name) was not opened, so its CID is unknown")
      }
      guard let vmdkParent = parent as? VMDKReader else {
        throw ImageError.usage(
          path: path, "the backing file \(backing.name) is a \(parent.formatName) image; a VMDK's parent must be a VMDK")
      }
      guard parent.virtualSize == virtualSize else {
        throw ImageError.usage(
          path: path,
          "a VMDK delta disk has its parent's size: \(backing.name) is \(parent.virtualSize) bytes, the output \(virtualSize)")
      }
      guard !backing.name.isEmpty, !backing.name.contains("\""), !backing.name.unicodeScalars.contains(where: { $0.value < 0x20 })
      else {
        throw ImageError.usage(
          path: path, "the backing file name cannot be recorded in a VMDK descriptor (it is empty, or holds a quote or a control character)")
      }
      descriptor.parentContentID = vmdkParent.descriptor.contentID ?? 0
      descriptor.parentFileNameHint = backing.name
    }
    return (virtualSize, descriptor)
  }

  // MARK: - The engine's calls

  public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
    guard offset >= 0, offset + Int64(bytes.count) <= virtualSize else {
      throw ImageError.invalid(
        path: main.name, "write of \(bytes.count) bytes at \(hex(offset)) is outside the virtual disk (size \(virtualSize))")
    }
    var done = 0
    while done < bytes.count {
      let position = offset + Int64(done)
      let extent = try reach(position)
      let count = Int(min(Int64(bytes.count - done), extent.start + extent.length - position))
      let piece = UnsafeRawBufferPointer(rebasing: bytes[done..<done + count])
      switch extent.storage! {
      case .sparse(let writer): try writer.write(piece, at: position - extent.start)
      case .flat(let target): try target.write(piece, at: position - extent.start)
      }
      done += count
    }
  }

  public func writeZeroes(_ range: Range<Int64>) throws {
    // Flat extents are new sparse files, and unallocated grains read as zero: only a
    // parent needs zeros stored.
    guard hasParent else { return }
    var position = range.lowerBound
    while position < range.upperBound {
      let extent = try reach(position)
      let end = min(range.upperBound, extent.start + extent.length)
      if case .sparse(let writer) = extent.storage! {
        try writer.writeZeroes(position - extent.start..<end - extent.start)
      }
      position = end
    }
  }

  public func finish() throws {
    do {
      _ = try reach(virtualSize)
      try finishExtents(before: extents.count)
      for extent in extents where extent.storage!.target !== main { try extent.storage!.target.commit() }
      if !settings.subformat.isSingleFile {
        try descriptorBytes.withUnsafeBytes { try main.write($0, at: 0) }
      }
      try main.commit()
    } catch {
      abandon()
      throw error
    }
  }

  public func abandon() {
    main.abandon()
    for extent in extents { extent.storage?.target.abandon() }
    companions?.removeCommitted()
  }

  // MARK: - Extents

  /// The extent holding `offset` (the last one for the disk's end), with every extent up
  /// to it made and every one before it finished: the engine moves forward only.
  private func reach(_ offset: Int64) throws -> Extent {
    var index = current
    while index + 1 < extents.count && extents[index + 1].start <= offset { index += 1 }
    while index > 0 && extents[index].start > offset { index -= 1 }
    for made in 0...index where extents[made].storage == nil { try makeStorage(extents[made]) }
    if index > current {
      try finishExtents(before: index)
      current = index
    }
    return extents[index]
  }

  private func makeStorage(_ extent: Extent) throws {
    guard let companions else {
      throw ImageError.usage(path: main.name, "a \(settings.subformat.rawValue) image needs files beside it, which cannot be made here")
    }
    let target = try companions.create(named: extent.fileName)
    if settings.subformat.isFlat {
      extent.storage = .flat(target)
      try target.truncate(to: extent.length)
    } else {
      extent.storage = .sparse(
        try SparseExtentWriter(
          target: target, length: extent.length, zeroedGrain: settings.zeroedGrain, hasParent: hasParent,
          descriptor: nil))
    }
  }

  /// Writes the metadata of every extent before `index` not yet finished.
  private func finishExtents(before index: Int) throws {
    for extent in extents[..<index] where !extent.finished {
      if case .sparse(let writer) = extent.storage! { try writer.finish() }
      extent.finished = true
    }
  }
}

extension VMDKWriter: FullyAllocatedLength {
  /// With every grain data: each sparse extent is its overhead (header, descriptor, both
  /// directories and all their tables) and then every grain, as `SparseExtentWriter` appends
  /// them; a flat extent is as long as its part of the disk; a separate descriptor file adds
  /// its text.
  public var fullyAllocatedLength: Int64 {
    var total = settings.subformat.isSingleFile ? 0 : Int64(descriptorBytes.count)
    for extent in extents {
      if settings.subformat.isFlat {
        total += extent.length
      } else {
        let sectors = UInt64(extent.length / 512)
        let grains = (sectors + VMDKWriterGeometry.grainSectors - 1) / VMDKWriterGeometry.grainSectors
        let layout = HostedSparseLayout(capacity: sectors)
        total += Int64(layout.overHead + grains * VMDKWriterGeometry.grainSectors) * 512
      }
    }
    return total
  }
}

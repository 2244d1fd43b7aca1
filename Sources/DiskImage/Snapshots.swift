/// One internal snapshot as `info` lists it: qemu's `SnapshotInfo` (qapi/block-core.json),
/// which qemu-img prints for every format that keeps snapshots inside the image (qcow2).
public struct SnapshotInfo: Sendable, Equatable {
  /// The unique id ("1", "2", ...), as the image stores it.
  public var id: String
  /// The name (`qemu-img snapshot -c NAME`), as the image stores it.
  public var name: String
  /// Bytes of saved VM state (RAM, devices); 0 for a disk-only snapshot.
  public var vmStateSize: Int64
  /// When the snapshot was taken: seconds since the Epoch and the nanoseconds beyond them.
  public var dateSeconds: Int64
  public var dateNanoseconds: Int64
  /// How long the guest had run when the snapshot was taken, in nanoseconds.
  public var vmClockNanoseconds: UInt64
  /// The record/replay instruction count, when the image records one.
  public var icount: Int64?

  public init(
    id: String, name: String, vmStateSize: Int64, dateSeconds: Int64, dateNanoseconds: Int64,
    vmClockNanoseconds: UInt64, icount: Int64?
  ) {
    self.id = id
    self.name = name
    self.vmStateSize = vmStateSize
    self.dateSeconds = dateSeconds
    self.dateNanoseconds = dateNanoseconds
    self.vmClockNanoseconds = vmClockNanoseconds
    self.icount = icount
  }
}

/// Which internal snapshot to read, as qemu-img's `convert -l` names it. Names and ids
/// are compared byte for byte, as qemu compares them.
public enum SnapshotSelector: Sendable, Equatable, CustomStringConvertible {
  /// `-l snapshot.id=ID`.
  case id(String)
  /// `-l snapshot.name=NAME`.
  case name(String)
  /// `-l snapshot.id=ID,snapshot.name=NAME`: both must match one snapshot.
  case idAndName(id: String, name: String)
  /// `-l ID_OR_NAME` (and the old `-s`): the snapshot with that id, else the first with that name.
  case idOrName(String)

  /// Says which snapshot was asked for, for messages: `id '1'`, `name 'before-upgrade'`.
  public var description: String {
    switch self {
    case .id(let id): return "id '\(id)'"
    case .name(let name): return "name '\(name)'"
    case .idAndName(let id, let name): return "id '\(id)' and name '\(name)'"
    case .idOrName(let text): return "id or name '\(text)'"
    }
  }

  /// The index in `snapshots` of the one this selects, by qemu's rules: the first match;
  /// for `idOrName`, a match by id wins over one by name.
  public func index(in snapshots: [SnapshotInfo]) -> Int? {
    func same(_ a: String, _ b: String) -> Bool { a.utf8.elementsEqual(b.utf8) }
    switch self {
    case .id(let id): return snapshots.firstIndex { same($0.id, id) }
    case .name(let name): return snapshots.firstIndex { same($0.name, name) }
    case .idAndName(let id, let name): return snapshots.firstIndex { same($0.id, id) && same($0.name, name) }
    case .idOrName(let text):
      return snapshots.firstIndex { same($0.id, text) } ?? snapshots.firstIndex { same($0.name, text) }
    }
  }
}

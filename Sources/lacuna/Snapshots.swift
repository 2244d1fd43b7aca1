import ArgumentParser
import DiskImage
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// Internal snapshots on the command line: `-l`/`-s` as qemu-img takes them, and the
/// listing `info` prints.
enum SnapshotOption {
  /// Parses qemu-img's `-l`: `snapshot.id=ID`, `snapshot.name=NAME`, both joined by a comma
  /// (`,,` is a literal comma; a key given twice counts the last time), or anything else as
  /// an id or a name (qemu's shorthand: the snapshot with that id, else the one with that
  /// name). `-s NAME` (the form qemu-img 7.2 no longer has) means the shorthand.
  static func parse(list: [String], old: String?) throws -> SnapshotSelector? {
    if !list.isEmpty && old != nil {
      throw ValidationError("give the snapshot with -l or with -s, not both")
    }
    if let old { return .idOrName(old) }
    // qemu-img takes the last -l given.
    guard let text = list.last else { return nil }
    guard text.hasPrefix("snapshot.") else { return .idOrName(text) }
    var id: String?
    var name: String?
    for part in text.replacing(",,", with: "\u{0}").split(separator: ",", omittingEmptySubsequences: false) {
      let item = String(part.replacing("\u{0}", with: ","))
      guard let equals = item.firstIndex(of: "=") else {
        throw ValidationError("-l '\(text)': '\(item)' is not snapshot.id=ID or snapshot.name=NAME")
      }
      let value = String(item[item.index(after: equals)...])
      switch item[..<equals] {
      case "snapshot.id": id = value
      case "snapshot.name": name = value
      default:
        throw ValidationError("-l '\(text)': unknown parameter '\(item[..<equals])' (snapshot.id and snapshot.name exist)")
      }
    }
    switch (id, name) {
    case let (id?, name?): return .idAndName(id: id, name: name)
    case let (id?, nil): return .id(id)
    case let (nil, name?): return .name(name)
    case (nil, nil): return nil  // not reached: the text starts with "snapshot."
    }
  }

  /// The `snapshots` list of qemu-img's `info --output=json`, each object's keys in the
  /// order qemu-img 7.2 prints them (its dictionary's order, not the schema's).
  static func json(_ snapshots: [SnapshotInfo]) -> InfoValue {
    .array(
      snapshots.map { snapshot in
        var fields: [(String, InfoValue)] = []
        if let icount = snapshot.icount { fields.append(("icount", .integer(icount))) }
        let clock = snapshot.vmClockNanoseconds
        fields += [
          ("vm-clock-nsec", .integer(Int64(clock % 1_000_000_000))),
          ("name", .string(snapshot.name)),
          ("date-sec", .integer(snapshot.dateSeconds)),
          ("date-nsec", .integer(snapshot.dateNanoseconds)),
          ("vm-clock-sec", .integer(Int64(clock / 1_000_000_000))),
          ("id", .string(snapshot.id)),
          ("vm-state-size", .integer(snapshot.vmStateSize)),
        ]
        return .object(fields)
      })
  }

  /// The "Snapshot list:" block of qemu-img's human `info`, line by line: columns of
  /// 10, 17, 8, 20, 13 and 11 characters, counted in bytes as C's printf counts them; the
  /// date in local time (TZ), the VM clock as hours:minutes:seconds.milliseconds.
  static func humanLines(_ snapshots: [SnapshotInfo]) -> [String] {
    var lines = [
      "Snapshot list:",
      padRight("ID", 10) + padRight("TAG", 17) + padLeft("VM SIZE", 8) + padLeft("DATE", 20)
        + padLeft("VM CLOCK", 13) + padLeft("ICOUNT", 11),
    ]
    for snapshot in snapshots {
      let seconds = snapshot.vmClockNanoseconds / 1_000_000_000
      let milliseconds = snapshot.vmClockNanoseconds / 1_000_000 % 1000
      // qemu prints each part as a C int.
      func part(_ value: UInt64) -> Int32 { Int32(truncatingIfNeeded: value) }
      let clock = cFormat(
        "%02d:%02d:%02d.%03d", part(seconds / 3600), part(seconds / 60 % 60), part(seconds % 60),
        part(milliseconds))
      lines.append(
        padRight(snapshot.id, 9) + " " + padRight(snapshot.name, 16) + " "
          + padLeft(humanSize(snapshot.vmStateSize), 8) + padLeft(localDate(snapshot.dateSeconds), 20)
          + padLeft(clock, 13) + padLeft(snapshot.icount.map { String($0) } ?? "", 11))
    }
    return lines
  }

  /// `seconds` since the Epoch as "YYYY-MM-DD HH:MM:SS" in the local time zone.
  static func localDate(_ seconds: Int64) -> String {
    var time = time_t(seconds)
    var parts = tm()
    guard localtime_r(&time, &parts) != nil else { return String(seconds) }
    var buffer = [CChar](repeating: 0, count: 64)
    let count = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S", &parts)
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  /// `text` padded with spaces to `width` bytes (printf's `%-Ns`); longer text stays whole.
  private static func padRight(_ text: String, _ width: Int) -> String {
    text + String(repeating: " ", count: max(0, width - text.utf8.count))
  }

  /// `text` padded on the left to `width` bytes (printf's `%Ns`).
  private static func padLeft(_ text: String, _ width: Int) -> String {
    String(repeating: " ", count: max(0, width - text.utf8.count)) + text
  }
}

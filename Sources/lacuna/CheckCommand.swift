import ArgumentParser
import Convert
import DiskImage
import FoundationEssentials
import QCOW2
import VDI

#if canImport(Glibc)
  import Glibc
#endif

struct CheckCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "check",
    abstract: "Check a qcow2 or VDI image's tables (and qcow2 refcounts), as qemu-img check does, without writing.",
    discussion: """
      Every cluster the image references (header, L1 and L2 tables, data and compressed \
      clusters, snapshots, bitmaps, refcount structures) is counted and compared with the \
      stored refcounts; the copied flags of the active tables are checked too. Findings go to \
      standard error in qemu-img's words; the summary and JSON fields are qemu-img's.

      Exit status: 0 no problem, 2 corruptions, 3 only leaked clusters, 1 the check could not \
      be completed (or the image does not open), 63 a format that has no check.

      The image is opened read-only and never changed: there is no -r. To repair, write a \
      fresh image with exact refcounts: `lacuna convert -O qcow2 damaged.qcow2 repaired.qcow2` \
      (internal snapshots and bitmaps are not carried over; damaged tables make convert \
      refuse the image, naming the entry).

      qcow2 and VDI are checked (qemu-img also checks VHDX and VMDK). The backing file is \
      not opened: a top layer whose backing file is missing is still checked. Memory follows \
      the host file (one byte per cluster of the file), never the virtual size.

      Examples:
        lacuna check disk.qcow2
        lacuna check --output=json -U running-vm.qcow2
      """)

  @Option(name: .customShort("f"), help: "The image's format; probed from its magic when omitted.")
  var format: String?

  @Option(name: .customLong("output"), help: "human or json.")
  var output: OutputFormat = .human

  @Flag(name: .customShort("q"), help: "Quiet: print nothing, answer with the exit status only.")
  var quiet = false

  @Option(name: .customShort("r"), help: .hidden)
  var repair: String?

  @OptionGroup var access: ImageAccess

  @Argument(help: "The image.")
  var image: String

  /// qemu-img's exit status for a format it has no check for.
  static let noCheckStatus: Int32 = 63

  func validate() throws {
    if repair != nil {
      throw ValidationError(
        "repair (-r) is not offered: lacuna check only reads. Write a fresh image with exact refcounts instead: lacuna convert -O qcow2 \(image) NEW.qcow2"
      )
    }
  }

  func run() throws {
    let source = try access.resolver.openSource(image)
    let imageFormat = try registry.format(of: source, named: format)
    let report: (String, Bool) -> Void = { line, named in
      if !quiet { fputs((named ? "lacuna: " : "") + escapingControlCharacters(line) + "\n", stderr) }
    }
    let result: QCOW2CheckResult
    switch imageFormat.name {
    case "qcow2":
      result = try QCOW2Checker.check(source, report: report)
    case "vdi":
      // qemu's VDI check has corruptions only: no leaks, no allocation figures.
      var counts = QCOW2CheckResult()
      counts.corruptions = try VDIChecker.check(source) { report($0, false) }.corruptions
      result = counts
    default:
      // qemu-img has no check for raw, vpc or the stream either; it does check VHDX and
      // VMDK, which lacuna does not yet.
      let qemuChecks = ["vhdx", "vmdk"].contains(imageFormat.name)
      throw CommandFailure(
        message: qemuChecks
          ? "This image format does not support checks (lacuna checks qcow2 and vdi; qemu-img check reads \(imageFormat.name))"
          : "This image format does not support checks",
        status: Self.noCheckStatus)
    }
    if let failure = result.failure {
      // qemu-img prints no summary for a check that did not complete.
      throw CommandFailure(message: "Check failed: \(failure)")
    }
    if !quiet {
      switch output {
      case .human: fputs(humanReport(result), stdout)
      case .json: print(renderJSON(jsonReport(result, format: imageFormat.name)))
      }
    }
    fflush(stdout)
    if result.checkErrors > 0 { throw CommandFailure(message: "Check failed") }
    // qemu-img's statuses; main's error path would print a message for them.
    if result.corruptions > 0 { Glibc.exit(2) }
    if result.leaks > 0 { Glibc.exit(3) }
  }

  /// qemu-img's human summary, line for line.
  func humanReport(_ result: QCOW2CheckResult) -> String {
    var text = ""
    if result.corruptions == 0 && result.leaks == 0 && result.checkErrors == 0 {
      text += "No errors were found on the image.\n"
    } else {
      if result.corruptions > 0 {
        text += "\n\(result.corruptions) errors were found on the image.\n"
        text += "Data may be corrupted, or further writes to the image may corrupt it.\n"
      }
      if result.leaks > 0 {
        text += "\n\(result.leaks) leaked clusters were found on the image.\n"
        text += "This means waste of disk space, but no harm to data.\n"
      }
      if result.checkErrors > 0 {
        text += "\n\(result.checkErrors) internal errors have occurred during the check.\n"
      }
    }
    if result.totalClusters != 0 && result.allocatedClusters != 0 {
      let allocated = Double(result.allocatedClusters)
      text += "\(result.allocatedClusters)/\(result.totalClusters) = "
        + cFormat("%0.2f", allocated * 100 / Double(result.totalClusters)) + "% allocated, "
        + cFormat("%0.2f", Double(result.fragmentedClusters) * 100 / allocated) + "% fragmented, "
        + cFormat("%0.2f", Double(result.compressedClusters) * 100 / allocated) + "% compressed clusters\n"
    }
    if result.imageEndOffset != 0 { text += "Image end offset: \(result.imageEndOffset)\n" }
    return text
  }

  /// qemu-img's JSON, its keys in its order; counts of zero are left out, as qemu leaves them.
  func jsonReport(_ result: QCOW2CheckResult, format: String) -> InfoValue {
    var fields: [(String, InfoValue)] = []
    func add(_ key: String, _ value: Int64) { if value != 0 { fields.append((key, .integer(value))) } }
    add("image-end-offset", result.imageEndOffset)
    add("compressed-clusters", result.compressedClusters)
    add("total-clusters", result.totalClusters)
    add("corruptions", Int64(result.corruptions))
    fields.append(("check-errors", .integer(Int64(result.checkErrors))))
    add("leaks", Int64(result.leaks))
    add("allocated-clusters", result.allocatedClusters)
    fields.append(("filename", .string(image)))
    fields.append(("format", .string(format)))
    add("fragmented-clusters", result.fragmentedClusters)
    return .object(fields)
  }
}

// The quick parser: the plain forms of `lacuna convert`, `info` and `map`, read without
// reflection.
//
// swift-argument-parser builds its picture of a command by reflecting on it (Mirror,
// dynamic casts, generic metadata made at run time); for `convert` that takes 2-4 ms,
// more than a conversion of a 1 GiB file that the file system clones, and as much as
// `info` or `map` of a small image takes in all. This parser reads only what it is sure
// of: known option names, each value in the next argument or after `--name=`, flags
// alone, and the images. For anything else (--help, --version, an unknown or repeated
// option, combined short flags, `--`, a value that starts with `-`, a value the option
// does not take, or settings that fail validation) it gives up and swift-argument-parser
// parses the whole command line as before, so the messages, help, completion scripts and
// exit statuses are its own. QuickParseTests holds the two parsers to the same result.

/// One option the quick parser knows: its spellings, and how it changes the settings.
struct QuickOption<Settings> {
  enum Action {
    /// Sets a value; says false when the value is not one the option takes.
    case value((inout Settings, String) -> Bool)
    case flag((inout Settings) -> Void)
  }

  var names: [String]
  var action: Action
  /// May be given more than once (each value is added).
  var repeats = false

  var takesValue: Bool {
    if case .value = action { true } else { false }
  }

  static func value(_ names: String..., repeats: Bool = false, set: @escaping (inout Settings, String) -> Bool) -> Self {
    QuickOption(names: names, action: .value(set), repeats: repeats)
  }

  static func flag(_ names: String..., set: @escaping (inout Settings) -> Void) -> Self {
    QuickOption(names: names, action: .flag(set))
  }
}

enum QuickParse {
  /// The settings `arguments` (without the verb) ask for, or nil where the quick parser is
  /// not sure of them. `make` builds the settings from the positional arguments.
  static func parse<Settings>(
    _ arguments: ArraySlice<String>, options: [QuickOption<Settings>], positionals: Int,
    make: ([String]) -> Settings
  ) -> Settings? {
    var given: [(option: Int, value: String?)] = []
    var seen = Set<Int>()
    var images: [String] = []
    var index = arguments.startIndex
    while index < arguments.endIndex {
      let argument = arguments[index]
      index += 1
      guard argument.hasPrefix("-") && argument != "-" else {
        images.append(argument)
        continue
      }
      var name = argument
      var inline: String?
      if argument.hasPrefix("--"), let equals = argument.firstIndex(of: "=") {
        name = String(argument[..<equals])
        inline = String(argument[argument.index(after: equals)...])
      }
      guard let option = options.firstIndex(where: { $0.names.contains(name) }) else { return nil }
      guard seen.insert(option).inserted || options[option].repeats else { return nil }
      guard options[option].takesValue else {
        guard inline == nil else { return nil }
        given.append((option, nil))
        continue
      }
      if let inline {
        given.append((option, inline))
        continue
      }
      guard index < arguments.endIndex, !arguments[index].hasPrefix("-") else { return nil }
      given.append((option, arguments[index]))
      index += 1
    }
    guard images.count == positionals else { return nil }
    var settings = make(images)
    for (option, value) in given {
      switch options[option].action {
      case .value(let set): guard let value, set(&settings, value) else { return nil }
      case .flag(let set): set(&settings)
      }
    }
    return settings
  }

  /// What main runs when the quick parser is sure of the command line, else nil.
  static func command(_ arguments: ArraySlice<String>) -> (() throws -> Void)? {
    switch arguments.first {
    case "convert": ConvertSettings.quick(arguments.dropFirst())?.run
    case "info": InfoSettings.quick(arguments.dropFirst())?.run
    case "map": MapSettings.quick(arguments.dropFirst())?.run
    default: nil
    }
  }
}

/// The settings of a verb that reads images: `-U` and `--untrusted` set `access`.
protocol ReadsImages {
  var access: AccessSettings { get set }
}

extension ReadsImages {
  /// `-U`/`--force-share` and `--untrusted` (ImageAccess).
  static var accessOptions: [QuickOption<Self>] {
    [
      .flag("-U", "--force-share") { $0.access.forceShare = true },
      .flag("--untrusted") { $0.access.untrusted = true },
    ]
  }
}

extension OutputFormat {
  /// `--output human|json`, for the quick tables.
  static func option<Settings>(set: @escaping (inout Settings, OutputFormat) -> Void) -> QuickOption<Settings> {
    .value("--output") {
      guard let format = OutputFormat(rawValue: $1) else { return false }
      set(&$0, format)
      return true
    }
  }
}

extension InfoSettings: ReadsImages {
  static func quick(_ arguments: ArraySlice<String>) -> InfoSettings? {
    QuickParse.parse(arguments, options: quickOptions, positionals: 1) { InfoSettings(image: $0[0]) }
  }

  /// Every option InfoCommand declares (QuickParseTests checks that none is missing).
  static let quickOptions: [QuickOption<InfoSettings>] =
    [
      .value("-f") { $0.format = $1; return true },
      OutputFormat.option { $0.output = $1 },
      .flag("--backing-chain") { $0.backingChain = true },
    ] + accessOptions
}

extension MapSettings: ReadsImages {
  static func quick(_ arguments: ArraySlice<String>) -> MapSettings? {
    QuickParse.parse(arguments, options: quickOptions, positionals: 1) { MapSettings(image: $0[0]) }
  }

  /// Every option MapCommand declares (QuickParseTests checks that none is missing).
  static let quickOptions: [QuickOption<MapSettings>] =
    [
      .value("-f") { $0.format = $1; return true },
      OutputFormat.option { $0.output = $1 },
      .value("--start-offset") { $0.startOffset = $1; return true },
      .value("--max-length") { $0.maxLength = $1; return true },
    ] + accessOptions
}

extension ConvertSettings: ReadsImages {
  /// The settings `arguments` (after `convert`) ask for, validated; nil where the quick
  /// parser is not sure of them or they are not valid (swift-argument-parser then says why).
  static func quick(_ arguments: ArraySlice<String>) -> ConvertSettings? {
    let settings = QuickParse.parse(arguments, options: quickOptions, positionals: 2) {
      ConvertSettings(source: $0[0], destination: $0[1])
    }
    guard let settings, (try? settings.validate()) != nil else { return nil }
    return settings
  }

  /// Every option ConvertCommand declares (QuickParseTests checks that none is missing).
  static let quickOptions: [QuickOption<ConvertSettings>] =
    [
      .value("-f") { $0.sourceFormat = $1; return true },
      .value("-l", repeats: true) { $0.snapshotOptions.append($1); return true },
      .value("-s") { $0.oldSnapshot = $1; return true },
      .value("-O") { $0.outputFormat = $1; return true },
      .value("-o", repeats: true) { $0.options.append($1); return true },
      .value("-S") { $0.sparseSize = $1; return true },
      .flag("-c") { $0.compress = true },
      .value("-B") { $0.backing = $1; return true },
      .value("-F") { $0.backingFormat = $1; return true },
      .value("--source-backing-format") { $0.sourceBackingFormat = $1; return true },
      .flag("-n") { $0.inPlace = true },
      .flag("--target-is-zero") { $0.targetIsZero = true },
      .value("-m") {
        guard let threads = Int($1) else { return false }
        $0.threads = threads
        return true
      },
      .flag("-W") { $0.outOfOrder = true },
      .value("-t") {
        guard let mode = CacheMode(rawValue: $1) else { return false }
        $0.cacheMode = mode
        return true
      },
      .flag("-p") { $0.progress = true },
      .value("--progress") {
        guard let format = ProgressFormat(rawValue: $1) else { return false }
        $0.progressFormat = format
        return true
      },
      .flag("-q") { $0.quiet = true },
      .flag("--summary") { $0.summary = true },
      .value("--copy-mode") {
        guard let mode = CopyModeOption(rawValue: $1) else { return false }
        $0.copyMode = mode
        return true
      },
    ] + accessOptions
}

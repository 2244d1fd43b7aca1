import CZlib
import CZstd

/// The compression libraries this build is linked against, as they report themselves at
/// run time (not the headers it was compiled with): what `lacuna --version` shows.
public enum CompressionLibraries {
  /// zlib's version, e.g. "1.2.13".
  public static var zlibVersion: String { String(cString: zlibVersion_()) }
  /// zstd's version, e.g. "1.5.4".
  public static var zstdVersion: String { String(cString: ZSTD_versionString()) }
}

/// zlib's `zlibVersion()`, under a name the static property above does not shadow.
private func zlibVersion_() -> UnsafePointer<CChar> { CZlib.zlibVersion() }

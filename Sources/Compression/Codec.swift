/// The compression methods a qcow2 image can use for its compressed clusters
/// (header field `compression_type`: 0 zlib, 1 zstd).
public enum CompressionType: String, Sendable, CaseIterable {
  case zlib
  case zstd

  /// The value of the qcow2 header field `compression_type`.
  public var qcow2Code: UInt8 {
    switch self {
    case .zlib: return 0
    case .zstd: return 1
    }
  }

  /// The type a qcow2 `compression_type` value names, or nil for an unknown value.
  public init?(qcow2Code: UInt8) {
    switch qcow2Code {
    case 0: self = .zlib
    case 1: self = .zstd
    default: return nil
    }
  }
}

/// Why a block did not compress or decompress. The message is one line; the caller adds
/// where the block came from.
public struct CompressionError: Error, CustomStringConvertible, Equatable {
  public var message: String
  public init(_ message: String) { self.message = message }
  public var description: String { message }
}

/// Compresses and decompresses whole blocks (a qcow2 cluster) with one method.
///
/// An instance keeps its library context between calls, because making one costs far more
/// than compressing a cluster. An instance is not thread-safe: keep one per thread, or hand
/// instances out from a pool.
public protocol Codec: AnyObject {
  var type: CompressionType { get }

  /// Decompresses `input` into `output`, which must come out exactly full.
  ///
  /// `input` may run past the end of the compressed stream (a qcow2 compressed cluster's
  /// length is only known to 512-byte sectors); what follows the stream is ignored.
  /// Decompression never writes past `output`: a stream that would produce more is an
  /// error, and so is one that ends before `output` is full.
  func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws

  /// Compresses `input` into one self-contained stream. Returns nil when the result would
  /// not be smaller than `input` (the caller then stores the block uncompressed).
  func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]?
}

/// Makes a codec of `type` with its own library context, compressing at `level` (nil: the
/// type's default, `defaultLevel`).
public func makeCodec(_ type: CompressionType, level: Int32? = nil) throws -> Codec {
  switch type {
  case .zlib: return try ZlibCodec(level: level ?? ZlibCodec.defaultLevel)
  case .zstd: return try ZstdCodec(level: level ?? ZstdCodec.defaultLevel)
  }
}

extension CompressionType {
  /// The compression levels the library takes for qcow2 clusters: zlib 1-9, zstd 1-19
  /// (zstd's 20-22 need a window larger than a cluster and gain nothing on one).
  public var levels: ClosedRange<Int32> {
    switch self {
    case .zlib: return 1...9
    case .zstd: return 1...19
    }
  }

  /// The level used when none is asked for.
  public var defaultLevel: Int32 {
    switch self {
    case .zlib: return ZlibCodec.defaultLevel
    case .zstd: return ZstdCodec.defaultLevel
    }
  }
}

extension Codec {
  /// Decompresses `input` into a new array of exactly `outputSize` bytes.
  public func decompress(_ input: [UInt8], outputSize: Int) throws -> [UInt8] {
    var output = [UInt8](repeating: 0, count: outputSize)
    try input.withUnsafeBytes { source in
      try output.withUnsafeMutableBytes { try decompress(source, into: $0) }
    }
    return output
  }

  /// Compresses `input`; nil when that would not make it smaller.
  public func compress(_ input: [UInt8]) throws -> [UInt8]? {
    try input.withUnsafeBytes { try compress($0) }
  }
}

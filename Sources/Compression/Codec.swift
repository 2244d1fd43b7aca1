// Placeholder; the codecs land with the qcow2 reader.
public enum CompressionType: String, Sendable { case zlib, zstd }

// swift-tools-version:5.9
import PackageDescription

// Layout: Sources/ holds the shared core, compression, the engine and the CLI; Formats/
// holds one target per disk-image format. A format depends on DiskImage (and Compression)
// only, never on another format or on Convert.
let package = Package(
  name: "lacuna",
  platforms: [.macOS(.v13)],
  products: [
    .executable(name: "lacuna", targets: ["lacuna"]),
    // lacuna as a Swift library (Sources/LacunaKit): open, map, convert with progress and
    // cancellation. The CLI is built on it.
    .library(name: "LacunaKit", targets: ["LacunaKit"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
  ],
  targets: [
    .target(name: "CLacunaSys", path: "Sources/CLacunaSys"),
    .systemLibrary(
      name: "CZlib", path: "Sources/CZlib", providers: [.apt(["zlib1g-dev"])]),
    .systemLibrary(
      name: "CZstd", path: "Sources/CZstd", providers: [.apt(["libzstd-dev"])]),
    // libnbd's header (libnbd-dev) at build time; libnbd.so.0 itself is loaded when an NBD URI
    // is first used (Sources/CLibNBD/include/CLibNBD.h says why).
    .target(name: "CLibNBD", path: "Sources/CLibNBD", linkerSettings: [.linkedLibrary("dl")]),
    .target(name: "DiskImage", dependencies: ["CLacunaSys"], path: "Sources/DiskImage"),
    .target(name: "Compression", dependencies: ["DiskImage", "CZlib", "CZstd"], path: "Sources/Compression"),
    .target(name: "Raw", dependencies: ["DiskImage"], path: "Formats/Raw", exclude: ["README.md"]),
    .target(
      name: "QCOW2", dependencies: ["DiskImage", "Compression"], path: "Formats/QCOW2",
      exclude: ["README.md"]),
    .target(name: "Convert", dependencies: ["DiskImage"], path: "Sources/Convert"),
    // NBD exports as byte sources and targets, through Debian's libnbd.
    .target(name: "NBD", dependencies: ["DiskImage", "CLibNBD"], path: "Sources/NBD"),
    .target(name: "Stream", dependencies: ["DiskImage", "CZlib"], path: "Formats/Stream", exclude: ["README.md"]),
    .target(name: "VHD", dependencies: ["DiskImage"], path: "Formats/VHD", exclude: ["README.md"]),
    .target(name: "VMDK", dependencies: ["DiskImage", "Compression"], path: "Formats/VMDK", exclude: ["README.md"]),
    .target(name: "VDI", dependencies: ["DiskImage"], path: "Formats/VDI", exclude: ["README.md"]),
    .target(name: "VHDX", dependencies: ["DiskImage"], path: "Formats/VHDX", exclude: ["README.md"]),
    .target(
      name: "LacunaKit",
      dependencies: ["DiskImage", "Convert", "NBD", "Raw", "QCOW2", "Stream", "VHD", "VMDK", "VDI", "VHDX"],
      path: "Sources/LacunaKit"),
    .executableTarget(
      name: "lacuna",
      dependencies: [
        "LacunaKit", "CLacunaSys", "DiskImage", "Compression", "Convert", "NBD", "Raw", "QCOW2", "Stream", "VHD", "VMDK", "VDI", "VHDX",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      path: "Sources/lacuna"),
    // The fuzz harness (Fuzz/, script/fuzz). Every build links it as a replayer of inputs,
    // so it cannot rot; script/fuzz builds it with -DFUZZING and libFuzzer.
    .executableTarget(
      name: "lacuna-fuzz", dependencies: ["DiskImage", "QCOW2", "Raw", "Stream", "VHD", "VMDK", "VDI", "VHDX"],
      path: "Fuzz"),
    // Helpers shared by the test targets: running programs, qemu, temporary folders, fixtures.
    .target(name: "TestSupport", dependencies: ["DiskImage"], path: "Tests/TestSupport"),
    .testTarget(name: "DiskImageTests", dependencies: ["DiskImage", "Raw", "TestSupport"], path: "Tests/DiskImageTests"),
    .testTarget(name: "CompressionTests", dependencies: ["Compression", "TestSupport"], path: "Tests/CompressionTests"),
    .testTarget(name: "QCOW2Tests", dependencies: ["QCOW2", "DiskImage", "TestSupport"], path: "Tests/QCOW2Tests"),
    .testTarget(
      name: "QCOW2WriterTests", dependencies: ["QCOW2", "DiskImage", "Convert", "Raw", "TestSupport"],
      path: "Tests/QCOW2WriterTests"),
    .testTarget(
      name: "ConvertTests", dependencies: ["Convert", "DiskImage", "Raw", "QCOW2", "TestSupport"],
      path: "Tests/ConvertTests"),
    .testTarget(
      name: "ConformanceTests", dependencies: ["DiskImage", "Raw", "QCOW2", "Stream", "Convert", "TestSupport"],
      path: "Tests/ConformanceTests"),
    // Only LacunaKit's public API: what a Swift app that manages VMs sees.
    .testTarget(name: "LacunaKitTests", dependencies: ["LacunaKit"], path: "Tests/LacunaKitTests"),
    .testTarget(name: "LacunaTests", dependencies: ["lacuna", "TestSupport"], path: "Tests/LacunaTests"),
    .testTarget(name: "VHDTests", dependencies: ["VHD", "DiskImage", "TestSupport", "lacuna"], path: "Tests/VHDTests"),
    .testTarget(name: "VMDKTests", dependencies: ["VMDK", "DiskImage", "lacuna", "TestSupport"], path: "Tests/VMDKTests"),
    .testTarget(name: "VDITests", dependencies: ["VDI", "DiskImage", "lacuna", "TestSupport"], path: "Tests/VDITests"),
    .testTarget(name: "VHDXTests", dependencies: ["VHDX", "DiskImage", "lacuna", "TestSupport"], path: "Tests/VHDXTests"),
    .testTarget(name: "NBDTests", dependencies: ["lacuna", "TestSupport"], path: "Tests/NBDTests"),
    .testTarget(
      name: "StreamTests", dependencies: ["Stream", "DiskImage", "Convert", "Raw", "CZlib", "TestSupport"],
      path: "Tests/StreamTests"),
  ]
)

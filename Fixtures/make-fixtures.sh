#!/bin/sh
# Remakes every fixture image in this folder with qemu-img and qemu-io (qemu 7.2 was used).
# Contents are fixed patterns (qemu-io write -P), so the virtual disks come out the same on
# every run. Run from anywhere: ./Fixtures/make-fixtures.sh
# See README.md for what each image holds.
set -eu
cd "$(dirname "$0")"

io() { qemu-io "$@" >/dev/null; }
create() { qemu-img create -q "$@"; }

rm -f ./*.img ./*.qcow2

# A sparse raw file: 256 KiB, data at 0 and 128 KiB + 4 KiB, holes elsewhere.
create -f raw raw-sparse.img 256K
io -f raw -c 'write -P 0x11 0 16k' -c 'write -P 0x22 135168 8k' raw-sparse.img

# Version 2 (compat 0.10), 4 KiB clusters, two L2 tables (4 MiB virtual).
create -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 4M
io -c 'write -P 0x21 0 8k' -c 'write -P 0x22 100k 3k' -c 'write -P 0x23 3M 12k' v2.qcow2

# Version 3 with qemu's default 64 KiB clusters.
create -f qcow2 -o compat=1.1 v3-64k.qcow2 4M
io -c 'write -P 0x31 0 64k' -c 'write -P 0x32 200k 10k' -c 'write -P 0x33 3M 64k' v3-64k.qcow2

# Version 3, 512-byte clusters (the smallest), an L2 table spans only 32 KiB.
create -f qcow2 -o cluster_size=512 cluster-512.qcow2 1M
io -c 'write -P 0x51 0 1536' -c 'write -P 0x52 33000 700' -c 'write -P 0x53 700k 64k' cluster-512.qcow2

# Zero clusters (v3): one over allocated data (keeps its host cluster), one over an
# unallocated cluster (no host cluster), and one partial write of zeros into data.
create -f qcow2 -o cluster_size=4096 zero-clusters.qcow2 1M
io -c 'write -P 0x61 0 32k' -c 'write -z 8k 8k' -c 'write -z 64k 16k' -c 'write -z 20k 1k' \
  -c 'write -P 0x62 512k 4k' zero-clusters.qcow2

# Compressed clusters (zlib), mixed with plain ones; the compressed data of later clusters
# starts inside a sector, not on its boundary.
create -f qcow2 -o cluster_size=4096 compressed-zlib.qcow2 1M
io -c 'write -c -P 0x71 0 4k' -c 'write -c -P 0x72 4k 4k' -c 'write -P 0x73 8k 4k' \
  -c 'write -c -P 0x74 64k 4k' -c 'write -c -P 0x75 1020k 4k' compressed-zlib.qcow2

# The same with zstd (incompatible bit 3 and compression_type 1).
create -f qcow2 -o cluster_size=4096,compression_type=zstd compressed-zstd.qcow2 1M
io -c 'write -c -P 0x81 0 4k' -c 'write -c -P 0x82 4k 4k' -c 'write -P 0x83 8k 4k' \
  -c 'write -c -P 0x84 64k 4k' -c 'write -c -P 0x85 1020k 4k' compressed-zstd.qcow2

# A whole image converted with -c (qemu-img's own compressed writer), 64 KiB clusters.
qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=65536 v3-64k.qcow2 convert-c.qcow2

# Extended L2 entries: 16 KiB clusters in 32 subclusters of 512 bytes; partial writes
# leave allocated, zero and unallocated subclusters in one cluster.
create -f qcow2 -o cluster_size=16384,extended_l2=on extended-l2.qcow2 1M
io -c 'write -P 0x91 1k 1k' -c 'write -P 0x92 4000 200' -c 'write -z 8k 1k' \
  -c 'write -P 0x93 32k 16k' -c 'write -z 64k 16k' -c 'write -P 0x94 100k 1k' extended-l2.qcow2

# Lazy refcounts (compatible bit 0), closed cleanly.
create -f qcow2 -o cluster_size=4096,lazy_refcounts=on lazy-refcounts.qcow2 1M
io -c 'write -P 0xa1 0 12k' lazy-refcounts.qcow2

# Lazy refcounts left dirty (incompatible bit 0): qemu-io aborts before closing.
create -f qcow2 -o cluster_size=4096,lazy_refcounts=on dirty.qcow2 1M
sh -c "qemu-io -c 'write -P 0xa2 4k 8k' -c abort dirty.qcow2; true" >/dev/null 2>&1

# An internal snapshot, then data changed after it: the active L1 shows the new data.
create -f qcow2 -o cluster_size=4096 snapshot.qcow2 1M
io -c 'write -P 0xb1 0 16k' -c 'write -P 0xb2 64k 4k' snapshot.qcow2
qemu-img snapshot -c before snapshot.qcow2
io -c 'write -P 0xb3 4k 4k' -c 'write -P 0xb4 128k 4k' -c 'write -z 64k 4k' snapshot.qcow2

# A 2-layer chain; the overlay records its backing by a relative name and its format.
create -f qcow2 -o cluster_size=4096 chain-base.qcow2 2M
io -c 'write -P 0xc1 0 128k' -c 'write -P 0xc4 1536k 8k' chain-base.qcow2
create -f qcow2 -o cluster_size=4096 -b chain-base.qcow2 -F qcow2 chain-top.qcow2 2M
io -c 'write -P 0xc2 4k 4k' -c 'write -z 64k 8k' -c 'write -P 0xc3 1536k 4k' chain-top.qcow2

# An overlay over the raw file above.
create -f qcow2 -o cluster_size=4096 -b raw-sparse.img -F raw raw-backed.qcow2 1M
io -c 'write -P 0xd1 8k 4k' raw-backed.qcow2

# A backing file shorter (1 MiB) than its overlay (3 MiB).
create -f qcow2 -o cluster_size=4096 short-base.qcow2 1M
io -c 'write -P 0xe1 0 8k' -c 'write -P 0xe3 1020k 4k' short-base.qcow2
create -f qcow2 -o cluster_size=4096 -b short-base.qcow2 -F qcow2 short-backed.qcow2 3M
io -c 'write -P 0xe2 2M 4k' short-backed.qcow2

# A persistent dirty bitmap (bitmaps extension, autoclear bit 0).
create -f qcow2 -o cluster_size=4096 bitmap.qcow2 1M
io -c 'write -P 0xf1 0 4k' bitmap.qcow2
qemu-img bitmap --add -g 65536 bitmap.qcow2 tracked
io -c 'write -P 0xf2 8k 4k' bitmap.qcow2

# The raw file as a sparse stream, made by lacuna itself (the fuzzer's seed for the stream
# reader); left as it is when lacuna is not built.
if [ -x ../.build/debug/lacuna ]; then
  rm -f raw-sparse.stream
  ../.build/debug/lacuna convert -O stream raw-sparse.img raw-sparse.stream
fi

ls -l ./*.img ./*.qcow2 ./*.stream

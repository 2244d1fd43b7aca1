#!/bin/sh
# Remakes the two small VDI fixtures (vdi-*.vdi), the fuzzer's seeds for the VDI reader.
# qemu-img writes VDIs with 1 MiB blocks only, so a qemu-made image holding any data is
# over 1 MiB. These start from qemu-img's header and are then given 4 KiB blocks (which
# VirtualBox makes with its AllocationBlockSize setting), a block map and data blocks by
# hand, field by field, so each file stays a few KiB. qemu-img refuses them for their block
# size; Tests/VDITests/FixtureTests.swift checks what lacuna reads from them.
# Run from anywhere: ./Fixtures/make-vdi-fixtures.sh  (needs qemu-img, dd, tr, head)
# See README.md for what each image holds.
set -eu
cd "$(dirname "$0")"

# le32 FILE OFFSET VALUE: writes VALUE as a little-endian u32 at OFFSET.
le32() {
  bytes=$(printf '\\%03o\\%03o\\%03o\\%03o' $(($3 & 255)) $(($3 >> 8 & 255)) $(($3 >> 16 & 255)) $(($3 >> 24 & 255)))
  # shellcheck disable=SC2059
  printf "$bytes" | dd of="$1" bs=1 seek=$(($2)) conv=notrunc status=none
}

# fill FILE OFFSET COUNT BYTE: writes COUNT bytes of BYTE (octal, as tr takes it) at OFFSET.
fill() {
  head -c "$3" /dev/zero | tr '\0' "\\$4" | dd of="$1" bs=1 seek=$(($2)) conv=notrunc status=none
}

rm -f vdi-*.vdi

# Header fields (offsets in the file): 0x154 block map offset, 0x158 data offset,
# 0x170 disk size (u64), 0x178 block size, 0x180 blocks, 0x184 blocks allocated.

# Dynamic, 1 MiB disk in 256 blocks of 4 KiB; map at 0x200 (1 KiB), data at 0x600.
# Data blocks in allocation order, not virtual order: virtual block 2 is data block 0
# (0x42), block 0 is data block 1 (0x41), block 255 (the last) is data block 2 (0x43 in
# its first 2 KiB). Block 5 is a zero block (0xfffffffe); every other block is free.
f=vdi-dynamic.vdi
qemu-img create -q -f vdi "$f" 1M
fill "$f" 512 1024 377
le32 "$f" 0x158 0x600
le32 "$f" 0x178 4096
le32 "$f" 0x180 256
le32 "$f" 0x184 3
le32 "$f" $((0x200 + 0 * 4)) 1
le32 "$f" $((0x200 + 2 * 4)) 0
le32 "$f" $((0x200 + 5 * 4)) 0xfffffffe
le32 "$f" $((0x200 + 255 * 4)) 2
fill "$f" $((0x600 + 0 * 4096)) 4096 102
fill "$f" $((0x600 + 1 * 4096)) 4096 101
fill "$f" $((0x600 + 2 * 4096)) 2048 103
truncate -s $((0x600 + 3 * 4096)) "$f"

# Fixed (type 2, as qemu-img's static=on writes it), 16 KiB disk in 4 blocks of 4 KiB,
# every block allocated in virtual order; map at 0x200 (16 bytes), data at 0x400.
# Block 1 holds 0x51, block 3 holds 0x52 in its last 512 bytes; the rest is zeros.
f=vdi-fixed.vdi
qemu-img create -q -f vdi -o static=on "$f" 16K
truncate -s 0 "$f.tmp" && head -c 1024 "$f" > "$f.tmp" && mv "$f.tmp" "$f"
le32 "$f" 0x178 4096
le32 "$f" 0x180 4
le32 "$f" 0x184 4
for i in 0 1 2 3; do le32 "$f" $((0x200 + i * 4)) "$i"; done
truncate -s $((0x400 + 4 * 4096)) "$f"
fill "$f" $((0x400 + 1 * 4096)) 4096 121
fill "$f" $((0x400 + 3 * 4096 + 3584)) 512 122

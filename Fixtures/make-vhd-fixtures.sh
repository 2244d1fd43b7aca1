#!/bin/sh
# Remakes the VHD (qemu: vpc) fixtures in this folder with qemu-img and qemu-io (qemu 7.2
# was used): seeds for the fuzzer's vpc reader (`lacuna-fuzz vpc Fixtures/vhd-*.vhd`).
# Contents are fixed patterns, but every VHD records a random unique id and a timestamp,
# so the files differ from run to run in those bytes (and their checksums).
# Run from anywhere: ./Fixtures/make-vhd-fixtures.sh. See README.md (VHD section).
set -eu
cd "$(dirname "$0")"

io() { qemu-io -f vpc "$@" >/dev/null; }
create() { qemu-img create -q -f vpc "$@"; }

rm -f ./vhd-*.vhd

# Dynamic, 1 MiB asked (CHS-rounded to 1079296 bytes): footer copy, dynamic header, a BAT
# with its one entry unallocated, footer. qemu's blocks are always 2 MiB, so one write
# would make the file over 2 MiB: the fixture stays empty.
create vhd-dynamic-empty.vhd 1M

# Fixed, 64 KiB asked (CHS-rounded to 69632 bytes, geometry 2/4/17): data, then the footer.
create -o subformat=fixed vhd-fixed.vhd 64K
io -c 'write -P 0x71 0 4k' -c 'write -P 0x72 40k 2k' vhd-fixed.vhd

# Fixed with force_size=on: creator "qem2", geometry 65535/16/255, the size is exactly
# 32 KiB (current size, no CHS rounding).
create -o subformat=fixed,force_size=on vhd-fixed-force-size.vhd 32K
io -c 'write -P 0x73 512 1k' vhd-fixed-force-size.vhd

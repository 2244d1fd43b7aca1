#!/bin/sh
# Remakes the VMDK fixtures (vmdk-*.vmdk) with qemu-img and qemu-io (qemu 7.2 was used):
# small single-file disks, the fuzzer's seeds for the VMDK reader. Contents are fixed
# patterns; the CID in each descriptor is random, so the files differ from run to run only
# there. Run from anywhere: ./Fixtures/make-vmdk-fixtures.sh
# See the VMDK section of README.md for what each image holds.
set -eu
cd "$(dirname "$0")"

io() { qemu-io "$@" >/dev/null; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rm -f ./vmdk-*.vmdk

# monolithicSparse, 1 MiB, 64 KiB grains (qemu's only size): one grain holding two writes,
# and one zeroed grain (GTE 1). Each plain grain costs 64 KiB of file, so there is one.
qemu-img create -q -f vmdk -o subformat=monolithicSparse,zeroed_grain=on vmdk-sparse.vmdk 1M
io -f vmdk -c 'write -P 0x11 0 4k' -c 'write -P 0x12 60k 2k' -c 'write -z 512k 64k' vmdk-sparse.vmdk

# streamOptimized, 1 MiB, converted from a raw disk: two compressed grains, the second one
# only partly written.
qemu-img create -q -f raw "$tmp/stream.raw" 1M
io -f raw -c 'write -P 0x21 0 64k' -c 'write -P 0x22 700k 4k' "$tmp/stream.raw"
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/stream.raw" vmdk-stream.vmdk

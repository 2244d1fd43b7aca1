#!/usr/bin/env python3
"""Makes benchmark inputs: sparse raw files with data extents at random places.

  make-workload.py mixed PATH [--size 16G] [--data 1G] [--zeros 256M] [--seed 1]
      data in 64 KiB..4 MiB extents, half random bytes and half text-like, plus
      allocated zero blocks (W1)
  make-workload.py fragmented PATH [--size 16G] [--extents 100000] [--seed 2]
      random 4 KiB extents (W2)
"""
import argparse
import os
import random

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text):
    text = text.strip().lower()
    if text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


WORDS = (b"the of and to in is was for on that with as by at from this be are it an or "
         b"kernel block cluster sector image disk volume snapshot backing guest host "
         b"0 1 2 3 4 5 6 7 8 9 /usr/lib /var/log error warning info debug\n").split(b" ")


TEXT = None


def text_bytes(rng, n):
    """Text-like bytes: a 1 MiB book of random words, read from a random place."""
    global TEXT
    if TEXT is None:
        book = bytearray()
        while len(book) < (5 << 20):
            book += b" ".join(rng.choice(WORDS) for _ in range(4096)) + b"\n"
        TEXT = bytes(book)
    start = rng.randrange(0, len(TEXT) - n) if n < len(TEXT) else 0
    return (TEXT[start:] * (n // len(TEXT) + 2))[:n] if n >= len(TEXT) else TEXT[start:start + n]


def mixed(args):
    rng = random.Random(args.seed)
    total, data, zeros = size(args.size), size(args.data), size(args.zeros)
    slots = total // (4 << 20)  # one extent per 4 MiB slot at most, so extents never overlap
    chosen = sorted(rng.sample(range(slots), slots // 2))  # the other half may hold zeros
    with open(args.path, "wb") as f:
        f.truncate(total)
        written = 0
        order = chosen[:]
        rng.shuffle(order)  # spread the data over the whole disk
        for i, slot in enumerate(order):
            if written >= data:
                break
            n = min(rng.choice([64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20]), data - written)
            f.seek(slot * (4 << 20))
            f.write(os.urandom(n) if i % 2 == 0 else text_bytes(rng, n))
            written += n
        # Allocated zero blocks (an image inflated by a byte copy) in free slots.
        taken = set(chosen)
        free = [s for s in range(slots) if s not in taken]
        rng.shuffle(free)
        zeroed = 0
        for slot in free:
            if zeroed >= zeros:
                break
            f.seek(slot * (4 << 20))
            f.write(bytes(1 << 20))
            zeroed += 1 << 20


def fragmented(args):
    rng = random.Random(args.seed)
    total = size(args.size)
    blocks = total // 4096
    with open(args.path, "wb") as f:
        f.truncate(total)
        for block in sorted(rng.sample(range(blocks), args.extents)):
            f.seek(block * 4096)
            f.write(rng.randbytes(4096))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["mixed", "fragmented"])
    parser.add_argument("path")
    parser.add_argument("--size", default="16G")
    parser.add_argument("--data", default="1G")
    parser.add_argument("--zeros", default="256M")
    parser.add_argument("--extents", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    mixed(args) if args.kind == "mixed" else fragmented(args)


if __name__ == "__main__":
    main()

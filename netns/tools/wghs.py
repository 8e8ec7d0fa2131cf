#!/usr/bin/env python3
"""WireGuard handshake load generator, for netns/bench only.

  wghs.py keys N                       print N "private public" key pairs (base64)
  wghs.py run --target ADDR --port P --hub-pubkey B64 --keys FILE --seconds S

`run` sends real Noise_IKpsk2 handshake initiations from the private keys in
FILE (lines "private public", peers the hub knows) round-robin, as fast as it
can, handles cookie replies (so it keeps going when the hub is under load) and
counts handshake responses. Bounded by --seconds (max 120); sends only to the
one target. Prints "initiations=N responses=N cookies=N seconds=S rate=R".
Needs the python `cryptography` package.
"""

import argparse
import base64
import hashlib
import hmac
import socket
import struct
import sys
import time

try:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives import serialization
except ImportError:  # pragma: no cover
    print("wghs.py: the python 'cryptography' package is missing", file=sys.stderr)
    sys.exit(3)

RAW = serialization.Encoding.Raw
RAWPUB = serialization.PublicFormat.Raw
RAWPRIV = serialization.PrivateFormat.Raw
NOENC = serialization.NoEncryption()


def HASH(x):
    return hashlib.blake2s(x).digest()


def MAC(k, x):
    return hashlib.blake2s(x, key=k, digest_size=16).digest()


def HMAC(k, x):
    return hmac.new(k, x, hashlib.blake2s).digest()


def KDF1(c, x):
    t0 = HMAC(c, x)
    return HMAC(t0, b"\x01")


def KDF2(c, x):
    t0 = HMAC(c, x)
    t1 = HMAC(t0, b"\x01")
    t2 = HMAC(t0, t1 + b"\x02")
    return t1, t2


C0 = HASH(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
H0 = HASH(C0 + b"WireGuard v1 zx2c4 Jason@zx2c4.com")
ZERO12 = b"\x00" * 12


def pub_bytes(priv):
    return priv.public_key().public_bytes(RAW, RAWPUB)


def rotl(v, n):
    return ((v << n) & 0xFFFFFFFF) | (v >> (32 - n))


def hchacha20(key, nonce16):
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    s += list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))

    def qr(a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 7)

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def xchacha_open(key, nonce24, ct, ad):
    sub = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(sub).decrypt(b"\x00" * 4 + nonce24[16:], ct, ad)


def tai64n():
    ns = time.time_ns()
    return struct.pack(">QI", 0x400000000000000A + ns // 1_000_000_000, ns % 1_000_000_000)


class Initiator:
    def __init__(self, hub_pub):
        self.spub_r = hub_pub
        self.spub_r_obj = X25519PublicKey.from_public_bytes(hub_pub)
        self.hr = HASH(H0 + hub_pub)
        self.mac1_key = HASH(b"mac1----" + hub_pub)
        self.cookie_key = HASH(b"cookie--" + hub_pub)
        self.cookie = None
        self.cookie_time = 0.0

    def initiation(self, idx, spub_i, ss):
        e = X25519PrivateKey.generate()
        epub = pub_bytes(e)
        c = KDF1(C0, epub)
        h = HASH(self.hr + epub)
        c, k = KDF2(c, e.exchange(self.spub_r_obj))
        enc_static = ChaCha20Poly1305(k).encrypt(ZERO12, spub_i, h)
        h = HASH(h + enc_static)
        c, k = KDF2(c, ss)
        enc_ts = ChaCha20Poly1305(k).encrypt(ZERO12, tai64n(), h)
        msg = struct.pack("<II", 1, idx) + epub + enc_static + enc_ts
        mac1 = MAC(self.mac1_key, msg)
        msg += mac1
        if self.cookie is not None and time.monotonic() - self.cookie_time < 110:
            msg += MAC(self.cookie, msg)
        else:
            msg += b"\x00" * 16
        return msg, mac1


def load_keys(path):
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            priv = X25519PrivateKey.from_private_bytes(base64.b64decode(parts[0]))
            out.append((priv, pub_bytes(priv)))
    return out


def cmd_keys(n):
    for _ in range(n):
        p = X25519PrivateKey.generate()
        raw = p.private_bytes(RAW, RAWPRIV, NOENC)
        print(base64.b64encode(raw).decode(), base64.b64encode(pub_bytes(p)).decode())


def cmd_run(a):
    if a.seconds > 120:
        raise SystemExit("refusing: --seconds <= 120")
    hub_pub = base64.b64decode(a.hub_pubkey)
    ini = Initiator(hub_pub)
    keys = load_keys(a.keys)
    hub_obj = ini.spub_r_obj
    ss = [priv.exchange(hub_obj) for priv, _ in keys]
    fam = socket.AF_INET6 if ":" in a.target else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect((a.target, a.port))
    s.setblocking(False)
    mac1_by_idx = {}
    sent = responses = cookies = bad = 0
    idx = 1
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    nkeys = len(keys)

    def drain():
        nonlocal responses, cookies, bad
        while True:
            try:
                pkt = s.recv(2048)
            except BlockingIOError:
                return
            except OSError:
                bad += 1
                return
            if len(pkt) == 92 and pkt[0] == 2:
                responses += 1
            elif len(pkt) == 64 and pkt[0] == 3:
                (recv_idx,) = struct.unpack_from("<I", pkt, 4)
                mac1 = mac1_by_idx.get(recv_idx)
                if mac1 is None:
                    continue
                try:
                    ini.cookie = xchacha_open(ini.cookie_key, pkt[8:32], pkt[32:64], mac1)
                    ini.cookie_time = time.monotonic()
                    cookies += 1
                except Exception:
                    bad += 1
            else:
                bad += 1

    while time.monotonic() < deadline:
        for _ in range(32):
            priv, spub = keys[idx % nkeys]
            msg, mac1 = ini.initiation(idx, spub, ss[idx % nkeys])
            mac1_by_idx[idx] = mac1
            if len(mac1_by_idx) > 100000:
                mac1_by_idx.clear()
            try:
                s.send(msg)
                sent += 1
            except (BlockingIOError, OSError):
                pass
            idx += 1
        drain()
    end = time.monotonic()
    time.sleep(0.5)
    drain()
    dt = end - t0
    print(
        f"initiations={sent} responses={responses} cookies={cookies} other={bad} "
        f"seconds={dt:.1f} rate={responses / dt:.0f}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys")
    k.add_argument("n", type=int)
    r = sub.add_parser("run")
    r.add_argument("--target", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--hub-pubkey", required=True)
    r.add_argument("--keys", required=True)
    r.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    if a.cmd == "keys":
        cmd_keys(a.n)
    else:
        cmd_run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

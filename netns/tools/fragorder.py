#!/usr/bin/env python3
"""UDP datagrams sent as IP fragments in reverse order (last fragment first),
to check that a NAT64 handles fragments that arrive out of order.

  fragorder.py client DST6 PORT SIZE   (IPv6 side; exits 0 when the answer,
                                        the datagram reversed, comes back)
  fragorder.py server BIND4 PORT       (IPv4 side; answers each datagram with
                                        its bytes reversed, as IPv4 fragments
                                        in reverse order)

The client learns its source address and port from a connected UDP socket,
sends the fragments it built through a raw socket, and reads the answer
(reassembled by the kernel) on the UDP socket. Raw sockets need root.
"""
import os
import socket
import struct
import sys

FRAG = 1232  # payload bytes per fragment: a multiple of 8, fits a 1280 MTU


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp(src, dst, sport, dport, payload, pseudo):
    length = 8 + len(payload)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    c = csum(pseudo(src, dst, length) + hdr + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, c) + payload


def pseudo6(src, dst, length):
    return src + dst + struct.pack("!I3xB", length, 17)


def pseudo4(src, dst, length):
    return src + dst + struct.pack("!xBH", 17, length)


def pieces(data):
    return [data[i:i + FRAG] for i in range(0, len(data), FRAG)]


def frags6(src, dst, l4, ident):
    out = []
    for n, p in enumerate(pieces(l4)):
        off = n * FRAG
        more = 1 if off + len(p) < len(l4) else 0
        fh = struct.pack("!BBHI", 17, 0, off | more, ident)
        ip = struct.pack("!IHBB", 6 << 28, 8 + len(p), 44, 64) + src + dst
        out.append(ip + fh + p)
    return out


def frags4(src, dst, l4, ident):
    out = []
    for n, p in enumerate(pieces(l4)):
        off = n * FRAG
        more = 0x2000 if off + len(p) < len(l4) else 0
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(p), ident,
                          more | (off // 8), 64, 17, 0, src, dst)
        c = csum(hdr)
        out.append(hdr[:10] + struct.pack("!H", c) + hdr[12:] + p)
    return out


def client(dst6, port, size):
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect((dst6, port))
    src6, sport = u.getsockname()[:2]
    src = socket.inet_pton(socket.AF_INET6, src6)
    dst = socket.inet_pton(socket.AF_INET6, dst6)
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    data = os.urandom(size)
    for attempt in range(3):
        l4 = udp(src, dst, sport, port, data, pseudo6)
        fr = frags6(src, dst, l4, int.from_bytes(os.urandom(4), "big"))
        if len(fr) < 2:
            sys.exit("fragorder: datagram too small to fragment")
        for f in reversed(fr):
            raw.sendto(f, (dst6, 0))
        try:
            if u.recv(65535) == data[::-1]:
                print("fragorder: %d bytes, %d fragments each way, answered" % (size, len(fr)))
                return 0
        except socket.timeout:
            pass
    print("fragorder: no answer", file=sys.stderr)
    return 1


def server(bind4, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((bind4, port))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src = socket.inet_aton(bind4)
    ident = 1
    while True:
        data, (peer, pport) = u.recvfrom(65535)
        dst = socket.inet_aton(peer)
        l4 = udp(src, dst, port, pport, data[::-1], pseudo4)
        ident = (ident + 1) & 0xFFFF
        for f in reversed(frags4(src, dst, l4, ident)):
            raw.sendto(f, (peer, 0))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    if len(sys.argv) == 4 and sys.argv[1] == "server":
        server(sys.argv[2], int(sys.argv[3]))
    sys.exit(__doc__)

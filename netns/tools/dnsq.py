#!/usr/bin/env python3
"""A minimal DNS client for the lab (no dnspython in Debian's base python).

    dnsq.py SERVER PORT NAME TYPE [tcp]   ask one question, print the reply as
        rcode=N aa=0|1 tc=0|1 an=N ns=N txt=v1,v2 soa=<mname>
    dnsq.py SERVER PORT --response        send 20 random bytes with the QR bit
        set (a "response") over UDP and print "reply" or "no-reply" (a server
        must drop them)
    dnsq.py SERVER PORT --counts [tcp]    send a bare query header announcing
        65535 questions and print the reply as above ("timeout" when none)

TYPE is A, NS, SOA, TXT or a number. Exit status 2 on a timeout.
"""
import os
import socket
import struct
import sys

TYPES = {"A": 1, "NS": 2, "SOA": 6, "TXT": 16, "AAAA": 28, "ANY": 255}


def name_bytes(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def read_name(msg, off):
    """Returns (name, offset after it), following compression pointers."""
    labels, jumped, end = [], False, off
    for _ in range(128):
        n = msg[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            ptr = ((n & 0x3F) << 8) | msg[off + 1]
            if not jumped:
                end = off + 2
            jumped, off = True, ptr
            continue
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    return ".".join(labels), (end if jumped else off)


def parse(msg):
    _id, flags, qd, an, ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        _, off = read_name(msg, off)
        off += 4
    txt, soa = [], ""
    for i in range(an + ns):
        _, off = read_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        rdata = msg[off:off + rdlen]
        if rtype == 16 and i < an:
            s, j = b"", 0
            while j < len(rdata):
                s += rdata[j + 1:j + 1 + rdata[j]]
                j += 1 + rdata[j]
            txt.append(s.decode("ascii", "replace"))
        if rtype == 6:
            soa, _ = read_name(msg, off)
        off += rdlen
    return "rcode=%d aa=%d tc=%d an=%d ns=%d txt=%s soa=%s" % (
        flags & 0xF, (flags >> 10) & 1, (flags >> 9) & 1, an, ns, ",".join(txt), soa)


def ask(server, port, fam, msg, tcp, timeout):
    """Sends msg, over TCP (length-prefixed) or UDP; the reply's bytes."""
    if tcp:
        s = socket.create_connection((server, port), timeout=timeout)
        s.sendall(struct.pack("!H", len(msg)) + msg)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        return buf[2:]
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.sendto(msg, (server, port))
    return s.recvfrom(65535)[0]


def main():
    server, port = sys.argv[1], int(sys.argv[2])
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    if sys.argv[3] == "--response":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(1)
        b = bytearray(os.urandom(20))
        b[2] |= 0x80
        s.sendto(bytes(b), (server, port))
        try:
            s.recvfrom(4096)
            print("reply")
        except socket.timeout:
            print("no-reply")
        return
    if sys.argv[3] == "--counts":
        h = struct.pack("!HHHHHH", 0x5151, 0x0100, 0xFFFF, 0, 0, 0)
        tcp = len(sys.argv) > 4 and sys.argv[4] == "tcp"
        try:
            r = ask(server, port, fam, h, tcp, 5 if tcp else 3)
        except socket.timeout:
            print("timeout")
            sys.exit(2)
        print(parse(r))
        return
    name, qtype = sys.argv[3], sys.argv[4]
    tcp = len(sys.argv) > 5 and sys.argv[5] == "tcp"
    q = struct.pack("!HHHHHH", 0x4a7e, 0x0100, 1, 0, 0, 0)
    q += name_bytes(name) + struct.pack("!HH", TYPES.get(qtype) or int(qtype), 1)
    try:
        r = ask(server, port, fam, q, tcp, 5)
    except socket.timeout:
        print("timeout")
        sys.exit(2)
    print(parse(r))


main()

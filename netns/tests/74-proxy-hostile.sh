#!/usr/bin/env bash
# Acceptance 7 (bad input) and the WebSocket part of acceptance 1, through the
# tunnel: while a well-behaved client fetches a page every 0.2 s (every fetch
# must succeed, from before the first attack until the last has returned, and
# some while the hostile client runs), a hostile client in `pub` runs slowloris
# (80 connections dribbling a request head), oversized headers, malformed
# requests, and a corpus of broken ClientHellos (the real hellos of
# tests/vectors/tls truncated, bit-flipped, with lying lengths, and garbage)
# against the hub. Each gets a clear answer (408/431/400, a TLS alert, or a
# close) within the configured deadlines; the hub stays up and counts them.
# Before that, clients that ask for a large answer and take nothing of it (an
# HTTP/1.1 one whose TCP window stays shut, HTTP/2 streams whose window the
# client never opens while it answers PINGs) are cut off at idle_timeout,
# counted as client_not_reading, their backend connections let go, the HTTP/2
# connection itself kept. A WebSocket echo through the hub works before and
# after.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=74-proxy-hostile
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 openssl ss jq
need_gatewire

DOMAIN=gw.example.org
HOST="web.$DOMAIN"
HUB4=$(lab_wan4 hub)
N1V6=$(lab_ov6 n1)
VECTORS="$GW_ROOT/tests/vectors/tls"
IDLE=4
# HTTP/2 streams the stalled client opens.
STREAMS=8

lab_up 1 0

CERT="$GW_TMP/certs"
mkdir -p "$CERT"
lab_selfsigned "$HOST" "$CERT/cert.pem" "$CERT/key.pem"

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]
header_timeout = 3
handshake_timeout = 3
idle_timeout = $IDLE
max_header_bytes = 8192

[[route]]
name = "web"
cert = "$CERT/cert.pem"
key = "$CERT/key.pem"
backends = ["http://[$N1V6]:8080"]
EOF
GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# --- backend: HTTP page + WebSocket echo (RFC 6455 handshake, frames echoed)
cat >"$GW_TMP/ws.py" <<'EOF'
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def handle(c):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(4096)
            if not d: return
            data += d
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin1")
        hdr = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
               for l in head.split("\r\n")[1:] if ":" in l}
        if head.split(" ")[1:2] == ["/big"]:
            # 1 GiB, sent for as long as the hub takes it.
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
            chunk = b"b" * 65536
            try:
                for _ in range((1 << 30) // len(chunk)):
                    c.sendall(chunk)
            except OSError:
                pass  # the hub let the connection go
            return
        if hdr.get("upgrade", "").lower() != "websocket":
            body = b"page-ok\n"
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            return
        acc = base64.b64encode(hashlib.sha1(hdr["sec-websocket-key"].encode() + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        while True:
            h = c.recv(2)
            if len(h) < 2: return
            n = h[1] & 0x7f
            if n == 126: n = struct.unpack("!H", c.recv(2))[0]
            mask = c.recv(4) if h[1] & 0x80 else b"\0\0\0\0"
            p = b""
            while len(p) < n: p += c.recv(n - len(p))
            p = bytes(b ^ mask[i % 4] for i, b in enumerate(p))
            if h[0] & 0x0f == 8: return
            c.sendall(bytes([0x81, len(p)]) + p)
    finally:
        c.close()
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(128)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
EOF
lab_bg n1 web python3 "$GW_TMP/ws.py" "$N1V6" 8080
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "hub :443" wait_for 10 lab_sh hub "ss -Hltn 'sport = :443' | grep -q ."

cat >"$GW_TMP/wsclient.py" <<'EOF'
import base64, os, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (sys.argv[2], key)).encode())
r = b""
while b"\r\n\r\n" not in r: r += s.recv(4096)
assert r.startswith(b"HTTP/1.1 101"), r
msg = b"echo-" + sys.argv[3].encode()
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
rest = r.split(b"\r\n\r\n", 1)[1]
while len(rest) < 2 + len(msg): rest += s.recv(4096)
print(rest[2:2 + len(msg)].decode())
EOF
ws=$(lab_exec pub python3 "$GW_TMP/wsclient.py" "$HUB4" "$HOST" "$$" 2>&1 || true)
assert_eq "WebSocket echo through the hub" "echo-$$" "$ws"

# --- clients that take nothing of a large answer
cat >"$GW_TMP/stall.py" <<'EOF'
import socket, struct, sys, time
hub, host, idle, streams = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3]), int(sys.argv[4])
fails = []

def ended(s, limit):
    """What the hub does within limit s: "eof" or "reset" (it gave up),
    "open" (data kept coming) or "silent" (neither)."""
    s.settimeout(limit)
    t = time.time()
    try:
        while time.time() - t < limit:
            if not s.recv(65536):
                return "eof"
        return "open"
    except socket.timeout:
        return "silent"
    except OSError:
        return "reset"

# 1. HTTP/1.1 with a small receive window, never read
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect((hub, 80))
s.sendall(b"GET /big HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
time.sleep(idle + 3)
how = ended(s, 10)
print("http/1.1 client that never reads: %s" % how)
if how not in ("eof", "reset"): fails.append("http/1.1: the hub did not cut the connection (%s)" % how)
s.close()

# 2. HTTP/2 (prior knowledge): INITIAL_WINDOW_SIZE 0, never a WINDOW_UPDATE,
# PINGs answered
def frame(ty, flags, sid, payload=b""):
    return struct.pack("!I", len(payload))[1:] + bytes([ty, flags]) + struct.pack("!I", sid) + payload
def lit(idx, v):  # literal header field without indexing, indexed name
    return bytes([idx, len(v)]) + v
s = socket.create_connection((hub, 80), timeout=1)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack("!HI", 4, 0)))
block = b"\x82\x86" + lit(4, b"/big") + lit(1, host)  # GET, http
ids = [1 + 2 * i for i in range(streams)]
for sid in ids:
    s.sendall(frame(1, 0x5, sid, block))  # END_STREAM | END_HEADERS
t0 = time.time()
buf = b""
heads, resets, data, pong, goaway, pinged = set(), {}, 0, False, None, False
while time.time() - t0 < idle + 10 and not pong:
    if len(resets) == len(ids) and not pinged:
        pinged = True
        s.sendall(frame(6, 0, 0, b"still-up"))
    try:
        d = s.recv(65536)
    except socket.timeout:
        continue
    except OSError as e:
        fails.append("http/2: connection failed: %s" % e); break
    if not d:
        fails.append("http/2: connection closed"); break
    buf += d
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big"); ty, fl = buf[3], buf[4]
        sid = int.from_bytes(buf[5:9], "big") & 0x7fffffff
        if len(buf) < 9 + n: break
        p, buf = buf[9:9 + n], buf[9 + n:]
        if ty == 4 and not fl & 1: s.sendall(frame(4, 1, 0))
        elif ty == 6 and fl & 1: pong = p == b"still-up"
        elif ty == 6: s.sendall(frame(6, 1, 0, p))
        elif ty == 1: heads.add(sid)
        elif ty == 0: data += n
        elif ty == 3: resets.setdefault(sid, time.time() - t0)
        elif ty == 7: goaway = p[4:8].hex()
first = min(resets.values()) if resets else None
print("http/2: %d answers, %d DATA bytes, %d/%d streams reset (first after %s s), goaway=%s, pong=%s"
      % (len(heads), data, len(resets), len(ids), "%.1f" % first if first else "-", goaway, pong))
if len(heads) != len(ids): fails.append("http/2: %d answers of %d" % (len(heads), len(ids)))
if data: fails.append("http/2: DATA past a zero window")
if len(resets) != len(ids): fails.append("http/2: streams left open: %s" % sorted(set(ids) - set(resets)))
if first is not None and first < idle - 0.5: fails.append("http/2: reset before idle_timeout (%.1f s)" % first)
if goaway is not None: fails.append("http/2: the connection got a GOAWAY (%s)" % goaway)
if not pong: fails.append("http/2: no answer to a PING after the resets")
s.close()
for f in fails: print("FAIL", f)
sys.exit(1 if fails else 0)
EOF

# --- the hostile client
cat >"$GW_TMP/hostile.py" <<'EOF'
import os, random, socket, sys, threading, time
hub, vecdir = sys.argv[1], sys.argv[2]
random.seed(7)
fails = []
def conn(port, timeout=8):
    s = socket.create_connection((hub, port), timeout=timeout)
    return s
def read_all(s, limit=8.0):
    s.settimeout(limit)
    out = b""
    t0 = time.time()
    try:
        while time.time() - t0 < limit:
            d = s.recv(4096)
            if not d: break
            out += d
    except socket.timeout:
        return out, False
    except OSError:
        pass
    return out, True

# 1. slowloris: 80 connections dribbling a head; all must be closed within ~5 s (header_timeout 3)
socks = []
for _ in range(80):
    s = conn(80); s.sendall(b"GET / HTTP/1.1\r\nHost: web.gw.example.org\r\n"); socks.append(s)
t0 = time.time()
closed = [False] * len(socks)
while time.time() - t0 < 8 and not all(closed):
    for i, s in enumerate(socks):
        if closed[i]: continue
        try:
            s.setblocking(False)
            try:
                d = s.recv(4096)
                if d == b"" or d.startswith(b"HTTP/1.1 408"): closed[i] = True; continue
            except BlockingIOError:
                pass
            s.send(b"X-a: b\r\n")
        except OSError:
            closed[i] = True
    time.sleep(0.5)
took = time.time() - t0
if not all(closed): fails.append("slowloris: %d connections still open after %.1fs" % (closed.count(False), took))
print("slowloris: %d/%d closed in %.1fs" % (closed.count(True), len(socks), took))
for s in socks: s.close()

# 2. oversized header: 431 (or a close) quickly
s = conn(80)
try:
    s.sendall(b"GET / HTTP/1.1\r\nHost: web.gw.example.org\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
except OSError:
    pass
out, done = read_all(s)
if not (out.startswith(b"HTTP/1.1 431") or (out == b"" and done)): fails.append("oversized: %r" % out[:60])
print("oversized headers:", out[:40])

# 3. malformed requests: 400
for bad in [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web.gw.example.org\r\nBad Header\r\n\r\n",
            b"\x00\x01\x02\x03\r\n\r\n"]:
    s = conn(80); s.sendall(bad); out, done = read_all(s)
    if not (out.startswith(b"HTTP/1.1 400") or (out == b"" and done)): fails.append("malformed %r: %r" % (bad[:20], out[:60]))
print("malformed requests: ok" if not any("malformed" in f for f in fails) else "malformed: FAIL")

# 3b. requests the hub does not pass on: two Hosts (400), CONNECT (405)
for bad, want in [(b"GET / HTTP/1.1\r\nHost: web.gw.example.org\r\nHost: other.gw.example.org\r\n\r\n", b"HTTP/1.1 400"),
                  (b"CONNECT web.gw.example.org:443 HTTP/1.1\r\nHost: web.gw.example.org:443\r\n\r\n", b"HTTP/1.1 405")]:
    s = conn(80); s.sendall(bad); out, done = read_all(s, 3.0)
    if not out.startswith(want): fails.append("refused %r: %r" % (bad[:24], out[:60]))
    s.close()
print("two Hosts and CONNECT: ok" if not any("refused" in f for f in fails) else "two Hosts or CONNECT: FAIL")

# 4. broken ClientHellos
vecs = [open(os.path.join(vecdir, f), "rb").read() for f in sorted(os.listdir(vecdir)) if f.endswith(".bin")]
cases = []
for v in vecs:
    for cut in sorted(set([1, 3, 5, 6, 9, 40, len(v) // 2, len(v) - 1])):
        if cut < len(v): cases.append(("truncate", v[:cut]))
    for _ in range(8):
        b = bytearray(v); i = random.randrange(len(b)); b[i] ^= 1 << random.randrange(8); cases.append(("flip", bytes(b)))
    b = bytearray(v); b[3:5] = b"\xff\xff"; cases.append(("record-len", bytes(b)))
    b = bytearray(v); b[6:9] = b"\xff\xff\xff"; cases.append(("hs-len", bytes(b)))
    b = bytearray(v); b[0] = 0x17; cases.append(("not-handshake", bytes(b)))
cases.append(("garbage", os.urandom(600)))
cases.append(("http-on-443", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
cases.append(("huge", b"\x16\x03\x01\x40\x00" + b"\x01" * 16384 + b"\x16\x03\x01\x40\x00" + b"\x00" * 3000))
slow = 0
for kind, data in cases:
    s = conn(443)
    try:
        s.sendall(data)
        if kind == "truncate": s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t = time.time()
    out, done = read_all(s, 6.0)
    if not done: fails.append("hello %s: no answer or close within 6 s" % kind)
    if time.time() - t > 4.5: slow += 1
    s.close()
print("broken ClientHellos: %d cases, %d slow" % (len(cases), slow))
for f in fails: print("FAIL", f)
sys.exit(1 if fails else 0)
EOF

# --- a well-behaved client keeps fetching during the attacks: from before the
# first until the stop file appears, made once the last has returned (at most
# 270 s). It counts apart the fetches it began while hostile.py ran.
cat >"$GW_TMP/good.sh" <<'EOF'
#!/bin/bash
# good.sh CA HOST ADDR STOP_FILE DURING_FILE MAX_SECONDS
ca=$1 host=$2 addr=$3 stop=$4 during=$5
ok=0 bad=0 ok_during=0 stopped=0
end=$(($(date +%s) + $6))
while [ "$(date +%s)" -lt "$end" ]; do
    if [ -e "$stop" ]; then stopped=1; break; fi
    in_attack=0
    if [ -e "$during" ]; then in_attack=1; fi
    if curl -sS --max-time 5 --cacert "$ca" --resolve "$host:443:$addr" "https://$host/" | grep -q page-ok; then
        ok=$((ok + 1)) ok_during=$((ok_during + in_attack))
    else
        bad=$((bad + 1))
    fi
    sleep 0.2
done
echo "good-client ok=$ok bad=$bad during=$ok_during stopped=$stopped"
EOF
chmod +x "$GW_TMP/good.sh"
GOOD_STOP="$GW_TMP/good.stop"
GOOD_DURING="$GW_TMP/good.during"
rm -f "$GOOD_STOP" "$GOOD_DURING"
lab_bg pub good bash "$GW_TMP/good.sh" "$CERT/cert.pem" "$HOST" "$HUB4" "$GOOD_STOP" "$GOOD_DURING" 270
sleep 1
stall_out=$(lab_exec pub timeout 60 python3 "$GW_TMP/stall.py" "$HUB4" "$HOST" "$IDLE" "$STREAMS" 2>&1) && src=0 || src=$?
printf '%s\n' "$stall_out" | sed 's/^/    /' >&2
check "clients that take nothing are cut off at idle_timeout, the HTTP/2 connection kept" [ "$src" = 0 ]
js=$(gw_show_json hub gw0 || true)
check "each cut exchange counted as client_not_reading" \
    jq -e --argjson n $((1 + STREAMS)) '.interfaces[0].proxy.routes[] | select(.route == "name:web") | .errors.client_not_reading == $n' <<<"$js" >/dev/null
# The well-behaved client's own fetch may be in flight at any one look: a
# connection the cut kept would show at every look for the 5 s.
backends_idle() {
    gw_show_json hub gw0 | jq -e '.interfaces[0].proxy.routes[] | select(.route == "name:web") | all(.backends[]; .active_connections == 0)' >/dev/null
}
check "their backend connections were let go" wait_for 5 backends_idle
touch "$GOOD_DURING"
hostile_out=$(lab_exec pub timeout 200 python3 "$GW_TMP/hostile.py" "$HUB4" "$VECTORS" 2>&1) && hrc=0 || hrc=$?
touch "$GOOD_STOP"
printf '%s\n' "$hostile_out" | sed 's/^/    /' >&2
check "every hostile case got a clear answer or a close in time" [ "$hrc" = 0 ]
check "hub survived the attack" lab_alive hub
lab_wait good || true
good=$(grep good-client "$(lab_logfile good)" | tail -n 1)
lab_log "$good"
check "the well-behaved client was never refused" grep -q " bad=0 " <<<"$good"
check "the well-behaved client ran until the attacks were over" grep -q " stopped=1$" <<<"$good"
check "the well-behaved client made progress" eval '[ "$(sed -n "s/.* ok=\([0-9]*\) .*/\1/p" <<<"$good")" -ge 20 ]'
check "the well-behaved client was served while hostile.py ran" \
    eval '[ "$(sed -n "s/.* during=\([0-9]*\) .*/\1/p" <<<"$good")" -ge 10 ]'

js=$(gw_show_json hub gw0 || true)
check "listener counters show the broken ClientHellos" \
    jq -e '.interfaces[0].proxy.routes[] | select(.route == "listener") | .errors.bad_client_hello > 10' <<<"$js" >/dev/null
# The two-Host request and the CONNECT (the hub's own 400 and 405), and the
# heads hyper's parser refused (the oversized one's 431 at least; of the
# malformed ones, those that reach the parser).
check "listener counters show the two-Host request, the CONNECT and the heads the parser refused" \
    jq -e '.interfaces[0].proxy.routes[] | select(.route == "listener") | .errors.bad_request >= 3' <<<"$js" >/dev/null
ws=$(lab_exec pub python3 "$GW_TMP/wsclient.py" "$HUB4" "$HOST" "after" 2>&1 || true)
assert_eq "WebSocket echo still works after the attack" "echo-after" "$ws"
check "hub still running" lab_alive hub
lab_finish

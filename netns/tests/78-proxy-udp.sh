#!/usr/bin/env bash
# UDP forwards that keep the client's address. The hub starts every datagram
# to the backend with a PROXY v2 header (DGRAM); dnsdist on the hidden node n1
# reads it (`setProxyProtocolACL`) and answers each query with the address the
# header names, so a client in pub gets its own address back, over IPv4 and
# IPv6. The hub listens on the wildcard and has a second public IPv4 address:
# a client that queries that address gets its answer from it (the client's
# socket is connected, so a reply from any other address is dropped), and the
# header names it. A 3000-byte datagram crosses the 1500-byte links and the
# tunnel both ways (fragmented by the hub and the node). Every flow writes an
# access-log line when it goes idle.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=78-proxy-udp
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd python3 socat ss jq dnsdist
need_gatewire

HUB4=$(lab_wan4 hub)
HUB6=$(lab_wan6 hub)
HUB4B=203.0.113.5
PUB4=$(lab_wan4 pub)
PUB6=$(lab_wan6 pub)
N1V6=$(lab_ov6 n1)

lab_up 1 0
ip -n "$(lab_ns hub)" addr add "$HUB4B/24" dev wan0

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
http_listen = []
https_listen = []
access_log = "$GW_TMP/access.log"

[[udp]]
listen = "0.0.0.0:5353"
backends = ["[$N1V6]:5391"]
proxy_protocol = true
flow_idle_timeout = 2

[[udp]]
listen = "[::]:5353"
backends = ["[$N1V6]:5391"]
proxy_protocol = true
flow_idle_timeout = 2

[[udp]]
listen = "0.0.0.0:5354"
backends = ["[$N1V6]:5300"]
flow_idle_timeout = 2
EOF
GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# dnsdist on n1 answers every A or AAAA query with the client address it was
# given; datagrams must carry a PROXY header when they come from the hub.
cat >"$GW_TMP/dnsdist.conf" <<EOF
setLocal("[$N1V6]:5391")
setACL({"0.0.0.0/0", "::/0"})
setProxyProtocolACL({"$(lab_ov6 hub)/128"})
setSecurityPollSuffix("")
function whoami(dq)
  return DNSAction.Spoof, dq.remoteaddr:toString()
end
addAction(AllRule(), LuaAction(whoami))
EOF
lab_bg n1 dnsdist dnsdist --supervised --disable-syslog -C "$GW_TMP/dnsdist.conf"
lab_bg n1 udpecho socat "UDP6-LISTEN:5300,bind=[$N1V6],fork,reuseaddr" PIPE
must "dnsdist listening on n1" wait_for 10 lab_sh n1 "ss -Hlun 'sport = :5391' | grep -q ."
must "hub UDP forwards bound" wait_for 10 lab_sh hub "ss -Hlun 'sport = :5353' | grep -q ."

# q.py SERVER PORT TYPE: one query from a connected socket (replies from any
# other address are dropped); prints the answer's address.
cat >"$GW_TMP/q.py" <<'EOF'
import socket, struct, sys
server, port, qtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
t = {"A": 1, "AAAA": 28}[qtype]
q = struct.pack(">HHHHHH", 0x4711, 0x0100, 1, 0, 0, 0) + b"\x03who\x07example\x00" + struct.pack(">HH", t, 1)
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((server, port))
for _ in range(3):
    s.send(q)
    try:
        d = s.recv(4096)
        break
    except socket.timeout:
        continue
else:
    sys.exit("no answer")
n = 4 if t == 1 else 16
print(socket.inet_ntop(socket.AF_INET if t == 1 else socket.AF_INET6, d[-n:]))
EOF
# big.py SERVER PORT: a 3000-byte datagram, echoed back whole.
cat >"$GW_TMP/big.py" <<'EOF'
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
msg = os.urandom(3000)
for _ in range(3):
    s.send(msg)
    try:
        d = s.recv(65535)
        break
    except socket.timeout:
        continue
else:
    sys.exit("no echo")
print("intact" if d == msg else "changed (%d bytes)" % len(d))
EOF
q() { lab_exec pub python3 "$GW_TMP/q.py" "$@" 2>&1 || true; }

assert_eq "IPv4 client: dnsdist on n1 sees the client address from the PROXY v2 header" \
    "$PUB4" "$(q "$HUB4" 5353 A)"
assert_eq "IPv6 client: the same over IPv6" "$PUB6" "$(q "$HUB6" 5353 AAAA)"
assert_eq "a query to the hub's second address is answered from that address" \
    "$PUB4" "$(q "$HUB4B" 5353 A)"
assert_eq "a 3000-byte datagram through the tunnel and back, fragmented on the way" \
    intact "$(lab_exec pub python3 "$GW_TMP/big.py" "$HUB4" 5354 2>&1 || true)"

# The flows go idle after 2 s and each writes its line.
jq_any() { jq -e -s "$@" >/dev/null; }
udp_lines() { jq -c 'select(.kind == "udp")' "$GW_TMP/access.log" 2>/dev/null | wc -l; }
check "four UDP flows in the access log" wait_for 10 eval '[ "$(udp_lines)" -ge 4 ]'
check "the IPv4 flow's line: client, forward, backend and bytes" jq_any --arg c "$PUB4:" \
    --arg b "[$N1V6]:5391" \
    'any(.[]; .kind == "udp" and (.client | startswith($c)) and .route == "udp:0.0.0.0:5353"
        and .backend == $b and .bytes_in > 0 and .bytes_out > 0)' "$GW_TMP/access.log"
check "the IPv6 flow's line" jq_any --arg c "[$PUB6]:" \
    'any(.[]; .kind == "udp" and (.client | startswith($c)) and .route == "udp:[::]:5353")' \
    "$GW_TMP/access.log"
check "the large datagram's flow counted 3000 bytes each way" jq_any \
    'any(.[]; .kind == "udp" and .route == "udp:0.0.0.0:5354" and .bytes_in == 3000 and .bytes_out == 3000)' \
    "$GW_TMP/access.log"

js=$(gw_show_json hub gw0 || true)
assert_eq "flows counted on the IPv4 DNS forward" 2 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "udp:0.0.0.0:5353") | .requests' <<<"$js")"

check "hub still running" lab_alive hub
lab_finish

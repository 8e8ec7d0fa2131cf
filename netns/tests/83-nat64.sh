#!/usr/bin/env bash
# Stateful NAT64 (RFC 6146) on the hub: n1, a node that uses only its IPv6
# overlay, reaches IPv4-only servers in `pub` (bound to 203.0.113.10 only)
# through 64:ff9b::/96 (wkp_strict = false: 203.0.113.10 is a documentation
# address). Its sessions leave the hub from pool4 198.51.100.200.
# Checked: HTTP (curl to [64:ff9b::cb00:710a]), a UDP echo, fragmented UDP in
# order and out of order, ping (ICMPv6 echo <-> ICMPv4 echo by identifier), a
# 20 MiB download intact, and a closed UDP port whose ICMPv4 port unreachable
# is mapped back to n1 (ECONNREFUSED).
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=83-nat64
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl socat python3 ping jq
need_gatewire

POOL4=198.51.100.200
PUB4=$(lab_wan4 pub)
PUB64=64:ff9b::cb00:710a # 64:ff9b::203.0.113.10
MARK="nat64-hello-$$"

lab_up 1 0

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<CONF

[xlat]
pool6 = "64:ff9b::/96"
# pub's 203.0.113.10 is a documentation address, which the Well-Known Prefix
# may not carry (RFC 6052 §3.1): the check is off in this lab.
wkp_strict = false

[xlat.nat64]
pool4 = "$POOL4"
ports = "20000-29999"
CONF
lab_exec hub sysctl -qw net.ipv4.ip_forward=1
GW_CONF=$conf gw_start_hub hub

nconf=$(gw_node_conf n1 hub)
# pool6 through the hub; and, by mistake, the wan prefix that holds the hub's
# endpoint (routed into the tunnel, it would cut the node off)
sed -i 's|"fd77:6777::/48"\]|"fd77:6777::/48", "64:ff9b::/96", "203.0.113.0/24"]|' "$nconf"
grep -q '64:ff9b::/96' "$nconf" || lab_die "could not add pool6 to n1's allowed_ips"
GW_CONF=$nconf gw_start_node n1 hub
# the node routes its hub's allowed_ips beyond its own prefixes into the tunnel
pool6_routed() { lab_exec n1 ip -6 route show 64:ff9b::/96 | grep -q "dev gwn0"; }
must "n1 routes pool6 into the tunnel" wait_for 5 pool6_routed
check "n1 does not route the prefix holding the hub's endpoint into the tunnel" \
    not lab_sh n1 "ip route show 203.0.113.0/24 | grep -q gwn0"
says_why() { grep "holds the hub endpoint 203.0.113.1" "$(lab_logfile n1)" | grep -q "route=203.0.113.0/24"; }
check "n1 says why" says_why
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# pub: IPv4-only servers; pool4 is routed to the hub
lab_exec pub ip route add "$POOL4/32" via "$(lab_wan4 hub)"
www="$GW_TMP/www"
mkdir -p "$www"
echo "$MARK" >"$www/hello.txt"
f=$(make_file medium 20)
cp "$f" "$www/medium"
lab_bg pub http python3 -m http.server --bind "$PUB4" --directory "$www" 8080
lab_bg pub udpecho socat "UDP4-RECVFROM:7000,bind=$PUB4,fork" PIPE
must "pub's HTTP server listens" wait_for 10 lab_sh pub "ss -Hltn 'sport = :8080' | grep -q ."

http_ok() {
    [ "$(lab_exec n1 curl -s --max-time 5 "http://[$PUB64]:8080/hello.txt")" = "$MARK" ]
}
check "n1 fetches http://[$PUB64]:8080 from IPv4-only pub through NAT64" wait_for 10 http_ok
check "pub saw the client as pool4 $POOL4" grep -q "$POOL4" "$(lab_logfile http)"

big_ok() {
    lab_exec n1 curl -s --max-time 30 -o "$GW_TMP/data/got" "http://[$PUB64]:8080/medium" &&
        cmp -s "$f" "$GW_TMP/data/got"
}
check "20 MiB download through NAT64, intact" big_ok

udp_ok() {
    local r
    r=$(echo "udp-$MARK" | lab_exec n1 timeout 5 socat -t 2 - "UDP6:[$PUB64]:7000") || return 1
    [ "$r" = "udp-$MARK" ]
}
check "UDP echo through NAT64" wait_for 10 udp_ok

# A 4000-byte datagram each way: n1 sends IPv6 fragments, pub answers with
# IPv4 fragments; the later fragments (no ports) follow their first.
udp_frag_ok() {
    lab_exec n1 python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], 7000))
data = os.urandom(4000)
for _ in range(3):
    s.send(data)
    try:
        if s.recv(8192) == data:
            sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
' "$PUB64"
}
check "fragmented UDP (4000 bytes) echoed through NAT64 both ways" udp_frag_ok

# The same, with every datagram's fragments sent last first (RFC 6146: a NAT64
# MUST handle fragments arriving out of order): the later fragments, which
# carry no ports, reach the hub before the first that maps them, both ways.
FRAGORDER="$GW_LIB_DIR/tools/fragorder.py"
lab_bg pub fragsrv python3 "$FRAGORDER" server "$PUB4" 7001
must "pub's out-of-order UDP server listens" wait_for 10 lab_sh pub "ss -Hlun 'sport = :7001' | grep -q ."
check "UDP fragments sent last first, through NAT64 both ways (3000 bytes)" \
    lab_exec n1 python3 "$FRAGORDER" client "$PUB64" 7001 3000
check "ping $PUB64 (ICMPv6 echo through NAT64)" lab_ping n1 "$PUB64"

port_unreach() {
    lab_exec n1 python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], 7999))
for _ in range(3):
    s.send(b"knock")
    try:
        s.recv(100)
    except ConnectionRefusedError:
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
' "$PUB64"
}
check "closed UDP port on pub: port unreachable mapped back to n1 (ECONNREFUSED)" port_unreach

gw_show_json hub >"$GW_TMP/show.json" || true
check "show --json has xlat_drops" jq -e '.interfaces[0] | has("xlat_drops")' "$GW_TMP/show.json"
check "show --json: NAT64 sessions and bindings" \
    jq -e '.interfaces[0].nat64 | .sessions >= 3 and .bindings >= 1' "$GW_TMP/show.json"
check "show --json: no fragment left held" jq -e '.interfaces[0].nat64.held_fragments == 0' "$GW_TMP/show.json"
# 3 fragments each way: the 2 later ones of each datagram were held, going
# out (IPv6) and coming back (IPv4; the hub's kernel forwards them as they are)
check "show --json: later fragments held both ways" \
    jq -e '.interfaces[0].nat64.held_fragments_total >= 4' "$GW_TMP/show.json"
for p in hub n1; do
    check "$p still running" lab_alive "$p"
done
lab_finish

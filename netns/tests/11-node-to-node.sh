#!/usr/bin/env bash
# [hub] node_to_node: who decides whether nodes reach each other. "off": the
# hub drops n1 -> n2 and counts drops.node_to_node, while every node still
# reaches the hub's own address. "kernel": the hub hands node-to-node packets
# to its kernel, which forwards them back into the TUN, so the hub's nftables
# forward chain decides: n1 -> n2 passes until a rule drops it, then n2 -> d1
# and n1 -> hub still pass. The change from "off" to "kernel" is a reload. `hub --check` refuses an unknown value and a peer
# whose allowed IPs hold the hub's own address, and warns when "kernel" meets
# a host that does not forward. Through the translator (the hub restarted
# with [xlat] and NAT64): n1 reaches n2's IPv4 address as pool6 + it, from
# pool4, with "direct"; with "off" that is dropped and counted, and so is
# n2's packet for pool4 (the hub's kernel would hand it back to the
# translator); with "kernel" the translated packet goes through the hub's
# forward chain, where a rule on pool4 stops it. With "direct", packets
# for x1, a peer that never connected, are staged (8) or counted
# drops.no_session at once, the staged ones too once 10 s have passed; and
# a packet larger than the hub's MTU (n1's TUN given a larger one) is
# dropped and counted drops.too_big.
# timeout: 360
set -euo pipefail
export GW_TEST_NAME=11-node-to-node
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq nft python3
need_gatewire

lab_up 2 1
nodes=(n1 n2 d1)
# x1: a peer of the hub that never connects
conf=$(gw_hub_conf hub "${nodes[@]}" x1)
# set_mode MODE : [hub] node_to_node = MODE in the hub's config
set_mode() {
    sed -i -e '/^node_to_node = /d' -e "s|^keepalive = .*|&\nnode_to_node = \"$1\"|" "$conf"
}
# hub_check NAME CONFIG : `gatewire hub --check`, output in $GW_TMP/NAME.out;
# true when it accepts CONFIG
hub_check() {
    lab_exec hub timeout 10 "$GATEWIRE" hub --config "$2" --check >"$GW_TMP/$1.out" 2>&1
}
out_has() { grep -q -- "$2" "$GW_TMP/$1.out"; }

# --check: unknown values, the hub's own address in a peer's allowed IPs
lab_exec hub sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
set_mode sideways
check "hub --check refuses node_to_node = \"sideways\"" not hub_check bad-mode "$conf"
check "... naming the allowed values" out_has bad-mode '"direct", "kernel", "off"'
set_mode kernel
check "hub --check accepts node_to_node = \"kernel\"" hub_check kernel "$conf"
check "... and warns that the host does not forward" out_has kernel 'node_to_node = "kernel" but net.ipv4.ip_forward'
capture="$GW_TMP/conf/capture.toml"
sed "s|\"$(lab_ov4 n2)/32\"|\"$(lab_ov4 hub)/32\", &|" "$conf" >"$capture"
check "hub --check refuses a peer holding the hub's address" not hub_check capture "$capture"
check "... naming the peer and the address" \
    out_has capture "(n2) allowed_ips $(lab_ov4 hub)/32: holds the hub's own address $(lab_ov4 hub)"

n2n_drops() {
    gw_show_json hub | jq -r '[.interfaces[] | .drops.node_to_node // 0] | add'
}

# ---- "off"
set_mode off
GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
gw_start_node n2 hub
gw_start_node d1 hub
for n in "${nodes[@]}"; do
    must "$n reaches the hub (v4 overlay)" wait_for 15 lab_ping1 "$n" "$(lab_ov4 hub)"
    check "$n reaches the hub (v6 overlay)" lab_ping "$n" "$(lab_ov6 hub)"
done
before=$(n2n_drops)
check "off: n1 -> n2 (v4) gets no answer" lab_ping_fails n1 "$(lab_ov4 n2)"
check "off: n1 -> n2 (v6) gets no answer" lab_ping_fails n1 "$(lab_ov6 n2)"
check "off: d1 -> n1 (v4) gets no answer" lab_ping_fails d1 "$(lab_ov4 n1)"
after=$(n2n_drops)
lab_log "drops.node_to_node: $before -> $after"
check "off: show --json counts drops.node_to_node ($before -> $after)" test "$after" -ge $((before + 9))
check "off: the hub still reaches n1" lab_ping hub "$(lab_ov4 n1)"
check "off: n1 still reaches the hub after the drops" lab_ping n1 "$(lab_ov4 hub)"

# ---- "kernel": the hub's kernel forwards, its firewall decides. Taken on a
# reload (SIGHUP): the tunnels stay up.
set_mode kernel
lab_exec hub sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
hub_pid=$(lab_pid hub)
kill -HUP "$hub_pid"
must "kernel: the hub applied it on SIGHUP" \
    wait_for 10 grep -q 'node_to_node="kernel".*traffic between nodes: applied\|traffic between nodes: applied.*kernel' "$(lab_logfile hub)"
check "kernel: the same hub process (no restart)" test "$(lab_pid hub)" = "$hub_pid"
check "kernel: the hub does not warn about forwarding" \
    not grep -q 'node_to_node = "kernel" but' "$(lab_logfile hub)"
check "kernel: n1 -> n2 (v4) through the hub's kernel" wait_for 5 lab_ping1 n1 "$(lab_ov4 n2)"
check "kernel: n1 -> n2 (v6) through the hub's kernel" wait_for 5 lab_ping1 n1 "$(lab_ov6 n2)"
check "kernel: d1 -> n1 (v4) through the hub's kernel" wait_for 5 lab_ping1 d1 "$(lab_ov4 n1)"
lab_exec hub nft -f - <<EOF
table inet gwtest {
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "gw0" oifname "gw0" ip saddr $(lab_ov4 n1) ip daddr $(lab_ov4 n2) counter drop
        iifname "gw0" oifname "gw0" ip6 saddr $(lab_ov6 n1) ip6 daddr $(lab_ov6 n2) counter drop
    }
}
EOF
fw_drops() {
    lab_exec hub nft -j list chain inet gwtest forward |
        jq '[.nftables[] | .rule? // empty | .expr[] | .counter? // empty | .packets] | add'
}
before=$(n2n_drops)
check "kernel + nft rule: n1 -> n2 (v4) gets no answer" lab_ping_fails n1 "$(lab_ov4 n2)"
check "kernel + nft rule: n1 -> n2 (v6) gets no answer" lab_ping_fails n1 "$(lab_ov6 n2)"
check "kernel + nft rule: the hub's forward chain dropped them ($(fw_drops))" test "$(fw_drops)" -ge 6
check "kernel + nft rule: the device dropped none itself" test "$(n2n_drops)" -eq "$before"
check "kernel + nft rule: n2 -> d1 (v4) still passes" lab_ping n2 "$(lab_ov4 d1)"
check "kernel + nft rule: d1 -> n2 (v6) still passes" lab_ping d1 "$(lab_ov6 n2)"
check "kernel + nft rule: n1 -> hub still passes" lab_ping n1 "$(lab_ov4 hub)"
lab_exec hub nft delete table inet gwtest
check "kernel, rule gone: n1 -> n2 (v4) passes again" wait_for 5 lab_ping1 n1 "$(lab_ov4 n2)"

# ---- through the translator: the hub with NAT64 behind a network-specific
# pool6, so that n1 reaches n2's IPv4 overlay address from its IPv6 one as
# pool6 + it. pool4 lies inside the overlay: n2 routes its answers into the
# tunnel, and they take the hub's kernel back to the translator.
POOL4=100.64.0.64
POOL6=2001:db8:64::
N2_64="$POOL6$(lab_ov4 n2)"
# applied MODE : how many times the hub's log says it applied node_to_node = MODE
applied() {
    grep -c "traffic between nodes: applied.*node_to_node=\"$1\"\|node_to_node=\"$1\".*traffic between nodes: applied" \
        "$(lab_logfile hub)" || true
}
applied_more() { [ "$(applied "$1")" -gt "$2" ]; }
# reload_mode MODE : set it in the file and SIGHUP the hub; true once applied
reload_mode() {
    local n
    n=$(applied "$1")
    set_mode "$1"
    kill -HUP "$(lab_pid hub)"
    wait_for 10 applied_more "$1" "$n"
}
lab_stop hub
cat >>"$conf" <<CONF

[xlat]
pool6 = "$POOL6/96"

[xlat.nat64]
pool4 = "$POOL4"
ports = "20000-20999"
CONF
set_mode direct
GW_CONF=$conf gw_start_hub hub
# n1 routes pool6 into its tunnel
nconf="$GW_TMP/conf/n1.toml"
sed -i "s|\"$GW_OV6_PREFIX\"\]|\"$GW_OV6_PREFIX\", \"$POOL6/96\"]|" "$nconf"
grep -q "$POOL6/96" "$nconf" || lab_die "could not add pool6 to n1's allowed_ips"
lab_stop n1
gw_restart_node n1
must "xlat: n1 reaches the hub again" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
must "xlat: n2 reaches the hub again" wait_for 15 lab_ping1 n2 "$(lab_ov4 hub)"
# n2 answers each UDP datagram with the address it came from
lab_bg n2 srcecho python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7000))
while True:
    _, a = s.recvfrom(100)
    s.sendto(a[0].encode(), a)
' "$(lab_ov4 n2)"
# seen_from : the source n2 saw n1's datagram to pool6 + n2 come from
# (empty: no answer)
seen_from() {
    lab_exec n1 python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(1)
for _ in range(3):
    s.sendto(b"hi", (sys.argv[1], 7000))
    try:
        print(s.recv(100).decode())
        break
    except socket.timeout:
        pass
' "$N2_64" 2>/dev/null || true
}
from_pool4() { [ "$(seen_from)" = "$POOL4" ]; }
check "xlat, direct: n1 pings n2 as $N2_64 (NAT64)" wait_for 10 lab_ping1 n1 "$N2_64"
check "xlat, direct: n2 sees n1's datagram from pool4 $POOL4" wait_for 5 from_pool4

# drops REASON : the hub's drops.REASON
drops() {
    gw_show_json hub | jq -r "[.interfaces[] | .drops.$1 // 0] | add"
}
# at_least REASON N : true when the hub's drops.REASON is N or more
at_least() { [ "$(drops "$1")" -ge "$2" ]; }
# n1 -> x1 (never connected, no session): 50 large pings, 8 staged, the
# rest counted at once, the staged too after 10 s
before=$(drops no_session)
lab_exec n1 ping -q -n -c 50 -i 0.01 -s 1300 -W 1 "$(lab_ov4 x1)" >/dev/null 2>&1 || true
check "direct: packets for x1 (no session) beyond the 8 staged count as no_session at once" \
    wait_for 3 at_least no_session $((before + 42))
check "... while 8 wait for a handshake" test "$(drops no_session)" -eq $((before + 42))
check "... and the staged ones once held 10 s" wait_for 15 at_least no_session $((before + 50))
lab_log "drops.no_session: $before -> $(drops no_session)"
# n1 with a larger MTU than the hub's: a 3000-byte packet for n2 (DF) is too big
before=$(drops too_big)
lab_exec n1 ip link set dev "${GW_NODE_IFACE:-gwn0}" mtu 4000
check "direct: n1 -> n2 larger than the hub's MTU gets no answer" \
    not lab_exec n1 ping -q -n -c 3 -i 0.2 -W 1 -M "do" -s 3000 "$(lab_ov4 n2)"
check "... counted as too_big" wait_for 3 at_least too_big $((before + 3))
lab_exec n1 ip link set dev "${GW_NODE_IFACE:-gwn0}" mtu "${GW_MTU:-1420}"
check "direct: n1 -> n2 at the hub's MTU still passes" \
    lab_exec n1 ping -q -n -c 3 -i 0.2 -W 1 -M "do" -s $((${GW_MTU:-1420} - 28)) "$(lab_ov4 n2)"

# "off": the translated packet is traffic between nodes too
must "xlat, off: the hub applied it on SIGHUP" reload_mode off
before=$(n2n_drops)
check "xlat, off: n1 -> $N2_64 gets no answer" lab_ping_fails n1 "$N2_64"
check "xlat, off: n2 sees no datagram from n1 through NAT64" test -z "$(seen_from)"
after=$(n2n_drops)
lab_log "drops.node_to_node: $before -> $after"
check "xlat, off: show --json counts them as node_to_node ($before -> $after)" \
    test "$after" -ge $((before + 6))
# n2 -> pool4: the hub's kernel would route it back to the translator, and
# the translator to a NAT64 session's node
before=$after
check "xlat, off: n2 -> pool4 gets no answer" lab_ping_fails n2 "$POOL4"
after=$(n2n_drops)
check "xlat, off: ... dropped as node_to_node ($before -> $after)" test "$after" -ge $((before + 3))
check "xlat, off: n1 still reaches the hub" lab_ping n1 "$(lab_ov4 hub)"

# "kernel": the translated packet (from pool4) goes through the forward chain
must "xlat, kernel: the hub applied it on SIGHUP" reload_mode kernel
check "xlat, kernel: n1 pings n2 as $N2_64 through the hub's kernel" wait_for 10 lab_ping1 n1 "$N2_64"
check "xlat, kernel: n2 sees n1's datagram from pool4" wait_for 5 from_pool4
lab_exec hub nft -f - <<EOF
table inet gwtest {
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "gw0" oifname "gw0" ip saddr $POOL4 ip daddr $(lab_ov4 n2) counter drop
    }
}
EOF
before=$(n2n_drops)
check "xlat, kernel + nft rule on pool4: n1 -> $N2_64 gets no answer" lab_ping_fails n1 "$N2_64"
check "xlat, kernel + nft rule: the hub's forward chain dropped them ($(fw_drops))" test "$(fw_drops)" -ge 3
check "xlat, kernel + nft rule: the device dropped none itself" test "$(n2n_drops)" -eq "$before"
lab_exec hub nft delete table inet gwtest
lab_stop srcecho

for p in hub "${nodes[@]}"; do
    check "$p still running" lab_alive "$p"
done
lab_finish

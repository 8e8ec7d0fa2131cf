#!/usr/bin/env bash
# A hub with a second public address answers each node from the address the
# node sent to, as kernel WireGuard does. n1, behind the NAT, dials the hub's
# second IPv4 address: the NAT lets through only datagrams from that address
# (an answer from the hub's first address matches none of its mappings), so
# the tunnel comes up only if the hub answers from it. d1, on the wan, dials
# the second IPv6 address: it would take answers from any address, so a
# counter on d1 checks where they come from.
# timeout: 120
set -euo pipefail
export GW_TEST_NAME=52-second-address
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq nft
need_gatewire

SECOND4=203.0.113.3
SECOND6=2001:db8:1::3

lab_up 1 1
ip -n "$(lab_ns hub)" addr add "$SECOND4/24" dev wan0
ip -n "$(lab_ns hub)" addr add "$SECOND6/64" dev wan0 nodad
gw_start_hub hub n1 d1

# On d1: count the hub's datagrams by the address they come from.
lab_exec d1 nft -f - <<NFT
table inet gwsrc {
    chain in {
        type filter hook input priority 0;
        ip6 saddr $SECOND6 udp sport $GW_HUB_PORT counter
        ip6 saddr $(lab_wan6 hub) udp sport $GW_HUB_PORT counter
    }
}
NFT
from_addr() {
    lab_exec d1 nft -j list table inet gwsrc |
        jq --arg a "$1" '[.nftables[] | .rule? // empty | select(any(.expr[]; .match?.right? == $a)) | .expr[] | .counter? // empty | .packets] | add // 0'
}

GW_ENDPOINT="$SECOND4:$GW_HUB_PORT" gw_start_node n1 hub
GW_ENDPOINT="[$SECOND6]:$GW_HUB_PORT" gw_start_node d1 hub

check "n1 (behind the NAT) reaches the hub through its second IPv4 address" \
    wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
check "the hub reaches n1" lab_ping hub "$(lab_ov4 n1)"
check "d1 reaches the hub through its second IPv6 address" \
    wait_for 15 lab_ping1 d1 "$(lab_ov4 hub)"
lab_ping d1 "$(lab_ov4 hub)" 3 || true
second=$(from_addr "$SECOND6")
first=$(from_addr "$(lab_wan6 hub)")
check "d1 hears the hub from $SECOND6 ($second datagrams)" test "${second:-0}" -gt 0
check "and never from $(lab_wan6 hub) ($first datagrams)" test "${first:-1}" -eq 0
n1_ep=$(gw_show_json hub | jq -r --arg k "$(lab_pub n1)" '.interfaces[].peers[] | select(.public_key == $k) | .endpoint')
check "the hub has n1 at the NAT ($n1_ep)" grep -q "^$(lab_wan4 nat):" <<<"$n1_ep"

# The second address goes away: sending from it fails, the hub forgets it
# and sends from the kernel's choice (d1 follows, as WireGuard peers do).
ip -n "$(lab_ns hub)" addr del "$SECOND6/64" dev wan0
check "the hub still reaches d1 after its address is removed" \
    wait_for 10 lab_ping1 hub "$(lab_ov4 d1)"
check "hub still running" lab_alive hub
lab_exec d1 nft delete table inet gwsrc || true
lab_finish

#!/usr/bin/env bash
# A gatewire hub and three gatewire nodes: n1 and n2 hidden behind the NAT, d1
# directly on the wan (reaching the hub over IPv6). n2 names its hub by DNS
# name. Every node pings the hub and every other node over both overlays (the
# hub forwards node-to-node itself: kernel forwarding stays off in the hub
# namespace), then 200 MiB cross node to node, intact.
# timeout: 600
set -euo pipefail
export GW_TEST_NAME=10-mesh
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping socat jq sha256sum
need_gatewire
MB=${MESH_MB:-200}

lab_up 2 1
lab_exec hub sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
lab_hosts n2 "$(lab_wan4 hub) hub.gw.test"

nodes=(n1 n2 d1)
gw_start_hub hub "${nodes[@]}"
gw_start_node n1 hub
GW_ENDPOINT="hub.gw.test:$GW_HUB_PORT" gw_start_node n2 hub
GW_ENDPOINT="[$(lab_wan6 hub)]:$GW_HUB_PORT" gw_start_node d1 hub

for n in "${nodes[@]}"; do
    check "$n reaches the hub (v4 overlay)" wait_for 15 lab_ping1 "$n" "$(lab_ov4 hub)"
    check "$n reaches the hub (v6 overlay)" lab_ping "$n" "$(lab_ov6 hub)"
done
for a in "${nodes[@]}"; do
    for b in "${nodes[@]}"; do
        [ "$a" = "$b" ] && continue
        check "$a -> $b through the hub (v4)" wait_for 5 lab_ping1 "$a" "$(lab_ov4 "$b")"
        check "$a -> $b through the hub (v6)" wait_for 5 lab_ping1 "$a" "$(lab_ov6 "$b")"
    done
done
check "hub -> n1 (hidden) overlay" lab_ping hub "$(lab_ov4 n1)"

# what the hub knows about its peers
show=$(gw_show_json hub || true)
echo "$show" >"$GW_TMP/show.json"
peer_has() { # NAME jq-condition-on-peer
    jq -e --arg k "$(lab_pub "$1")" ".interfaces[] | .peers[] | select(.public_key == \$k) | $2" \
        "$GW_TMP/show.json" >/dev/null
}
for n in "${nodes[@]}"; do
    check "show --json: $n has a handshake" peer_has "$n" '.latest_handshake > 0'
    check "show --json: $n has rx and tx bytes" peer_has "$n" '.rx_bytes > 0 and .tx_bytes > 0'
done
check "show --json: n1 is seen from the NAT's wan address" peer_has n1 \
    ".endpoint | startswith(\"$(lab_wan4 nat):\")"
check "show --json: d1 is seen over IPv6" peer_has d1 ".endpoint | contains(\"$(lab_wan6 d1)\")"

# bulk transfer node to node (both ends behind the NAT), then back over v6
f=$(make_file big "$MB")
check "$MB MiB n1 -> n2 over the v4 overlay, intact" tcp_transfer n1 n2 "$(lab_ov4 n2)" "$f" 300
f2=$(make_file medium 50)
check "50 MiB n2 -> d1 over the v6 overlay, intact" tcp_transfer n2 d1 "$(lab_ov6 d1)" "$f2" 120
check "50 MiB d1 -> hub over the v4 overlay, intact" tcp_transfer d1 hub "$(lab_ov4 hub)" "$f2" 120

for p in hub "${nodes[@]}"; do
    check "$p still running" lab_alive "$p"
done
lab_finish

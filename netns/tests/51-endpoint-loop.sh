#!/usr/bin/env bash
# A peer's endpoint never moves to an address inside the peer's own allowed
# IPs that is routed into the hub's tunnel. The hub allows d1 (a direct node)
# 172.31.99.1/32, which it routes into its tunnel, and 0.0.0.0/0, which it
# does not (a default route is never added). d1 first sends to the hub from a
# second wan address (inside 0.0.0.0/0 but not routed into the tunnel: an
# ordinary roam, the hub follows), then from
# 172.31.99.1 (a local address and a source route on d1). Taken as d1's
# endpoint, that address would send the hub's datagrams for d1 into the
# tunnel, to be encrypted for d1 again, round after round. The hub keeps the
# endpoint it had, counts drops.endpoint_loop, warns once, and goes on
# talking to d1 both ways.
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=51-endpoint-loop
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq
need_gatewire

INSIDE=172.31.99.1
ROAM=203.0.113.99 # d1's second wan address
HUB4=$(lab_wan4 hub)

lab_up 0 1
conf=$(gw_hub_conf hub d1)
sed -i "s|^allowed_ips = \[\"$(lab_ov4 d1)/32\"|allowed_ips = [\"$INSIDE/32\", \"0.0.0.0/0\", \"$(lab_ov4 d1)/32\"|" "$conf"
must "the hub config allows d1 $INSIDE and 0.0.0.0/0" grep -q "\"$INSIDE/32\", \"0.0.0.0/0\"" "$conf"
GW_CONF=$conf gw_start_hub hub
# Loose reverse-path filtering, as on a multi-homed gateway: a source the
# hub routes into its tunnel is still accepted on wan0.
lab_exec hub sysctl -qw net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.wan0.rp_filter=2
GW_PKA=1 gw_start_node d1 hub
must "d1 reaches the hub" wait_for 15 lab_ping1 d1 "$(lab_ov4 hub)"
must "the hub routes $INSIDE into its tunnel" \
    bash -c "ip -n '$(lab_ns hub)' route get $INSIDE | grep -q 'dev gw0'"
must "the hub does not route $ROAM into its tunnel" \
    bash -c "! ip -n '$(lab_ns hub)' route get $ROAM | grep -q 'dev gw0'"

d1_json() { gw_show_json hub | jq -c '.interfaces[].peers[] | select(.name == "d1")'; }
endpoint_is() { [ "$(d1_json | jq -r .endpoint)" = "$1" ]; }
loops() { gw_show_json hub | jq -r '[.interfaces[].drops.endpoint_loop // 0] | add'; }
loops_above() { [ "$(loops)" -gt "$1" ]; }
port=$(d1_json | jq -r .endpoint | sed 's/.*://')
lab_log "d1's endpoint at the hub: $(d1_json | jq -r .endpoint)"
check "d1's endpoint is its wan address" endpoint_is "$(lab_wan4 d1):$port"
check "no refused roam yet ($(loops))" test "$(loops)" -eq 0

lab_exec d1 ip addr add "$ROAM/24" dev wan0
lab_exec d1 ip route replace "$HUB4/32" dev wan0 src "$ROAM"
check "an ordinary roam: the hub follows d1 to $ROAM" wait_for 10 endpoint_is "$ROAM:$port"

lab_exec d1 ip addr add "$INSIDE/32" dev lo
lab_exec d1 ip route replace "$HUB4/32" dev wan0 src "$INSIDE"
sleep 3 # three keepalives from $INSIDE
lab_log "d1 endpoint now: $(d1_json | jq -r .endpoint), loops $(loops)"
check "d1's endpoint stays $ROAM:$port" endpoint_is "$ROAM:$port"
check "hub -> d1 over the tunnel" lab_ping hub "$(lab_ov4 d1)"
check "d1 -> hub over the tunnel" lab_ping d1 "$(lab_ov4 hub)"
check "d1's datagrams from $INSIDE were refused as an endpoint (drops.endpoint_loop $(loops))" loops_above 0
n=$(loops)
check "the refusals go on with every keepalive (after $n)" wait_for 5 loops_above "$n"
check "the hub warned once" test "$(grep -c 'inside its own allowed IPs' "$(lab_logfile hub)")" -eq 1
check "hub still running" lab_alive hub
check "d1 still running" lab_alive d1
lab_finish

#!/usr/bin/env bash
# Lab self-test, no gatewire involved: a wireguard-go hub and wireguard-go
# nodes (two hidden behind the NAT, one direct). If this fails the lab or the
# machine is broken, not gatewire.
set -euo pipefail
export GW_TEST_NAME=01-lab
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd wg wireguard-go ping socat conntrack jq

lab_up 2 1

# underlay sanity: wan hosts see each other, hidden nodes reach the wan through
# the NAT, nobody on the wan reaches the LAN.
must "pub pings hub (v4)" lab_ping pub "$(lab_wan4 hub)"
must "pub pings hub (v6)" lab_ping pub "$(lab_wan6 hub)"
must "n1 pings hub through the NAT" lab_ping n1 "$(lab_wan4 hub)"
check "hub cannot reach the LAN" lab_ping_fails hub "$(lab_lan4 n1)"
# segments are plain switches: bridged frames skip the iptables hooks even on
# a host with br_netfilter loaded
bridge_nf_off() {
    [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && return 0
    [ "$(ip netns exec "$(lab_ns wan)" sysctl -n net.bridge.bridge-nf-call-iptables)" = 0 ] &&
        [ "$(ip netns exec "$(lab_ns lan)" sysctl -n net.bridge.bridge-nf-call-ip6tables)" = 0 ]
}
check "the segments' bridges do not call iptables" bridge_nf_off

# wireguard-go hub with kernel forwarding between its peers
lab_exec hub sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
wg_impl_start wireguard-go hub wg0
wg_iface_setup hub wg0 hub "$GW_HUB_PORT" "$(lab_ov4 hub)/10" "$(lab_ov6 hub)/48"
nodes=(n1 n2 d1)
for n in "${nodes[@]}"; do
    wg_peer hub wg0 "$n" "$(lab_ov4 "$n")/32,$(lab_ov6 "$n")/128"
    wg_impl_start wireguard-go "$n" wg0
    wg_iface_setup "$n" wg0 "$n" 0 "$(lab_ov4 "$n")/10" "$(lab_ov6 "$n")/48"
    wg_peer "$n" wg0 hub "$GW_OV4_PREFIX,$GW_OV6_PREFIX" "$(lab_hub_endpoint hub)" 2
done

for n in "${nodes[@]}"; do
    must "$n reaches hub overlay v4" wait_for 10 lab_ping1 "$n" "$(lab_ov4 hub)"
    check "$n reaches hub overlay v6" lab_ping "$n" "$(lab_ov6 hub)"
done
check "n1 -> n2 via hub (v4)" lab_ping n1 "$(lab_ov4 n2)"
check "n2 -> d1 via hub (v6)" lab_ping n2 "$(lab_ov6 d1)"
check "hub -> n1 (hidden) overlay" lab_ping hub "$(lab_ov4 n1)"

f=$(make_file small 20)
check "20 MiB n1 -> d1 over the tunnels" tcp_transfer n1 d1 "$(lab_ov4 d1)" "$f"

# the hub sees n1 behind the NAT's wan address in the first port range
ep_port() { lab_exec hub wg show wg0 endpoints | awk -v k="$(lab_pub n1)" '$1==k {print $2}' | sed 's/.*://'; }
port=$(ep_port)
check "hub sees n1 from NAT range ($port)" test "$port" -ge "$(nat_port_min)" -a "$port" -le "$(nat_port_max)"

nat_rebind
new_port_seen() {
    local p
    p=$(ep_port)
    [ "$p" -ge "$(nat_port_min)" ] && [ "$p" -le "$(nat_port_max)" ]
}
check "after nat_rebind the hub learns n1's new port" wait_for 10 new_port_seen
check "hub -> n1 after nat_rebind" wait_for 10 lab_ping1 hub "$(lab_ov4 n1)"
lab_log "n1 endpoint port: $port -> $(ep_port)"

lab_finish

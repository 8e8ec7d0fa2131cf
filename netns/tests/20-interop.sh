#!/usr/bin/env bash
# Interoperability with wireguard-go (configured only with wg and ip):
#  A. gatewire hub; n1 is a wireguard-go node behind the NAT, n2 a gatewire
#     node behind the NAT. n1 <-> hub and n1 <-> n2 (forwarded by the gatewire hub).
#  B. wireguard-go hub on hub2 (kernel forwarding on); d1 and n3 are gatewire
#     nodes. Each reaches the hub and each other.
#  C. `gatewire wg wg0` (daemonizing, configured only with wg/ip) on d2 joins
#     the wireguard-go hub.
# Ping plus a TCP transfer both ways in each case.
# timeout: 420
set -euo pipefail
export GW_TEST_NAME=20-interop
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd wg wireguard-go ping socat
need_gatewire
MB=${INTEROP_MB:-50}

lab_up 3 2
lab_add_hub2
f=$(make_file data "$MB")

# ---------------------------------------------------------------- A
lab_log "A: gatewire hub, wireguard-go node n1, gatewire node n2"
lab_exec hub sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
gw_start_hub hub n1 n2
gw_start_node n2 hub
wg_impl_start wireguard-go n1 wg0
wg_iface_setup n1 wg0 n1 0 "$(lab_ov4 n1)/10" "$(lab_ov6 n1)/48"
wg_peer n1 wg0 hub "$GW_OV4_PREFIX,$GW_OV6_PREFIX" "$(lab_hub_endpoint hub)" 5

check "A: wireguard-go n1 -> gatewire hub (v4)" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
check "A: wireguard-go n1 -> gatewire hub (v6)" lab_ping n1 "$(lab_ov6 hub)"
check "A: gatewire hub -> wireguard-go n1" lab_ping hub "$(lab_ov4 n1)"
check "A: n1 -> n2 (wireguard-go -> gatewire hub -> gatewire node)" wait_for 10 lab_ping1 n1 "$(lab_ov4 n2)"
check "A: n2 -> n1 (v6)" wait_for 10 lab_ping1 n2 "$(lab_ov6 n1)"
check "A: $MB MiB n1 -> hub" tcp_transfer n1 hub "$(lab_ov4 hub)" "$f"
check "A: $MB MiB hub -> n1" tcp_transfer hub n1 "$(lab_ov4 n1)" "$f"
check "A: $MB MiB n1 -> n2 (v6)" tcp_transfer n1 n2 "$(lab_ov6 n2)" "$f"
check "A: $MB MiB n2 -> n1" tcp_transfer n2 n1 "$(lab_ov4 n1)" "$f"
hs=$(lab_exec n1 wg show wg0 latest-handshakes | awk '{print $2}')
check "A: wireguard-go n1 reports a handshake with the gatewire hub ($hs)" test "${hs:-0}" -gt 0

# ---------------------------------------------------------------- B
lab_log "B: wireguard-go hub on hub2, gatewire nodes d1 (direct) and n3 (hidden)"
lab_exec hub2 sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
wg_impl_start wireguard-go hub2 wg0
wg_iface_setup hub2 wg0 hub2 "$GW_HUB_PORT" "$(lab_ov4 hub2)/10" "$(lab_ov6 hub2)/48"
for n in d1 n3; do
    wg_peer hub2 wg0 "$n" "$(lab_ov4 "$n")/32,$(lab_ov6 "$n")/128"
    gw_start_node "$n" hub2
done
check "B: gatewire d1 -> wireguard-go hub (v4)" wait_for 15 lab_ping1 d1 "$(lab_ov4 hub2)"
check "B: gatewire n3 -> wireguard-go hub (v4)" wait_for 15 lab_ping1 n3 "$(lab_ov4 hub2)"
check "B: gatewire n3 -> wireguard-go hub (v6)" lab_ping n3 "$(lab_ov6 hub2)"
check "B: wireguard-go hub -> hidden gatewire n3" lab_ping hub2 "$(lab_ov4 n3)"
check "B: d1 -> n3 through the wireguard-go hub" wait_for 10 lab_ping1 d1 "$(lab_ov4 n3)"
check "B: $MB MiB n3 -> hub2" tcp_transfer n3 hub2 "$(lab_ov4 hub2)" "$f"
check "B: $MB MiB hub2 -> n3" tcp_transfer hub2 n3 "$(lab_ov4 n3)" "$f"
check "B: $MB MiB d1 -> n3 (v6)" tcp_transfer d1 n3 "$(lab_ov6 n3)" "$f"
eps=$(lab_exec hub2 wg show wg0 endpoints)
check "B: wireguard-go hub sees n3 behind the NAT" grep -q "$(lab_wan4 nat):" <<<"$eps"


# ---------------------------------------------------------------- C
lab_log "C: gatewire wg (plain UAPI mode, daemonized) on d2 -> wireguard-go hub2"
rc=0
lab_exec d2 env -u WG_PROCESS_FOREGROUND NO_COLOR=1 timeout 20 "$GATEWIRE" wg wg0 \
    >"$(lab_logfile gatewire-wg-d2)" 2>&1 || rc=$?
check "C: gatewire wg wg0 returns after daemonizing (status $rc)" test "$rc" -eq 0
# A second daemon for the same interface cannot start: the parent says why.
rc=0
out=$(lab_exec d2 env -u WG_PROCESS_FOREGROUND NO_COLOR=1 timeout 20 "$GATEWIRE" wg wg0 2>&1) || rc=$?
check "C: a second gatewire wg wg0 fails (status $rc)" test "$rc" -eq 1
check "C: and prints the daemon's error ($out)" grep -q 'gatewire: .*wg0' <<<"$out"
check "C: the UAPI socket exists" wait_for 5 uapi_ready d2 wg0
check "C: the daemon lives on in d2" test -n "$(ip netns pids "$(lab_ns d2)")"
wg_iface_setup d2 wg0 d2 0 "$(lab_ov4 d2)/10" "$(lab_ov6 d2)/48"
wg_peer d2 wg0 hub2 "$GW_OV4_PREFIX,$GW_OV6_PREFIX" "$(lab_hub_endpoint hub2)" 5
wg_peer hub2 wg0 d2 "$(lab_ov4 d2)/32,$(lab_ov6 d2)/128"
check "C: gatewire wg d2 -> wireguard-go hub (v4)" wait_for 15 lab_ping1 d2 "$(lab_ov4 hub2)"
check "C: gatewire wg d2 -> wireguard-go hub (v6)" lab_ping d2 "$(lab_ov6 hub2)"
check "C: d2 -> n3 (gatewire wg -> wireguard-go hub -> gatewire node)" wait_for 10 lab_ping1 d2 "$(lab_ov4 n3)"
check "C: $MB MiB d2 -> hub2" tcp_transfer d2 hub2 "$(lab_ov4 hub2)" "$f"
check "C: $MB MiB hub2 -> d2 (v6)" tcp_transfer hub2 d2 "$(lab_ov6 d2)" "$f"
hs=$(lab_exec d2 wg show wg0 latest-handshakes | awk '{print $2}')
check "C: wg show on gatewire wg reports the handshake ($hs)" test "${hs:-0}" -gt 0

lab_finish

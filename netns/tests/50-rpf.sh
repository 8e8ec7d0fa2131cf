#!/usr/bin/env bash
# Source filtering (cryptokey routing): n1 sends from addresses outside its
# allowed IPs -- an unassigned overlay address and d1's own address, v4 and v6.
# The hub drops them and counts drops.source_not_allowed, for the interface and
# for peer n1; n1's legitimate traffic still flows.
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=50-rpf
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq
need_gatewire

lab_up 1 1
gw_start_hub hub n1 d1
gw_start_node n1 hub
gw_start_node d1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
must "d1 reaches the hub" wait_for 15 lab_ping1 d1 "$(lab_ov4 hub)"

drops() { # jq path under the interface or the peer: iface|peer NAME
    local j
    j=$(gw_show_json hub) || return 1
    if [ "$1" = iface ]; then
        jq -r '[.interfaces[] | .drops.source_not_allowed // 0] | add' <<<"$j"
    else
        jq -r --arg k "$(lab_pub "$2")" \
            '[.interfaces[].peers[] | select(.public_key == $k) | .drops.source_not_allowed // 0] | add // 0' <<<"$j"
    fi
}
before_if=$(drops iface || echo 0)
before_n1=$(drops peer n1 || echo 0)
lab_log "source_not_allowed before: interface $before_if, n1 $before_n1"

# spoofed sources on n1's tunnel interface
spoof4=100.64.9.9
spoof6=fd77:6777::9:9
lab_exec n1 ip addr add "$spoof4/32" dev gwn0
lab_exec n1 ip addr add "$(lab_ov4 d1)/32" dev gwn0
lab_exec n1 ip -6 addr add "$spoof6/128" dev gwn0 nodad
ping_from() { lab_exec n1 ping -q -n -c 5 -i 0.2 -W 1 -I "$1" "$2" >/dev/null 2>&1; }

check "ping from unassigned $spoof4 to the hub gets no answer" not ping_from "$spoof4" "$(lab_ov4 hub)"
check "ping from d1's address (spoofed by n1) to the hub gets no answer" not ping_from "$(lab_ov4 d1)" "$(lab_ov4 hub)"
check "ping from unassigned $spoof6 to the hub gets no answer" not ping_from "$spoof6" "$(lab_ov6 hub)"
check "ping from $spoof6 to node d1 through the hub gets no answer" not ping_from "$spoof6" "$(lab_ov6 d1)"
# a UDP burst from a spoofed source, to be sure many packets are counted
lab_exec n1 bash -c "for i in \$(seq 50); do echo x; done | socat -u - UDP4-SENDTO:$(lab_ov4 hub):9,bind=$spoof4" >/dev/null 2>&1 || true

after_if=$(drops iface || echo 0)
after_n1=$(drops peer n1 || echo 0)
after_d1=$(drops peer d1 || echo 0)
lab_log "source_not_allowed after: interface $after_if, n1 $after_n1, d1 $after_d1"
check "show --json: interface drops.source_not_allowed grew ($before_if -> $after_if)" \
    test "${after_if:-0}" -gt "${before_if:-0}"
check "show --json: at least 15 drops counted on the interface ($after_if)" test "${after_if:-0}" -ge 15
check "show --json: peer n1 drops.source_not_allowed > 0 ($after_n1)" test "${after_n1:-0}" -gt 0
check "show --json: peer d1 has no source_not_allowed drops ($after_d1)" test "${after_d1:-0}" -eq 0

# remove the spoofed addresses (the kernel may pick them as source otherwise)
lab_exec n1 ip addr del "$spoof4/32" dev gwn0
lab_exec n1 ip addr del "$(lab_ov4 d1)/32" dev gwn0
lab_exec n1 ip -6 addr del "$spoof6/128" dev gwn0
check "n1's own address still works (v4)" lab_ping n1 "$(lab_ov4 hub)"
check "n1's own address still works (v6)" lab_ping n1 "$(lab_ov6 hub)"
check "d1 still reaches n1" lab_ping d1 "$(lab_ov4 n1)"
check "hub still running" lab_alive hub
lab_finish

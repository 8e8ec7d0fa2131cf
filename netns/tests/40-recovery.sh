#!/usr/bin/env bash
# Recovery: kill -9 the hub and restart it; every node (n1, n2 hidden, d1
# direct) carries traffic again within RECOVERY_MAX (10) seconds of the hub
# being back. Then the NAT forgets its mappings (nat_rebind): the hub must still
# reach the hidden node, and `gatewire show --json` shows its new port.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=40-recovery
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq conntrack
need_gatewire
RECOVERY_MAX=${RECOVERY_MAX:-10}

lab_up 2 1
nodes=(n1 n2 d1)
gw_start_hub hub "${nodes[@]}"
for n in "${nodes[@]}"; do gw_start_node "$n" hub; done
for n in "${nodes[@]}"; do
    must "$n reaches the hub before the crash" wait_for 15 lab_ping1 "$n" "$(lab_ov4 hub)"
done
must "n1 -> d1 before the crash" wait_for 5 lab_ping1 n1 "$(lab_ov4 d1)"

# recovery_ms NODE DEST T0_MS OUTFILE : poll fast until DEST answers from NODE,
# write the milliseconds since T0 (or "timeout") to OUTFILE.
recovery_ms() {
    local node=$1 dst=$2 t0=$3 out=$4 end
    end=$(($(now_ms) + 30000))
    while [ "$(now_ms)" -lt "$end" ]; do
        if lab_exec "$node" ping -q -n -c 1 -W 0.25 "$dst" >/dev/null 2>&1; then
            echo $(($(now_ms) - t0)) >"$out"
            return 0
        fi
        sleep 0.05
    done
    echo timeout >"$out"
}

fmt_s() { case $1 in timeout) echo "timeout" ;; *) printf '%d.%02d' $(($1 / 1000)) $(($1 % 1000 / 10)) ;; esac; }

for round in 1 2; do
    lab_log "round $round: kill -9 the hub"
    lab_stop hub KILL
    # a few seconds of silence: nodes keep sending into the void
    sleep "${DOWN_SECS:-3}"
    gw_restart_hub hub
    t_back=$(now_ms)
    lab_log "hub is back (gw0 up)"
    pids=()
    for n in "${nodes[@]}"; do
        recovery_ms "$n" "$(lab_ov4 hub)" "$t_back" "$GW_TMP/rec-$round-$n" &
        pids+=($!)
    done
    recovery_ms n1 "$(lab_ov4 d1)" "$t_back" "$GW_TMP/rec-$round-n1-d1" &
    pids+=($!)
    wait "${pids[@]}"
    for n in "${nodes[@]}"; do
        ms=$(cat "$GW_TMP/rec-$round-$n")
        echo "RECOVERY round=$round node=$n seconds=$(fmt_s "$ms")" >&2
        check "round $round: $n carries traffic $(fmt_s "$ms") s after the hub is back (max $RECOVERY_MAX)" \
            test "$ms" != timeout -a "${ms/timeout/999999}" -le $((RECOVERY_MAX * 1000))
    done
    ms=$(cat "$GW_TMP/rec-$round-n1-d1")
    echo "RECOVERY round=$round path=n1->d1 seconds=$(fmt_s "$ms")" >&2
    check "round $round: n1 -> d1 through the hub again after $(fmt_s "$ms") s" \
        test "$ms" != timeout -a "${ms/timeout/999999}" -le $((RECOVERY_MAX * 1000))
done

# ---------------------------------------------------------------- NAT rebinding
ep_port() {
    gw_show_json hub | jq -r --arg k "$(lab_pub "$1")" \
        '.interfaces[].peers[] | select(.public_key == $k) | .endpoint // ""' | sed 's/.*://'
}
in_range() { [ -n "$1" ] && [ "$1" -ge "$(nat_port_min)" ] && [ "$1" -le "$(nat_port_max)" ]; }
port_in_range() { in_range "$(ep_port "$1")"; }

old=$(ep_port n1)
check "before rebind: hub sees n1 at a NAT port ($old)" in_range "$old"
nat_rebind
t0=$(now_ms)
check "after rebind: the hub reaches n1" wait_for 20 lab_ping1 hub "$(lab_ov4 n1)"
t1=$(now_ms)
check "after rebind: gatewire show --json shows n1's new port" wait_for 10 port_in_range n1
check "after rebind: the hub reaches n2" wait_for 20 lab_ping1 hub "$(lab_ov4 n2)"
new=$(ep_port n1)
lab_log "n1 endpoint port $old -> $new; hub reached n1 again $(fmt_s $((t1 - t0))) s after the rebind"
check "after rebind: d1 -> n1 through the hub" wait_for 10 lab_ping1 d1 "$(lab_ov4 n1)"

for p in hub "${nodes[@]}"; do check "$p still running" lab_alive "$p"; done

# ------------------------------------------------- the TUN deleted under a node
# Nothing more can pass: the node ends with an error (its supervisor starts it
# again with a new interface) instead of failing every read for ever.
gone_pid=$(lab_pid n2)
lab_sh n2 "ip link del gwn0"
check "n2 ends once its TUN is deleted" wait_for 5 not lab_alive n2
rc=0
wait "$gone_pid" 2>/dev/null || rc=$?
check "n2 exits with an error status ($rc)" test "$rc" -ne 0
check "n2 logs why" grep -q 'TUN interface is gone' "$(lab_logfile n2)"
check "the hub still reaches n1" wait_for 10 lab_ping1 hub "$(lab_ov4 n1)"
lab_finish

#!/usr/bin/env bash
# Hostile traffic at the hub's UDP port, from the pub namespace, while n1 sends
# a file to d1 through the hub:
#   100,000 random datagrams (v4), 50,000 forged WireGuard messages (types 1..4,
#   garbage, wrong lengths; v4 and v6), then a flood of handshake initiations
#   with a valid mac1 (python) plus wireguard-go peers with unknown keys.
# During the initiation flood node n2 starts and must complete a handshake.
# Afterwards: hub alive, transfer intact, hub log grew by fewer than 100 lines.
# timeout: 480
set -euo pipefail
export GW_TEST_NAME=60-hostile
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd python3 ping socat jq wireguard-go wg
need_gatewire
MB=${HOSTILE_MB:-100}
FLOOD_SECS=${FLOOD_SECS:-30}
LOG_MAX=${LOG_MAX:-100}
FLOOD="$GW_LIB_DIR/tools/wgflood.py"

lab_up 2 1
gw_start_hub hub n1 n2 d1
gw_start_node n1 hub
gw_start_node d1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
must "n1 reaches d1" wait_for 10 lab_ping1 n1 "$(lab_ov4 d1)"

hublog=$(lab_logfile hub)
lines0=$(wc -l <"$hublog")
f=$(make_file data "$MB")

# Transfers n1 -> d1 run back to back in the background during everything
# below, until the attack is over ($GW_TMP/stop); each result is one line.
(
    while [ ! -e "$GW_TMP/stop" ]; do
        if tcp_transfer n1 d1 "$(lab_ov4 d1)" "$f" 400; then echo ok; else echo fail; fi >>"$GW_TMP/xfer.result"
    done
) &
xfer=$!
sleep 1

hub4=$(lab_wan4 hub)
hub6=$(lab_wan6 hub)
flood() { lab_exec pub python3 "$FLOOD" "$@" --port "$GW_HUB_PORT" 2>&1 | sed 's/^/    flood: /' >&2; }
flood random --target "$hub4" --count 100000 --seconds 60
flood forged --target "$hub4" --count 40000 --seconds 60
flood forged --target "$hub6" --count 10000 --seconds 60
check "hub survived random and forged datagrams" lab_alive hub

# unknown keys doing real handshakes: wireguard-go peers in pub
for i in 1 2 3 4; do
    lab_key "x$i"
    wg_impl_start wireguard-go pub "wgx$i"
    lab_exec pub wg set "wgx$i" private-key "$(lab_keyfile "x$i")" \
        peer "$(lab_pub hub)" endpoint "$hub4:$GW_HUB_PORT" allowed-ips "$(lab_ov4 hub)/32" persistent-keepalive 1
    lab_exec pub ip link set "wgx$i" up
done

# the initiation flood, in the background
lab_bg pub initflood python3 "$FLOOD" initflood --target "$hub4" --port "$GW_HUB_PORT" \
    --pubkey "$(lab_pub hub)" --count 3000000 --seconds "$FLOOD_SECS"
sleep 3
lab_log "starting n2 during the initiation flood"
t0=$(now_ms)
gw_start_node n2 hub
if check "n2 completes a handshake and reaches the hub during the flood" wait_for 40 lab_ping1 n2 "$(lab_ov4 hub)"; then
    lab_log "n2 came up $(($(now_ms) - t0)) ms after starting"
fi
check "initiation flood was still running when n2 came up" lab_alive initflood
check "n1 (existing session) still reaches the hub during the flood" lab_ping n1 "$(lab_ov4 hub)"

# restart n2 once more during the flood, as a node the hub already knows
if lab_alive initflood; then
    lab_stop n2
    gw_restart_node n2
    check "restarted n2 reaches the hub again during the flood" wait_for 40 lab_ping1 n2 "$(lab_ov4 hub)"
fi
lab_wait initflood || true
sed -n 's/^/    /p' "$(lab_logfile initflood)" | tail -n 1 >&2
for i in 1 2 3 4; do lab_stop "wireguard-go-pub-wgx$i"; done

touch "$GW_TMP/stop"
wait "$xfer" || true
n_ok=$(grep -cx ok "$GW_TMP/xfer.result" || true)
n_fail=$(grep -cx fail "$GW_TMP/xfer.result" || true)
lab_log "transfers of $MB MiB during the attack: $n_ok intact, $n_fail failed"
check "every $MB MiB transfer n1 -> d1 during the attack arrived intact ($n_ok ok, $n_fail failed)" \
    test "$n_ok" -ge 2 -a "$n_fail" -eq 0
check "hub still running" lab_alive hub
check "n1 -> d1 still works" lab_ping n1 "$(lab_ov4 d1)"
check "n2 -> n1 works" wait_for 10 lab_ping1 n2 "$(lab_ov4 n1)"

lines1=$(wc -l <"$hublog")
added=$((lines1 - lines0))
lab_log "hub log grew by $added lines during the attack"
check "hub log not flooded: $added lines added (< $LOG_MAX)" test "$added" -lt "$LOG_MAX"

j=$(gw_show_json hub || echo '{}')
lab_log "hub drop counters: $(jq -c '[.interfaces[]?.drops]' <<<"$j")"
total=$(jq '[.interfaces[]?.drops // {} | to_entries[] | .value] | add // 0' <<<"$j")
check "hub counted the hostile datagrams as drops ($total)" test "${total:-0}" -gt 10000
for r in invalid_packet cookie_sent handshake_rate_limited decrypt_failed unknown_peer; do
    v=$(jq "[.interfaces[]?.drops.$r // 0] | add // 0" <<<"$j")
    lab_log "drops.$r = $v"
done
lab_finish

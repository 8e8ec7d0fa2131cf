#!/usr/bin/env bash
# A node that starts with its clock behind (a machine without a real-time
# clock, before NTP): its handshake timestamps are older than the last one the
# hub accepted from it, and the hub refuses every initiation (counted as
# stale_timestamp, and warned about). When the clock is set right the node
# renews its handshake state and is back within seconds, without a restart.
# The node's clock is libfaketime's (LD_PRELOAD, an offset read from a file);
# its monotonic clock is left alone.
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=42-clock-behind
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq
need_gatewire
BACK_MAX=${BACK_MAX:-20}

faketime_lib=""
for f in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1; do
    if [ -e "$f" ]; then
        faketime_lib=$f
        break
    fi
done
[ -n "$faketime_lib" ] || lab_die "missing libfaketime (Debian's faketime package; run .ci/deps)"

lab_up 1 0
gw_start_hub hub n1
gw_start_node n1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"

stale() {
    gw_show_json hub | jq -r '[.interfaces[].drops.stale_timestamp // 0] | add // 0'
}
stale_peer() {
    gw_show_json hub | jq -r --arg k "$(lab_pub n1)" \
        '[.interfaces[].peers[] | select(.public_key == $k) | .drops.stale_timestamp // 0] | add // 0'
}
stale_above() { [ "$(stale)" -gt "$1" ]; }
assert_eq "no stale initiation yet" 0 "$(stale)"

# The node stops and starts again 10 minutes behind.
lab_stop n1
clockfile="$GW_TMP/n1.faketime"
echo "-600" >"$clockfile"
lab_bg n1 n1 env NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" \
    LD_PRELOAD="$faketime_lib" FAKETIME_TIMESTAMP_FILE="$clockfile" FAKETIME_NO_CACHE=1 \
    DONT_FAKE_MONOTONIC=1 FAKETIME_DONT_FAKE_MONOTONIC=1 \
    "$GATEWIRE" node --config "$GW_TMP/conf/n1.toml"
wait_for 10 iface_up n1 gwn0 || lab_die "gatewire node in n1 did not bring up gwn0 within 10 s"
behind() {
    local there here
    there=$(lab_exec n1 env LD_PRELOAD="$faketime_lib" FAKETIME_TIMESTAMP_FILE="$clockfile" \
        FAKETIME_NO_CACHE=1 date +%s)
    here=$(date +%s)
    [ $((here - there)) -ge 590 ]
}
must "libfaketime sets n1's clock 10 minutes behind" behind

must "the hub refuses n1's initiations as stale" wait_for 15 stale_above 0
first=$(stale)
check "and goes on refusing them (more than $first)" wait_for 12 stale_above "$first"
check "counted for n1 too" test "$(stale_peer)" -gt 0
check "n1 cannot reach the hub" not lab_ping1 n1 "$(lab_ov4 hub)"
hublog=$(lab_logfile hub)
check "the hub says the peer's clock may be behind" \
    grep -q "WARN.*is the peer's clock behind?" "$hublog"
check "and says it once a minute at most" \
    test "$(grep -c "is the peer's clock behind?" "$hublog")" -eq 1
check "the stale initiations are not decryption failures" \
    test "$(gw_show_json hub | jq '[.interfaces[].drops.decrypt_failed // 0] | add // 0')" -eq 0

# NTP sets the clock right.
echo "+0" >"$clockfile"
t0=$(now_ms)
check "n1 carries traffic again within $BACK_MAX s of its clock being set right" \
    wait_for "$BACK_MAX" lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "back after $((($(now_ms) - t0) / 1000)) s"
check "n1 says it handshook again with the clock's time" \
    grep -q "handshake timestamps behind the wall clock" "$(lab_logfile n1)"
check "the hub reaches n1" wait_for 5 lab_ping1 hub "$(lab_ov4 n1)"
late=$(stale)
sleep 6
assert_eq "no stale initiation since" "$late" "$(stale)"
for p in hub n1; do check "$p still running" lab_alive "$p"; done
lab_finish

#!/usr/bin/env bash
# CLI smoke test: keys interchangeable with wg, config validation, --check,
# clean exit on SIGTERM/SIGINT.
# timeout: 120
set -euo pipefail
export GW_TEST_NAME=05-cli
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd wg jq
need_gatewire

# --- keys -------------------------------------------------------------------
k_gw=$("$GATEWIRE" genkey)
k_wg=$(wg genkey)
is_key() { [[ $1 =~ ^[A-Za-z0-9+/]{43}=$ ]]; }
check "gatewire genkey prints a base64 key ($k_gw)" is_key "$k_gw"
check "gatewire genkey gives a new key each time" test "$k_gw" != "$("$GATEWIRE" genkey)"
check "wg pubkey accepts a gatewire key, same result as gatewire pubkey" \
    test "$(echo "$k_gw" | wg pubkey)" = "$(echo "$k_gw" | "$GATEWIRE" pubkey)"
check "gatewire pubkey accepts a wg key, same result as wg pubkey" \
    test "$(echo "$k_wg" | "$GATEWIRE" pubkey)" = "$(echo "$k_wg" | wg pubkey)"
check "gatewire pubkey accepts input without trailing newline" \
    test "$(printf %s "$k_wg" | "$GATEWIRE" pubkey)" = "$(echo "$k_wg" | wg pubkey)"
pubkey_of() { printf '%s\n' "$1" | "$GATEWIRE" pubkey >/dev/null 2>&1; }
check "gatewire pubkey rejects garbage" not pubkey_of "not a key"
check "gatewire pubkey rejects a 31-byte key" not pubkey_of "$(head -c 31 /dev/urandom | base64)"

# --- config validation --------------------------------------------------------
lab_up 0 0
good_hub=$(gw_hub_conf hub n1 n2)
good_node=$(gw_node_conf n1 hub)

# run_check NAME CONFIG MODE : gatewire MODE --config CONFIG --check, inside the
# hub namespace (so a wrongly started daemon could not touch the host);
# output in $GW_TMP/NAME.out, exit status returned.
run_check() {
    local rc=0
    lab_exec hub timeout 10 "$GATEWIRE" "$3" --config "$2" --check >"$GW_TMP/$1.out" 2>&1 || rc=$?
    return $rc
}
out_has() { grep -qi -- "$2" "$GW_TMP/$1.out"; }

check "hub --check accepts a good config" run_check good-hub "$good_hub" hub
check "node --check accepts a good config" run_check good-node "$good_node" node
has_gw0() { ip -n "$(lab_ns hub)" link show gw0 >/dev/null 2>&1; }
check "--check did not create an interface" not has_gw0

# bad_case NAME MODE MUST_MENTION sed-expression : mutate a good config
bad_case() {
    local name=$1 mode=$2 word=$3 expr=$4 base f rc=0
    if [ "$mode" = hub ]; then base=$good_hub; else base=$good_node; fi
    f="$GW_TMP/conf/bad-$name.toml"
    sed "$expr" "$base" >"$f"
    run_check "$name" "$f" "$mode" || rc=$?
    check "$name: non-zero exit (got $rc)" test "$rc" -ne 0
    check "$name: message names '$word'" out_has "$name" "$word"
    lab_log "$name: $(head -c 300 "$GW_TMP/$name.out" | tr '\n' ' ')"
}
bad_case unknown-hub-key hub bogus_key '/^\[hub\]/a bogus_key = 1'
bad_case unknown-peer-key hub colour '/^\[\[peer\]\]/a colour = "blue"'
bad_case unknown-node-key node frobnicate '/^\[node\]/a frobnicate = true'
bad_case bad-private-key hub private_key 's|^private_key = .*|private_key = "not!base64"|'
bad_case short-private-key hub private_key "s|^private_key = .*|private_key = \"$(head -c 16 /dev/urandom | base64)\"|"
bad_case bad-peer-pubkey hub public_key '0,/^public_key = .*/s||public_key = "AAAA"|'
bad_case bad-hub-pubkey node public_key 's|^public_key = .*|public_key = "%%%"|'
bad_case bad-allowed-ip hub allowed_ips '0,/^allowed_ips = .*/s||allowed_ips = ["100.64.0.300/32"]|'
bad_case bad-endpoint node endpoint 's|^endpoint = .*|endpoint = "no-port-here"|'

rc=0
lab_exec hub timeout 10 "$GATEWIRE" hub --config "$GW_TMP/does-not-exist.toml" --check >"$GW_TMP/missing.out" 2>&1 || rc=$?
check "missing config file: non-zero exit" test "$rc" -ne 0

# --- lifecycle ------------------------------------------------------------------
for sig in TERM INT; do
    gw_start_hub hub n1 n2
    check "hub is running before SIG$sig" lab_alive hub
    pid=$(lab_pid hub)
    kill -"$sig" "$pid"
    rc=0
    if wait_for 10 not kill -0 "$pid"; then
        wait "$pid" || rc=$?
        check "hub exits with status 0 on SIG$sig (got $rc)" test "$rc" -eq 0
    else
        check "hub exits within 10 s of SIG$sig" false
        lab_stop hub KILL
    fi
    rm -f "$GW_TMP/pids/hub.pid"
    check "gw0 is gone after SIG$sig" not has_gw0
done

# a second start after a clean stop works (stale UAPI socket handled)
gw_start_hub hub n1 n2
check "hub restarts after a clean stop" lab_alive hub
show_ok() { gw_show_json hub | jq -e ".interfaces[0].listen_port == $GW_HUB_PORT" >/dev/null; }
check "gatewire show --json works against the hub" show_ok
lab_stop hub

lab_finish

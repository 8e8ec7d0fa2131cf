#!/usr/bin/env bash
# Jool's graybox SIIT vectors through a real TUN: the real `gatewire hub` runs
# the translator on TUN xv0 in a fresh namespace, configured like the cases
# (restarted when a case's settings change), and the Rust test
# tests/xlat_tun_vectors.rs injects every sent packet into the TUN with an
# AF_PACKET socket and compares what the translator writes back with the
# expected packets (graybox rules: pair by addresses, same length, bytes equal
# but the ignored offsets). `ip rule iif xv0 blackhole` keeps the kernel from
# answering the translated packets itself (nat64.md section 1.5).
# Env: XLAT_TUN_TEST (prebuilt test binary; default: cargo builds it).
# timeout: 600
set -euo pipefail
export GW_TEST_NAME=80-xlat-vectors
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ip cargo jq
need_gatewire

# the test binary, of the cargo profile the gatewire binary comes from
# (target/PROFILE/gatewire; CI's `ci`, whose tests `cargo test --profile ci`
# has built already); picked by its target name, not by output order
profile=release
case $GATEWIRE in
*/target/debug/gatewire) profile=dev ;;
*/target/*/gatewire) profile=$(basename "$(dirname "$GATEWIRE")") ;;
esac
test_bin=${XLAT_TUN_TEST:-}
if [ -z "$test_bin" ]; then
    test_bin=$(cd "$GW_ROOT" && cargo test --profile "$profile" --test xlat_tun_vectors --no-run --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .target.name == "xlat_tun_vectors" and .executable != null) | .executable' |
        tail -n 1)
fi
[ -x "$test_bin" ] || lab_die "could not build tests/xlat_tun_vectors.rs"

trap _lab_on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
_lab_netns_add xv
lab_exec xv sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
lab_exec xv ip rule add iif xv0 blackhole
lab_exec xv ip -6 rule add iif xv0 blackhole

out="$GW_TMP/logs/vectors.log"
rc=0
lab_exec xv env GATEWIRE="$GATEWIRE" "$test_bin" --ignored --nocapture --test-threads=1 >"$out" 2>&1 || rc=$?
grep -E 'graybox SIIT|^FAIL' "$out" >&2 || true
check "every graybox SIIT case passes through the TUN (see $out)" test "$rc" -eq 0
check "the case count was reported" grep -q "cases pass" "$out"
lab_finish

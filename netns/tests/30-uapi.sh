#!/usr/bin/env bash
# The standard UAPI on a gatewire hub: `wg show` reports peers, `wg set` adds
# peers at runtime (a gatewire node d1 and a wireguard-go node n2 connect
# through them) and removes them (traffic stops).
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=30-uapi
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd wg wireguard-go ping jq
need_gatewire

lab_up 2 1
gw_start_hub hub n1
gw_start_node n1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
lab_ping n1 "$(lab_ov4 hub)" 5 || true # some transfer to see

# ---------------------------------------------------------------- wg show
show=$(lab_exec hub wg show gw0 2>&1 || true)
printf '%s\n' "$show" | sed 's/^/    | /' >&2
check "wg show gw0 names the hub's public key" grep -qF "public key: $(lab_pub hub)" <<<"$show"
check "wg show gw0 shows the listen port" grep -q "listening port: $GW_HUB_PORT" <<<"$show"
check "wg show gw0 lists peer n1" grep -qF "peer: $(lab_pub n1)" <<<"$show"
check "wg show gw0 shows n1's endpoint (the NAT)" grep -q "endpoint: $(lab_wan4 nat):" <<<"$show"
check "wg show gw0 shows a latest handshake" grep -q "latest handshake:" <<<"$show"
check "wg show gw0 shows transfer" grep -q "transfer:" <<<"$show"
check "wg show gw0 shows n1's allowed ips" grep -q "allowed ips: .*$(lab_ov4 n1)/32" <<<"$show"

# dump: pubkey psk endpoint allowed-ips latest-handshake rx tx keepalive
dump_field() { lab_exec hub wg show gw0 dump | awk -v k="$(lab_pub "$1")" -v c="$2" '$1==k {print $c}'; }
hs=$(dump_field n1 5)
rx=$(dump_field n1 6)
tx=$(dump_field n1 7)
check "dump: n1 latest handshake is recent ($hs)" test "$(($(date +%s) - ${hs:-0}))" -lt 60
check "dump: n1 rx ($rx) and tx ($tx) > 0" test "${rx:-0}" -gt 0 -a "${tx:-0}" -gt 0
check "wg show gw0 public-key" test "$(lab_exec hub wg show gw0 public-key)" = "$(lab_pub hub)"
check "wg show gw0 listen-port" test "$(lab_exec hub wg show gw0 listen-port)" = "$GW_HUB_PORT"
showconf_ok() { lab_exec hub wg showconf gw0 | grep -q '^\[Peer\]'; }
check "wg showconf gw0 works" showconf_ok

# The socket hands out the private key: another user is refused whatever the
# file's mode (the kernel's credentials decide, not the mode).
sock=/run/wireguard/gw0.sock
lab_exec hub chmod 666 "$sock"
as_nobody=$(printf 'get=1\n\n' | lab_exec hub setpriv --reuid 65534 --regid 65534 --clear-groups \
    socat -t 2 - "UNIX-CONNECT:$sock" 2>&1 || true)
printf '%s\n' "$as_nobody" | sed 's/^/    nobody | /' | grep -v private_key >&2
# Connected (no "Permission denied" from socat) and closed unanswered (at
# most socat's "Broken pipe" on writing the request).
cut_off() { ! grep -qE 'private_key|errno=|Permission denied|No such file|refused' <<<"$as_nobody"; }
check "another user gets nothing from the UAPI socket, even at mode 666" cut_off
as_root=$(printf 'get=1\n\n' | lab_exec hub socat -t 2 - "UNIX-CONNECT:$sock" 2>&1 || true)
check "root still gets its answer" grep -q '^errno=0' <<<"$as_root"
lab_exec hub chmod 600 "$sock"

# ---------------------------------------------------------------- wg set: fwmark
# wg-quick's full tunnel routes everything but the device's own marked
# packets into it: the mark must be on what the UDP sockets send.
lab_exec hub nft -f - <<EOF
table inet gwmark {
    chain out {
        type filter hook output priority 0;
        meta mark 0xca6c udp sport $GW_HUB_PORT counter
    }
}
EOF
marked() {
    lab_exec hub nft -j list table inet gwmark |
        jq '[.nftables[] | .rule? // empty | .expr[] | .counter? // empty | .packets] | add // 0'
}
check "wg set fwmark" lab_exec hub wg set gw0 fwmark 0xca6c
check "wg show reports the fwmark" test "$(lab_exec hub wg show gw0 fwmark)" = "0xca6c"
lab_ping n1 "$(lab_ov4 hub)" 3 || true
m1=$(marked)
check "the hub's own UDP packets carry the mark ($m1 counted)" test "${m1:-0}" -gt 0
check "wg set fwmark 0 removes it" lab_exec hub wg set gw0 fwmark 0
check "wg show reports no fwmark" test "$(lab_exec hub wg show gw0 fwmark)" = "off"
lab_ping n1 "$(lab_ov4 hub)" 3 || true
m2=$(marked)
check "unmarked again: no more marked packets ($m1 then $m2)" test "${m2:-0}" -eq "${m1:-0}"
lab_exec hub nft delete table inet gwmark || true

# ---------------------------------------------------------------- wg set: add
lab_log "adding d1 (gatewire node) and n2 (wireguard-go node) at runtime"
check "wg set adds d1" lab_exec hub wg set gw0 peer "$(lab_pub d1)" \
    allowed-ips "$(lab_ov4 d1)/32,$(lab_ov6 d1)/128"
check "wg set adds n2" lab_exec hub wg set gw0 peer "$(lab_pub n2)" \
    allowed-ips "$(lab_ov4 n2)/32,$(lab_ov6 n2)/128"
check "wg show lists 3 peers" test "$(lab_exec hub wg show gw0 peers | wc -l)" -eq 3

gw_start_node d1 hub
wg_impl_start wireguard-go n2 wg0
wg_iface_setup n2 wg0 n2 0 "$(lab_ov4 n2)/10" "$(lab_ov6 n2)/48"
wg_peer n2 wg0 hub "$GW_OV4_PREFIX,$GW_OV6_PREFIX" "$(lab_hub_endpoint hub)" 5

check "runtime peer d1 (gatewire) reaches the hub" wait_for 15 lab_ping1 d1 "$(lab_ov4 hub)"
check "runtime peer d1 reaches the hub over v6" lab_ping d1 "$(lab_ov6 hub)"
check "runtime peer n2 (wireguard-go) reaches the hub" wait_for 15 lab_ping1 n2 "$(lab_ov4 hub)"
check "n1 reaches runtime peer d1 through the hub" wait_for 5 lab_ping1 n1 "$(lab_ov4 d1)"
check "runtime peer n2 reaches d1 through the hub" wait_for 5 lab_ping1 n2 "$(lab_ov4 d1)"
check "the hub reaches runtime peer n2" lab_ping hub "$(lab_ov4 n2)"

peer_count=$(gw_show_json hub | jq '[.interfaces[].peers[]] | length' || echo "?")
check "gatewire show --json lists the runtime peers too ($peer_count)" test "$peer_count" = 3

# ---------------------------------------------------------------- wg set: remove
check "wg set removes d1" lab_exec hub wg set gw0 peer "$(lab_pub d1)" remove
check "wg set removes n2" lab_exec hub wg set gw0 peer "$(lab_pub n2)" remove
check "wg show lists 1 peer" test "$(lab_exec hub wg show gw0 peers | wc -l)" -eq 1
check "removed d1 is cut off (d1 -> hub fails)" lab_ping_fails d1 "$(lab_ov4 hub)"
check "removed n2 is cut off (n2 -> hub fails)" lab_ping_fails n2 "$(lab_ov4 hub)"
check "removed d1 is cut off (hub -> d1 fails)" lab_ping_fails hub "$(lab_ov4 d1)"
check "n1 cannot reach removed d1" lab_ping_fails n1 "$(lab_ov4 d1)"
check "n1 still reaches the hub" lab_ping n1 "$(lab_ov4 hub)"
sleep 6 # a few handshake retries of the removed peers
check "removed d1 stays cut off" lab_ping_fails d1 "$(lab_ov4 hub)"

# re-adding d1 brings it back
check "wg set re-adds d1" lab_exec hub wg set gw0 peer "$(lab_pub d1)" \
    allowed-ips "$(lab_ov4 d1)/32,$(lab_ov6 d1)/128"
check "re-added d1 reaches the hub again" wait_for 20 lab_ping1 d1 "$(lab_ov4 hub)"

# a change of allowed-ips at runtime takes effect
check "wg set narrows n1's allowed-ips to v6 only" lab_exec hub wg set gw0 peer "$(lab_pub n1)" \
    allowed-ips "$(lab_ov6 n1)/128"
check "n1 over v4 is now refused" lab_ping_fails n1 "$(lab_ov4 hub)"
check "n1 over v6 still works" lab_ping n1 "$(lab_ov6 hub)"

# A new persistent keepalive for a live peer rebuilds its WireGuard state:
# the hub handshakes at once, so n1's traffic goes on without a gap.
check "wg set changes n1's persistent keepalive" lab_exec hub wg set gw0 peer "$(lab_pub n1)" \
    persistent-keepalive 7
check "n1 still reaches the hub right after" wait_for 2 lab_ping1 n1 "$(lab_ov6 hub)"
ka_of_n1() { lab_exec hub wg show gw0 persistent-keepalive | awk -v k="$(lab_pub n1)" '$1 == k {print $2}'; }
check "wg show reports it ($(ka_of_n1))" test "$(ka_of_n1)" = 7

for p in hub n1 d1; do check "$p still running" lab_alive "$p"; done
lab_finish

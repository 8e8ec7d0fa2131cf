#!/usr/bin/env bash
# Names across the hub mesh: two hubs with control planes share one etcd, and
# a name one hub grants to a node cannot be granted to another node through
# the other hub. Hub A (namespace hub, mesh name hub-a) has hidden node n1,
# hub B (hub2, hub-b) has hidden node n2; each node declares its services to
# its hub's node API.
#  1. `ctl name set blog --owner n1` on hub A claims blog.gw.test in etcd for
#     n1. On hub B the same name for n2 is refused (409, naming hub-a and n1)
#     and hub B's state is unchanged; for n1 it is taken (a node keeps its name
#     on every hub). n1 declares blog: served through either hub.
#  2. Deleting blog on hub A releases hub A's claim and hub B, which still
#     grants blog to n1, claims it.
#  3. Hub B grants shop to n2, which declares it: served. A claim written by
#     etcdctl for another node through a hub-z takes precedence: hub B turns
#     n2's shop route off (404), shows the conflict (`show`, `/metrics`) and
#     logs it; once that claim is deleted hub B claims shop again and serves it.
#  4. A lapsed claim (expired, grace period over) is taken over; a malformed
#     claim is counted and logged without its value, and holds its host
#     against every grant until it is deleted.
#  0. Before the hubs have read the claims from etcd (etcd not started yet),
#     a grant is refused with 503.
#  5. Hub B keeps the claims in its state directory: restarted while etcd is
#     down, it still refuses shop (held by hub-z's claim) while serving n2's
#     other name, and answers grants with 503 until etcd is back.
# timeout: 240
# Variables read only inside eval'd checks look unused to shellcheck.
# shellcheck disable=SC2034
set -euo pipefail
export GW_TEST_NAME=102-mesh-names
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss jq etcd etcdctl
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB2_4=$(lab_wan4 hub2)
PREFIX=/gatewire/mesh/names/

lab_up 2 0
lab_add_hub2

ETCD=$(lab_etcd_url hub)
ectl() { lab_exec hub etcdctl --endpoints "$ETCD" "$@"; }

# names_hub NS NAME NODE : a hub config with the proxy, the control plane and [mesh]
names_hub() {
    local ns=$1 name=$2 node=$3 conf
    conf=$(gw_hub_conf "$ns" "$node")
    cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
connect_timeout = 2

[control]
state_dir = "$GW_TMP/state-$ns"
socket = "$GW_TMP/$ns.ctl.sock"
node_port = 7001

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$(lab_wan4 "$ns")"]
ttl = 3
EOF
    echo "$conf"
}
GW_CONF=$(names_hub hub hub-a n1) gw_start_hub hub
CONF_B=$(names_hub hub2 hub-b n2)
GW_CONF=$CONF_B gw_start_hub hub2

# run_out CMD... : runs CMD (which may fail); its output in $out, status in $rc
run_out() {
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
}
ctlA() { "$GATEWIRE" ctl --socket "$GW_TMP/hub.ctl.sock" "$@"; }
ctlB() { "$GATEWIRE" ctl --socket "$GW_TMP/hub2.ctl.sock" "$@"; }
must "hub A's control socket answers" wait_for 10 eval 'ctlA status >/dev/null 2>&1'
must "hub B's control socket answers" wait_for 10 eval 'ctlB status >/dev/null 2>&1'

# --- 0. before the claims were ever read, nothing is granted
run_out ctlA name set early --owner "$(lab_pub n1)"
check "a grant before etcd was reached is refused" test "$rc" -ne 0
check "with 503, saying the claims are not read yet" eval \
    'grep -q 503 <<<"$out" && grep -q "not been read from etcd yet" <<<"$out"'
lab_etcd hub
must "etcd listening on hub A's wan address" \
    wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."

# Each node declares its services to its own hub.
conf1=$(gw_node_conf n1 hub)
echo "control = \"[$(lab_ov6 hub)]:7001\"" >>"$conf1"
conf2=$(gw_node_conf n2 hub2)
echo "control = \"[$(lab_ov6 hub2)]:7001\"" >>"$conf2"
GW_CONF=$conf1 gw_start_node n1 hub
GW_CONF=$conf2 gw_start_node n2 hub2
must "n1 reaches hub A" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"
must "n2 reaches hub B" wait_for 15 lab_ping1 n2 "$(lab_ov6 hub2)"
K1=$(lab_pub n1)
K2=$(lab_pub n2)

for n in n1 n2; do
    mkdir -p "$GW_TMP/www-$n"
    echo "$n" >"$GW_TMP/www-$n/index.html"
    lab_bg "$n" "web-$n" python3 -m http.server 8080 --bind "$(lab_ov6 "$n")" --directory "$GW_TMP/www-$n"
    must "$n web server listens" wait_for 10 lab_sh "$n" "ss -Hltn 'sport = :8080' | grep -q ."
done
# get HUB_IP NAME : the page NAME.gw.test serves through the hub at HUB_IP
get() { lab_exec pub curl -sS --max-time 5 --resolve "$2.$DOMAIN:80:$1" "http://$2.$DOMAIN/" 2>/dev/null || true; }
code() { lab_exec pub curl -sS --max-time 5 -o /dev/null -w '%{http_code}' --resolve "$2.$DOMAIN:80:$1" "http://$2.$DOMAIN/" 2>/dev/null || true; }
# claim HOST : the claim's JSON in etcd ("" when there is none)
claim() { ectl get --print-value-only "$PREFIX$1" 2>/dev/null || true; }
claim_is() { [ "$(claim "$1" | jq -r '"\(.hub) \(.owner)"' 2>/dev/null)" = "$2 $3" ]; }
declare_service() {
    cat >>"$1" <<EOF

[[service]]
name = "$2"
local = "[$3]:8080"
EOF
}
mesh_json() { gw_show_json "$1" gw0 | jq -c '.interfaces[0].mesh'; }
must "both hubs connected to etcd" wait_for 20 eval \
    '[ "$(mesh_json hub | jq -r .etcd_connected)$(mesh_json hub2 | jq -r .etcd_connected)" = truetrue ]'

# --- 1. the first grant claims the name for its node
must "hub A grants blog to n1" ctlA name set blog --owner "$K1"
check "blog.gw.test is claimed in etcd for n1 by hub-a" wait_for 5 claim_is "blog.$DOMAIN" hub-a "$K1"
run_out ctlB name set blog --owner "$K2"
check "hub B refuses blog for n2 (ctl fails)" test "$rc" -ne 0
check "the refusal is a 409 naming hub-a and n1" eval \
    'grep -q 409 <<<"$out" && grep -q "hub-a" <<<"$out" && grep -qF "$K1" <<<"$out" && grep -q "held in the hub mesh" <<<"$out"'
assert_eq "hub B's state has no blog" 0 "$(ctlB --json names | jq length)"
must "hub B grants blog to n1 (the same node)" ctlB name set blog --owner "$K1"
check "the claim is still hub-a's" claim_is "blog.$DOMAIN" hub-a "$K1"
declare_service "$conf1" blog "$(lab_ov6 n1)"
must "hub A reports blog active for n1" \
    wait_for 15 grep -q 'service active.*service=name:blog' "$(lab_logfile n1)"
must "blog through hub A answers n1" wait_for 10 eval '[ "$(get "$HUB4" blog)" = n1 ]'
check "blog through hub B answers n1 (mesh)" wait_for 10 eval '[ "$(get "$HUB2_4" blog)" = n1 ]'
check "hub A shows one claim of its own" wait_for 5 eval '[ "$(mesh_json hub | jq -r .own_name_claims)" = 1 ]'

# --- 2. hub A lets go; hub B, which grants blog to n1 too, claims it
must "hub A deletes blog" ctlA name delete blog
check "hub A released the claim and hub B claimed blog for n1" wait_for 8 claim_is "blog.$DOMAIN" hub-b "$K1"
check "hub A logged the release" grep -q 'mesh: name claim released.*blog' "$(lab_logfile hub)"

# --- 3. a claim for another node turns a route off, and its removal on again
must "hub B grants shop to n2" ctlB name set shop --owner "$K2"
check "shop.gw.test claimed for n2 by hub-b" wait_for 5 claim_is "shop.$DOMAIN" hub-b "$K2"
declare_service "$conf2" shop "$(lab_ov6 n2)"
must "hub B reports shop active for n2" \
    wait_for 15 grep -q 'service active.*service=name:shop' "$(lab_logfile n2)"
must "shop through hub B answers n2" wait_for 10 eval '[ "$(get "$HUB2_4" shop)" = n2 ]'
ectl put "${PREFIX}shop.$DOMAIN" "{\"owner\":\"$K1\",\"hub\":\"hub-z\"}" >/dev/null
check "hub B turns n2's shop route off (404)" wait_for 8 eval '[ "$(code "$HUB2_4" shop)" = 404 ]'
check "hub A does not send shop anywhere either (404)" wait_for 8 eval '[ "$(code "$HUB4" shop)" = 404 ]'
conflict_shown() {
    [ "$(mesh_json hub2 | jq -r ".name_conflicts[0] | \"\(.host) \(.held_by) \(.hub)\"")" = "shop.$DOMAIN $K1 hub-z" ]
}
check "hub B shows the conflict" wait_for 5 conflict_shown
show=$(lab_exec hub2 "$GATEWIRE" show gw0 2>/dev/null || true)
check "gatewire show prints it" grep -qF "refused here: shop.$DOMAIN (held for $K1 through hub-z)" <<<"$show"
metrics=$(curl -sS --max-time 5 --unix-socket "$GW_TMP/hub2.ctl.sock" http://gw/metrics || true)
check "/metrics counts one conflict" grep -qx "gatewire_mesh_name_conflicts 1" <<<"$metrics"
check "/metrics: hub B holds one claim (blog)" grep -qx "gatewire_mesh_name_claims 1" <<<"$metrics"
check "hub B logged the conflict" grep -q 'held in the mesh for another node.*shop' "$(lab_logfile hub2)"
check "the route status names the holder" eval \
    "ctlB --json peer show '$K2' | grep -q 'held in the hub mesh'"
check "hub B did not overwrite hub-z's claim" claim_is "shop.$DOMAIN" hub-z "$K1"
ectl del "${PREFIX}shop.$DOMAIN" >/dev/null
check "hub B claims shop again" wait_for 8 claim_is "shop.$DOMAIN" hub-b "$K2"
check "shop through hub B answers n2 again" wait_for 10 eval '[ "$(get "$HUB2_4" shop)" = n2 ]'
check "the conflict is gone from show" wait_for 5 eval '[ "$(mesh_json hub2 | jq ".name_conflicts | length")" = 0 ]'

# --- 4. a lapsed claim is taken over; a malformed one is counted
ectl put "${PREFIX}news.$DOMAIN" "{\"owner\":\"$K1\",\"hub\":\"hub-z\",\"expires\":1}" >/dev/null
must "hub B grants news to n2 over a lapsed claim" ctlB name set news --owner "$K2"
check "hub B took the lapsed claim over" wait_for 5 claim_is "news.$DOMAIN" hub-b "$K2"
bad_before=$(mesh_json hub | jq -r .bad_records)
ectl put "${PREFIX}bad.$DOMAIN" "not-a-claim-SECRET-$$" >/dev/null
check "hub A counts the malformed claim" wait_for 5 eval \
    '[ "$(mesh_json hub | jq -r .bad_records)" -gt "$bad_before" ]'
check "hub A logged it" grep -q "name claim not used.*bad.$DOMAIN" "$(lab_logfile hub)"
check "without its value" not grep -q "SECRET-$$" "$(lab_logfile hub)"
run_out ctlA name set bad --owner "$K1"
check "a name whose claim cannot be read is not granted (409)" eval \
    '[ "$rc" -ne 0 ] && grep -q 409 <<<"$out" && grep -q "cannot be read" <<<"$out"'
check "the unreadable claim is left as it was" eval '[ "$(claim "bad.$DOMAIN")" = "not-a-claim-SECRET-$$" ]'
ectl del "${PREFIX}bad.$DOMAIN" >/dev/null
must "once it is deleted, the grant goes through" wait_for 5 ctlA name set bad --owner "$K1"
check "and hub A claims it" wait_for 5 claim_is "bad.$DOMAIN" hub-a "$K1"
check "hub A is still up and connected" eval '[ "$(mesh_json hub | jq -r .etcd_connected)" = true ]'

# --- 5. a hub restarted while etcd is down still knows the claims it saw
declare_service "$conf2" news "$(lab_ov6 n2)"
must "news through hub B answers n2" wait_for 15 eval '[ "$(get "$HUB2_4" news)" = n2 ]'
ectl put "${PREFIX}shop.$DOMAIN" "{\"owner\":\"$K1\",\"hub\":\"hub-z\"}" >/dev/null
must "hub B turns shop off again" wait_for 8 eval '[ "$(code "$HUB2_4" shop)" = 404 ]'
cached_hub_z() {
    jq -r --arg h "shop.$DOMAIN" '.claims[$h]' "$GW_TMP/state-hub2/mesh-claims.json" | base64 -d | grep -q hub-z
}
check "hub B keeps the claims in its state directory" wait_for 5 cached_hub_z
lab_stop etcd
lab_stop hub2
GW_CONF=$CONF_B gw_start_hub hub2
must "hub B is back (etcd still down)" wait_for 10 eval 'ctlB status >/dev/null 2>&1'
check "hub B loaded the claims of its last session" \
    wait_for 5 grep -q "name claims of the last session loaded" "$(lab_logfile hub2)"
# n2's tunnel comes back within its dead_after; news proves it is back.
check "after the restart, news through hub B answers n2" wait_for 20 eval '[ "$(get "$HUB2_4" news)" = n2 ]'
assert_eq "and shop stays off without etcd" 404 "$(code "$HUB2_4" shop)"
run_out ctlB name set later --owner "$K2"
check "grants wait for etcd after the restart (503)" eval '[ "$rc" -ne 0 ] && grep -q 503 <<<"$out"'
lab_etcd hub
must "hub B reconnects to etcd" wait_for 20 eval '[ "$(mesh_json hub2 | jq -r .etcd_connected)" = true ]'
assert_eq "shop is still off" 404 "$(code "$HUB2_4" shop)"
ectl del "${PREFIX}shop.$DOMAIN" >/dev/null
check "once hub-z's claim goes, shop through hub B answers n2 again" wait_for 10 eval '[ "$(get "$HUB2_4" shop)" = n2 ]'

lab_finish

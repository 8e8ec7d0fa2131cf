#!/usr/bin/env bash
# Two hubs meshed through an etcd with authentication on (a user and a
# password, `[mesh] username`/`password_file`), whose tokens expire after
# 3 s of the session's quiet (`--auth-token-ttl 3`; etcd's default is 300):
# the lease's keep-alives and the watch do not renew a token, so a hub's next
# request after a quiet spell carries an expired one. The hubs learn each
# other's names; after 10 s of quiet a route added to hub B's config is
# published and served through hub A, the record going out with a fresh token
# (no `invalid auth token` anywhere in the hubs' logs, no new etcd session);
# a wrong password is a clear error and the hub keeps serving its own routes.
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=79-hub-mesh-auth
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss jq etcd etcdctl
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB2_4=$(lab_wan4 hub2)
MARK1="from-n1-$$"
MARK2="from-n2-$$"

lab_up 2 0
lab_add_hub2

# --- etcd on hub A's wan address, authentication on, short-lived tokens
ETCD=$(lab_etcd_url hub)
lab_bg hub etcd etcd --name e1 --data-dir "$GW_TMP/etcd" \
    --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e1=http://127.0.0.1:2380 --log-level warn \
    --auth-token simple --auth-token-ttl 3
must "etcd listening on hub A's wan address" \
    wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."
PW="pw-$$-$RANDOM"
ectl() { lab_exec hub etcdctl --endpoints "$ETCD" "$@"; }
must "etcd user root made" ectl user add "root:$PW"
must "etcd authentication on" ectl auth enable
check "etcd refuses a request without the password" not ectl get /x
printf '%s\n' "$PW" >"$GW_TMP/etcd.pw"
chmod 600 "$GW_TMP/etcd.pw"
printf 'not-the-password\n' >"$GW_TMP/wrong.pw"
chmod 600 "$GW_TMP/wrong.pw"

# mesh_hub NS NAME V4 NODE ROUTE PWFILE : the hub config with the proxy and [mesh]
mesh_hub() {
    local ns=$1 name=$2 v4=$3 node=$4 route=$5 pw=$6 conf
    conf=$(gw_hub_conf "$ns" "$node")
    cat >>"$conf" <<CONF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[[route]]
name = "$route"
backends = ["http://[$(lab_ov6 "$node")]:8080"]

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$v4"]
ttl = 3
username = "root"
password_file = "$pw"
CONF
    echo "$conf"
}
confA=$(mesh_hub hub hub-a "$HUB4" n1 alpha "$GW_TMP/etcd.pw")
confB=$(mesh_hub hub2 hub-b "$HUB2_4" n2 beta "$GW_TMP/etcd.pw")
GW_CONF=$confA gw_start_hub hub
GW_CONF=$confB gw_start_hub hub2
gw_start_node n1 hub
gw_start_node n2 hub2
must "n1 reaches hub A" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"
must "n2 reaches hub B" wait_for 15 lab_ping1 n2 "$(lab_ov6 hub2)"
lab_bg n1 web1 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n1)" 8080 "$MARK1"
lab_bg n2 web2 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n2)" 8080 "$MARK2"
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "backend on n2" wait_for 10 lab_sh n2 "ss -Hltn 'sport = :8080' | grep -q ."

mesh_json() { gw_show_json "$1" gw0 | jq -c '.interfaces[0].mesh'; }
knows() { [ "$(mesh_json "$1" | jq -r --arg h "$2" '.hubs[] | select(.name == $h) | .hosts')" = "$3" ]; }
must "hub A learns hub B's host through the authenticated etcd" wait_for 20 knows hub hub-b 1
must "hub B learns hub A's host" wait_for 20 knows hub2 hub-a 1
pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }
body=$(pcurl --resolve "beta.$DOMAIN:80:$HUB4" "http://beta.$DOMAIN/b" || true)
check "beta (hub B's) served through hub A" grep -q "$MARK2 path=/b" <<<"$body"

sessions() { grep -c "mesh: connected to etcd" "$(lab_logfile "$1")" || true; }
sa=$(sessions hub)
sb=$(sessions hub2)
lab_log "quiet for 10 s: the hubs' etcd tokens expire (ttl 3 s)"
sleep 10
cat >>"$confB" <<CONF

[[route]]
name = "gamma"
backends = ["http://[$(lab_ov6 n2)]:8080"]
CONF
must "hub A learns hub B's new host after the quiet spell" wait_for 20 knows hub hub-b 2
body=$(pcurl --resolve "gamma.$DOMAIN:80:$HUB4" "http://gamma.$DOMAIN/g" || true)
check "gamma, added after the tokens expired, served through hub A" grep -q "$MARK2 path=/g" <<<"$body"
assert_eq "hub B published over the same etcd session (a fresh token, no reconnect)" "$sb" "$(sessions hub2)"
assert_eq "hub A kept its etcd session" "$sa" "$(sessions hub)"
for h in hub hub2; do
    check "no expired-token error in $h's log" not grep -qi "invalid auth token" "$(lab_logfile "$h")"
done

# --- a wrong password: said clearly, and the hub's own routes still work
sed -i "s|password_file = \"$GW_TMP/etcd.pw\"|password_file = \"$GW_TMP/wrong.pw\"|" "$confA"
lab_stop hub
GW_CONF=$confA gw_start_hub hub
must "hub A reports the refused password" \
    wait_for 20 grep -qiE "authentication failed|invalid user ID or password" "$(lab_logfile hub)"
check "hub A is not connected to etcd" test "$(mesh_json hub | jq -r .etcd_connected)" = false
must "n1 reaches hub A again" wait_for 20 lab_ping1 n1 "$(lab_ov6 hub)"
body=$(pcurl --resolve "alpha.$DOMAIN:80:$HUB4" "http://alpha.$DOMAIN/a" || true)
check "hub A still serves its own route alpha" grep -q "$MARK1 path=/a" <<<"$body"
lab_finish

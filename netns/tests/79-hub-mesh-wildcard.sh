#!/usr/bin/env bash
# A wildcard certificate (DNS-01) in a hub mesh, with Debian's pebble and a
# real etcd. Both hubs have `wildcard = true` and a DNS listener; the
# operator's delegation (dnsmasq in `pub`, which pebble asks) sends
# `_acme-challenge.gw.test` to hub B only. Hub A serves blog with acme = true
# and orders *.gw.test; hub B, which orders nothing, answers the TXT value
# hub A published in etcd. Then hub B's shop route gets acme = true: hub B
# takes the wildcard certificate from etcd, with no second order, and both
# hubs serve the same certificate (verified by curl against pebble's root).
# timeout: 240
set -euo pipefail
export GW_TEST_NAME=79-hub-mesh-wildcard
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 openssl ss jq etcd etcdctl dnsmasq pebble pebble-challtestsrv
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB2_4=$(lab_wan4 hub2)
PUB4=$(lab_wan4 pub)
MARK1="from-n1-$$"
MARK2="from-n2-$$"

lab_up 2 0
lab_add_hub2

ETCD=$(lab_etcd_url hub)
lab_etcd hub
must "etcd listening" wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."
ectl() { lab_exec hub etcdctl --endpoints "$ETCD" "$@"; }

# --- the delegation: _acme-challenge.gw.test to hub B, the rest to challtestsrv
lab_acme_delegation pub "$DOMAIN" "$HUB2_4"
must "dnsmasq in pub" wait_for 10 lab_sh pub "ss -Hlun 'sport = :5300' | grep -q ."
lab_pebble pub "$HUB4" 127.0.0.1:5300
CA="$GW_TMP/ca"

SECRET="$GW_TMP/mesh.key"
(umask 077 && head -c 48 /dev/urandom | base64 -w0 >"$SECRET" && echo >>"$SECRET")
# mesh_hub NS NAME V4 NODE ROUTE ACME : the hub config
mesh_hub() {
    local ns=$1 name=$2 v4=$3 node=$4 route=$5 acme=$6 conf
    conf=$(gw_hub_conf "$ns" "$node")
    cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[proxy.acme]
directory = "https://$PUB4:14000/dir"
directory_ca = "$CA/ca.pem"
state_dir = "$GW_TMP/acme-$ns"
wildcard = true
dns_listen = ["$v4:53"]

[[route]]
name = "$route"
acme = $acme
backends = ["http://[$(lab_ov6 "$node")]:8080"]

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$v4"]
ttl = 3
secret_file = "$SECRET"
EOF
    echo "$conf"
}
confA=$(mesh_hub hub hub-a "$HUB4" n1 blog true)
confB=$(mesh_hub hub2 hub-b "$HUB2_4" n2 shop false)
GW_CONF=$confB gw_start_hub hub2
must "hub B in etcd" wait_for 20 eval "ectl get --prefix --keys-only /gatewire/mesh/hubs/ | grep -q hub-b"
GW_CONF=$confA gw_start_hub hub
gw_start_node n1 hub
gw_start_node n2 hub2
lab_bg n1 web1 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n1)" 8080 "$MARK1"
lab_bg n2 web2 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n2)" 8080 "$MARK2"
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "backend on n2" wait_for 10 lab_sh n2 "ss -Hltn 'sport = :8080' | grep -q ."

WILD="*.$DOMAIN"
STATE_A="$GW_TMP/acme-hub"
STATE_B="$GW_TMP/acme-hub2"
must "hub A: the wildcard certificate (its order)" wait_for 60 test -s "$STATE_A/certs/$WILD/fullchain.pem"
check "hub A's log: issued" grep -q "ACME certificate issued.*\*\.$DOMAIN" "$(lab_logfile hub)"
check "pebble's TXT query went to hub B" \
    grep -q "forwarded _acme-challenge.$DOMAIN to $HUB2_4" "$(lab_logfile resolver)"
mesh_json() { gw_show_json "$1" gw0 | jq -c '.interfaces[0].mesh'; }
check "hub B answered it from etcd" test "$(mesh_json hub2 | jq -r .acme_answered)" -ge 1
dns_b=$(gw_show_json hub2 gw0 | jq -c '.interfaces[0].proxy.routes[] | select(.route == "dns")' || true)
check "hub B's DNS listener counted the query" jq -e '.requests >= 1' <<<"$dns_b"
check "no order at hub B" not grep -q "ordering an ACME certificate" "$(lab_logfile hub2)"
assert_eq "etcd holds the wildcard certificate" "/gatewire/mesh/acme/certs/$WILD" \
    "$(ectl get --prefix --keys-only /gatewire/mesh/acme/certs/ | grep . || true)"
check "its private key is sealed" grep -q '"key_sealed":"v1\.' <<<"$(ectl get --print-value-only "/gatewire/mesh/acme/certs/$WILD")"
must "no challenge answers or locks left in etcd" wait_for 10 eval \
    "[ -z \"\$(ectl get --prefix --keys-only /gatewire/mesh/acme/ | grep -v '/certs/' | grep . || true)\" ]"

lab_exec pub curl -sS --cacert "$CA/ca.pem" "https://$PUB4:15000/roots/0" >"$GW_TMP/root.pem"
check "pebble root fetched" grep -q "BEGIN CERTIFICATE" "$GW_TMP/root.pem"
pcurl() { lab_exec pub curl -sS --max-time 10 --cacert "$GW_TMP/root.pem" "$@"; }
fingerprint() {
    lab_sh pub "openssl s_client -connect $2:443 -servername $1 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256" 2>/dev/null || true
}
body=$(pcurl --resolve "blog.$DOMAIN:443:$HUB4" "https://blog.$DOMAIN/a" || true)
check "HTTPS blog at hub A, verified" grep -q "$MARK1 path=/a" <<<"$body"

# --- hub B's shop gets acme = true: it takes the certificate from etcd
sed -i 's/^acme = false$/acme = true/' "$confB"
kill -HUP "$(lab_pid hub2)"
must "hub B writes the wildcard certificate it took from the mesh" \
    wait_for 20 test -s "$STATE_B/certs/$WILD/fullchain.pem"
check "hub B's log: taken from the mesh" grep -q "ACME certificate taken from the mesh" "$(lab_logfile hub2)"
body=$(pcurl --resolve "shop.$DOMAIN:443:$HUB2_4" "https://shop.$DOMAIN/b" || true)
check "HTTPS shop at hub B, verified" grep -q "$MARK2 path=/b" <<<"$body"
fa=$(fingerprint "blog.$DOMAIN" "$HUB4")
check "hub A presents a certificate" grep -q "Fingerprint" <<<"$fa"
assert_eq "both hubs present the same certificate" "$fa" "$(fingerprint "shop.$DOMAIN" "$HUB2_4")"
assert_eq "one order in the whole mesh" 1 "$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)"
check "no private key in any hub's log" not grep -q "PRIVATE KEY" "$(lab_logfile hub)" "$(lab_logfile hub2)"

check "hub A still running" lab_alive hub
check "hub B still running" lab_alive hub2
lab_finish

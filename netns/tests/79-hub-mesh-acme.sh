#!/usr/bin/env bash
# ACME shared through the hub mesh, with Debian's pebble and a real etcd. Hub A
# (namespace hub, mesh hub-a) orders over HTTP-01, hub B (hub2, hub-b) over
# TLS-ALPN-01; pebble's DNS sends every name to hub B except shop, which goes
# to hub A. So every validation lands on a hub that did not order:
# - blog: hub A orders; hub B serves blog itself (a plain HTTP route) and
#   answers the HTTP-01 challenge hub A published in etcd;
# - shop: hub B orders; hub A serves shop itself and answers the TLS-ALPN-01
#   validation with a certificate for the digest hub B published;
# - both: both hubs serve it with acme = true; one order, one certificate,
#   served by both hubs.
# curl verifies every certificate against pebble's root. When hub B's blog
# route gets acme = true, hub B takes hub A's certificate from etcd (no new
# order, written to its state directory). A lock held by another hub (written
# with etcdctl) holds an order back; deleting it lets the order run at once.
# A malformed shared key is counted and left out. The hubs share a secret
# (`secret_file`): the private keys in etcd are sealed with it, and a sealed
# record copied under another host does not open.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=79-hub-mesh-acme
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 openssl ss jq etcd etcdctl pebble pebble-challtestsrv
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB2_4=$(lab_wan4 hub2)
PUB4=$(lab_wan4 pub)
MARK1="from-n1-$$"
MARK2="from-n2-$$"
BLOG="blog.$DOMAIN"
SHOP="shop.$DOMAIN"
BOTH="both.$DOMAIN"
LATE="late.$DOMAIN"

lab_up 2 0
lab_add_hub2

# --- etcd on hub A's wan address
ETCD=$(lab_etcd_url hub)
lab_etcd hub
must "etcd listening" wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."
ectl() { lab_exec hub etcdctl --endpoints "$ETCD" "$@"; }

# --- pebble in pub; its DNS answers hub B's address, shop hub A's
CA="$GW_TMP/ca"
lab_pebble pub "$HUB2_4"
lab_pebble_a pub "$SHOP" "$HUB4"

SECRET="$GW_TMP/mesh.key"
(umask 077 && head -c 48 /dev/urandom | base64 -w0 >"$SECRET" && echo >>"$SECRET")
# mesh_hub NS NAME V4 NODE CHALLENGE ROUTES : the hub config
mesh_hub() {
    local ns=$1 name=$2 v4=$3 node=$4 challenge=$5 routes=$6 conf
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
challenge = "$challenge"
$routes

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$v4"]
ttl = 3
secret_file = "$SECRET"
EOF
    echo "$conf"
}
# route NAME NODE ACME
route() { printf '\n[[route]]\nname = "%s"\nacme = %s\nbackends = ["http://[%s]:8080"]\n' "$1" "$3" "$(lab_ov6 "$2")"; }

confA=$(mesh_hub hub hub-a "$HUB4" n1 http-01 "$(route blog n1 true)$(route shop n1 false)$(route both n1 true)")
confB=$(mesh_hub hub2 hub-b "$HUB2_4" n2 tls-alpn-01 "$(route blog n2 false)$(route shop n2 true)$(route both n2 true)")
GW_CONF=$confA gw_start_hub hub
GW_CONF=$confB gw_start_hub hub2
gw_start_node n1 hub
gw_start_node n2 hub2
lab_bg n1 web1 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n1)" 8080 "$MARK1"
lab_bg n2 web2 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n2)" 8080 "$MARK2"
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "backend on n2" wait_for 10 lab_sh n2 "ss -Hltn 'sport = :8080' | grep -q ."

STATE_A="$GW_TMP/acme-hub"
STATE_B="$GW_TMP/acme-hub2"
must "hub A: certificate for $BLOG (its order, validated at hub B)" \
    wait_for 60 test -s "$STATE_A/certs/$BLOG/fullchain.pem"
must "hub B: certificate for $SHOP (its order, validated at hub A)" \
    wait_for 60 test -s "$STATE_B/certs/$SHOP/fullchain.pem"
must "both hubs: certificate for $BOTH" \
    wait_for 60 eval "test -s '$STATE_A/certs/$BOTH/fullchain.pem' && test -s '$STATE_B/certs/$BOTH/fullchain.pem'"

lab_exec pub curl -sS --cacert "$CA/ca.pem" "https://$PUB4:15000/roots/0" >"$GW_TMP/root.pem"
check "pebble root fetched" grep -q "BEGIN CERTIFICATE" "$GW_TMP/root.pem"
pcurl() { lab_exec pub curl -sS --max-time 10 --cacert "$GW_TMP/root.pem" "$@"; }
# fingerprint HOST ADDR : SHA-256 fingerprint of the certificate ADDR:443 serves for HOST
fingerprint() {
    lab_sh pub "openssl s_client -connect $2:443 -servername $1 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256" 2>/dev/null || true
}

body=$(pcurl --resolve "$BLOG:443:$HUB4" "https://$BLOG/a" || true)
check "HTTPS $BLOG at hub A: pebble's certificate, verified" grep -q "$MARK1 path=/a" <<<"$body"
body=$(pcurl --resolve "$SHOP:443:$HUB2_4" "https://$SHOP/b" || true)
check "HTTPS $SHOP at hub B: pebble's certificate, verified" grep -q "$MARK2 path=/b" <<<"$body"
body=$(pcurl --resolve "$BOTH:443:$HUB4" "https://$BOTH/c" || true)
check "HTTPS $BOTH at hub A, verified" grep -q "$MARK1 path=/c" <<<"$body"
body=$(pcurl --resolve "$BOTH:443:$HUB2_4" "https://$BOTH/d" || true)
check "HTTPS $BOTH at hub B, verified" grep -q "$MARK2 path=/d" <<<"$body"
fa=$(fingerprint "$BOTH" "$HUB4")
fb=$(fingerprint "$BOTH" "$HUB2_4")
check "$BOTH: hub A serves a certificate" grep -q "Fingerprint" <<<"$fa"
assert_eq "$BOTH: both hubs serve the same certificate (one order)" "$fa" "$fb"

orders() { grep -c "POST /order-plz" "$(lab_logfile pebble)" || true; }
assert_eq "three names, three orders in the whole mesh" 3 "$(orders)"

mesh_json() { gw_show_json "$1" gw0 | jq -c '.interfaces[0].mesh'; }
check "hub B answered hub A's HTTP-01 validation" test "$(mesh_json hub2 | jq -r .acme_answered)" -ge 1
check "hub A answered hub B's TLS-ALPN-01 validation" test "$(mesh_json hub | jq -r .acme_answered)" -ge 1
check "hub A's log: a certificate issued for $BLOG" grep -q "ACME certificate issued.*$BLOG\|$BLOG.*ACME certificate issued" "$(lab_logfile hub)"
check "hub B's log: a certificate issued for $SHOP" grep -q "ACME certificate issued.*$SHOP\|$SHOP.*ACME certificate issued" "$(lab_logfile hub2)"
assert_eq "etcd holds the three certificates" 3 \
    "$(ectl get --prefix --keys-only /gatewire/mesh/acme/certs/ | grep -c .)"
certs_json() { ectl get --prefix --print-value-only /gatewire/mesh/acme/certs/; }
assert_eq "every private key in etcd is sealed with the mesh secret" 3 "$(certs_json | grep -c '"key_sealed":"v1\.' || true)"
check "no private key in clear in etcd" not grep -q "PRIVATE KEY" <<<"$(certs_json)"
must "both hubs see three shared certificates" wait_for 10 eval \
    "[ \"\$(mesh_json hub | jq -r .acme_certificates)\" = 3 ] && [ \"\$(mesh_json hub2 | jq -r .acme_certificates)\" = 3 ]"
assert_eq "no challenge answers or locks are left in etcd" "" \
    "$(ectl get --prefix --keys-only /gatewire/mesh/acme/ | grep -v '/certs/' | grep . || true)"
show=$(lab_exec hub "$GATEWIRE" show gw0 2>/dev/null || true)
check "gatewire show prints the mesh's ACME line" grep -q "acme: 3 certificates shared" <<<"$show"

# --- hub B's blog route gets acme = true: it takes hub A's certificate
python3 - "$confB" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
old = 'name = "blog"\nacme = false'
assert s.count(old) == 1
open(p, "w").write(s.replace(old, 'name = "blog"\nacme = true'))
EOF
kill -HUP "$(lab_pid hub2)"
must "hub B writes the certificate for $BLOG it took from the mesh" \
    wait_for 20 test -s "$STATE_B/certs/$BLOG/fullchain.pem"
check "hub B's log: taken from the mesh" grep -q "ACME certificate taken from the mesh" "$(lab_logfile hub2)"
body=$(pcurl --resolve "$BLOG:443:$HUB2_4" "https://$BLOG/e" || true)
check "HTTPS $BLOG at hub B now, verified" grep -q "$MARK2 path=/e" <<<"$body"
assert_eq "$BLOG: hub B serves hub A's certificate" "$(fingerprint "$BLOG" "$HUB4")" "$(fingerprint "$BLOG" "$HUB2_4")"
assert_eq "no new order for it" 3 "$(orders)"

# --- a lock held by another hub holds an order back
ectl put "/gatewire/mesh/acme/locks/$LATE" hub-z >/dev/null
python3 - "$confA" "$(route late n1 true)" <<'EOF'
import sys
open(sys.argv[1], "a").write(sys.argv[2])
EOF
must "hub A shows $LATE being ordered by hub-z" wait_for 15 eval \
    "mesh_json hub | jq -e --arg h '$LATE' '.acme_orders[] | select(.host == \$h and .hub == \"hub-z\")' >/dev/null"
sleep 4
assert_eq "while hub-z holds the lock, hub A orders nothing" 3 "$(orders)"
check "no certificate for $LATE yet" not test -e "$STATE_A/certs/$LATE/fullchain.pem"
ectl del "/gatewire/mesh/acme/locks/$LATE" >/dev/null
must "the lock gone, hub A orders $LATE" wait_for 30 test -s "$STATE_A/certs/$LATE/fullchain.pem"
assert_eq "one more order" 4 "$(orders)"
body=$(pcurl --resolve "$LATE:443:$HUB4" "https://$LATE/f" || true)
check "HTTPS $LATE at hub A, verified" grep -q "$MARK1 path=/f" <<<"$body"

# --- a sealed record copied under another host does not open
bad_before=$(mesh_json hub | jq -r .bad_records)
ectl get --print-value-only "/gatewire/mesh/acme/certs/$BOTH" >"$GW_TMP/both.json"
lab_exec hub etcdctl --endpoints "$ETCD" put "/gatewire/mesh/acme/certs/copy.$DOMAIN" <"$GW_TMP/both.json" >/dev/null
must "the copied record is counted" wait_for 10 eval \
    "[ \"\$(mesh_json hub | jq -r .bad_records)\" -gt $bad_before ]"
check "hub A logs that it does not open" grep -q "does not open with this hub's mesh secrets" "$(lab_logfile hub)"
assert_eq "and does not count it as a shared certificate" 4 "$(mesh_json hub | jq -r .acme_certificates)"
ectl del "/gatewire/mesh/acme/certs/copy.$DOMAIN" >/dev/null

# --- a malformed shared key
bad_before=$(mesh_json hub | jq -r .bad_records)
ectl put "/gatewire/mesh/acme/certs/$SHOP" '{"chain": "x"}' >/dev/null
must "a malformed shared certificate is counted" wait_for 10 eval \
    "[ \"\$(mesh_json hub | jq -r .bad_records)\" -gt $bad_before ]"
check "hub A logs it without its value" grep -q "shared ACME key not used" "$(lab_logfile hub)"
body=$(pcurl --resolve "$SHOP:443:$HUB2_4" "https://$SHOP/g" || true)
check "hub B keeps serving $SHOP with its certificate" grep -q "$MARK2 path=/g" <<<"$body"
check "no private key in any hub's log" not grep -q "PRIVATE KEY" "$(lab_logfile hub)" "$(lab_logfile hub2)"

# --- hub B restarted without the secret: it cannot open the sealed keys, and
# neither takes them nor stores its own (older or equal) ones over them
sealed_count() { certs_json | grep -c '"key_sealed":"v1\.' || true; }
ectl del "/gatewire/mesh/acme/certs/$SHOP" >/dev/null
must "with the malformed record deleted, hub B stores $SHOP again, sealed" \
    wait_for 10 eval '[ "$(sealed_count)" = 4 ]'
lab_stop hub2
sed -i '/^secret_file = /d' "$confB"
GW_CONF=$confB gw_start_hub hub2
must "hub B (no secret) is back in etcd" wait_for 20 eval '[ "$(mesh_json hub2 | jq -r .etcd_connected)" = true ]'
must "hub B logs that the sealed keys do not open" \
    wait_for 10 grep -q "does not open with this hub's mesh secrets" "$(lab_logfile hub2)"
sleep 5
assert_eq "hub B (no secret) can use no shared certificate" 0 "$(mesh_json hub2 | jq -r .acme_certificates)"
assert_eq "the sealed records are still there, sealed" 4 "$(sealed_count)"
check "hub B stored no key in clear over them" not grep -q "PRIVATE KEY" <<<"$(certs_json)"
assert_eq "and ordered nothing" 4 "$(orders)"
# (n2's tunnel comes back within its dead_after)
blog_at_b() { pcurl --resolve "$BLOG:443:$HUB2_4" "https://$BLOG/h" 2>/dev/null | grep -q "$MARK2 path=/h"; }
check "hub B still serves $BLOG with the certificate it has (verified)" wait_for 20 blog_at_b

lab_finish

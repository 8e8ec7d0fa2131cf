#!/usr/bin/env bash
# One wildcard certificate for every name under the gateway domain, ordered
# with DNS-01 from Debian's pebble. The hub answers `_acme-challenge.gw.test`
# on its DNS listener (`[proxy.acme] dns_listen`); dnsmasq in `pub` stands for
# the operator's NS delegation: pebble asks it, and it sends that name (and
# only that name) to the hub, everything else to pebble-challtestsrv.
# - blog and shop (name routes, acme = true) get one certificate, for
#   *.gw.test, in one order; curl verifies it against pebble's root on both;
# - the DNS listener, over UDP and TCP: NOERROR and no TXT once the order is
#   done, the SOA, NXDOMAIN below the name, REFUSED outside it; a header
#   announcing 65535 questions gets FORMERR over TCP and no reply over UDP
#   (whose questions do not parse: not answered, so no reply loop with
#   another UDP service); both that and a "response" are counted as
#   bad_dns_query;
# - a route added by a reload is served at once with the same certificate,
#   and a restart takes it from disk: no new order either time.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=73-proxy-wildcard
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 openssl ss jq dnsmasq pebble pebble-challtestsrv
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
PUB4=$(lab_wan4 pub)
N1V6=$(lab_ov6 n1)
MARK="n1-$$"
DNSQ="$GW_LIB_DIR/tools/dnsq.py"

lab_up 1 0

# --- dnsmasq in pub: the delegation of _acme-challenge.gw.test to the hub
lab_acme_delegation pub "$DOMAIN" "$HUB4"
must "dnsmasq in pub" wait_for 10 lab_sh pub "ss -Hlun 'sport = :5300' | grep -q ."
lab_pebble pub "$HUB4" 127.0.0.1:5300
CA="$GW_TMP/ca"

# --- hub config
STATE="$GW_TMP/acme-state"
conf=$(gw_hub_conf hub n1)
cp "$conf" "$GW_TMP/hub-base.toml"
write_conf() {
    cp "$GW_TMP/hub-base.toml" "$conf"
    cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[proxy.acme]
directory = "https://$PUB4:14000/dir"
directory_ca = "$CA/ca.pem"
contact = ["mailto:ops@$DOMAIN"]
state_dir = "$STATE"
wildcard = true
dns_listen = ["$HUB4:53"]

[[route]]
name = "blog"
acme = true
backends = ["http://[$N1V6]:8080"]

[[route]]
name = "shop"
acme = true
backends = ["http://[$N1V6]:8080"]
EOF
    for extra in "$@"; do
        cat >>"$conf" <<EOF

[[route]]
name = "$extra"
acme = true
backends = ["http://[$N1V6]:8080"]
EOF
    done
}
write_conf

GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

lab_bg n1 web python3 "$GW_LIB_DIR/tools/echo-headers.py" "$N1V6" 8080 "$MARK"
must "web on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."

# --- one order, one certificate for *.gw.test
WILD="$STATE/certs/*.$DOMAIN"
must "wildcard certificate on disk" wait_for 60 test -s "$WILD/fullchain.pem"
check "no certificate of its own for blog" test ! -e "$STATE/certs/blog.$DOMAIN"
san=$(openssl x509 -in "$WILD/fullchain.pem" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
assert_eq "the certificate names *.$DOMAIN only" "DNS:*.$DOMAIN" "$san"
orders=$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)
assert_eq "one ACME order for two names" 1 "$orders"
check "pebble asked for the TXT of _acme-challenge.$DOMAIN, which went to the hub" \
    grep -q "forwarded _acme-challenge.$DOMAIN to $HUB4" "$(lab_logfile resolver)"
check "the hub logged the issue" grep -q "ACME certificate issued.*\*\.$DOMAIN" "$(lab_logfile hub)"
lab_exec pub curl -sS --cacert "$CA/ca.pem" "https://$PUB4:15000/roots/0" >"$GW_TMP/pebble-root.pem"
check "pebble root fetched" grep -q "BEGIN CERTIFICATE" "$GW_TMP/pebble-root.pem"
pcurl() { lab_exec pub curl -sS --max-time 10 --cacert "$GW_TMP/pebble-root.pem" "$@"; }
for n in blog shop; do
    body=$(pcurl --resolve "$n.$DOMAIN:443:$HUB4" "https://$n.$DOMAIN/" || true)
    check "https://$n.$DOMAIN verified by curl against pebble's root" grep -q "$MARK path=/ .* xfh=$n.$DOMAIN " <<<"$body"
done
ver=$(pcurl --http2 -o /dev/null -w '%{http_version}' --resolve "blog.$DOMAIN:443:$HUB4" \
    "https://blog.$DOMAIN/" || true)
assert_eq "HTTP/2 with the wildcard certificate" 2 "$ver"
serial() {
    lab_sh pub "openssl s_client -connect $HUB4:443 -servername $1 </dev/null 2>/dev/null | openssl x509 -noout -serial"
}
s_blog=$(serial "blog.$DOMAIN" || true)
s_shop=$(serial "shop.$DOMAIN" || true)
check "blog and shop present the same certificate" test -n "$s_blog" -a "$s_blog" = "$s_shop"
check "a name two labels down gets no certificate" eval \
    "! pcurl --resolve 'a.blog.$DOMAIN:443:$HUB4' 'https://a.blog.$DOMAIN/' >/dev/null 2>&1"

# --- the DNS listener
q() { lab_exec pub python3 "$DNSQ" "$HUB4" 53 "$@"; }
out=$(q "_acme-challenge.$DOMAIN" TXT || true)
check "TXT after the order: NOERROR, authoritative, no values left (udp)" \
    grep -q "^rcode=0 aa=1 tc=0 an=0 ns=1 txt= soa=_acme-challenge.$DOMAIN" <<<"$out"
out=$(q "_ACME-Challenge.GW.test" TXT tcp || true)
check "the same over TCP, any case" grep -q "^rcode=0 aa=1 tc=0 an=0 ns=1" <<<"$out"
out=$(q "_acme-challenge.$DOMAIN" SOA || true)
check "SOA of the delegated name" grep -q "^rcode=0 aa=1 tc=0 an=1 .*soa=_acme-challenge.$DOMAIN" <<<"$out"
out=$(q "x._acme-challenge.$DOMAIN" TXT || true)
check "NXDOMAIN below it" grep -q "^rcode=3 aa=1" <<<"$out"
out=$(q "blog.$DOMAIN" A || true)
check "REFUSED outside it" grep -q "^rcode=5 aa=0" <<<"$out"
out=$(lab_exec pub python3 "$DNSQ" "$HUB4" 53 --counts tcp || true)
check "a header announcing 65535 questions gets FORMERR over TCP" grep -q "^rcode=1 aa=0 tc=0 an=0 ns=0" <<<"$out"
out=$(lab_exec pub python3 "$DNSQ" "$HUB4" 53 --counts || true)
assert_eq "the same over UDP gets no reply" timeout "$out"
out=$(lab_exec pub python3 "$DNSQ" "$HUB4" 53 --response || true)
assert_eq "a response (random bytes, QR set) gets no reply" no-reply "$out"
js=$(gw_show_json hub gw0 || true)
dns=$(jq -c '.interfaces[0].proxy.routes[] | select(.route == "dns")' <<<"$js" 2>/dev/null || true)
echo "dns counters: $dns"
check "show --json counts the DNS queries (pebble's and these six)" jq -e '.requests >= 7' <<<"$dns"
check "show --json counts the bad ones" jq -e '.errors.bad_dns_query == 2' <<<"$dns"
check "show --json counts the refused one" jq -e '.errors.unknown_host == 1' <<<"$dns"
certs=$(jq -c '.interfaces[0].proxy.certificates' <<<"$js" 2>/dev/null || true)
echo "certificates: $certs"
check "show --json lists the one certificate, from ACME, with its expiry and renewal" \
    jq -e --arg h "*.$DOMAIN" 'length == 1 and .[0].host == $h and .[0].source == "acme"
        and .[0].not_after > now and (.[0].renew_at | type) == "number" and .[0].renew_at < .[0].not_after
        and (.[0] | has("error") | not)' <<<"$certs"
show=$(lab_exec hub "$GATEWIRE" show gw0 2>/dev/null || true)
check "gatewire show sums the certificates up" grep -q "^certificates: 1; next to expire \*\.$DOMAIN in [0-9]* days$" <<<"$show"

# --- a reload adds a route: same certificate at once, no order
write_conf wiki
kill -HUP "$(lab_pid hub)"
check "a route added by a reload is served with the wildcard certificate" wait_for 15 eval \
    "pcurl --resolve 'wiki.$DOMAIN:443:$HUB4' 'https://wiki.$DOMAIN/' | grep -q '$MARK path=/ .* xfh=wiki.$DOMAIN '"
orders=$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)
assert_eq "no order for the new name" 1 "$orders"

# --- restart: from disk, no order
lab_stop hub
GW_CONF=$conf gw_start_hub hub
must "proxy back" wait_for 15 lab_sh hub "ss -Hltn 'sport = :443' | grep -q ."
check "after a restart the wildcard certificate is served again" wait_for 20 eval \
    "pcurl --resolve 'shop.$DOMAIN:443:$HUB4' 'https://shop.$DOMAIN/' | grep -q '$MARK'"
orders=$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)
assert_eq "no new ACME order after the restart" 1 "$orders"

check "hub still running" lab_alive hub
lab_finish

#!/usr/bin/env bash
# The hubs as the name servers of their gateway zone (`[proxy.dns]`), meshed
# through etcd. Hub A (namespace hub) and hub B (hub2) both answer gw.test;
# the hidden node n1 dials both hubs and both route `alpha` to it; n2 dials
# hub B only, which routes `beta` to it (hub A learns beta from the mesh).
# dig (bind9-dnsutils) in the public namespace asks each hub directly: every
# hub names itself first, then the other hub (its public addresses, from its
# mesh record), for every name it or the mesh serves (A and AAAA, the
# answer authoritative, over UDP and TCP), NXDOMAIN with the zone's SOA for
# other names and for names two labels down, the two name servers at the
# apex with each one's own address, REFUSED outside the zone and for a zone
# transfer; a route added to hub B's config is named within seconds, by
# hub B and, through the mesh, by hub A; a gateway domain hub B adds two
# labels down is named through the mesh by hub A, and the name between
# (v2.gw.test) is NODATA on both hubs. Then the client resolves names as a
# user's machine does: glibc's resolver asks dnsmasq in pub, which forwards
# gw.test to both hubs (the zone's two name servers, hub A first), and curl
# reaches alpha and beta by name alone. Hub A is stopped: its name server no
# longer answers, glibc asks again after a second, dnsmasq sends the query
# to hub B, which names itself, and curl reaches alpha by name through
# hub B; once hub A's mesh record is gone, hub B names itself alone.
# `gatewire show` counts the queries.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=79-hub-mesh-dns
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl dig dnsmasq python3 ss jq etcd etcdctl
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB6=$(lab_wan6 hub)
HUB2_4=$(lab_wan4 hub2)
HUB2_6=$(lab_wan6 hub2)
MARK1="from-n1-$$"
MARK2="from-n2-$$"

lab_up 2 0
lab_add_hub2

lab_etcd hub
ETCD=$(lab_etcd_url hub)
must "etcd listening on hub A's wan address" \
    wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."

# dns_hub NS NAME V4 V6 ROUTES NODES... : a hub config with the proxy, the
# zone's DNS and [mesh]
dns_hub() {
    local ns=$1 name=$2 v4=$3 v6=$4 routes=$5 conf
    shift 5
    conf=$(gw_hub_conf "$ns" "$@")
    cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80", "[::]:80"]
https_listen = []
$routes

[proxy.dns]
listen = ["$v4:53", "[$v6]:53"]
addresses = ["$v4", "$v6"]
ttl = 5

[proxy.dns.nameservers]
"ns1.$DOMAIN" = ["$HUB4", "$HUB6"]
"ns2.$DOMAIN" = ["$HUB2_4", "$HUB2_6"]

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$v4", "$v6"]
ttl = 3
EOF
    echo "$conf"
}

ALPHA_ROUTE="
[[route]]
name = \"alpha\"
backends = [\"http://[$(lab_ov6 n1)]:8080\"]"
BETA_ROUTE="
[[route]]
name = \"beta\"
backends = [\"http://[$(lab_ov6 n2)]:8080\"]"
confA=$(dns_hub hub hub-a "$HUB4" "$HUB6" "$ALPHA_ROUTE" n1)
confB=$(dns_hub hub2 hub-b "$HUB2_4" "$HUB2_6" "$ALPHA_ROUTE$BETA_ROUTE" n1 n2)
GW_CONF=$confA gw_start_hub hub
GW_CONF=$confB gw_start_hub hub2
gw_start_node n1 hub hub2
gw_start_node n2 hub2
must "n1 reaches hub A" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"
must "n1 reaches hub B" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub2)"
must "n2 reaches hub B" wait_for 15 lab_ping1 n2 "$(lab_ov6 hub2)"

lab_bg n1 web1 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n1)" 8080 "$MARK1"
lab_bg n2 web2 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n2)" 8080 "$MARK2"
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "backend on n2" wait_for 10 lab_sh n2 "ss -Hltn 'sport = :8080' | grep -q ."
must "hub A's DNS listener" wait_for 10 lab_sh hub "ss -Hlun 'sport = :53' | grep -q ."
must "hub B's DNS listener" wait_for 10 lab_sh hub2 "ss -Hlun 'sport = :53' | grep -q ."

# d SERVER ARGS... : dig in pub, short answers only
d() { lab_exec pub dig +time=2 +tries=1 +short "@$1" "${@:2}" 2>/dev/null || true; }
# dfull SERVER ARGS... : dig's full answer
dfull() { lab_exec pub dig +time=2 +tries=1 "@$1" "${@:2}" 2>/dev/null || true; }
# da SERVER ARGS... : the addresses of dig's answer, in order, on one line
da() { d "$@" | tr '\n' ' ' | sed 's/ $//'; }
names() { [ "$(da "$1" "$2" A)" = "$3" ]; }

# --- each hub names itself first, then the other hub of the mesh
must "hub A learns beta and hub B's public addresses from the mesh" \
    wait_for 15 names "$HUB4" "beta.$DOMAIN" "$HUB4 $HUB2_4"
assert_eq "hub A: alpha (its own route) is hub A, then hub B" "$HUB4 $HUB2_4" "$(da "$HUB4" "alpha.$DOMAIN" A)"
assert_eq "hub A: AAAA of alpha, the IPv6 addresses in the same order" "$HUB6 $HUB2_6" \
    "$(da "$HUB4" "alpha.$DOMAIN" AAAA)"
must "hub B learns hub A's public addresses" wait_for 15 names "$HUB2_4" "alpha.$DOMAIN" "$HUB2_4 $HUB4"
assert_eq "hub B: beta is hub B, then hub A" "$HUB2_4 $HUB4" "$(da "$HUB2_4" "beta.$DOMAIN" A)"
assert_eq "hub B over IPv6 and TCP, any case: AAAA of beta" "$HUB2_6 $HUB6" \
    "$(da "$HUB2_6" +tcp "BeTa.GW.test" AAAA)"
out=$(dfull "$HUB4" "alpha.$DOMAIN" A)
check "an authoritative answer (aa), no recursion offered" grep -qE "flags: qr aa rd;" <<<"$out"
check "with the configured TTL" grep -qE "^alpha\.$DOMAIN\.[[:space:]]+5[[:space:]]+IN[[:space:]]+A[[:space:]]+$HUB4" <<<"$out"

out=$(dfull "$HUB4" "nope.$DOMAIN" A)
check "a name no hub serves: NXDOMAIN" grep -q "status: NXDOMAIN" <<<"$out"
check "... with the zone's SOA" grep -qE "^$DOMAIN\.[[:space:]].*SOA" <<<"$out"
out=$(dfull "$HUB4" "x.alpha.$DOMAIN" A)
check "two labels down: NXDOMAIN" grep -q "status: NXDOMAIN" <<<"$out"
assert_eq "NS at the apex: the two name servers" "ns1.$DOMAIN. ns2.$DOMAIN." \
    "$(d "$HUB4" "$DOMAIN" NS | sort | tr '\n' ' ' | sed 's/ $//')"
assert_eq "hub A names ns2 with hub B's address" "$HUB2_4" "$(d "$HUB4" "ns2.$DOMAIN" A)"
assert_eq "hub B names ns1 with hub A's IPv6 address" "$HUB6" "$(d "$HUB2_4" "ns1.$DOMAIN" AAAA)"
check "SOA at the apex" grep -q "^$DOMAIN\. hostmaster\.$DOMAIN\. " <<<"$(d "$HUB4" "$DOMAIN" SOA)"
out=$(dfull "$HUB4" "example.org" A)
check "a name outside the zone: REFUSED" grep -q "status: REFUSED" <<<"$out"
out=$(lab_exec pub dig +time=2 +tries=1 "@$HUB4" "$DOMAIN" AXFR 2>&1 || true)
check "a zone transfer is refused" grep -q "Transfer failed\|status: REFUSED" <<<"$out"

# --- a route added to hub B's config (the hub reloads an edited file) is
# named by both hubs
sed -i "s|^\[proxy.dns\]\$|[[route]]\nname = \"gamma\"\nbackends = [\"http://[$(lab_ov6 n2)]:8080\"]\n\n[proxy.dns]|" "$confB"
check "hub B names gamma after the reload" wait_for 10 names "$HUB2_4" "gamma.$DOMAIN" "$HUB2_4 $HUB4"
check "hub A names gamma through the mesh" wait_for 15 names "$HUB4" "gamma.$DOMAIN" "$HUB4 $HUB2_4"
# --- hub B gets a second gateway domain, v2 under the first: hub A, which
# does not have it, names beta.v2 (two labels down) through the mesh, and
# the name between it and the apex exists, empty, on both hubs (a resolver
# minimising query names asks it first; NXDOMAIN there would deny the names
# below)
sed -i "s|^domains = \[\"$DOMAIN\"\]\$|domains = [\"$DOMAIN\", \"v2.$DOMAIN\"]|" "$confB"
check "hub A names beta.v2 (hub B's) through the mesh" \
    wait_for 15 names "$HUB4" "beta.v2.$DOMAIN" "$HUB4 $HUB2_4"
for hub_ip in "$HUB4" "$HUB2_4"; do
    out=$(dfull "$hub_ip" "v2.$DOMAIN" A)
    check "$hub_ip: v2, above a served name: NOERROR with no answer (NODATA)" \
        eval "grep -q 'status: NOERROR' <<<\"\$out\" && grep -q 'ANSWER: 0,' <<<\"\$out\""
    check "$hub_ip: ... with the SOA of its zone" grep -qE "^(v2\.)?$DOMAIN\.[[:space:]].*SOA" <<<"$out"
    out=$(dfull "$hub_ip" "x.v2.$DOMAIN" A)
    check "$hub_ip: a name beside beta.v2: NXDOMAIN" grep -q "status: NXDOMAIN" <<<"$out"
done

# --- a user's machine: glibc -> dnsmasq in pub -> the zone's two name servers
lab_bg pub resolver dnsmasq -k --port=53 --listen-address=127.0.0.1 --bind-interfaces \
    --no-resolv --no-hosts --cache-size=0 --log-queries --log-facility=- \
    --pid-file="$GW_TMP/resolver.pid" --strict-order \
    --server="/$DOMAIN/$HUB4#53" --server="/$DOMAIN/$HUB2_4#53"
must "dnsmasq in pub" wait_for 10 lab_sh pub "ss -Hlun 'sport = :53' | grep -q ."
mkdir -p "$GW_TMP/ns/pub"
# (glibc asks again after a second without an answer; dnsmasq sends a query
# asked again to every server of the zone)
printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:4\n' >"$GW_TMP/ns/pub/resolv.conf"
pcurl() { lab_exec pub curl -sS --max-time 5 "$@"; }
body=$(pcurl "http://alpha.$DOMAIN/by-name" || true)
check "curl reaches alpha by its name alone" grep -q "$MARK1 path=/by-name" <<<"$body"
body=$(pcurl "http://beta.$DOMAIN/by-name" || true)
check "curl reaches beta by its name alone" grep -q "$MARK2 path=/by-name" <<<"$body"
assert_eq "the resolver asks hub A first (--strict-order), which names itself" "$HUB4" \
    "$(lab_exec pub getent ahostsv4 "alpha.$DOMAIN" | awk 'NR == 1 { print $1 }')"
code=$(pcurl -o /dev/null -w '%{http_code}' "http://nope.$DOMAIN/" 2>/dev/null || true)
check "a name no hub serves does not resolve (curl gets no address)" test "$code" = 000

# --- hub A goes: its name server times out, the resolver asks the other one,
# which names hub B
lab_stop hub
reach_alpha() { pcurl "http://alpha.$DOMAIN/after" 2>/dev/null | grep -q "$MARK1 path=/after"; }
t0=$(date +%s%N)
check "with hub A stopped, curl reaches alpha by name through hub B" wait_for 20 reach_alpha
lab_log "alpha by name again after $((($(date +%s%N) - t0) / 1000000)) ms"
assert_eq "the resolver now names hub B" "$HUB2_4" \
    "$(lab_exec pub getent ahostsv4 "alpha.$DOMAIN" | awk 'NR == 1 { print $1 }')"
check "hub B no longer names the stopped hub A" wait_for 10 names "$HUB2_4" "alpha.$DOMAIN" "$HUB2_4"
check "dnsmasq forwarded to hub B" grep -q "forwarded alpha.$DOMAIN to $HUB2_4" "$(lab_logfile resolver)"

js=$(gw_show_json hub2 gw0 || true)
dns=$(jq -c '.interfaces[0].proxy.routes[] | select(.route == "dns")' <<<"$js" 2>/dev/null || true)
echo "hub B dns counters: $dns"
check "hub B counts its queries" jq -e '.requests >= 5' <<<"$dns"

lab_finish

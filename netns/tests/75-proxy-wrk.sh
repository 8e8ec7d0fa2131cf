#!/usr/bin/env bash
# Acceptance 8: `wrk` with 64 connections for 20 s against a terminated HTTPS
# route through the tunnel (nginx on the hidden node n1 behind the NAT serves a
# small page): zero socket errors, zero non-2xx answers, and the hub's counters
# agree. `pub` gets a private /etc/hosts so wrk sends the route's name as SNI.
# Use an optimised build (target/release/gatewire, the default, or the ci profile CI runs).
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=75-proxy-wrk
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd wrk nginx openssl ss jq
need_gatewire

DOMAIN=gw.example.org
HOST="web.$DOMAIN"
HUB4=$(lab_wan4 hub)
N1=$(lab_ov4 n1)
DUR=${WRK_DURATION:-20}

lab_up 1 0

CERT="$GW_TMP/certs"
mkdir -p "$CERT"
lab_selfsigned "$HOST" "$CERT/cert.pem" "$CERT/key.pem"

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[[route]]
name = "web"
cert = "$CERT/cert.pem"
key = "$CERT/key.pem"
backends = ["http://$N1:8080"]
EOF
GW_CONF=$conf RUST_LOG=warn gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"

lab_nginx n1 nginx "
    keepalive_requests 100000;
    server {
        listen $N1:8080;
        location / { default_type text/plain; return 200 \"small-response-from-n1\n\"; }
    }" 1024
must "nginx on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "hub :443" wait_for 10 lab_sh hub "ss -Hltn 'sport = :443' | grep -q ."

echo "$HUB4 $HOST" >"$GW_TMP/hosts"
must "route works" wait_for 10 eval \
    "lab_exec pub curl -sS --max-time 5 --cacert '$CERT/cert.pem' --resolve '$HOST:443:$HUB4' 'https://$HOST/' | grep -q small-response-from-n1"

out=$(lab_exec pub bash -c "mount --bind '$GW_TMP/hosts' /etc/hosts && exec wrk -t 2 -c 64 -d ${DUR}s --latency https://$HOST/" 2>&1 || true)
printf '%s\n' "$out" | sed 's/^/    /' >&2
reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
check "wrk completed requests" [ "${reqs:-0}" -gt 1000 ]
check "no socket errors" not grep -q "Socket errors" <<<"$out"
check "no non-2xx answers" not grep -q "Non-2xx" <<<"$out"
js=$(gw_show_json hub gw0 || true)
errs=$(jq '[.interfaces[0].proxy.routes[] | select(.route == "name:web") | .errors[]] | add // 0' <<<"$js")
assert_eq "no errors counted on the route" 0 "$errs"
n=$(jq '.interfaces[0].proxy.routes[] | select(.route == "name:web") | .requests' <<<"$js")
check "hub counted at least wrk's requests" [ "${n:-0}" -ge "${reqs:-1}" ]
lab_log "wrk: $reqs requests in ${DUR}s, $(sed -n 's/^Requests\/sec: *//p' <<<"$out") req/s"
# Backend connections are kept and reused (by the client connection that
# opened them, then from the pool), not opened per request: tens of thousands
# of requests leave about one backend socket per wrk connection on n1, in any
# state (a connection per request would leave one TIME-WAIT socket each).
bsocks=$(lab_sh n1 "ss -Htan 'sport = :8080' | grep -vc LISTEN" || true)
lab_log "backend sockets on n1 after the run: ${bsocks:-?} (for $reqs requests)"
check "backend connections were reused (1 to 128 sockets on n1, got ${bsocks:-none})" \
    eval '[ "${bsocks:-0}" -ge 1 ] && [ "${bsocks:-0}" -le 128 ]'
check "hub still running" lab_alive hub
lab_finish

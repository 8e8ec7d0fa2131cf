#!/usr/bin/env bash
# The hub's embedded reverse proxy in front of a hidden node behind the NAT.
# n1 runs real backends bound only to its IPv6 overlay address: an HTTP server
# (python3) that echoes the forwarding headers, a TCP echo and a UDP echo
# (socat). From the public namespace `pub`, curl reaches the HTTP backend by
# name over IPv4 and IPv6, over plain HTTP, terminated HTTPS (HTTP/1.1 and
# HTTP/2) with a certificate file on the hub; the backend sees the client's real
# address in X-Forwarded-For. An unknown Host gets 404, an unknown SNI the TLS
# alert unrecognized_name; the TCP and UDP forwards carry an IPv4 client to the
# IPv6-only backends; a TCP forward with a certificate terminates TLS at the
# hub (socat verifies it) and carries the plain stream to the same echo. Client
# address rules: a route that admits only pub's IPv6 address answers its IPv4 403, a
# forward that refuses pub's network closes it, both counted; a route with a
# rate limit answers 429 after its burst; a TCP forward with `bandwidth`
# paces a 1 MiB echo to its rate (and the other forwards not); a route with HTTP Basic
# authentication (an htpasswd file made by htpasswd -B) answers 401 without
# the right password and keeps the credentials from the backend; a route with
# forward authentication asks nginx on n1 first (its redirect to a login page
# reaches the client, a good token passes with the user nginx names). A route
# with a path prefix sends /api (stripped) to a second backend on n1 and the
# rest to the first; a dot-segment gets 400; an upload over its
# max_body_size gets 413; its header rules set HSTS and remove the
# backend's Content-Type. The access log
# has a JSON line per request and connection and is reopened on SIGHUP. A
# config whose backend is the hub's loopback is refused at load.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=70-proxy
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl socat python3 openssl ss htpasswd nginx
need_gatewire

DOMAIN=gw.example.org
HOST="blog.$DOMAIN"
HUB4=$(lab_wan4 hub)
HUB6=$(lab_wan6 hub)
PUB4=$(lab_wan4 pub)
PUB6=$(lab_wan6 pub)
N1V6=$(lab_ov6 n1)
MARK="hello-from-n1-$$"

lab_up 1 0

# --- certificate for the terminated route (self-signed; curl trusts it by --cacert)
CERT_DIR="$GW_TMP/certs"
mkdir -p "$CERT_DIR"
lab_selfsigned "$HOST" "$CERT_DIR/fullchain.pem" "$CERT_DIR/key.pem"

# --- users of the route with HTTP Basic authentication (bcrypt, as htpasswd makes them)
htpasswd -cbB "$GW_TMP/team.htpasswd" alice "s3cret-$$" 2>/dev/null

# --- hub config: the lab's hub file plus the proxy sections
conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80", "[::]:80"]
https_listen = ["0.0.0.0:443", "[::]:443"]
access_log = "$GW_TMP/access.log"

[[route]]
name = "blog"
tls = "terminate"
cert = "$CERT_DIR/fullchain.pem"
key = "$CERT_DIR/key.pem"
backends = ["http://[$N1V6]:8080"]

# One host, two services on n1: /api (prefix stripped) and the rest.
[[route]]
name = "shop"
backends = ["http://[$N1V6]:8080"]
max_body_size = "1 MB"
response_headers = { "Strict-Transport-Security" = "max-age=31536000", "Content-Type" = "" }
request_headers = { "X-Auth-Request-User" = "shop-hub" }
health_check = "http"
health_path = "/web-health"
health_interval = 1

[[route.paths]]
prefix = "/api"
backends = ["http://[$N1V6]:8081"]
strip_prefix = true
health_path = "/api-health"

# Only pub's IPv6 address may use this one.
[[route]]
name = "admin"
backends = ["http://[$N1V6]:8080"]
allow = ["$PUB6"]

# Only alice, with her password.
[[route]]
name = "team"
backends = ["http://[$N1V6]:8080"]
basic_auth_file = "$GW_TMP/team.htpasswd"

# Asks nginx on n1 (an authentication service) first.
[[route]]
name = "sso"
backends = ["http://[$N1V6]:8080"]
forward_auth = "http://[$N1V6]:4180/auth"
forward_auth_headers = ["X-Auth-Request-User"]

# Three requests at once per client, then one a second.
[[route]]
name = "limited"
backends = ["http://[$N1V6]:8080"]
rate_limit = 1
rate_burst = 3

[[tcp]]
listen = "0.0.0.0:2222"
backends = ["[$N1V6]:7000"]

[[tcp]]
listen = "0.0.0.0:2223"
backends = ["[$N1V6]:7000"]
cert = "$CERT_DIR/fullchain.pem"
key = "$CERT_DIR/key.pem"

[[tcp]]
listen = "0.0.0.0:2224"
backends = ["[$N1V6]:7000"]
deny = ["${PUB4%.*}.0/24"]

# All its clients together: 2 Mbit/s each way.
[[tcp]]
listen = "0.0.0.0:2225"
backends = ["[$N1V6]:7000"]
bandwidth = "2 Mbit/s"

[[udp]]
listen = "0.0.0.0:5353"
backends = ["[$N1V6]:5300"]
EOF

# A config whose backend loops into the hub is refused at load, naming it.
bad="$GW_TMP/conf/hub-bad.toml"
sed 's#backends = \["http://\[.*\]:8080"\]#backends = ["http://127.0.0.1:8080"]#' "$conf" >"$bad"
out=$(lab_exec hub "$GATEWIRE" hub --config "$bad" --check 2>&1 || true)
check "a loopback backend is refused at config load, named" \
    grep -q "127.0.0.1:8080.*loopback" <<<"$out"
check "the refusal names the route" grep -q "blog" <<<"$out"

GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# --- backends on n1, bound to its IPv6 overlay address only
lab_bg n1 web python3 "$GW_LIB_DIR/tools/echo-headers.py" "$N1V6" 8080 "$MARK"
lab_bg n1 api python3 "$GW_LIB_DIR/tools/echo-headers.py" "$N1V6" 8081 "api-$MARK"
# (socat's PIPE echo can deadlock on the 1 MiB echoes below)
lab_bg n1 tcpecho python3 "$GW_LIB_DIR/tools/tcpecho.py" "$N1V6" 7000
lab_bg n1 udpecho socat "UDP6-LISTEN:5300,bind=[$N1V6],fork,reuseaddr" PIPE
must "HTTP backend listening on n1's overlay address" \
    wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q '$N1V6'"
must "second HTTP backend (the shop's API) listening" \
    wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8081' | grep -q '$N1V6'"
must "TCP echo listening" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :7000' | grep -q ."
must "hub proxy listening on :80 and :443" \
    wait_for 10 lab_sh hub "ss -Hltn 'sport = :80' | grep -q . && ss -Hltn 'sport = :443' | grep -q ."

# curl from the public namespace. Prints the body; extra args pass through.
pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }

# --- HTTP by name; an IPv4 client reaches an IPv6-only backend
body=$(pcurl --resolve "$HOST:80:$HUB4" "http://$HOST/plain" || true)
check "HTTP by name over IPv4 reaches n1's IPv6-only backend" grep -q "$MARK path=/plain" <<<"$body"
check "backend sees the client's IPv4 address in X-Forwarded-For" grep -q "xff=$PUB4 " <<<"$body"
check "X-Forwarded-Proto is http" grep -q "xfp=http " <<<"$body"
check "X-Forwarded-Host is the requested host" grep -q "xfh=$HOST " <<<"$body"
check "Forwarded names the client" grep -q "fwd=for=$PUB4;" <<<"$body"
body=$(pcurl --resolve "$HOST:80:$HUB4" -H "X-Forwarded-For: 203.0.113.66" \
    -H "X-Forwarded-Host: evil.example" "http://$HOST/spoof" || true)
check "a client's own X-Forwarded-For and -Host are replaced (no trusted_proxies)" \
    grep -q "path=/spoof xff=$PUB4 xfp=http xfh=$HOST " <<<"$body"

body=$(pcurl --resolve "$HOST:80:[$HUB6]" "http://$HOST/v6" || true)
check "HTTP by name over IPv6" grep -q "$MARK path=/v6" <<<"$body"
check "X-Forwarded-For carries the IPv6 client" grep -q "xff=$PUB6 " <<<"$body"

code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "nope.$DOMAIN:80:$HUB4" "http://nope.$DOMAIN/" || true)
assert_eq "unknown Host gets 404" 404 "$code"

# --- path prefixes: /api to the second backend, prefix stripped; the rest to the first
SHOP="shop.$DOMAIN"
# (its active checks marked both down while they were not listening yet)
shop_up() {
    gw_show_json hub gw0 2>/dev/null |
        jq -e '[.interfaces[0].proxy.routes[] | select(.route == "name:shop") | .backends[] | .up] == [true, true]' >/dev/null
}
must "the shop's backends pass their health checks" wait_for 10 shop_up
body=$(pcurl --resolve "$SHOP:80:$HUB4" "http://$SHOP/api/orders?id=7" || true)
check "/api/orders goes to the API backend as /orders, query kept" \
    grep -q "^api-$MARK path=/orders?id=7 xff=$PUB4 " <<<"$body"
body=$(pcurl --resolve "$SHOP:80:$HUB4" "http://$SHOP/api" || true)
check "/api itself goes to the API backend as /" grep -q "^api-$MARK path=/ " <<<"$body"
body=$(pcurl --resolve "$SHOP:80:$HUB4" "http://$SHOP/apix/a" || true)
check "/apix is not under /api: the route's own backend, path as sent" \
    grep -q "^$MARK path=/apix/a " <<<"$body"
body=$(pcurl --resolve "$SHOP:80:[$HUB6]" "http://$SHOP/cart" || true)
check "the rest goes to the route's own backend" grep -q "^$MARK path=/cart " <<<"$body"
check "request_headers: the backend gets the route's header" grep -q "user=shop-hub" <<<"$body"
head=$(pcurl -D - -o /dev/null --resolve "$SHOP:80:$HUB4" "http://$SHOP/cart" | tr -d '\r' || true)
check "response_headers: HSTS set on the backend's response" \
    grep -qi "^strict-transport-security: max-age=31536000$" <<<"$head"
check "response_headers: the backend's Content-Type removed" \
    test -z "$(grep -i '^content-type:' <<<"$head")"
code=$(pcurl --path-as-is -o /dev/null -w '%{http_code}' --resolve "$SHOP:80:$HUB4" \
    "http://$SHOP/api/../admin" || true)
assert_eq "a dot-segment on a route with paths gets 400" 400 "$code"
big=$(make_file upload.bin 2)
code=$(pcurl -o /dev/null -w '%{http_code}' --data-binary "@$big" --resolve "$SHOP:80:$HUB4" \
    "http://$SHOP/api/upload" || true)
assert_eq "a 2 MiB upload to a route with max_body_size 1 MB gets 413" 413 "$code"
check "health checks: the route's path on its own backend" \
    wait_for 5 grep -q '"GET /web-health HTTP' "$GW_TMP/logs/web.log"
check "health checks: the prefix's own health_path on its backend" \
    wait_for 5 grep -q '"GET /api-health HTTP' "$GW_TMP/logs/api.log"
check "and not the route's path there" test -z "$(grep -F '/web-health' "$GW_TMP/logs/api.log")"
js=$(gw_show_json hub gw0 || true)
assert_eq "show --json: counted as body_too_large" 1 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:shop") | .errors.body_too_large' <<<"$js")"
assert_eq "show --json: the prefix's backend listed with its path, up" "/api true" \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:shop") | .backends[] | select(.path) | "\(.path) \(.up)"' <<<"$js")"
assert_eq "show --json: the dot-segment counted as bad_path" 1 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:shop") | .errors.bad_path' <<<"$js")"

# --- HTTPS terminated at the hub (certificate file), HTTP/1.1 and HTTP/2
body=$(pcurl --cacert "$CERT_DIR/fullchain.pem" --resolve "$HOST:443:$HUB4" "https://$HOST/tls" || true)
check "HTTPS terminated at the hub, curl verifies the certificate" grep -q "$MARK path=/tls" <<<"$body"
check "X-Forwarded-Proto is https" grep -q "xfp=https " <<<"$body"
ver=$(pcurl --http2 -o /dev/null -w '%{http_version}' --cacert "$CERT_DIR/fullchain.pem" \
    --resolve "$HOST:443:$HUB4" "https://$HOST/h2" || true)
assert_eq "HTTP/2 negotiated through ALPN" 2 "$ver"
err=$(lab_exec pub curl -sS --max-time 10 -k --resolve "nope.$DOMAIN:443:$HUB4" "https://nope.$DOMAIN/" 2>&1 >/dev/null || true)
# curl (OpenSSL) reports alert 112 as "tlsv1 unrecognized name"; other alerts
# (internal_error, access_denied) do not pass.
check "unknown SNI gets the TLS alert unrecognized_name" grep -qi "unrecognized name" <<<"$err"

# --- TCP and UDP forwards: IPv4 client, IPv6-only backends
tcp_out=$(lab_sh pub "printf 'tcp-$MARK' | timeout 10 socat -t 2 - TCP4:$HUB4:2222" || true)
assert_eq "TCP forward: IPv4 client to the IPv6-only echo on n1" "tcp-$MARK" "$tcp_out"
tls_out=$(lab_sh pub "printf 'tls-$MARK' | timeout 10 socat -t 2 - OPENSSL:$HUB4:2223,cafile=$CERT_DIR/fullchain.pem,commonname=$HOST,snihost=$HOST" || true)
assert_eq "TCP forward with TLS terminated at the hub (certificate verified)" "tls-$MARK" "$tls_out"
udp_out=$(lab_sh pub "printf 'udp-$MARK' | timeout 10 socat -t 2 - UDP4:$HUB4:5353" || true)
assert_eq "UDP forward: IPv4 client to the IPv6-only echo on n1" "udp-$MARK" "$udp_out"

# --- bandwidth: 1 MiB echoed through the forward limited to 2 Mbit/s
# (250 kB/s each way, both ways at once) takes about 4.2 s, less a burst of
# 25 kB; the unlimited forward on 2222 is not held back by it
bw_file=$(make_file bw.bin 1)
bw_sum=$(sha256sum <"$bw_file" | cut -d' ' -f1)
# echo_through PORT : 1 MiB through the TCP forward on PORT and back; prints
# the milliseconds, logs what came back
echo_through() {
    local out="$GW_TMP/data/echo-$1.out" t0 ms
    t0=$(now_ms)
    lab_sh pub "timeout 30 socat -t 30 -T 30 - TCP4:$HUB4:$1 <'$bw_file' >'$out'" 2>/dev/null || true
    ms=$(($(now_ms) - t0))
    lab_log "port $1: $(stat -c %s "$out") bytes back in $ms ms"
    echo "$ms"
}
bw_ms=$(echo_through 2225)
assert_eq "1 MiB echoed through the 2 Mbit/s TCP forward arrives intact" \
    "$bw_sum" "$(sha256sum <"$GW_TMP/data/echo-2225.out" | cut -d' ' -f1)"
check "and takes at least 3.8 s ($bw_ms ms)" test "$bw_ms" -ge 3800
free_ms=$(echo_through 2222)
assert_eq "the same through the unlimited forward arrives intact" \
    "$bw_sum" "$(sha256sum <"$GW_TMP/data/echo-2222.out" | cut -d' ' -f1)"
check "and is not held back ($free_ms ms)" test "$free_ms" -lt "$bw_ms"
check "gatewire show has the forward's limit in bytes per second" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].proxy.routes[] | select(.route == \"tcp:0.0.0.0:2225\") | .bandwidth == 250000 and .bytes_out == 1048576' >/dev/null"

# --- client address rules: the admin route admits pub's IPv6 address only,
# the TCP forward on 2224 refuses pub's IPv4 network
ADMIN="admin.$DOMAIN"
code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "$ADMIN:80:$HUB4" "http://$ADMIN/" || true)
assert_eq "allow: pub over IPv4 gets 403 from the admin route" 403 "$code"
body=$(pcurl --resolve "$ADMIN:80:[$HUB6]" "http://$ADMIN/admin" || true)
check "allow: pub over IPv6 (the allowed address) reaches the backend" grep -q "$MARK path=/admin" <<<"$body"
deny_out=$(lab_sh pub "printf 'deny-$MARK' | timeout 10 socat -t 2 - TCP4:$HUB4:2224" 2>/dev/null || true)
assert_eq "deny: the TCP forward closes pub's IPv4 connection unanswered" "" "$deny_out"
LIMITED="limited.$DOMAIN"
# Five requests well within a second (one token a second comes back).
codes=$(for i in 1 2 3 4 5; do pcurl -D "$GW_TMP/limited-$i.head" -o /dev/null -w '%{http_code} ' \
    --resolve "$LIMITED:80:$HUB4" "http://$LIMITED/"; done || true)
assert_eq "rate limit: a burst of 3, then 429 (5 quick requests)" "200 200 200 429 429 " "$codes"
retry=$(tr -d '\r' <"$GW_TMP/limited-5.head" | awk -F': ' 'tolower($1) == "retry-after" {print $2}' || true)
assert_eq "rate limit: the 429 says when to retry" 1 "$retry"
# --- HTTP Basic authentication at the edge
TEAM="team.$DOMAIN"
code=$(pcurl -D "$GW_TMP/team.head" -o /dev/null -w '%{http_code}' --resolve "$TEAM:80:$HUB4" "http://$TEAM/" || true)
assert_eq "basic auth: no credentials, 401" 401 "$code"
check "basic auth: the 401 asks for Basic credentials for the route's host" \
    grep -qi "^www-authenticate: Basic realm=\"$TEAM\"" "$GW_TMP/team.head"
code=$(pcurl -o /dev/null -w '%{http_code}' -u "alice:wrong" --resolve "$TEAM:80:$HUB4" "http://$TEAM/" || true)
assert_eq "basic auth: a wrong password, 401" 401 "$code"
body=$(pcurl -u "alice:s3cret-$$" --resolve "$TEAM:80:[$HUB6]" "http://$TEAM/team" || true)
check "basic auth: alice reaches the backend" grep -q "$MARK path=/team" <<<"$body"
check "basic auth: the backend does not see her credentials" grep -q "auth=None" <<<"$body"

# --- forward authentication: nginx on n1 stands in for an SSO service
lab_nginx n1 nginx "
    server {
        listen [$N1V6]:4180;
        location = /auth {
            if (\$http_authorization = \"Bearer good-$$\") {
                add_header X-Auth-Request-User alice;
                return 200;
            }
            return 302 \"https://sso.example.org/login?rd=\$http_x_forwarded_host\$http_x_forwarded_uri\";
        }
    }"
must "nginx (the authentication service) on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :4180' | grep -q ."
SSO="sso.$DOMAIN"
loc=$(pcurl -o /dev/null -w '%{http_code} %{redirect_url}' --resolve "$SSO:80:$HUB4" "http://$SSO/inbox?page=2" || true)
assert_eq "forward auth: no token, the service's redirect to its login page" \
    "302 https://sso.example.org/login?rd=$SSO/inbox?page=2" "$loc"
body=$(pcurl -H "Authorization: Bearer good-$$" -H "X-Auth-Request-User: mallory" \
    --resolve "$SSO:80:$HUB4" "http://$SSO/inbox" || true)
check "forward auth: a good token reaches the backend" grep -q "$MARK path=/inbox" <<<"$body"
check "forward auth: the backend gets the user the service named, not the client's claim" \
    grep -q "user=alice" <<<"$body"

js=$(gw_show_json hub gw0 || true)
assert_eq "forward auth: the refusal counted as unauthorized" 1 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:sso") | .errors.unauthorized' <<<"$js")"
assert_eq "basic auth: refusals counted as unauthorized" 2 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:team") | .errors.unauthorized' <<<"$js")"
assert_eq "rate limit: refusals counted as rate_limited" 2 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "name:limited") | .errors.rate_limited' <<<"$js")"
denied() { jq -r --arg r "$1" '.interfaces[0].proxy.routes[] | select(.route == $r) | .errors.denied // 0' <<<"$js"; }
assert_eq "the refusals are counted as denied (route)" 1 "$(denied name:admin)"
assert_eq "the refusals are counted as denied (TCP forward)" 1 "$(denied tcp:0.0.0.0:2224)"

# --- the access log: a JSON line per request and per forwarded connection
ALOG="$GW_TMP/access.log"
logged() { jq -e -s "$1" "$ALOG" >/dev/null 2>&1; }
check "access log: the IPv4 request with its client, status, path and backend" wait_for 5 logged \
    "any(.[]; (.client | startswith(\"$PUB4:\")) and .path == \"/plain\" and .status == 200 and .route == \"name:blog\" and .backend == \"[$N1V6]:8080\")"
check "access log: alice's request names her" logged \
    'any(.[]; .path == "/team" and .status == 200 and .user == "alice")'
check "access log: the HTTPS request over HTTP/2 is marked tls and HTTP/2" logged \
    'any(.[]; .path == "/h2" and .tls == true and .proto == "HTTP/2")'
check "access log: the refused connection on the TCP forward, error denied" logged \
    'any(.[]; .kind == "tcp" and .route == "tcp:0.0.0.0:2224" and .error == "denied")'
check "access log: the TCP forward's bytes both ways" logged \
    "any(.[]; .kind == \"tcp\" and .route == \"tcp:0.0.0.0:2222\" and .bytes_in == ${#MARK} + 4 and .bytes_out == ${#MARK} + 4)"
# logrotate: move the file away, SIGHUP, and the next request lands in a new file
mv "$ALOG" "$ALOG.1"
kill -HUP "$(lab_pid hub)"
sleep 1
pcurl -o /dev/null --resolve "$HOST:80:$HUB4" "http://$HOST/after-hup" || true
check "access log: reopened after SIGHUP (logrotate)" wait_for 5 logged 'any(.[]; .path == "/after-hup")'
check "access log: the moved file keeps the earlier lines" jq -e -s 'length > 5' "$ALOG.1"

# --- a burst of requests, then the hub is still fine
# (pcurl has no --fail: the status is checked, so a 404, 502 or 503 is a failure)
ok=0
for _ in $(seq 1 50); do
    code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "$HOST:80:$HUB4" "http://$HOST/burst" || true)
    if [ "$code" = 200 ]; then ok=$((ok + 1)); fi
done
assert_eq "50 sequential requests through the tunnel answered 200" 50 "$ok"

check "hub still running" lab_alive hub
check "n1 still running" lab_alive n1
lab_finish

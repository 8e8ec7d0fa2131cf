#!/usr/bin/env bash
# A load balancer in front of the hub: haproxy in `pub` relays to the hub with
# PROXY headers (v2 on an HTTP frontend, v1 on a TCP frontend), and the hub,
# told to expect them from pub's IPv4 address (`[proxy] proxy_protocol_from`),
# takes the client from the header: the backend on the hidden node n1 sees
# haproxy's client in X-Forwarded-For, the route's `deny` rule refuses that
# client, and the access log names it for the TCP forward. A connection from
# pub's IPv4 address without a header is closed and counted; pub's IPv6
# address is not a balancer and needs none.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=77-proxy-balancer
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 socat ss jq haproxy
need_gatewire

DOMAIN=gw.example.org
HOST="app.$DOMAIN"
HUB4=$(lab_wan4 hub)
HUB6=$(lab_wan6 hub)
PUB4=$(lab_wan4 pub)
PUB6=$(lab_wan6 pub)
N1V6=$(lab_ov6 n1)

lab_up 1 0

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80", "[::]:80"]
https_listen = []
access_log = "$GW_TMP/access.log"
proxy_protocol_from = ["$PUB4"]

[[route]]
name = "app"
backends = ["http://[$N1V6]:8080"]

# Refuses one address on pub's loopback (haproxy's client there).
[[route]]
name = "guarded"
backends = ["http://[$N1V6]:8080"]
deny = ["127.0.0.66"]

[[tcp]]
listen = "0.0.0.0:2222"
backends = ["[$N1V6]:7000"]
EOF
GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# Backends on n1: an HTTP server that echoes X-Forwarded-For, a TCP echo.
cat >"$GW_TMP/backend.py" <<'EOF'
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("xff=%s\n" % self.headers.get("X-Forwarded-For")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6

S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
EOF
lab_bg n1 web python3 "$GW_TMP/backend.py" "$N1V6" 8080
lab_bg n1 tcpecho socat "TCP6-LISTEN:7000,bind=[$N1V6],fork,reuseaddr" PIPE
must "HTTP backend listening" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "TCP echo listening" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :7000' | grep -q ."

# haproxy in pub: its clients are on pub's loopback, it connects to the hub
# from pub's wan IPv4 address with a PROXY header.
cat >"$GW_TMP/haproxy.cfg" <<EOF
global
    log stderr format raw local0 warning
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    mode http
    bind 127.0.0.1:8080
    bind 127.0.0.66:8080
    default_backend hub
backend hub
    mode http
    server hub $HUB4:80 send-proxy-v2
frontend raw
    mode tcp
    bind 127.0.0.1:2222
    default_backend hubtcp
backend hubtcp
    mode tcp
    server hub $HUB4:2222 send-proxy
EOF
lab_bg pub haproxy haproxy -db -f "$GW_TMP/haproxy.cfg"
must "haproxy listening in pub" wait_for 10 lab_sh pub "ss -Hltn 'sport = :8080' | grep -q ."

pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }

body=$(pcurl -H "Host: $HOST" "http://127.0.0.1:8080/" || true)
assert_eq "through haproxy (PROXY v2): the backend sees haproxy's client" "xff=127.0.0.1" "$body"
code=$(pcurl -o /dev/null -w '%{http_code}' --interface 127.0.0.66 -H "Host: guarded.$DOMAIN" "http://127.0.0.66:8080/" || true)
assert_eq "the route's deny rule applies to the client in the header (403)" 403 "$code"
body=$(pcurl --interface 127.0.0.1 -H "Host: guarded.$DOMAIN" "http://127.0.0.1:8080/" || true)
assert_eq "another client through haproxy passes the same route" "xff=127.0.0.1" "$body"
tcp_out=$(lab_sh pub "printf 'through-haproxy' | timeout 10 socat -t 2 - TCP4:127.0.0.1:2222" || true)
assert_eq "TCP through haproxy (PROXY v1) reaches n1's echo" "through-haproxy" "$tcp_out"
check "the access log names haproxy's client for the TCP forward" wait_for 5 eval \
    "jq -e -s 'any(.[]; .kind == \"tcp\" and (.client | startswith(\"127.0.0.1:\")))' '$GW_TMP/access.log' >/dev/null"
check "no line in the access log names the balancer as the client" \
    not grep -q "\"client\":\"$PUB4:" "$GW_TMP/access.log"

# pub's IPv4 address without a header: closed, counted. Its IPv6 address is
# not a balancer.
direct=$(pcurl --resolve "$HOST:80:$HUB4" "http://$HOST/" 2>&1 || true)
check "a balancer's connection without a PROXY header is closed" not grep -q "xff=" <<<"$direct"
body=$(pcurl --resolve "$HOST:80:[$HUB6]" "http://$HOST/" || true)
assert_eq "pub's IPv6 address (not a balancer) needs no header" "xff=$PUB6" "$body"
js=$(gw_show_json hub gw0 || true)
assert_eq "the headerless connection is counted (bad_proxy_header)" 1 \
    "$(jq -r '.interfaces[0].proxy.routes[] | select(.route == "listener") | .errors.bad_proxy_header' <<<"$js")"

check "hub still running" lab_alive hub
lab_finish

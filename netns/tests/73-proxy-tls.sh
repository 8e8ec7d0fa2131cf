#!/usr/bin/env bash
# Acceptance 1, 2 and 5 with real servers:
# - HTTPS terminated at the hub with certificates issued by ACME: Debian's
#   pebble runs in `pub` (its DNS, pebble-challtestsrv, answers the hub's
#   address for every name), the hub orders over HTTP-01 for a name route and an
#   fqdn route; curl verifies them against pebble's root, over HTTP/1.1 and
#   HTTP/2; the certificates are on disk and are reused after a hub restart.
# - HTTPS passthrough to nginx on n1, which holds the certificate (curl verifies
#   it against the test CA) and sees the client's address through the PROXY
#   header; nginx takes v1 as well, so a second passthrough route leads to
#   the python backend that takes only a v2 header, which names the client.
# - A TCP forward with PROXY v2 (a python backend decodes it) and a UDP forward
#   answered by dnsmasq on n1.
# timeout: 400
set -euo pipefail
export GW_TEST_NAME=73-proxy-tls
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 openssl ss nginx dnsmasq pebble pebble-challtestsrv
need_gatewire

DOMAIN=gw.example.org
BLOG="blog.$DOMAIN"
WWW=www.example.net
SECURE=secure.example.com
PPV2=ppv2.example.com
HUB4=$(lab_wan4 hub)
PUB4=$(lab_wan4 pub)
N1V6=$(lab_ov6 n1)
MARK="n1-$$"

lab_up 1 0

# --- a test CA: it signs pebble's HTTPS certificate and nginx's
CA="$GW_TMP/ca"
mkdir -p "$CA"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=gatewire test CA" -keyout "$CA/ca.key" -out "$CA/ca.pem" >/dev/null 2>&1
# sign NAME SAN : $CA/NAME.pem and $CA/NAME.key, a leaf for SAN
sign() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
        -keyout "$CA/$1.key" -out "$CA/$1.csr" >/dev/null 2>&1
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n' "$2" >"$CA/$1.ext"
    openssl x509 -req -in "$CA/$1.csr" -CA "$CA/ca.pem" -CAkey "$CA/ca.key" -CAcreateserial \
        -days 2 -extfile "$CA/$1.ext" -out "$CA/$1.pem" >/dev/null 2>&1 || lab_die "openssl (sign $1)"
}
sign nginx "DNS:$SECURE"

# --- pebble in pub, its DNS answering the hub's address for every name
lab_pebble pub "$HUB4"

# --- hub config
STATE="$GW_TMP/acme-state"
conf=$(gw_hub_conf hub n1)
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
challenge = "http-01"

[[route]]
name = "blog"
acme = true
backends = ["http://[$N1V6]:8080"]

[[route]]
fqdn = "$WWW"
acme = true
backends = ["http://[$N1V6]:8080"]

[[route]]
fqdn = "$SECURE"
tls = "passthrough"
proxy_protocol = true
backends = ["[$N1V6]:8443"]

# The same as the route above, to the backend that accepts only PROXY v2.
[[route]]
fqdn = "$PPV2"
tls = "passthrough"
proxy_protocol = true
backends = ["[$N1V6]:7003"]

[[tcp]]
listen = "0.0.0.0:2223"
proxy_protocol = true
backends = ["[$N1V6]:7003"]

[[udp]]
listen = "0.0.0.0:53"
backends = ["[$N1V6]:5353"]
EOF

GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# --- backends on n1
cat >"$GW_TMP/web.py" <<'EOF'
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = ("%s host=%s xff=%s\n" % (sys.argv[3], self.headers.get("Host"),
             self.headers.get("X-Forwarded-For"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
EOF
cat >"$GW_TMP/ppv2.py" <<'EOF'
# TCP server: reads a PROXY v2 header (version 2, command PROXY), answers
# "src=<ip>" and echoes; anything else (a v1 header, none) gets an error line.
import ipaddress, socket, struct, sys, threading
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
def serve(c):
    try:
        h = b""
        while len(h) < 16:
            d = c.recv(16 - len(h))
            if not d: return
            h += d
        if h[:12] != SIG: c.sendall(b"no-proxy-v2-header\n"); return
        if h[12] != 0x21: c.sendall(b"not-v2-proxy-command\n"); return
        n = struct.unpack("!H", h[14:16])[0]
        body = b""
        while len(body) < n: body += c.recv(n - len(body))
        fam = h[13] >> 4
        if fam == 1: src = str(ipaddress.IPv4Address(body[0:4])); port = struct.unpack("!H", body[8:10])[0]
        else: src = str(ipaddress.IPv6Address(body[0:16])); port = struct.unpack("!H", body[32:34])[0]
        c.sendall(("src=%s\n" % src).encode())
        while True:
            d = c.recv(4096)
            if not d: break
            c.sendall(d)
    finally:
        c.close()
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
lab_bg n1 web python3 "$GW_TMP/web.py" "$N1V6" 8080 "$MARK"
lab_bg n1 ppv2 python3 "$GW_TMP/ppv2.py" "$N1V6" 7003
lab_nginx n1 nginx "
    server {
        listen [$N1V6]:8443 ssl proxy_protocol;
        server_name $SECURE;
        ssl_certificate $CA/nginx.pem;
        ssl_certificate_key $CA/nginx.key;
        location / { default_type text/plain; return 200 \"nginx-$MARK pp=\$proxy_protocol_addr\n\"; }
    }"
lab_bg n1 dnsmasq dnsmasq -k --port=5353 --listen-address="$N1V6" --bind-interfaces \
    --no-resolv --no-hosts --pid-file="$GW_TMP/dnsmasq.pid" --address="/svc.test/192.0.2.77"
must "web on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "nginx on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8443' | grep -q ."
must "dnsmasq on n1" wait_for 10 lab_sh n1 "ss -Hlun 'sport = :5353' | grep -q ."

# --- ACME: both certificates issued
must "ACME certificate for $BLOG on disk" wait_for 60 test -s "$STATE/certs/$BLOG/fullchain.pem"
must "ACME certificate for $WWW on disk" wait_for 60 test -s "$STATE/certs/$WWW/fullchain.pem"
lab_exec pub curl -sS --cacert "$CA/ca.pem" "https://$PUB4:15000/roots/0" >"$GW_TMP/pebble-root.pem"
check "pebble root fetched" grep -q "BEGIN CERTIFICATE" "$GW_TMP/pebble-root.pem"
pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }
body=$(pcurl --cacert "$GW_TMP/pebble-root.pem" --resolve "$BLOG:443:$HUB4" "https://$BLOG/" || true)
check "HTTPS by name with an ACME certificate, verified by curl against pebble's root" \
    grep -q "$MARK host=$BLOG" <<<"$body"
check "the backend sees the client in X-Forwarded-For" grep -q "xff=$PUB4" <<<"$body"
body=$(pcurl --cacert "$GW_TMP/pebble-root.pem" --resolve "$WWW:443:$HUB4" "https://$WWW/" || true)
check "HTTPS by fqdn with an ACME certificate" grep -q "$MARK host=$WWW" <<<"$body"
ver=$(pcurl --http2 -o /dev/null -w '%{http_version}' --cacert "$GW_TMP/pebble-root.pem" \
    --resolve "$BLOG:443:$HUB4" "https://$BLOG/" || true)
assert_eq "HTTP/2 on the ACME route" 2 "$ver"
body=$(pcurl --resolve "$WWW:80:$HUB4" "http://$WWW/plain" || true)
check "HTTP by fqdn" grep -q "$MARK host=$WWW" <<<"$body"

# --- passthrough: nginx holds the certificate and sees the PROXY header; v2 is
# checked by the strict backend
body=$(pcurl --cacert "$CA/ca.pem" --resolve "$SECURE:443:$HUB4" "https://$SECURE/" || true)
check "passthrough: curl verifies nginx's own certificate" grep -q "nginx-$MARK" <<<"$body"
check "passthrough: nginx sees the client address through the PROXY header" grep -q "pp=$PUB4" <<<"$body"
# A ClientHello for $PPV2 (made by python's ssl, sent on a plain socket): the
# backend's first line is src=<client> only after a PROXY v2 header.
cat >"$GW_TMP/hello.py" <<'EOF'
import socket, ssl, sys
out = ssl.MemoryBIO()
tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=sys.argv[2])
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection((sys.argv[1], 443), timeout=5)
s.sendall(out.read())
print(s.makefile("rb").readline().decode(errors="replace").strip())
EOF
out=$(lab_exec pub python3 "$GW_TMP/hello.py" "$HUB4" "$PPV2" || true)
assert_eq "passthrough: the backend gets a PROXY v2 header naming the client" "src=$PUB4" "$out"

# --- TCP forward with PROXY v2, UDP forward to dnsmasq
out=$(lab_sh pub "printf 'hi' | timeout 10 socat -t 2 - TCP4:$HUB4:2223" || true)
check "TCP forward: the backend sees the client address through PROXY v2" grep -q "src=$PUB4" <<<"$out"
check "TCP forward: bytes relayed" grep -q "hi" <<<"$out"
cat >"$GW_TMP/dnsq.py" <<'EOF'
import socket, struct, sys
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
for l in sys.argv[2].split("."): q += bytes([len(l)]) + l.encode()
q += b"\x00" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(q, (sys.argv[1], 53))
r, _ = s.recvfrom(4096)
print(".".join(str(b) for b in r[-4:]))
EOF
ans=$(lab_exec pub python3 "$GW_TMP/dnsq.py" "$HUB4" svc.test || true)
assert_eq "UDP forward: a DNS query answered by dnsmasq on n1" 192.0.2.77 "$ans"

# --- restart: the stored certificates are reused (no new order)
orders_before=$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)
lab_stop hub
GW_CONF=$conf gw_start_hub hub
must "proxy back" wait_for 15 lab_sh hub "ss -Hltn 'sport = :443' | grep -q ."
check "after a restart the ACME certificate is served again" wait_for 20 eval \
    "pcurl --cacert '$GW_TMP/pebble-root.pem' --resolve '$BLOG:443:$HUB4' 'https://$BLOG/' | grep -q '$MARK'"
orders_after=$(grep -c "POST /order-plz" "$(lab_logfile pebble)" || true)
assert_eq "no new ACME order after the restart" "$orders_before" "$orders_after"

check "hub still running" lab_alive hub
lab_finish

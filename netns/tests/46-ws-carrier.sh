#!/usr/bin/env bash
# A node whose network lets nothing out but an HTTP reverse proxy that
# terminates TLS (nginx on the NAT box, standing in for a TLS-inspecting
# corporate proxy or a CDN in front of the hub): the TLS carrier's own ALPN
# cannot pass it, WebSocket can. n1 has `websocket = "wss://<nginx>/..."`;
# nginx terminates TLS and passes the upgrade on to the hub's plain :80,
# where the hub answers the tunnel path on any host and relays the messages
# to its WireGuard port. n1 checks nginx's certificate against a test CA
# (`websocket_ca`), reaches the hub and carries traffic both ways; n2, given
# another CA, refuses the certificate and sends nothing (its URL's query, a
# token, never leaves it); requests on the path that are not the tunnel's are
# refused or routed as usual; after a hub restart n1 comes back by itself.
# timeout: 240
set -euo pipefail
export GW_TEST_NAME=46-ws-carrier
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl ss jq openssl socat sha256sum nginx
need_gatewire

HUB4=$(lab_wan4 hub)
EDGE=$(lab_lan4 nat)
WSPATH=/.well-known/gatewire/wg
URL="wss://$EDGE:8443$WSPATH"

lab_up 2 0

# --- n1 and n2 get nothing through the NAT: only nginx on the NAT box itself
lab_exec nat nft -f - <<EOF
table inet walled {
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "lan0" ip saddr { $(lab_lan4 n1), $(lab_lan4 n2) } counter drop
    }
}
EOF
# --- nginx's certificate, for its address, from a test CA; another CA for n2
CERT_DIR="$GW_TMP/certs"
mkdir -p "$CERT_DIR"
for ca in ca other-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=gatewire test $ca" -keyout "$CERT_DIR/$ca.key" -out "$CERT_DIR/$ca.pem" \
        >/dev/null 2>&1 || lab_die "openssl ($ca)"
done
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=edge" \
    -keyout "$CERT_DIR/edge.key" -out "$CERT_DIR/edge.csr" >/dev/null 2>&1
printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n' "$EDGE" >"$CERT_DIR/edge.ext"
openssl x509 -req -in "$CERT_DIR/edge.csr" -CA "$CERT_DIR/ca.pem" -CAkey "$CERT_DIR/ca.key" \
    -CAcreateserial -days 2 -extfile "$CERT_DIR/edge.ext" -out "$CERT_DIR/edge.pem" >/dev/null 2>&1 ||
    lab_die "openssl (edge certificate)"
lab_nginx nat edge "
    log_format up '\$request \$status';
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen $EDGE:8443 ssl;
        ssl_certificate $CERT_DIR/edge.pem;
        ssl_certificate_key $CERT_DIR/edge.key;
        access_log $GW_TMP/edge/access.log up;
        location / {
            proxy_pass http://$HUB4:80;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_read_timeout 600s;
        }
    }"
must "nginx listens on the NAT box" wait_for 10 lab_sh nat "ss -Hltn 'sport = :8443' | grep -q ."

conf=$(gw_hub_conf hub n1 n2)
cat >>"$conf" <<EOF

[proxy]
domains = ["gw.example.org"]
http_listen = ["0.0.0.0:80"]
EOF
GW_CONF=$conf gw_start_hub hub
n1conf=$(gw_node_conf n1 hub)
sed -i "s|^persistent_keepalive = .*|&\ntransport = \"tls\"\nwebsocket = \"$URL\"\nwebsocket_ca = \"$CERT_DIR/ca.pem\"|" "$n1conf"
GW_CONF=$n1conf gw_start_node n1 hub
TOKEN=n2-token-$RANDOM
n2conf=$(gw_node_conf n2 hub)
sed -i "s|^persistent_keepalive = .*|&\ntransport = \"tls\"\nwebsocket = \"$URL?t=$TOKEN\"\nwebsocket_ca = \"$CERT_DIR/other-ca.pem\"|" "$n2conf"
GW_CONF=$n2conf gw_start_node n2 hub
must "the hub listens on :80" wait_for 10 lab_sh hub "ss -Hltn 'sport = :80' | grep -q ."

path_json_of() { gw_show_json "$1" gwn0 | jq -c '.interfaces[0].hub_paths[0]'; }
path_json() { path_json_of n1; }

t0=$(now_ms)
check "n1 reaches the hub's overlay address through nginx over WebSocket" \
    wait_for 30 lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "n1 reached the hub after $(($(now_ms) - t0)) ms"
check "n1 cannot reach the hub's :80 itself" eval \
    "! lab_sh n1 \"timeout 3 bash -c ': </dev/tcp/$HUB4/80'\" 2>/dev/null"
check "the NAT dropped what n1 sent on its own" \
    lab_sh nat "nft list table inet walled | grep -Eq 'packets [1-9]'"
check "n1 shows the hub reached over the WebSocket carrier" eval \
    "path_json | jq -e --arg u '$URL' '.via == \"tls\" and .websocket == \$u and .tls.open == 1 and .tls.bytes_in > 0' >/dev/null"
check "and says so in plain gatewire show" eval \
    "lab_exec n1 '$GATEWIRE' show gwn0 | grep -q 'hub hub: over tls (transport tls); WebSocket to $URL'"
check "the hub counts the open carried tunnel" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.open == 1 and .interfaces[0].tls_tunnels.bytes_out > 0' >/dev/null"
check "the hub reaches n1 (v6 overlay) through it" lab_ping hub "$(lab_ov6 n1)"

# --- n2's CA did not sign nginx's certificate: no stream, no request
check "n2 refuses nginx's certificate" wait_for 10 grep -q \
    "cannot reach the hub over TLS.*certificate is refused: UnknownIssuer" "$(lab_logfile n2)"
check "n2 carries nothing" eval \
    "path_json_of n2 | jq -e '.tls.failed >= 1 and .tls.streams == 0 and .tls.bytes_out == 0' >/dev/null"
check "n2 does not reach the hub" lab_ping_fails n2 "$(lab_ov4 hub)"
check "n2's token is in none of its logs and shows" eval \
    "! grep -q -- '$TOKEN' '$(lab_logfile n2)' && ! gw_show_json n2 gwn0 | grep -q -- '$TOKEN'"
f=$(make_file ws.bin 8)
check "8 MiB from n1 to the hub arrive intact" tcp_transfer n1 hub "$(lab_ov4 hub)" "$f" 60
check "8 MiB from the hub to n1 arrive intact" tcp_transfer hub n1 "$(lab_ov4 n1)" "$f" 60 5202

# --- the tunnel path is the hub's only for WebSocket tunnel requests
code() { lab_exec pub curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$@" 2>/dev/null || true; }
check "a plain GET of the path is routed as any request (no route: 404)" \
    test "$(code "http://$HUB4$WSPATH")" = 404
failed0=$(gw_show_json hub gw0 | jq '.interfaces[0].tls_tunnels.failed')
check "a WebSocket request for another subprotocol gets 400" \
    test "$(code -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
        -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Protocol: chat' \
        "http://$HUB4$WSPATH")" = 400
check "one for another WebSocket version gets 426" \
    test "$(code -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 8' \
        -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Sec-WebSocket-Protocol: gatewire-wg' \
        "http://$HUB4$WSPATH")" = 426
check "both are counted as failed carried tunnels" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.failed == $failed0 + 2' >/dev/null"

# --- the hub restarts: the stream ends, n1 comes back by itself
lab_stop hub
gw_restart_hub hub
t0=$(now_ms)
check "n1 reaches the restarted hub again (over WebSocket)" wait_for 45 lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "n1 back $(($(now_ms) - t0)) ms after the hub's restart"
check "n1 opened a second stream" eval "path_json | jq -e '.tls.streams >= 2 and .tls.open == 1' >/dev/null"
# (nginx logs a request when it ends: the first tunnel's, at the restart)
check "nginx passed the first tunnel's upgrade (101 on the tunnel path)" \
    grep -q "GET $WSPATH HTTP/1.1 101" "$GW_TMP/edge/access.log"
check "and no request of n2's" eval "! grep -q -- '$TOKEN' '$GW_TMP/edge/access.log'"

lab_finish

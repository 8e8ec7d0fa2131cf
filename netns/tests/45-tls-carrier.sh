#!/usr/bin/env bash
# A network that lets no UDP out: the NAT in front of n1 and n2 drops every
# forwarded UDP packet. n1 (transport "auto", the default) gets no answer over
# UDP, falls back to WireGuard carried over TLS on the hub's :443 and serves
# a route through it; n2 (transport "udp") stays cut off. The same :443 still
# serves a terminated HTTPS route to web clients. n3's network lets nothing
# out but a web proxy (tinyproxy on the NAT box) that asks for a user and
# password: with `tls_proxy` and `tls_proxy_auth_file` its carrier goes
# through the proxy's CONNECT, authenticated. When the hub restarts, the
# streams end and n1 and n3 come back over TLS by themselves. When n1's
# stream breaks under it, n1 opens a new one at once (UDP was dead when it
# took TLS) instead of trying UDP for 10 s first. n1 tries UDP in
# the background every 5 s (`udp_retry = 5`) while the stream carries its
# tunnel. With UDP out but no answers back, those tries cost the tunnel
# little (a keepalive through the stream claims the hub back); when the NAT
# lets UDP through again, n1 leaves TLS for UDP by itself.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=45-tls-carrier
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss jq openssl socat sha256sum tinyproxy
need_gatewire

DOMAIN=gw.example.org
HOST=app.$DOMAIN
HUB4=$(lab_wan4 hub)
N1=$(lab_ov4 n1)

lab_up 3 0

# --- the NAT drops every UDP packet from the LAN (TCP still passes), and
# everything n3 sends: n3 has only the web proxy
lab_exec nat nft -f - <<EOF
table inet noudp {
    chain forward_udp {
        type filter hook forward priority filter; policy accept;
        iifname "lan0" meta l4proto udp counter drop
        iifname "lan0" ip saddr $(lab_lan4 n3) counter drop
    }
}
EOF
PROXY=$(lab_lan4 nat):8888
PROXY_PASSWORD=Pr0xy-$RANDOM-s3cret
cat >"$GW_TMP/conf/tinyproxy.conf" <<EOF
BasicAuth gw $PROXY_PASSWORD
Port 8888
Listen $(lab_lan4 nat)
Timeout 600
Allow 192.168.77.0/24
ConnectPort 443
LogLevel Info
LogFile "$GW_TMP/logs/tinyproxy-requests.log"
PidFile "$GW_TMP/tinyproxy.pid"
EOF
lab_bg nat tinyproxy tinyproxy -d -c "$GW_TMP/conf/tinyproxy.conf"
must "tinyproxy listens on the NAT box" wait_for 10 lab_sh nat "ss -Hltn 'sport = :8888' | grep -q ."

CERT_DIR="$GW_TMP/certs"
mkdir -p "$CERT_DIR"
lab_selfsigned "$HOST" "$CERT_DIR/fullchain.pem" "$CERT_DIR/key.pem"

conf=$(gw_hub_conf hub n1 n2 n3)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[[route]]
name = "app"
tls = "terminate"
cert = "$CERT_DIR/fullchain.pem"
key = "$CERT_DIR/key.pem"
backends = ["http://$N1:8080"]
EOF
GW_CONF=$conf gw_start_hub hub

n2conf=$(gw_node_conf n2 hub)
sed -i 's/^persistent_keepalive = .*/&\ntransport = "udp"/' "$n2conf"
n3conf=$(gw_node_conf n3 hub)
printf 'gw:%s\n' "$PROXY_PASSWORD" >"$GW_TMP/conf/n3-proxy.auth"
chmod 600 "$GW_TMP/conf/n3-proxy.auth"
sed -i "s|^persistent_keepalive = .*|&\ntransport = \"tls\"\ntls_proxy = \"http://$PROXY\"\ntls_proxy_auth_file = \"$GW_TMP/conf/n3-proxy.auth\"|" "$n3conf"
n1conf=$(gw_node_conf n1 hub)
sed -i 's/^persistent_keepalive = .*/&\nudp_retry = 5/' "$n1conf"
GW_CONF=$n1conf gw_start_node n1 hub
GW_CONF=$n2conf gw_start_node n2 hub
GW_CONF=$n3conf gw_start_node n3 hub

mkdir -p "$GW_TMP/www"
echo "served-by-n1" >"$GW_TMP/www/index.html"
lab_bg n1 web-n1 python3 -m http.server --bind "$N1" --directory "$GW_TMP/www" 8080
must "web server on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."

path_json() { gw_show_json "$1" gwn0 | jq -c '.interfaces[0].hub_paths[0]'; }

# --- n1: UDP gets nothing back, TLS does (10 s of UDP first, then the stream)
t0=$(now_ms)
must "n1 reaches the hub's overlay address through the TLS carrier" wait_for 40 lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "n1 reached the hub after $(($(now_ms) - t0)) ms (UDP blocked)"
check "the NAT dropped n1's UDP" lab_sh nat "nft list table inet noudp | grep -Eq 'packets [1-9]'"
check "n1 shows its hub reached over tls" eval "path_json n1 | jq -e '.via == \"tls\" and .transport == \"auto\" and .tls.open == 1 and .tls.bytes_in > 0' >/dev/null"
check "and says so in plain gatewire show" eval \
    "lab_exec n1 '$GATEWIRE' show gwn0 | grep -q 'hub hub: over tls (transport auto); TLS to $HUB4:443'"
check "the hub counts open carried tunnels" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.open >= 1 and .interfaces[0].tls_tunnels.bytes_out > 0' >/dev/null"
check "the hub reaches n1 (v6 overlay) through it" lab_ping hub "$(lab_ov6 n1)"

# --- n2: UDP only, so it stays cut off
check "n2 (transport udp) does not reach the hub" lab_ping_fails n2 "$(lab_ov4 hub)"
check "n2 shows udp and no stream" eval "path_json n2 | jq -e '.via == \"udp\" and .tls.streams == 0' >/dev/null"

# --- n3: only the web proxy gets out; the carrier goes through its CONNECT
check "n3 (tls through the web proxy) reaches the hub" wait_for 20 lab_ping1 n3 "$(lab_ov4 hub)"
check "n3 shows tls through the proxy" eval \
    "path_json n3 | jq -e --arg p '$PROXY' '.via == \"tls\" and .tls_proxy == \$p and .tls.open == 1' >/dev/null"
check "the proxy carried n3's CONNECT to the hub's :443" \
    grep -q "CONNECT.*$HUB4:443" "$GW_TMP/logs/tinyproxy-requests.log"
connect_code() {
    lab_exec n3 curl -sS -o /dev/null -w '%{http_connect}' --max-time 5 --proxytunnel \
        -x "$1" "https://$HUB4/" 2>/dev/null || true
}
check "the proxy asks for credentials (a CONNECT without them gets 407)" \
    test "$(connect_code "http://$PROXY")" = 407
# (tinyproxy answers wrong ones with 401)
check "and refuses wrong ones" eval "connect_code 'http://gw:wrong@$PROXY' | grep -Eqx '40[17]'"
check "and lets the right ones through" test "$(connect_code "http://gw:$PROXY_PASSWORD@$PROXY")" = 200
check "n3's log never shows the proxy's password" eval "! grep -q -- '$PROXY_PASSWORD' '$GW_TMP/logs/n3.log'"
check "nor its gatewire show" eval "! gw_show_json n3 gwn0 | grep -q -- '$PROXY_PASSWORD'"
check "the hub reaches n3 through it" lab_ping hub "$(lab_ov4 n3)"
check "the hub counts two open carried tunnels" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.open == 2' >/dev/null"

# --- the proxy refuses n3's credentials (its password changed): n3 waits
# before trying again instead of trying every 5 s (a directory behind the
# proxy may lock the account after a few failures)
lab_exec nat nft add table inet syns
lab_exec nat nft add chain inet syns input '{ type filter hook input priority 0; }'
lab_exec nat nft add rule inet syns input ip saddr "$(lab_lan4 n3)" tcp dport 8888 \
    tcp flags syn counter
lab_stop n3
printf 'gw:wrong-%s\n' "$RANDOM" >"$GW_TMP/conf/n3-proxy.auth"
GW_CONF=$n3conf gw_start_node n3 hub
check "n3 says the proxy refused its credentials" wait_for 15 \
    grep -q "the proxy refused the credentials; trying again later" "$(lab_logfile n3)"
sleep 16
syns=$(lab_exec nat nft list chain inet syns input | sed -n 's/.*packets \([0-9]*\).*/\1/p')
check "and does not try again within 16 s (${syns:-0} connections to the proxy)" \
    test "${syns:-0}" -eq 1
lab_exec nat nft delete table inet syns
lab_stop n3
printf 'gw:%s\n' "$PROXY_PASSWORD" >"$GW_TMP/conf/n3-proxy.auth"
GW_CONF=$n3conf gw_start_node n3 hub
must "n3 is back through the proxy with its right password" \
    wait_for 20 lab_ping1 n3 "$(lab_ov4 hub)"

# --- public traffic to n1's service crosses the carried tunnel; :443 still
# serves web clients beside the carriers
pcurl() { lab_exec pub curl -sS --max-time 10 "$@" 2>/dev/null; }
body=$(pcurl --cacert "$CERT_DIR/fullchain.pem" --resolve "$HOST:443:$HUB4" "https://$HOST/" || true)
check "HTTPS on the hub's :443 reaches n1's service through the TLS carrier" grep -q served-by-n1 <<<"$body"
body=$(pcurl --resolve "$HOST:80:$HUB4" "http://$HOST/" || true)
check "HTTP too" grep -q served-by-n1 <<<"$body"
f=$(make_file carrier.bin 16)
check "16 MiB from n1 to the hub through the carrier arrive intact" tcp_transfer n1 hub "$(lab_ov4 hub)" "$f" 60

# --- the hub restarts: the stream ends, n1 comes back over TLS by itself
lab_stop hub
gw_restart_hub hub
t0=$(now_ms)
check "n1 reaches the restarted hub again (over TLS)" wait_for 45 lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "n1 back $(($(now_ms) - t0)) ms after the hub's restart"
check "n1 opened a second stream" eval "path_json n1 | jq -e '.via == \"tls\" and .tls.streams >= 2' >/dev/null"
check "n3 is back through the proxy too" wait_for 20 lab_ping1 n3 "$(lab_ov4 hub)"
body=$(pcurl --cacert "$CERT_DIR/fullchain.pem" --resolve "$HOST:443:$HUB4" "https://$HOST/" || true)
check "the route serves again" grep -q served-by-n1 <<<"$body"
check "n1 stayed on TLS while UDP was blocked (its UDP tries went nowhere)" eval \
    "path_json n1 | jq -e '.via == \"tls\"' >/dev/null"

# --- n1's stream breaks (its socket killed, as when an intermediary drops
# it): a new one at once, not 10 s of UDP first
streams=$(path_json n1 | jq '.tls.streams')
udp_lines=$(grep -c "reaching the hub over UDP" "$(lab_logfile n1)" || true)
t0=$(now_ms)
lab_exec n1 ss -K -t dst "$HUB4" dport = :443 >/dev/null
check "n1 has a new stream within 5 s" wait_for 5 eval \
    "path_json n1 | jq -e '.via == \"tls\" and .tls.open == 1 and .tls.streams > $streams' >/dev/null"
check "and reaches the hub through it" wait_for 5 lab_ping1 n1 "$(lab_ov4 hub)"
lab_log "n1 back $(($(now_ms) - t0)) ms after its stream broke"
check "without going to UDP in between" test \
    "$(grep -c "reaching the hub over UDP" "$(lab_logfile n1)" || true)" = "$udp_lines"

# --- UDP gets out but nothing comes back: n1's tries reach the hub, whose
# answers are dropped; a keepalive through the stream moves the hub back
# after each try, so the tunnel keeps working
lab_exec nat nft flush chain inet noudp forward_udp
lab_exec nat nft add rule inet noudp forward_udp iifname "lan0" ip saddr "$(lab_lan4 n3)" counter drop
lab_exec nat nft add rule inet noudp forward_udp oifname "lan0" meta l4proto udp counter drop
recv=$(lab_exec hub ping -c 50 -i 0.2 -W 1 -q "$(lab_ov4 n1)" 2>/dev/null |
    sed -n 's/.* \([0-9]*\) received.*/\1/p')
lab_log "hub -> n1 with UDP one way: ${recv:-0}/50 pings answered"
check "hub -> n1 keeps working while n1's UDP tries go unanswered (${recv:-0}/50, at least 30)" \
    test "${recv:-0}" -ge 30
check "the NAT dropped the hub's UDP answers" \
    lab_sh nat "nft list chain inet noudp forward_udp | grep 'oifname' | grep -Eq 'packets [1-9]'"
check "n1 stays on TLS" eval "path_json n1 | jq -e '.via == \"tls\" and .tls.open == 1' >/dev/null"
check "the hub closed no stream for its peer moving between UDP and its stream" eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.superseded == 0' >/dev/null"

# --- the NAT lets UDP through again (n3 still gets nothing but the proxy):
# n1's next UDP try is answered and it leaves TLS
lab_exec nat nft flush chain inet noudp forward_udp
lab_exec nat nft add rule inet noudp forward_udp iifname "lan0" ip saddr "$(lab_lan4 n3)" counter drop
t0=$(now_ms)
check "n1 is back on UDP within seconds of UDP getting through" wait_for 20 eval \
    "path_json n1 | jq -e '.via == \"udp\" and .tls.open == 0' >/dev/null"
lab_log "n1 left TLS $(($(now_ms) - t0)) ms after UDP got through"
check "n1's log says why" grep -q "the hub answers over UDP again; leaving TLS" "$(lab_logfile n1)"
check "n1 reaches the hub over UDP" lab_ping1 n1 "$(lab_ov4 hub)"
check "the hub reaches n1 over UDP" lab_ping hub "$(lab_ov6 n1)"
check "the hub has one carried tunnel left (n3's)" wait_for 10 eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].tls_tunnels.open == 1' >/dev/null"
n1key=$(gw_show_json n1 gwn0 | jq -r '.interfaces[0].public_key')
check "the hub sends to n1's public UDP address (n1's peer entry)" eval \
    "gw_show_json hub gw0 | jq -e --arg k '$n1key' --arg ip '$(lab_wan4 nat)' '.interfaces[0].peers[] | select(.public_key == \$k) | .endpoint | startswith(\$ip + \":\")' >/dev/null"
body=$(pcurl --cacert "$CERT_DIR/fullchain.pem" --resolve "$HOST:443:$HUB4" "https://$HOST/" || true)
check "the route serves over UDP" grep -q served-by-n1 <<<"$body"
check "n3 still goes through the proxy" eval \
    "path_json n3 | jq -e '.via == \"tls\" and .tls.open == 1' >/dev/null"

lab_finish

#!/usr/bin/env bash
# Acceptance 6: editing the hub's config adds a route while a large download over
# another route runs to the end unharmed. n1 serves a 64 MiB file (python3
# http.server on its IPv6 overlay address); curl in `pub` downloads it through
# the hub at a limited rate (about 8 s). Meanwhile the test appends a second
# route and a TCP forward to the hub's config file: the hub picks the change up
# by itself (file watch), the new route answers within seconds, and the download
# completes with the right checksum. A config edit that breaks the file is
# refused and the running routes keep working; SIGHUP reloads too. Counters and
# route health are in `gatewire show --json` under `proxy`. A reload that
# fails in the proxy stage (a certificate file missing) applies nothing of
# the file, its new [[peer]] neither.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=71-proxy-reload
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss sha256sum jq socat
need_gatewire

DOMAIN=gw.example.org
HUB4=$(lab_wan4 hub)
N1V6=$(lab_ov6 n1)

lab_up 1 0

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[[route]]
name = "files"
backends = ["http://[$N1V6]:8080"]
EOF

# The service manager's readiness protocol (Type=notify).
notes="$GW_TMP/notify.log"
lab_notify hub
NOTIFY_SOCKET="$GW_TMP/notify.sock" GW_CONF=$conf gw_start_hub hub
check "the hub tells the service manager it is ready" wait_for 10 grep -qx 'READY=1' "$notes"
gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"

# --- backends on n1: a file server and a second small site
www="$GW_TMP/www"
mkdir -p "$www/files" "$www/news"
big=$(make_file big.bin 64)
cp "$big" "$www/files/big.bin"
echo "news-$$" >"$www/news/index.html"
cat >"$GW_TMP/serve.py" <<'EOF'
import functools, socket, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6

h = functools.partial(SimpleHTTPRequestHandler, directory=sys.argv[3])
S((sys.argv[1], int(sys.argv[2])), h).serve_forever()
EOF
lab_bg n1 files python3 "$GW_TMP/serve.py" "$N1V6" 8080 "$www/files"
lab_bg n1 news python3 "$GW_TMP/serve.py" "$N1V6" 8081 "$www/news"
lab_bg n1 echo socat "TCP6-LISTEN:7001,bind=[$N1V6],fork,reuseaddr" PIPE
must "file server listening on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "news server listening on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8081' | grep -q ."
must "hub proxy listening on :80" wait_for 10 lab_sh hub "ss -Hltn 'sport = :80' | grep -q ."

pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }
news() { pcurl --resolve "news.$DOMAIN:80:$HUB4" "http://news.$DOMAIN/" 2>/dev/null; }

code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "news.$DOMAIN:80:$HUB4" "http://news.$DOMAIN/" || true)
assert_eq "news is not routed yet (404)" 404 "$code"

# --- the long download: 64 MiB at 8 MiB/s
out="$GW_TMP/data/big.out"
lab_bg pub download curl -sS --max-time 120 --limit-rate 8M -o "$out" \
    -w '%{http_code} %{size_download}\n' \
    --resolve "files.$DOMAIN:80:$HUB4" "http://files.$DOMAIN/big.bin"
must "download under way" wait_for 10 test -s "$out"
sleep 1

# --- edit the config: a new route and a new TCP forward
cp "$conf" "$GW_TMP/conf/base.toml"
t0=$(now_ms)
cat >>"$conf" <<EOF

[[route]]
name = "news"
backends = ["http://[$N1V6]:8081"]

[[tcp]]
listen = "0.0.0.0:7001"
backends = ["[$N1V6]:7001"]
EOF
check "the new route answers within 5 s of the edit" wait_for 5 eval 'news | grep -q "news-$$"'
lab_log "new route live $(($(now_ms) - t0)) ms after the edit"
tcp_out=$(lab_sh pub "printf 'tcp-$$' | timeout 10 socat -t 2 - TCP4:$HUB4:7001" || true)
assert_eq "the new TCP forward works" "tcp-$$" "$tcp_out"
check "the download is still running after the reload" lab_alive download

# --- a broken edit is refused; everything keeps working
cp "$conf" "$GW_TMP/conf/good.toml"
echo 'this is = not [valid' >>"$conf"
sleep 2
check "hub logs the refused reload" grep -q "config reload failed" "$(lab_logfile hub)"
check "routes still served after a broken edit" eval 'news | grep -q "news-$$"'
cp "$GW_TMP/conf/good.toml" "$conf"

# --- the download ends intact
must "download finished" wait_for 60 not lab_alive download
res=$(tail -n 1 "$(lab_logfile download)")
assert_eq "download: HTTP 200, every byte" "200 $((64 * 1024 * 1024))" "$res"
h1=$(sha256sum <"$big" | cut -d' ' -f1)
h2=$(sha256sum <"$out" | cut -d' ' -f1)
assert_eq "download checksum intact" "$h1" "$h2"

# --- SIGHUP reloads at once: back to the base config (news removed)
cp "$GW_TMP/conf/base.toml" "$conf"
kill -HUP "$(lab_pid hub)"
check "news is gone after the reload (404)" wait_for 5 eval \
    "[ \"\$(pcurl -o /dev/null -w '%{http_code}' --resolve news.$DOMAIN:80:$HUB4 http://news.$DOMAIN/)\" = 404 ]"
check "hub logged the SIGHUP reload" grep -q "SIGHUP; reloading" "$(lab_logfile hub)"
check "hub still alive after SIGHUP" lab_alive hub

# --- counters in gatewire show --json
js=$(gw_show_json hub gw0 || true)
check "show --json has the files route with the download's bytes" \
    jq -e '.interfaces[0].proxy.routes[] | select(.route == "name:files") | .bytes_out >= 67108864' <<<"$js" >/dev/null
check "show --json reports backend health" \
    jq -e '.interfaces[0].proxy.routes[] | select(.route == "name:files") | .backends[0].up == true' <<<"$js" >/dev/null

# --- [[peer]] changes apply on reload (n1's key swapped for another, a peer
# with an off-link prefix added, routed, and taken away again with its route);
# what needs a restart (listen_port) is named in a warning and kept as it runs
cp "$conf" "$GW_TMP/conf/peers.toml"
other=$(wg genkey | wg pubkey)
sed -i -e "s|$(lab_pub n1)|$other|" -e "s|^listen_port = .*|listen_port = 51999|" "$conf"
cat >>"$conf" <<EOF

[[peer]]
name = "lan"
public_key = "$(wg genkey | wg pubkey)"
allowed_ips = ["10.250.7.0/24"]
EOF
lan_route() { [ -n "$(lab_sh hub "ip route show exact 10.250.7.0/24 dev gw0")" ]; }
kill -HUP "$(lab_pid hub)"
check "hub logs the [[peer]] change" wait_for 5 grep -q 'peer\]\] changes applied' "$(lab_logfile hub)"
check "hub names listen_port as needing a restart" \
    grep -q 'listen_port.*take effect when the hub restarts\|take effect when the hub restarts.*listen_port' "$(lab_logfile hub)"
peer_on() { gw_show_json hub gw0 | jq -e --arg k "$1" '.interfaces[0].peers[] | select(.public_key == $k)' >/dev/null; }
check "n1's peer is gone from the device" not peer_on "$(lab_pub n1)"
check "the added peer's off-link prefix is routed into the tunnel" wait_for 5 lan_route
check "the new peer is on the device" peer_on "$other"
check "the hub keeps its running port" lab_sh hub "ss -Hlun 'sport = :$GW_HUB_PORT' | grep -q ."
check "n1 no longer reaches the hub" wait_for 10 not lab_ping1 n1 "$(lab_ov6 hub)"
cp "$GW_TMP/conf/peers.toml" "$conf"
kill -HUP "$(lab_pid hub)"
check "n1 reaches the hub again once its peer is back" wait_for 20 lab_ping1 n1 "$(lab_ov6 hub)"
check "the swapped-in peer is gone again" not peer_on "$other"
check "the removed peer's route is gone with it" wait_for 5 not lan_route
check "a reload is announced to the service manager, then ready again" \
    eval "grep -A1 '^RELOADING=1 MONOTONIC_USEC=[0-9]*\$' '$notes' | grep -qx 'READY=1 STATUS='"

# --- a reload that fails in the proxy stage applies nothing: one edit adds a
# [[peer]] and a route whose certificate file is missing (the file loads; the
# certificate is read when the proxy is built). Neither is taken, the log and
# the service manager say so, and `gatewire show --json` counts it. With the
# file mended (the broken route left out), the peer comes.
cp "$conf" "$GW_TMP/conf/mended.toml"
late=$(wg genkey | wg pubkey)
late_peer() {
    cat <<EOF

[[peer]]
name = "late"
public_key = "$late"
allowed_ips = ["100.64.9.9/32"]
EOF
}
late_peer >>"$conf"
cat >>"$conf" <<EOF

[[route]]
name = "broken"
backends = ["http://[$N1V6]:8081"]
cert = "$GW_TMP/missing/broken.pem"
key = "$GW_TMP/missing/broken.key"
EOF
kill -HUP "$(lab_pid hub)"
check "the hub logs that the reload applied nothing, naming the route" wait_for 5 \
    grep -q 'config reload failed; nothing applied.*name:broken' "$(lab_logfile hub)"
check "the new peer is not on the device" not peer_on "$late"
check "the service manager is told the reload failed" wait_for 5 \
    grep -q '^READY=1 STATUS=reload failed: .*name:broken' "$notes"
check "the proxy runs its routes as before, without the broken one" eval \
    "gw_show_json hub gw0 | jq -e '[.interfaces[0].proxy.routes[].route] | index(\"name:files\") != null and index(\"name:broken\") == null' >/dev/null"
check "the running route still serves" eval \
    "[ \"\$(pcurl -o /dev/null -w '%{http_code}' --resolve files.$DOMAIN:80:$HUB4 http://files.$DOMAIN/)\" = 200 ]"
js=$(gw_show_json hub gw0 || true)
check "show --json: the last reload failed, naming the route" \
    jq -e '.interfaces[0].config_reload | .last.ok == false and (.last.error | test("name:broken")) and .failures >= 1' <<<"$js" >/dev/null
cp "$GW_TMP/conf/mended.toml" "$conf"
late_peer >>"$conf"
kill -HUP "$(lab_pid hub)"
check "with the file mended the new peer comes" wait_for 5 peer_on "$late"
js=$(gw_show_json hub gw0 || true)
check "show --json: the last reload worked" \
    jq -e '.interfaces[0].config_reload.last | .ok == true and .error == null' <<<"$js" >/dev/null
check "the service manager is told it is ready again" wait_for 5 eval \
    "tail -n 1 '$notes' | grep -qx 'READY=1 STATUS='"

check "hub still running" lab_alive hub
lab_stop hub
check "the hub tells the service manager it stops" grep -qx 'STOPPING=1' "$notes"
lab_finish

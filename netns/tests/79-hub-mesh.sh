#!/usr/bin/env bash
# Two hubs meshed through etcd: any hub serves any name. Hub A (namespace hub,
# mesh name hub-a) has hidden node n1 behind the NAT and the route `alpha`;
# hub B (hub2, hub-b) has hidden node n2 and the routes `beta` (HTTP, and HTTPS
# terminated at hub B with a certificate only hub B holds). etcd (Debian's
# etcd-server) runs on hub A's wan address. From the public namespace, curl
# reaches beta through hub A and alpha through hub B, over plain HTTP, over
# HTTPS (curl verifies hub B's certificate through hub A: TLS goes end to
# end) and over IPv6; the backend sees the real client address in
# X-Forwarded-For. A PROXY header from a client is not believed; behind a
# balancer (pub's IPv6 address is hub B's proxy_protocol_from), hub A's
# connection carries the balancer's header and then hub A's. A route added
# to hub B's config is served through hub A within seconds. Records written
# by etcdctl: one with a loopback address is counted and left out, one that
# claims hub A's own host does not take it from hub A, and hub B writes its
# own again when it is deleted. Hub B stopping
# withdraws its names from hub A at once; killed, they go after the lease
# (ttl 3 s) and meanwhile hub A answers 502 quickly; restarted, they come
# back. With etcd down, hub A keeps serving beta from its last table, and
# reconnects when etcd is back. Unknown names still get 404 and a TLS alert.
# A hub that will not serve a connection another hub sent says so before
# anything reaches the client: gamma, paused at hub B, gets 502 through hub
# A (hub B refused it; both count it); a stale record lists beta at hub A's
# own listeners, and through hub A beta still reaches hub B over HTTP and
# HTTPS once that stale hub (hub A itself) has refused it.
# Then both hubs restart with a shared secret (`secret_file`): their PROXY
# headers are sealed; a sealed header made with the secret for hub A is taken
# from any address, one made with another secret, for another hub or as
# older hubs sealed (version 1) is refused; cut off from
# etcd (nftables in hub2), hub B's record goes from hub A's table, and hub A
# still takes hub B's sealed connections for alpha.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=79-hub-mesh
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl socat python3 openssl ss jq etcd etcdctl
need_gatewire

DOMAIN=gw.test
HUB4=$(lab_wan4 hub)
HUB6=$(lab_wan6 hub)
HUB2_4=$(lab_wan4 hub2)
HUB2_6=$(lab_wan6 hub2)
PUB4=$(lab_wan4 pub)
PUB6=$(lab_wan6 pub)
MARK1="from-n1-$$"
MARK2="from-n2-$$"

lab_up 2 0
lab_add_hub2

# --- etcd on hub A's wan address
ETCD=$(lab_etcd_url hub)
start_etcd() { lab_etcd hub; }
start_etcd
must "etcd listening on hub A's wan address" \
    wait_for 20 lab_sh hub "ss -Hltn 'sport = :2379' | grep -q ."

# --- hub B's certificate for beta (hub A has none)
CERT_DIR="$GW_TMP/certs"
mkdir -p "$CERT_DIR"
lab_selfsigned "beta.$DOMAIN" "$CERT_DIR/beta.pem" "$CERT_DIR/beta.key"

# mesh_hub NS NAME V4 V6 NODE ROUTES : the hub config with the proxy and [mesh]
mesh_hub() {
    local ns=$1 name=$2 v4=$3 v6=$4 node=$5 routes=$6 conf
    conf=$(gw_hub_conf "$ns" "$node")
    cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80", "[::]:80"]
https_listen = ["0.0.0.0:443", "[::]:443"]
access_log = "$GW_TMP/access-$ns.log"
$routes

[mesh]
name = "$name"
etcd = ["$ETCD"]
advertise = ["$v4", "$v6"]
ttl = 3
EOF
    echo "$conf"
}

confA=$(mesh_hub hub hub-a "$HUB4" "$HUB6" n1 "
[[route]]
name = \"alpha\"
backends = [\"http://[$(lab_ov6 n1)]:8080\"]")
# hub A also runs the control plane, for /metrics
SOCK_A="$GW_TMP/hub-a.ctl.sock"
cat >>"$confA" <<EOF

[control]
state_dir = "$GW_TMP/state-a"
socket = "$SOCK_A"
EOF
confB=$(mesh_hub hub2 hub-b "$HUB2_4" "$HUB2_6" n2 "
[[route]]
name = \"beta\"
tls = \"terminate\"
cert = \"$CERT_DIR/beta.pem\"
key = \"$CERT_DIR/beta.key\"
backends = [\"http://[$(lab_ov6 n2)]:8080\"]")

# pub's IPv6 address stands for a balancer in front of hub B
sed -i "s|^\[proxy\]\$|[proxy]\nproxy_protocol_from = [\"$PUB6\"]|" "$confB"
GW_CONF=$confA gw_start_hub hub
GW_CONF=$confB gw_start_hub hub2
gw_start_node n1 hub
gw_start_node n2 hub2
must "n1 reaches hub A" wait_for 15 lab_ping1 n1 "$(lab_ov6 hub)"
must "n2 reaches hub B" wait_for 15 lab_ping1 n2 "$(lab_ov6 hub2)"

# --- backends on the nodes' IPv6 overlay addresses: echo the forwarding headers
lab_bg n1 web1 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n1)" 8080 "$MARK1"
lab_bg n2 web2 python3 "$GW_LIB_DIR/tools/echo-headers.py" "$(lab_ov6 n2)" 8080 "$MARK2"
must "backend on n1" wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q ."
must "backend on n2" wait_for 10 lab_sh n2 "ss -Hltn 'sport = :8080' | grep -q ."

mesh_json() { gw_show_json "$1" gw0 | jq -c '.interfaces[0].mesh'; }
# etcd_is NS BOOL : NS's mesh reports etcd_connected BOOL
etcd_is() { [ "$(mesh_json "$1" | jq -r .etcd_connected)" = "$2" ]; }
# knows NS HUB N : NS's mesh table lists hub HUB with N hosts
knows() { [ "$(mesh_json "$1" | jq -r --arg h "$2" '.hubs[] | select(.name == $h) | .hosts')" = "$3" ]; }
forgot() { mesh_json "$1" | jq -e --arg h "$2" '[.hubs[] | select(.name == $h)] | length == 0' >/dev/null; }
must "hub A learns hub B's one host" wait_for 15 knows hub hub-b 1
must "hub B learns hub A's one host" wait_for 15 knows hub2 hub-a 1
js=$(mesh_json hub)
assert_eq "hub A is connected to etcd" true "$(jq -r .etcd_connected <<<"$js")"
assert_eq "hub A publishes its one host" 1 "$(jq -r .published_hosts <<<"$js")"
assert_eq "hub A sends hub B's TLS connections to its advertised addresses" \
    "[\"$HUB2_4:443\",\"[$HUB2_6]:443\"]" "$(jq -c '.hubs[0].https' <<<"$js")"

pcurl() { lab_exec pub curl -sS --max-time 10 "$@"; }
BETA="beta.$DOMAIN"
ALPHA="alpha.$DOMAIN"

# --- any hub serves any name
body=$(pcurl --resolve "$BETA:80:$HUB4" "http://$BETA/via-a" || true)
check "HTTP: beta (hub B's route) through hub A reaches n2" grep -q "$MARK2 path=/via-a" <<<"$body"
check "HTTP: n2 sees the real client address through both hubs" grep -q "xff=$PUB4 " <<<"$body"
body=$(pcurl --resolve "$ALPHA:80:$HUB2_4" "http://$ALPHA/via-b" || true)
check "HTTP: alpha (hub A's route) through hub B reaches n1" grep -q "$MARK1 path=/via-b xff=$PUB4 " <<<"$body"
body=$(pcurl --cacert "$CERT_DIR/beta.pem" --resolve "$BETA:443:$HUB4" "https://$BETA/tls" || true)
check "HTTPS: hub B's certificate, verified by curl, through hub A" grep -q "$MARK2 path=/tls xff=$PUB4 xfp=https" <<<"$body"
ver=$(pcurl --http2 -o /dev/null -w '%{http_version}' --cacert "$CERT_DIR/beta.pem" \
    --resolve "$BETA:443:$HUB4" "https://$BETA/h2" || true)
assert_eq "HTTPS through hub A: HTTP/2 negotiated end to end with hub B" 2 "$ver"
body=$(pcurl --resolve "$BETA:80:[$HUB6]" "http://$BETA/v6" || true)
check "HTTP over IPv6 through hub A, the IPv6 client address arrives" grep -q "$MARK2 path=/v6 xff=$PUB6 " <<<"$body"
body=$(pcurl --resolve "$ALPHA:80:$HUB4" "http://$ALPHA/local" || true)
check "hub A still serves its own route itself" grep -q "$MARK1 path=/local xff=$PUB4 " <<<"$body"

code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "nope.$DOMAIN:80:$HUB4" "http://nope.$DOMAIN/" || true)
assert_eq "a name no hub serves: 404" 404 "$code"
err=$(lab_exec pub curl -sS --max-time 10 -k --resolve "nope.$DOMAIN:443:$HUB4" "https://nope.$DOMAIN/" 2>&1 >/dev/null || true)
check "a name no hub serves: TLS alert" grep -qi "unrecognized name\|alert" <<<"$err"

# --- a client cannot claim another address with a PROXY header
spoof() {
    lab_sh pub "printf 'PROXY TCP4 198.51.100.99 $1 5555 80\r\nGET /spoof HTTP/1.1\r\nHost: $BETA\r\nConnection: close\r\n\r\n' | timeout 10 socat -t 3 - TCP4:$1:80" 2>/dev/null || true
}
out=$(spoof "$HUB2_4")
check "a client's PROXY header at hub B is refused (400)" grep -q "^HTTP/1.1 400" <<<"$out"
out=$(spoof "$HUB4")
check "a client's PROXY header at hub A is refused (400)" grep -q "^HTTP/1.1 400" <<<"$out"
check "no backend ever saw the claimed address" not grep -q "198.51.100.99" "$(lab_logfile web2)"

# --- a balancer in front of hub B (pub over IPv6, proxy_protocol_from)
via_lb() {
    # (stdin stays open until the answer is in: the HTTP server closes on a
    # half-closed connection)
    lab_sh pub "(printf '$1GET /$2 HTTP/1.1\r\nHost: $BETA\r\nConnection: close\r\n\r\n'; sleep 2) | timeout 10 socat -t 3 - TCP6:[$HUB2_6]:80" 2>/dev/null || true
}
out=$(via_lb "PROXY TCP4 203.0.113.77 $HUB2_4 5555 80\r\n" lb-client)
check "through a balancer, a client's connection: one header, the client it names" \
    grep -q "$MARK2 path=/lb-client xff=203.0.113.77 " <<<"$out"
out=$(via_lb "PROXY TCP4 $HUB4 $HUB2_4 40000 80\r\nPROXY TCP4 203.0.113.78 $HUB2_4 5556 80\r\n" lb-hub)
check "through a balancer, hub A's connection: the balancer's header, then hub A's" \
    grep -q "$MARK2 path=/lb-hub xff=203.0.113.78 " <<<"$out"

js=$(gw_show_json hub gw0)
check "hub A counts connections sent to other hubs" \
    test "$(jq -r '.interfaces[0].mesh.forwarded' <<<"$js")" -ge 4
check "hub A's proxy stats have a mesh entry with bytes both ways" \
    jq -e '.interfaces[0].proxy.routes[] | select(.route == "mesh") | .bytes_in > 0 and .bytes_out > 0' <<<"$js"
check "hub B counts connections other hubs sent" \
    test "$(mesh_json hub2 | jq -r .received)" -ge 4
# access_line FILE FILTER : the first line of the access log FILE that jq's FILTER selects
access_line() { jq -c "select($2)" "$1" 2>/dev/null | head -n 1; }
line=$(access_line "$GW_TMP/access-hub.log" '.kind == "mesh" and .host == "beta.gw.test" and .tls == false')
check "hub A logs the connection it sent on: its client, host, hub and bytes" \
    jq -e --arg c "$PUB4" --arg b "$HUB2_4:80" \
    '(.client | startswith($c + ":")) and .route == "mesh:hub-b" and .backend == $b and .bytes_in > 0 and .bytes_out > 0' <<<"$line"
line=$(access_line "$GW_TMP/access-hub.log" '.kind == "mesh" and .tls == true')
check "... and the TLS ones (tls true, to hub B's :443)" \
    jq -e --arg b "$HUB2_4:443" '.route == "mesh:hub-b" and .backend == $b' <<<"$line"
line=$(access_line "$GW_TMP/access-hub2.log" '.kind == "http" and .path == "/via-a"')
check "hub B logs the request with the real client" \
    jq -e --arg c "$PUB4" '(.client | startswith($c + ":")) and .route == "name:beta" and .status == 200' <<<"$line"
metrics=$(curl -sS --max-time 5 --unix-socket "$SOCK_A" http://gw/metrics || true)
check "/metrics: hub A's etcd session is up" grep -qx "gatewire_mesh_etcd_connected 1" <<<"$metrics"
check "/metrics: one other hub" grep -qx "gatewire_mesh_hubs 1" <<<"$metrics"
check "/metrics: the connections sent to hub B" grep -qE "^gatewire_mesh_forwarded_total ([4-9]|[1-9][0-9]+)$" <<<"$metrics"
check "/metrics: the mesh's bytes as a route" grep -qE '^gatewire_route_out_bytes_total\{route="mesh"\} [1-9]' <<<"$metrics"

# --- a route added to hub B's config is served through hub A
cat >>"$confB" <<EOF

[[route]]
name = "delta"
backends = ["http://[$(lab_ov6 n2)]:8080"]
EOF
must "hub A learns hub B's new host" wait_for 15 knows hub hub-b 2
body=$(pcurl --resolve "delta.$DOMAIN:80:$HUB4" "http://delta.$DOMAIN/new" || true)
check "the new route is served through hub A" grep -q "$MARK2 path=/new" <<<"$body"

# --- what others write into etcd
ectl() { lab_exec hub etcdctl --endpoints "$ETCD" "$@"; }
bad() { [ "$(mesh_json "$1" | jq -r .bad_records)" -ge "$2" ]; }
ectl put /gatewire/mesh/hubs/evil '{"v":1,"name":"evil","http":["127.0.0.1:80"],"hosts":["alpha.gw.test"]}' >/dev/null
check "a record with a loopback address is not used, and counted (hub A)" wait_for 5 bad hub 1
check "... and at hub B" wait_for 5 bad hub2 1
check "... and the hub it names is in no table" forgot hub2 evil
# (the NAT box's wan address: in the lab, nothing listens on its port 80)
ectl put /gatewire/mesh/hubs/thief "{\"v\":1,\"name\":\"thief\",\"http\":[\"$(lab_wan4 nat):80\"],\"hosts\":[\"$ALPHA\"]}" >/dev/null
must "a record that claims alpha too is taken" wait_for 5 knows hub thief 1
body=$(pcurl --resolve "$ALPHA:80:$HUB4" "http://$ALPHA/own" || true)
check "hub A still serves its own alpha itself (own routes win)" grep -q "$MARK1 path=/own xff=$PUB4 " <<<"$body"
ectl del /gatewire/mesh/hubs/thief >/dev/null
ectl del /gatewire/mesh/hubs/evil >/dev/null
ectl del /gatewire/mesh/hubs/hub-b >/dev/null
check "hub B writes its deleted record again" wait_for 5 knows hub hub-b 2

# --- a hub that will not serve a connection says so, and the next hub is tried
cp "$confB" "$GW_TMP/confB.before"
cat >>"$confB" <<EOF

[[route]]
name = "gamma"
paused = true
backends = ["http://[$(lab_ov6 n2)]:8080"]
EOF
must "hub A learns hub B's paused route" wait_for 15 knows hub hub-b 3
GAMMA="gamma.$DOMAIN"
counter() { mesh_json "$1" | jq -r ".$2"; }
refused0=$(counter hub refused)
declined0=$(counter hub2 declined)
# gamma_via_a : gamma through hub A's HTTP status (hub B refuses it, and is
# then tried after the others for 5 s)
gamma_via_a() { pcurl -o /dev/null -w '%{http_code}' --resolve "$GAMMA:80:$HUB4" "http://$GAMMA/" || true; }
assert_eq "gamma, paused at hub B, the one hub that has it: hub B refuses, hub A answers 502" 502 "$(gamma_via_a)"
check "hub A counts hub B's refusal" test "$(counter hub refused)" -gt "$refused0"
check "hub B counts the connection it refused" test "$(counter hub2 declined)" -gt "$declined0"
# A stale record: it lists beta at hub A's own listeners, where there is no
# route for beta, for a hub that answers whether it takes a connection.
ectl put /gatewire/mesh/hubs/ghost "{\"v\":1,\"name\":\"ghost\",\"http\":[\"$HUB4:80\"],\"https\":[\"$HUB4:443\"],\"hosts\":[\"$BETA\"],\"ack\":1}" >/dev/null
must "hub A takes the stale record" wait_for 5 knows hub ghost 1
refused1=$(counter hub refused)
declined1=$(counter hub declined)
# Hub B has just refused gamma: for 5 s hub A tries it last, the stale hub first.
assert_eq "gamma again (hub B now tried last)" 502 "$(gamma_via_a)"
body=$(pcurl --resolve "$BETA:80:$HUB4" "http://$BETA/past-ghost" || true)
check "HTTP: beta through hub A, the stale hub refusing first, reaches n2 through hub B" \
    grep -q "$MARK2 path=/past-ghost xff=$PUB4 " <<<"$body"
check "hub A counts both refusals (gamma at hub B, beta at the stale hub)" \
    test "$(counter hub refused)" -ge $((refused1 + 2))
check "hub A, as the stale hub, counts the connection it refused" \
    test "$(counter hub declined)" -gt "$declined1"
sleep 5.5 # (hub A tries the stale hub, which refused, last for 5 s)
assert_eq "gamma once more" 502 "$(gamma_via_a)"
body=$(pcurl --cacert "$CERT_DIR/beta.pem" --resolve "$BETA:443:$HUB4" "https://$BETA/tls-past-ghost" || true)
check "HTTPS: beta through hub A past the stale hub, hub B's certificate end to end" \
    grep -q "$MARK2 path=/tls-past-ghost xff=$PUB4 xfp=https" <<<"$body"
check "hub A counts that refusal too" test "$(counter hub refused)" -ge $((refused1 + 4))
check "hub A logs gamma's 502s with hub B's refusal as their cause" \
    jq -e -s 'map(select(.kind == "mesh" and .host == "gamma.gw.test" and .status == 502 and .error == "backend_refused")) | length == 3' \
    "$GW_TMP/access-hub.log"
ectl del /gatewire/mesh/hubs/ghost >/dev/null
cp "$GW_TMP/confB.before" "$confB"
must "the stale record gone from hub A's table" wait_for 5 forgot hub ghost
must "gamma gone from hub B" wait_for 15 knows hub hub-b 2

# --- hub B stops: its names leave hub A at once
lab_stop hub2
check "hub B stopping withdraws its record at once" wait_for 3 forgot hub hub-b
code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "$BETA:80:$HUB4" "http://$BETA/" || true)
assert_eq "beta through hub A while hub B is down: 404" 404 "$code"
GW_CONF=$confB gw_start_hub hub2
must "hub B back in hub A's table" wait_for 20 knows hub hub-b 2
# beta_via_a PATH : beta answers through hub A (n2 first has to find the
# restarted hub B's tunnel: up to its dead_after)
beta_via_a() { pcurl --resolve "$BETA:80:$HUB4" "http://$BETA/$1" 2>/dev/null | grep -q "$MARK2 path=/$1"; }
check "beta through hub A again after hub B's restart" wait_for 20 beta_via_a back

# --- hub B killed: hub A answers 502 at once until the lease runs out
lab_stop hub2 KILL
t0=$(now_ms)
code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "$BETA:80:$HUB4" "http://$BETA/" || true)
t1=$(now_ms)
check "beta through hub A with hub B killed: 502 or, once the lease ran out, 404 (got $code)" \
    grep -qx "502\|404" <<<"$code"
check "and within 4 s (took $((t1 - t0)) ms)" test $((t1 - t0)) -lt 4000
if [ "$code" = 502 ]; then
    sleep 0.5 # (the access log is written by a task of its own)
    check "the 502 is in hub A's access log with its cause" \
        jq -e -s 'map(select(.kind == "mesh" and .host == "beta.gw.test" and .status == 502 and .error == "backend_refused")) | length == 1' \
        "$GW_TMP/access-hub.log"
fi
check "hub B's record goes when its lease runs out (ttl 3 s)" wait_for 10 forgot hub hub-b
GW_CONF=$confB gw_start_hub hub2
must "hub B back after the kill" wait_for 20 knows hub hub-b 2
check "beta through hub A again after the kill" wait_for 20 beta_via_a again

# --- etcd down: the last table keeps serving
lab_stop etcd
check "hub A reports etcd as disconnected" \
    wait_for 20 etcd_is hub false
body=$(pcurl --resolve "$BETA:80:$HUB4" "http://$BETA/no-etcd" || true)
check "beta through hub A while etcd is down (last table kept)" grep -q "$MARK2 path=/no-etcd" <<<"$body"
start_etcd
check "hub A reconnects to etcd" \
    wait_for 30 etcd_is hub true
check "hub A still knows hub B after etcd's restart" wait_for 15 knows hub hub-b 2
body=$(pcurl --resolve "$ALPHA:80:$HUB2_4" "http://$ALPHA/after" || true)
check "alpha through hub B after etcd's restart" grep -q "$MARK1 path=/after" <<<"$body"

check "hub A ran throughout" lab_alive hub

# --- a shared secret: sealed headers
head -c 48 /dev/urandom | base64 -w0 >"$GW_TMP/mesh.key"
sed -i "s|^ttl = 3\$|&\nsecret_file = \"$GW_TMP/mesh.key\"|" "$confA" "$confB"
check "both configs name the secret" eval "grep -q secret_file '$confA' && grep -q secret_file '$confB'"
lab_stop hub2
lab_stop hub
GW_CONF=$confA gw_start_hub hub
GW_CONF=$confB gw_start_hub hub2
must "hub A and hub B know each other again" wait_for 20 eval "knows hub hub-b 2 && knows hub2 hub-a 1"
check "hub A seals its headers" eval "mesh_json hub | jq -e '.sealed == true' >/dev/null"
# A client that connects to hub A's :443 and says nothing: with a secret the
# hub first waits for a sealed header, and the silence is still counted as
# any TLS listener counts it (handshake_timeout, 10 s); checked below.
lab_bg pub silent python3 -c "import socket, time; s = socket.create_connection(('$HUB4', 443)); time.sleep(14)"
alpha_via_b() { pcurl --resolve "$ALPHA:80:$HUB2_4" "http://$ALPHA/$1" 2>/dev/null | grep -q "$MARK1 path=/$1 xff=$PUB4 "; }
check "alpha through hub B, sealed, with the real client" wait_for 20 alpha_via_b sealed
# sealed.py KEYFILE TO CLIENT HUB HOST N [VERSION] : N requests to HUB from
# pub, each on a connection of its own that starts with one and the same
# header, sealed with KEYFILE's secret for the hub named TO and naming
# CLIENT (VERSION 1: sealed as older hubs did, bound to no hub); prints each
# answer, or <closed>, after a line `=====`
cat >"$GW_TMP/sealed.py" <<'EOF'
import hashlib, hmac, os, socket, struct, sys, time
key, to, client, hub, host, n = open(sys.argv[1], "rb").read().strip(), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
version = int(sys.argv[7]) if len(sys.argv) > 7 else 2
h = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12 + 52)
     + socket.inet_aton(client) + socket.inet_aton(hub) + struct.pack("!HH", 5555, 80)
     + bytes([0xE7]) + struct.pack("!H", 49) + bytes([version]) + struct.pack("!Q", int(time.time()))
     + os.urandom(8))
# Version 2: the MAC also covers a label and the receiving hub's name (its
# length first, 8 bytes), which are not sent.
bound = b"gatewire mesh seal v2, for hub:" + struct.pack("!Q", len(to)) + to.encode() if version == 2 else b""
h += hmac.new(key, h + bound, hashlib.sha256).digest()
for i in range(n):
    s = socket.create_connection((hub, 80), timeout=10)
    s.sendall(h + b"GET /sealed-by-hand HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    out = b""
    while True:
        try:
            d = s.recv(4096)
        except ConnectionResetError:  # closed with the request unread
            d = b""
        if not d:
            break
        out += d
    print("=====")
    print(out.decode(errors="replace") if out else "<closed>")
EOF
head -c 48 /dev/urandom | base64 -w0 >"$GW_TMP/other.key"
out=$(lab_exec pub python3 "$GW_TMP/sealed.py" "$GW_TMP/mesh.key" hub-a 198.51.100.42 "$HUB4" "$ALPHA" 2) ||
    lab_die "sealed.py failed"
first=$(awk '/^=====$/ {n++; next} n == 1' <<<"$out")
second=$(awk '/^=====$/ {n++; next} n == 2' <<<"$out")
check "a header sealed with the secret is taken from any address (pub is no hub)" \
    grep -q "$MARK1 path=/sealed-by-hand xff=198.51.100.42 " <<<"$first"
assert_eq "the same sealed header again (a replay) is refused: connection closed" "<closed>" "$second"
check "... and counted" eval "mesh_json hub | jq -e '.bad_seals >= 1' >/dev/null"
# sealed1 KEYFILE TO CLIENT [VERSION] : the one answer to one such header
# sent to hub A
sealed1() {
    local out
    out=$(lab_exec pub python3 "$GW_TMP/sealed.py" "$1" "$2" "$3" "$HUB4" "$ALPHA" 1 "${4:-2}") ||
        { echo "sealed.py failed"; return; }
    awk '/^=====$/ {n++; next} n == 1' <<<"$out"
}
assert_eq "one sealed with another secret: connection closed" "<closed>" \
    "$(sealed1 "$GW_TMP/other.key" hub-a 198.51.100.43)"
assert_eq "one sealed for hub B, sent to hub A: connection closed" "<closed>" \
    "$(sealed1 "$GW_TMP/mesh.key" hub-b 198.51.100.44)"
assert_eq "one sealed with the secret as older hubs did (version 1): connection closed" "<closed>" \
    "$(sealed1 "$GW_TMP/mesh.key" hub-a 198.51.100.45 1)"
sleep 0.5 # (the access log is written by a task of its own)
check "hub A's access log has the sealed client, never those the refused seals claimed" \
    jq -e -s 'any(.client == "198.51.100.42:5555") and all(.client | test("^198\\.51\\.100\\.4[345]:") | not)' \
    "$GW_TMP/access-hub.log"

listener_timeouts() {
    gw_show_json hub gw0 | jq -r '.interfaces[0].proxy.routes[] | select(.route == "listener") | .errors.handshake_timeout // 0'
}
check "the silent client on hub A's :443 is counted (handshake_timeout)" \
    wait_for 15 eval '[ "$(listener_timeouts)" -ge 1 ]'

# --- hub B cut off from etcd: hub A forgets it, yet takes its sealed connections
lab_exec hub2 nft -f - <<EOF
table inet cut_etcd {
    chain out {
        type filter hook output priority filter; policy accept;
        ip daddr $HUB4 tcp dport 2379 drop
    }
}
EOF
check "hub B loses etcd" wait_for 30 etcd_is hub2 false
check "hub A forgets hub B (its lease ran out)" wait_for 20 forgot hub hub-b
check "alpha through hub B, cut off from etcd: hub A takes its sealed header" alpha_via_b cut-off
code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "$BETA:80:$HUB4" "http://$BETA/" || true)
assert_eq "beta through hub A meanwhile: 404 (hub A no longer knows hub B)" 404 "$code"
lab_exec hub2 nft delete table inet cut_etcd
check "hub B reconnects to etcd" wait_for 30 etcd_is hub2 true
check "hub A knows hub B again" wait_for 15 knows hub hub-b 2
check "beta through hub A again" wait_for 20 beta_via_a healed
lab_finish

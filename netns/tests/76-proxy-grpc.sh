#!/usr/bin/env bash
# gRPC through the hub: a real gRPC server (Debian's python3-grpcio) on the
# hidden node n1, bound only to its IPv6 overlay address behind the NAT; the
# hub terminates TLS for grpc.<domain> and speaks HTTP/2 to the backend
# (`backend_protocol = "http2"`, h2c). A real gRPC client in `pub` verifies the
# hub's certificate and makes unary and server-streaming calls, and sees a
# status the server sets (NOT_FOUND with its details, carried in HTTP/2
# trailers); a client without TLS (h2c) is served on the plain port. A server
# that allows two streams per connection, held by two long streaming calls,
# still answers a third call: the hub opens a second connection to it. The
# backend sees the client address in X-Forwarded-For, the calls
# share one backend connection, the route's HTTP health check runs over
# HTTP/2, and a WebSocket upgrade on the route gets a clear 501. Then n1
# declares the same server itself (`[[service]] http2 = true` through the
# node services API) under a name the operator granted it, and the client
# reaches it by that name too.
# timeout: 240
set -euo pipefail
export GW_TEST_NAME=76-proxy-grpc
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl openssl ss jq
need_gatewire
PY=/usr/bin/python3
"$PY" -c "import grpc" 2>/dev/null || lab_die "missing Python module grpc for $PY (run .ci/deps: python3-grpcio)"

DOMAIN=gw.example.org
HOST="grpc.$DOMAIN"
HUB4=$(lab_wan4 hub)
PUB4=$(lab_wan4 pub)
N1V6=$(lab_ov6 n1)
HUBV6=$(lab_ov6 hub)

lab_up 1 0

CERT_DIR="$GW_TMP/certs"
mkdir -p "$CERT_DIR"
lab_selfsigned "$HOST" "$CERT_DIR/fullchain.pem" "$CERT_DIR/key.pem"

conf=$(gw_hub_conf hub n1)
cat >>"$conf" <<CONF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]

[control]
state_dir = "$GW_TMP/state"
socket = "$GW_TMP/ctl.sock"
node_port = 7001

[[route]]
name = "grpc"
cert = "$CERT_DIR/fullchain.pem"
key = "$CERT_DIR/key.pem"
backend_protocol = "http2"
backends = ["[$N1V6]:50051"]
health_check = "http"
health_path = "/"
health_interval = 1
health_fall = 1

# A server that allows two streams per connection.
[[route]]
name = "watch"
backend_protocol = "http2"
backends = ["[$N1V6]:50052"]
CONF
GW_CONF=$conf gw_start_hub hub
nconf=$(gw_node_conf n1 hub)
echo "control = \"[$HUBV6]:7001\"" >>"$nconf" # the last table is n1's [[hub]]
GW_CONF=$nconf gw_start_node n1 hub
must "n1 reaches the hub over the v6 overlay" wait_for 15 lab_ping1 n1 "$HUBV6"

# A gRPC service without generated code: methods take and return raw bytes.
cat >"$GW_TMP/grpc_server.py" <<'PYEOF'
import sys, time
from concurrent import futures
import grpc

def say(req, ctx):
    md = dict(ctx.invocation_metadata())
    return b"echo:" + req + b" xff=" + md.get("x-forwarded-for", "-").encode()

def count(req, ctx):
    for i in range(int(req)):
        yield b"n%d" % i

def missing(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.decode())

def watch(req, ctx):
    # A long server-streaming call: one message, then silence until the
    # client goes away.
    yield b"watching"
    while ctx.is_active():
        time.sleep(0.1)

opts = []
if len(sys.argv) > 3:
    opts.append(("grpc.max_concurrent_streams", int(sys.argv[3])))
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lab.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Missing": grpc.unary_unary_rpc_method_handler(missing),
    "Watch": grpc.unary_stream_rpc_method_handler(watch),
}),))
server.add_insecure_port("[%s]:%s" % (sys.argv[1], sys.argv[2]))
server.start()
server.wait_for_termination()
PYEOF

cat >"$GW_TMP/grpc_client.py" <<'PYEOF'
import sys
import grpc

hub, host, ca, what = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
ch = grpc.secure_channel("ipv4:%s:443" % hub, creds, options=[
    ("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)])
if what == "say-plain":
    ch = grpc.insecure_channel("ipv4:%s:80" % hub, options=[("grpc.default_authority", host)])
    what = "say"
try:
    if what == "say":
        for i in range(int(sys.argv[5])):
            print(ch.unary_unary("/lab.Echo/Say")(b"hi%d" % i, timeout=10).decode())
    elif what == "count":
        print(" ".join(m.decode() for m in ch.unary_stream("/lab.Echo/Count")(b"5", timeout=10)))
    elif what == "missing":
        ch.unary_unary("/lab.Echo/Missing")(b"x42", timeout=10)
        print("no error")
except grpc.RpcError as e:
    print("status=%s details=%s" % (e.code().name, e.details()))
PYEOF

lab_bg n1 grpcd "$PY" "$GW_TMP/grpc_server.py" "$N1V6" 50051
must "gRPC server listening on n1's overlay address" \
    wait_for 15 lab_sh n1 "ss -Hltn 'sport = :50051' | grep -q '$N1V6'"
must "hub proxy listening on :443" wait_for 10 lab_sh hub "ss -Hltn 'sport = :443' | grep -q ."

route_json() { gw_show_json hub gw0 | jq -c '.interfaces[0].proxy.routes[] | select(.route == "name:grpc")'; }
# The health check (every second, down after one failure) is an HTTP/2 GET:
# grpcio answers it with HTTP 200 (and a gRPC error status); an HTTP/1.1 probe
# of this h2c-only server fails. It failed while the server was starting.
must "the route's HTTP/2 health check passes" wait_for 15 eval \
    'route_json | jq -e ".backends[0].check == \"passing\"" >/dev/null'
failed0=$(route_json | jq '.backends[0].checks_failed')

client() { lab_exec pub "$PY" "$GW_TMP/grpc_client.py" "$HUB4" "$HOST" "$CERT_DIR/fullchain.pem" "$@"; }
ctl() { "$GATEWIRE" ctl --socket "$GW_TMP/ctl.sock" "$@"; }

out=$(client say 1 2>&1 || true)
assert_eq "unary call through the hub to n1's IPv6-only gRPC server" "echo:hi0 xff=$PUB4" "$out"
out=$(client say-plain 1 2>&1 || true)
assert_eq "a client without TLS (h2c) on the plain port" "echo:hi0 xff=$PUB4" "$out"
out=$(client count 2>&1 || true)
assert_eq "server-streaming call: five messages" "n0 n1 n2 n3 n4" "$out"
out=$(client missing 2>&1 || true)
assert_eq "the server's status and details arrive (HTTP/2 trailers)" \
    "status=NOT_FOUND details=no such thing: x42" "$out"
out=$(client say 20 2>&1 || true)
n=$(grep -c "^echo:hi[0-9]* xff=$PUB4\$" <<<"$out" || true)
assert_eq "20 unary calls on one client channel" 20 "$n"
conns=$(lab_sh n1 "ss -Htn state established 'sport = :50051' | grep -c '$HUBV6'" || true)
assert_eq "the hub carries them on one backend connection" 1 "$conns"

code=$(lab_exec pub curl --http1.1 -sS --max-time 10 -o /dev/null -w '%{http_code}' --cacert "$CERT_DIR/fullchain.pem" \
    --resolve "$HOST:443:$HUB4" -H 'Connection: Upgrade' -H 'Upgrade: websocket' "https://$HOST/ws" || true)
assert_eq "a WebSocket upgrade on an HTTP/2-backend route gets 501" 501 "$code"

sleep 2 # two more health probes
js=$(route_json)
check "the health check still passes" jq -e '.backends[0].check == "passing"' <<<"$js"
assert_eq "no health probe failed since" "$failed0" "$(jq '.backends[0].checks_failed' <<<"$js")"
check "show --json counts the calls" jq -e '.requests >= 24' <<<"$js"
check "show --json: no backend errors" \
    jq -e '[.errors | to_entries[] | select(.key != "backend_protocol") | .value] | add // 0 | . == 0' <<<"$js"
check "show --json: the upgrade counted as backend_protocol" jq -e '.errors.backend_protocol == 1' <<<"$js"
# --- the node declares the gRPC server itself
must "the operator grants n1 the name rpc" ctl name set rpc --owner "$(lab_pub n1)"
cat >>"$nconf" <<CONF

[[service]]
name = "rpc"
local = "[$N1V6]:50051"
http2 = true
CONF
must "the hub reports rpc active for n1" \
    wait_for 15 grep -q 'service active.*service=name:rpc' "$(lab_logfile n1)"
rpc_spec() { ctl --json route show rpc | jq -r '.spec.backend_protocol // "-"'; }
out=$(rpc_spec 2>&1 || true)
assert_eq "the declared service's route speaks HTTP/2 to n1" http2 "$out"
out=$(lab_exec pub "$PY" "$GW_TMP/grpc_client.py" "$HUB4" "rpc.$DOMAIN" "$CERT_DIR/fullchain.pem" say-plain 1 2>&1 || true)
assert_eq "a gRPC call reaches n1's declared service by name (h2c on :80)" "echo:hi0 xff=$PUB4" "$out"

# --- long streams fill a backend connection: the hub opens another
lab_bg n1 grpcd2 "$PY" "$GW_TMP/grpc_server.py" "$N1V6" 50052 2
must "the two-stream gRPC server listening on n1" \
    wait_for 15 lab_sh n1 "ss -Hltn 'sport = :50052' | grep -q '$N1V6'"
cat >"$GW_TMP/grpc_watch.py" <<'PYEOF'
import sys, threading, time
import grpc

hub, host = sys.argv[1], sys.argv[2]
opts = [("grpc.default_authority", host)]
# Separate client connections to the hub: the hub alone decides how the calls
# share its backend connections.
chans = [grpc.insecure_channel("ipv4:%s:80" % hub, options=opts) for _ in range(3)]
calls = [c.unary_stream("/lab.Echo/Watch")(b"", timeout=30) for c in chans[:2]]
print(" ".join(next(c).decode() for c in calls))
# The hub learns the server's limit from its SETTINGS within a fraction of a
# second of connecting.
time.sleep(0.5)
print(chans[2].unary_unary("/lab.Echo/Say")(b"past", timeout=5).decode().split(" ")[0])
sys.stdout.flush()
open(sys.argv[3], "w").write("ready")
threading.Event().wait(3)
for c in calls:
    c.cancel()
PYEOF
lab_exec pub "$PY" "$GW_TMP/grpc_watch.py" "$HUB4" "watch.$DOMAIN" "$GW_TMP/watch.ready" \
    >"$GW_TMP/watch.out" 2>&1 &
watcher=$!
check "two long streams open, then a unary call is answered beside them" \
    wait_for 15 test -s "$GW_TMP/watch.ready"
lab_log "watch client: $(paste -sd'|' "$GW_TMP/watch.out" | cut -c1-300)"
assert_eq "the streams' first messages and the unary call's answer" \
    "watching watching|echo:past" "$(paste -sd'|' "$GW_TMP/watch.out")"
conns=$(lab_sh n1 "ss -Htn state established 'sport = :50052' | grep -c '$HUBV6'" || true)
assert_eq "the hub opened a second backend connection for it" 2 "$conns"
wait "$watcher" || true

# --- the route's certificate from files, as the admin API lists it
na=$(date -d "$(openssl x509 -in "$CERT_DIR/fullchain.pem" -noout -enddate | cut -d= -f2)" +%s)
certs=$(ctl --json certs || true)
check "ctl certs lists the route's file certificate with its expiry" \
    jq -e --arg h "$HOST" --argjson na "$na" \
    'length == 1 and .[0].host == $h and .[0].source == "file" and .[0].not_after == $na' <<<"$certs"
check "and prints it as a table" eval "ctl certs | grep -q '^$HOST  *file  *in .* ok\$'"

check "hub still running" lab_alive hub
lab_finish

#!/usr/bin/env bash
# Control plane, acceptance 1-2: enrolment by token and node-declared services.
# The hub starts with no peers at all; n1 and n2 are fresh hidden nodes behind
# the NAT, each with a web server on 127.0.0.1:8080 (the node forwards to it
# from its overlay address).
#  1. `gatewire ctl token create --names blog` prints a token; on n1
#     `gatewire node join <token> --run` makes the key, calls the hub's TLS API
#     with the token's pin, writes the config and connects. Adding a
#     `[[service]] name = "blog"` to that config (picked up live) publishes
#     blog: curl in `pub` gets n1's page by name. The same token is refused on
#     a second use with a message saying it was used (HTTP 410), and nothing
#     changes on the hub.
#  2. n2 joins with a token for another name and declares blog too: the hub
#     refuses it, the node logs "hub refused service" naming the owner, the
#     node services API and `ctl peer show` report the refusal, and the blog
#     route is unchanged (one backend, only n1 answers). n2's `private`
#     service declares `deny = [pub's address]`: the route carries the rule and
#     pub gets 403. After
#     `ctl name set blog --owner K1 --owner K2 --replicas --bandwidth "2 Mbit/s"`,
#     the route gets that limit, and n2 becomes a second
#     backend and requests are balanced over both. Removing the service from
#     n2's config withdraws n2 again; the route keeps n1 alone.
# timeout: 240
# Variables read only inside eval'd checks look unused to shellcheck.
# shellcheck disable=SC2034
set -euo pipefail
export GW_TEST_NAME=101-control-join
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss jq
need_gatewire

DOMAIN=gw.example.org
HUB4=$(lab_wan4 hub)
HUBOV=$(lab_ov4 hub)
API_PORT=7443
NODE_PORT=7001
SOCK="$GW_TMP/hub.ctl.sock"
TOKEN_FILE="$GW_TMP/admin.token"

lab_up 2 0

(umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$TOKEN_FILE")
conf=$(gw_hub_conf hub)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
connect_timeout = 2

[control]
state_dir = "$GW_TMP/state"
socket = "$SOCK"
listen = ["$HUB4:$API_PORT"]
admin_token_file = "$TOKEN_FILE"
api_endpoint = "$HUB4:$API_PORT"
wg_endpoint = "$(lab_hub_endpoint hub)"
tls_endpoint = "$HUB4:8443"
node_port = $NODE_PORT
pools = ["100.64.5.0/24", "fd77:6777:0:5::/64"]

[xlat]
pool6 = "64:ff9b::/96"

[xlat.nat64]
pool4 = "198.51.100.200"
EOF

ctl() { "$GATEWIRE" ctl --socket "$SOCK" "$@"; }
api_up() { ctl status >/dev/null 2>&1; }
listening() { lab_sh "$1" "ss -Hltn 'sport = :$2' | grep -q ."; }

GW_CONF=$conf gw_start_hub hub
must "control socket answers" wait_for 10 api_up
must "no peers before any join" eval '[ "$(ctl --json peers | jq length)" = 0 ]'

# Web servers on the nodes' loopback: each answers with its node's name.
for n in n1 n2; do
    mkdir -p "$GW_TMP/www-$n"
    echo "$n" >"$GW_TMP/www-$n/index.html"
    lab_bg "$n" "web-$n" python3 -m http.server 8080 --bind 127.0.0.1 --directory "$GW_TMP/www-$n"
    must "$n web server listens" wait_for 10 listening "$n" 8080
done

pcurl() { lab_exec pub curl -sS --max-time 5 "$@" 2>/dev/null; }
blog() { pcurl --resolve "blog.$DOMAIN:80:$HUB4" "http://blog.$DOMAIN/"; }
blog_code() { pcurl -o /dev/null -w '%{http_code}' --resolve "blog.$DOMAIN:80:$HUB4" "http://blog.$DOMAIN/" || true; }
# blog_seen N: the set of distinct answers over N requests, space separated.
blog_seen() {
    local i
    for i in $(seq "$1"); do blog || echo "ERR"; done | sort -u | tr '\n' ' ' | sed 's/ $//'
}
backends() { ctl --json route show blog | jq -c '.spec.backends | sort'; }

# --- 1. n1 joins with a token for blog
state_before=$(ctl --json status | jq -r .state_version)
TOKEN1=$(ctl token create --names blog --ttl 10m 2>"$GW_TMP/token1.err")
check "token create printed a gwj1 token" eval '[[ $TOKEN1 == gwj1.* ]]'
check "token create reported its id on stderr" grep -q . "$GW_TMP/token1.err"
must "the token is listed" eval '[ "$(ctl --json tokens | jq length)" = 1 ]'

d1="$GW_TMP/n1-etc"
mkdir -p "$d1"
# --run: join, write the config, then run the node with it.
lab_bg n1 n1 env NO_COLOR=1 RUST_LOG=info "$GATEWIRE" node join "$TOKEN1" \
    --config "$d1/node.toml" --name n1 --run
must "n1 joined and brought up gwn0" wait_for 20 iface_up n1 gwn0
check "the key file is private (0600)" eval '[ "$(stat -c %a "$d1/node.key")" = 600 ]'
check "the config names the hub's node API" grep -q "^control = \"$HUBOV:$NODE_PORT\"" "$d1/node.toml"
check "the config carries the hub's tls_endpoint" grep -q "^tls_endpoint = \"$HUB4:8443\"" "$d1/node.toml"
check "the config lists blog for the owner to uncomment" grep -q '^# name = "blog"' "$d1/node.toml"
check "the private key is not in the config" not grep -q "$(cat "$d1/node.key")" "$d1/node.toml"
# The hub runs NAT64: its pool6 is among what the node routes to it.
check "the config routes the hub's NAT64 pool6 to the hub" grep -q '^allowed_ips = .*"64:ff9b::/96"' "$d1/node.toml"
pool6_routed() { lab_exec n1 ip -6 route show 64:ff9b::/96 | grep -q "dev gwn0"; }
check "n1 routes pool6 into the tunnel" wait_for 5 pool6_routed
K1=$(ctl --json peers | jq -r '.[] | select(.name == "n1") | .public_key')
check "the hub lists n1 as a peer" eval '[ -n "$K1" ] && [ "$K1" != null ]'
N1OV=$(ctl --json peers | jq -r '.[] | select(.name == "n1") | .allowed_ips[0]' | cut -d/ -f1)
check "n1 got an address from the pool" eval '[[ $N1OV == 100.64.5.* ]]'
n1_up() { lab_ping1 n1 "$HUBOV"; }
must "n1 reaches the hub through the tunnel" wait_for 15 n1_up
check "blog is owned by n1's key" eval '[ "$(ctl --json names | jq -r ".[] | select(.name == \"blog\") | .owners[0]")" = "$K1" ]'

# The owner publishes blog: uncomment-style edit of the running node's config.
cat >>"$d1/node.toml" <<EOF

[[service]]
name = "blog"
local = "127.0.0.1:8080"
EOF
must "n1's edited config is picked up" wait_for 10 grep -q 'applying \[\[service\]\]' "$(lab_logfile n1)"
must "the hub reports blog active for n1" wait_for 15 grep -q 'service active.*service=name:blog' "$(lab_logfile n1)"
must "curl in pub reaches n1 by name" wait_for 10 eval '[ "$(blog)" = n1 ]'
check "blog route has n1's overlay address as its one backend" \
    eval '[ "$(backends | jq -r "length")" = 1 ] && backends | grep -q "$N1OV"'

# The same token again, from another node: refused, clearly.
v_before=$(ctl --json status | jq -r .state_version)
set +e
lab_exec n2 "$GATEWIRE" node join "$TOKEN1" --config "$GW_TMP/reuse/node.toml" >"$GW_TMP/reuse.out" 2>&1
rc=$?
set -e
check "a second use of the token fails (exit $rc)" eval '[ $rc -ne 0 ]'
check "the refusal says the token was already used (410) and when (UTC)" \
    eval 'grep -q "already used" "$GW_TMP/reuse.out" && grep -q 410 "$GW_TMP/reuse.out" && grep -Eq "at [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z" "$GW_TMP/reuse.out"'
check "the refusal does not name the node that used the token" \
    eval 'grep -q "by another node" "$GW_TMP/reuse.out" && ! grep -qF "$K1" "$GW_TMP/reuse.out"'
check "no config was written on the refused join" not test -e "$GW_TMP/reuse/node.toml"
check "the refused join changed nothing on the hub" eval '[ "$(ctl --json status | jq -r .state_version)" = "$v_before" ]'
check "still one peer" eval '[ "$(ctl --json peers | jq length)" = 1 ]'
check "state moved from the start (join and service)" eval '[ "$v_before" != "$state_before" ]'

# --- 2. n2 claims blog without owning it
# A port of the hub's [control] ports range that another program holds.
HELD_PORT=20777
lab_bg hub holder python3 -m http.server "$HELD_PORT" --bind 0.0.0.0 --directory "$GW_TMP"
must "another program listens on the hub's port $HELD_PORT" wait_for 10 listening hub "$HELD_PORT"
TOKEN2=$(ctl token create --names other,private --ttl 10m --bandwidth "1 Mbit/s" 2>/dev/null)
check "the token lists its bandwidth" eval '[ "$(ctl --json tokens | jq -r ".[] | select(.used_by == null) | .bandwidth")" = "1 Mbit/s" ]'
d2="$GW_TMP/n2-etc"
mkdir -p "$d2"
check "a bad --interface is refused before the token is spent" \
    not lab_exec n2 "$GATEWIRE" node join "$TOKEN2" --config "$d2/node.toml" --interface 'bad/if'
must "n2 joins with its own token (interface gwj0)" \
    lab_exec n2 "$GATEWIRE" node join "$TOKEN2" --config "$d2/node.toml" --name n2 --interface gwj0
cat >>"$d2/node.toml" <<EOF

[[service]]
name = "other"
local = "127.0.0.1:8080"

# The node's owner keeps this one from pub's IPv4 address.
[[service]]
name = "private"
local = "127.0.0.1:8080"
deny = ["$(lab_wan4 pub)"]

[[service]]
name = "blog"
local = "127.0.0.1:8080"

# Another program on the hub holds this port (below).
[[service]]
name = "other"
protocol = "tcp"
local = "127.0.0.1:8080"
port = 8081
public_port = $HELD_PORT
EOF
lab_bg n2 n2 env NO_COLOR=1 RUST_LOG=info "$GATEWIRE" node --config "$d2/node.toml"
must "n2 brought up gwj0" wait_for 10 iface_up n2 gwj0
K2=$(ctl --json peers | jq -r '.[] | select(.name == "n2") | .public_key')
N2OV=$(ctl --json peers | jq -r '.[] | select(.name == "n2") | .allowed_ips[0]' | cut -d/ -f1)
must "n2 logs the hub's refusal of blog, naming no other node" \
    wait_for 20 grep -q "hub refused service.*service=name:blog.*owned by another node" "$(lab_logfile n2)"
check "n2's log has no other node's key" not grep -qF "$K1" "$(lab_logfile n2)"
check "n2's own name is active" grep -q 'service active.*service=name:other' "$(lab_logfile n2)"
svc=$(lab_exec n2 curl -sS --max-time 5 "http://$HUBOV:$NODE_PORT/v1/services")
check "the node services API reports blog refused with the reason" \
    eval 'jq -e ".services[] | select(.host == \"name:blog\") | .status == \"refused\" and (.error | contains(\"owned by\"))" <<<"$svc" >/dev/null'
check "ctl peer show n2 reports the refusal, naming the owner" eval 'ctl peer show "$K2" | grep -qF "owned by $K1"'
check "a tcp service on a port another program holds on the hub is refused, saying so" \
    eval 'jq -e ".services[] | select(.host == \"tcp:$HELD_PORT\") | .status == \"refused\" and (.error | contains(\"cannot be listened on at the hub\"))" <<<"$svc" >/dev/null'
check "the hub logged no failed proxy reload" not grep -q "proxy reload failed" "$(lab_logfile hub)"
check "the blog route still has one backend" eval '[ "$(backends | jq -r "length")" = 1 ] && backends | grep -q "$N1OV"'
check "blog answers from n1 only (20 requests)" eval '[ "$(blog_seen 20)" = n1 ]'
other() { pcurl --resolve "other.$DOMAIN:80:$HUB4" "http://other.$DOMAIN/"; }
check "n2's own name serves n2" eval '[ "$(other)" = n2 ]'
# n1's blog listens on its loopback: its forwarder on the overlay answers the
# hub (whose addresses the join wrote into the config), never another node.
check "the config lists the hub's own overlay addresses" grep -q "^addresses = \[\"$HUBOV\"" "$d1/node.toml"
check "the hub reaches n1's forwarder" eval '[ "$(lab_exec hub curl -sS --max-time 5 "http://$N1OV:8080/")" = n1 ]'
check "n2 does not reach n1's loopback service through the forwarder" \
    not lab_exec n2 curl -sS --max-time 5 "http://$N1OV:8080/"
fwd=$(gw_show_json n1 gwn0 | jq -c ".interfaces[0].service_forwarders[] | select(.listen == \"$N1OV:8080\")")
echo "n1's forwarder: $fwd"
check "n1's show counts the forwarder's connections and n2's refused one" \
    eval 'jq -e ".service == \"blog\" and .protocol == \"tcp\" and .local == \"127.0.0.1:8080\" and .connections >= 1 and .errors.denied >= 1 and .bytes_out > 0" <<<"$fwd" >/dev/null'
# Client address rules declared by the node reach the hub's route.
must "n2's private service is active" wait_for 15 grep -q 'service active.*service=name:private' "$(lab_logfile n2)"
check "the private route carries n2's deny rule (canonical form)" \
    eval '[ "$(ctl --json route show private | jq -c .spec.deny)" = "[\"$(lab_wan4 pub)/32\"]" ]'
private_code=$(pcurl -o /dev/null -w '%{http_code}' --resolve "private.$DOMAIN:80:$HUB4" "http://private.$DOMAIN/" || true)
assert_eq "pub's IPv4 address is refused by the node's rule (403)" 403 "$private_code"

# The owner allows replicas and adds n2's key.
must "ctl name set blog with both owners, replicas and a bandwidth" \
    ctl name set blog --owner "$K1" --owner "$K2" --replicas --bandwidth "2 Mbit/s"
must "blog gets n2 as a second backend" wait_for 35 eval '[ "$(backends | jq -r length)" = 2 ]'
check "the name's bandwidth reaches its route's spec" \
    eval '[ "$(ctl --json route show blog | jq -r .spec.bandwidth)" = "2 Mbit/s" ]'
check "and the running route (250000 bytes/s in gatewire show)" wait_for 5 eval \
    "gw_show_json hub gw0 | jq -e '.interfaces[0].proxy.routes[] | select(.route == \"name:blog\") | .bandwidth == 250000' >/dev/null"
check "an unreadable bandwidth is refused" not ctl name set blog --owner "$K1" --bandwidth fast
check "the second backend is n2's overlay address" eval 'backends | grep -q "$N2OV"'
must "blog is balanced over n1 and n2" wait_for 10 eval '[ "$(blog_seen 10)" = "n1 n2" ]'
must "n2 logs blog active" wait_for 35 grep -q 'service active.*service=name:blog' "$(lab_logfile n2)"

# Removing the service from n2's config withdraws n2's backend (live reload).
python3 - "$d2/node.toml" <<'EOF'
import sys
p = sys.argv[1]
text = open(p).read()
block = '\n[[service]]\nname = "blog"\nlocal = "127.0.0.1:8080"\n'
assert block in text, "blog service block not found"
open(p + ".new", "w").write(text.replace(block, ""))
EOF
mv "$d2/node.toml.new" "$d2/node.toml"
must "n2 withdraws blog: one backend again" wait_for 10 eval '[ "$(backends | jq -r length)" = 1 ]'
check "the remaining backend is n1" eval 'backends | grep -q "$N1OV"'
check "blog answers from n1 only again" eval '[ "$(blog_seen 10)" = n1 ]'
check "n2's other service stays" eval '[ "$(other)" = n2 ]'

# A restart of the hub keeps peers, names and the declared routes.
gw_restart_hub hub
must "control socket answers after the restart" wait_for 10 api_up
check "both peers kept" eval '[ "$(ctl --json peers | jq length)" = 2 ]'
check "blog owners kept" eval '[ "$(ctl --json names | jq -r ".[] | select(.name == \"blog\") | .owners | length")" = 2 ]'
check "and its bandwidth" eval '[ "$(ctl --json names | jq -r ".[] | select(.name == \"blog\") | .bandwidth")" = "2 Mbit/s" ]'
check "the names n2's token made have the token's bandwidth" \
    eval '[ "$(ctl --json names | jq -r ".[] | select(.name == \"other\") | .bandwidth")" = "1 Mbit/s" ]'
must "blog still served by n1 after the restart" wait_for 20 eval '[ "$(blog)" = n1 ]'
check "the used token is still refused after the restart" \
    not lab_exec n2 "$GATEWIRE" node join "$TOKEN1" --config "$GW_TMP/reuse2/node.toml"

# Removing n2 withdraws its services and frees the names it alone held;
# blog keeps n1 as its one owner.
check "ctl peer remove n2" ctl peer remove "$K2"
other_code() { pcurl -o /dev/null -w '%{http_code}' --resolve "other.$DOMAIN:80:$HUB4" "http://other.$DOMAIN/" || true; }
must "other is no longer served" wait_for 10 eval '[ "$(other_code)" = 404 ]'
check "other and private are freed" eval '[ "$(ctl --json names | jq -r "[.[] | select(.name == \"other\" or .name == \"private\")] | length")" = 0 ]'
check "blog is n1's alone" eval '[ "$(ctl --json names | jq -c ".[] | select(.name == \"blog\") | .owners")" = "[\"$K1\"]" ]'
check "the hub logs the names freed" grep -q "names freed with their peer" "$(lab_logfile hub)"
check "blog still served by n1" eval '[ "$(blog)" = n1 ]'

lab_finish

#!/usr/bin/env bash
# Yggdrasil access (issue E) with Debian's yggdrasil 0.4.7 supervised by gatewire.
#
# n1 is a node with NO WireGuard tunnel at all: `gatewire node` with only a
# [yggdrasil] section, behind the NAT, its daemon peered with the hub's over
# TCP (then, in a second case, over TLS). It serves a site bound to its own
# 200::/7 address; curl in `pub` reaches it by name through the hub's proxy
# over IPv4 (an IPv4 client served by a Yggdrasil IPv6 backend).
# kill -9 of the hub's daemon: gatewire restarts it and the route recovers by
# itself; `gatewire show` reports the overlay address and the peers. A hung
# daemon (SIGSTOP: its process stays, its admin socket stops answering) is
# reported unresponsive, then stopped and started again after three failed
# probes (10 s apart), and the route recovers again. kill -9 of a gatewire
# leaves no yggdrasil behind. Bad input: a malformed key or peer URI is
# refused naming it; a daemon binary that will not start (/bin/false) is
# reported and retried with backoff while WireGuard (n2) keeps working.
# (Address vectors and `yggdrasil -address/-subnet` equality: tests/ygg_daemon.rs.)
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=90-ygg
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 jq ss
need_gatewire
YGGBIN=${YGGBIN:-/usr/sbin/yggdrasil}
[ -x "$YGGBIN" ] || lab_die "missing $YGGBIN (apt-get install yggdrasil)"

DOMAIN=gw.example.org
SITE="site.$DOMAIN"
HUB4=$(lab_wan4 hub)
MARK="hello-over-yggdrasil-$$"

# ---------------------------------------------------------------- helpers
# ygg_keygen NAME : gatewire ygg keygen -> keys/NAME.ygg (PrivateKey), NAME.yggaddr
ygg_keygen() {
    local out
    out=$("$GATEWIRE" ygg keygen)
    (umask 077 && sed -n 's/^PrivateKey: //p' <<<"$out" >"$GW_TMP/keys/$1.ygg")
    sed -n 's/^Address: //p' <<<"$out" >"$GW_TMP/keys/$1.yggaddr"
    sed -n 's/^PublicKey: //p' <<<"$out" >"$GW_TMP/keys/$1.yggpub"
}
ygg_priv() { cat "$GW_TMP/keys/$1.ygg"; }
ygg_addr() { cat "$GW_TMP/keys/$1.yggaddr"; }
ygg_pub() { cat "$GW_TMP/keys/$1.yggpub"; }

# ygg_node_conf NODE PEER_URI : a node file with [yggdrasil] only (no [[hub]])
ygg_node_conf() {
    local node=$1 peer=$2 f="$GW_TMP/conf/$1-ygg.toml"
    cat >"$f" <<EOF
[node]
private_key = "$(lab_priv "$node")"
addresses = []

[yggdrasil]
private_key = "$(ygg_priv "$node")"
peers = ["$peer"]
interface = "ygg0"
EOF
    echo "$f"
}

# show_json NS : gatewire show --json inside NS
show_json() { lab_exec "$1" "$GATEWIRE" show --json 2>/dev/null; }
# ygg_field NS JQ : one value of the overlay object
ygg_field() { show_json "$1" | jq -r ".yggdrasil$2"; }
ygg_running() { [ "$(ygg_field "$1" .daemon.status)" = running ]; }
# has_addr NS IFACE ADDR
has_addr() { lab_exec "$1" ip -6 -o addr show dev "$2" 2>/dev/null | grep -q " $3/7 "; }
# peer_listed NS ADDR : the overlay of NS has an up link to ADDR
peer_listed() {
    show_json "$1" | jq -e --arg a "$2" '.yggdrasil.peers | any(.address == $a and .up)' >/dev/null
}
pcurl() { lab_exec pub curl -sS --max-time 5 --resolve "$SITE:80:$HUB4" "http://$SITE/" 2>/dev/null; }
site_ok() { pcurl | grep -q "$MARK"; }
pid_gone() { ! kill -0 "$1" 2>/dev/null; }
restarted() { [ "$(ygg_field hub .daemon.restarts)" = "$1" ] && ygg_running hub; }
ygg_status_is() { [ "$(ygg_field "$1" .daemon.status)" = "$2" ]; }
restarts_at_least() { [ "$(ygg_field hub .daemon.restarts)" -ge "$1" ]; }
tls_link() { show_json "$1" | jq -e '.yggdrasil.peers | any((.remote // "") | test("tls://"))' >/dev/null; }
# delays_grow LOG : the last three retry delays logged are non-decreasing
delays_grow() {
    grep -o 'retry_in_s=[0-9.]*' "$1" | tail -n 3 | cut -d= -f2 | sort -n -c
}

# ---------------------------------------------------------------- keys, CLI
ygg_keygen hub
ygg_keygen n1
HUBY=$(ygg_addr hub)
N1Y=$(ygg_addr n1)
out=$("$GATEWIRE" ygg address "$(ygg_pub n1)")
assert_eq "gatewire ygg address agrees with keygen" "Address: $N1Y" "$(head -1 <<<"$out")"
# The daemon derives the same address from the same key (-address reads a config).
printf '{"PrivateKey":"%s","PublicKey":"%s"}\n' "$(ygg_priv n1)" "$(ygg_pub n1)" >"$GW_TMP/conf/n1-probe.json"
assert_eq "yggdrasil -address agrees" "$N1Y" \
    "$("$YGGBIN" -useconffile "$GW_TMP/conf/n1-probe.json" -address 2>/dev/null)"
rm -f "$GW_TMP/conf/n1-probe.json"
lab_log "hub overlay address $HUBY, n1 overlay address $N1Y"

lab_up 2 0

# ---------------------------------------------------------------- hub config
conf=$(gw_hub_conf hub n2)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = []

[[route]]
name = "site"
backends = ["http://[$N1Y]:8080"]

[yggdrasil]
private_key = "$(ygg_priv hub)"
listen = ["tcp://0.0.0.0:12345", "tls://0.0.0.0:12346"]
interface = "ygg0"
EOF

# ---------------------------------------------------------------- (d) bad input, refused at load
bad="$GW_TMP/conf/hub-badkey.toml"
sed "/^\[yggdrasil\]/,\$ s/^private_key = .*/private_key = \"00112233zz\"/" "$conf" >"$bad"
rc=0
out=$(lab_exec hub "$GATEWIRE" hub --config "$bad" --check 2>&1) || rc=$?
check "a malformed [yggdrasil] key is refused (exit $rc)" test "$rc" -ne 0
check "the refusal names [yggdrasil] private_key" grep -q "\[yggdrasil\] private_key" <<<"$out"
check "the refusal does not echo the key" not grep -q "00112233zz" <<<"$out"
bad="$GW_TMP/conf/hub-baduri.toml"
sed "s#^listen = \[\"tcp://0.0.0.0:12345\"#peers = [\"tcp//$HUB4:1\"]\nlisten = [\"tcp://0.0.0.0:12345\"#" "$conf" >"$bad"
rc=0
out=$(lab_exec hub "$GATEWIRE" hub --config "$bad" --check 2>&1) || rc=$?
check "a malformed peer URI is refused (exit $rc)" test "$rc" -ne 0
check "the refusal names the peer URI" grep -q "peers.*tcp//$HUB4:1" <<<"$out"
out=$(lab_exec n1 "$GATEWIRE" node --config "$(ygg_node_conf n1 "tcp://$HUB4:12345")" --check 2>&1 || true)
check "a node with only [yggdrasil] (no [[hub]]) is accepted" grep -q ": ok" <<<"$out"

# ---------------------------------------------------------------- (b) TCP
GW_CONF=$conf gw_start_hub hub
gw_start_node n2 hub
must "WireGuard: n2 reaches the hub" wait_for 15 lab_ping1 n2 "$(lab_ov4 hub)"
must "hub: yggdrasil gives ygg0 its address" wait_for 20 has_addr hub ygg0 "$HUBY"
check "hub: 200::/7 is routed through ygg0" \
    lab_sh hub "ip -6 route show 200::/7 | grep -q 'dev ygg0'"

# The service manager's readiness protocol (Type=notify).
notes="$GW_TMP/notify.log"
lab_notify n1
lab_bg n1 n1 env NO_COLOR=1 RUST_LOG=info NOTIFY_SOCKET="$GW_TMP/notify.sock" \
    "$GATEWIRE" node --config "$GW_TMP/conf/n1-ygg.toml"
must "n1: yggdrasil up on ygg0 (no WireGuard interface)" wait_for 20 has_addr n1 ygg0 "$N1Y"
check "n1 (Yggdrasil only) tells the service manager it is ready" \
    wait_for 10 grep -qx 'READY=1' "$notes"
kill -HUP "$(lab_pid n1)"
check "n1 (Yggdrasil only) takes SIGHUP as a reload" \
    wait_for 10 grep -q "SIGHUP; unchanged" "$(lab_logfile n1)"
check "n1 said RELOADING=1 and READY=1 again" \
    bash -c 'grep -q "^RELOADING=1" "$1" && [ "$(grep -cx READY=1 "$1")" -ge 2 ]' _ "$notes"
check "n1 still runs after SIGHUP" lab_alive n1
check "n1 has no WireGuard interface" not lab_sh n1 "ip link show gwn0 2>/dev/null"
mkdir -p "$GW_TMP/site"
echo "$MARK" >"$GW_TMP/site/index.html"
lab_bg n1 web python3 -m http.server --bind "$N1Y" --directory "$GW_TMP/site" 8080
must "site listening on n1's 200::/7 address" \
    wait_for 10 lab_sh n1 "ss -Hltn 'sport = :8080' | grep -q '$N1Y'"
must "hub and n1 peered over TCP" wait_for 30 peer_listed hub "$N1Y"
t0=$(now_ms)
check "pub reaches n1's site by name over IPv4, through the hub, over Yggdrasil" wait_for 30 site_ok
lab_log "site reachable $(($(now_ms) - t0)) ms after peering"
check "n1 is reachable over the overlay from the hub" lab_sh hub "ping -6 -c 2 -W 2 -q $N1Y >/dev/null"

# ---------------------------------------------------------------- (c) show, kill -9, recovery
j=$(show_json hub)
assert_eq "show: overlay address" "$HUBY" "$(jq -r .yggdrasil.address <<<"$j")"
assert_eq "show: daemon running" running "$(jq -r .yggdrasil.daemon.status <<<"$j")"
check "show: n1 listed as an up peer" jq -e --arg a "$N1Y" '.yggdrasil.peers | any(.address == $a and .up and .uptime >= 0)' <<<"$j" >/dev/null
check "show: the WireGuard interface is still listed" jq -e '.interfaces | length == 1' <<<"$j" >/dev/null
txt=$(lab_exec hub "$GATEWIRE" show 2>&1)
check "show (text): overlay section with address and peer" \
    bash -c 'grep -q "^yggdrasil: ygg0 (running)" <<<"$1" && grep -q "address: $2" <<<"$1" && grep -q "peer: $3 (up)" <<<"$1"' _ "$txt" "$HUBY" "$N1Y"

ypid=$(jq -r .yggdrasil.daemon.pid <<<"$j")
must "hub daemon pid known ($ypid)" test "$ypid" -gt 1
lab_log "kill -9 of the hub's yggdrasil (pid $ypid)"
t0=$(now_ms)
kill -KILL "$ypid"
check "gatewire notices and restarts the daemon" wait_for 15 restarted 1
npid=$(ygg_field hub .daemon.pid)
check "the new daemon has a new pid ($npid)" test "$npid" != "$ypid"
check "the route recovers by itself" wait_for 90 site_ok
lab_log "route back $(($(now_ms) - t0)) ms after kill -9"
check "hub: 200::/7 routed through ygg0 again" lab_sh hub "ip -6 route show 200::/7 | grep -q 'dev ygg0'"
check "the log reports the death" grep -q "killed by signal 9" "$(lab_logfile hub)"
check "WireGuard untouched by the overlay restart" lab_ping n2 "$(lab_ov4 hub)"

# ---------------------------------------------------------------- (c) a hung daemon
ypid=$(ygg_field hub .daemon.pid)
must "hub daemon pid known ($ypid)" test "$ypid" -gt 1
lab_log "kill -STOP of the hub's yggdrasil (pid $ypid)"
t0=$(now_ms)
kill -STOP "$ypid"
check "show: the hung daemon is reported unresponsive" wait_for 20 ygg_status_is hub unresponsive
check "gatewire stops the hung daemon and starts a new one" wait_for 45 restarted 2
lab_log "daemon restarted $(($(now_ms) - t0)) ms after kill -STOP"
check "the hung daemon is gone" wait_for 5 pid_gone "$ypid"
npid=$(ygg_field hub .daemon.pid)
check "the new daemon has a new pid ($npid)" test "$npid" != "$ypid"
check "show: last error names the failed probes" \
    grep -q "admin socket .* did not answer 3 probes in a row" <<<"$(ygg_field hub .daemon.last_error)"
sock=$(ygg_field hub .daemon.admin_socket)
check "the log warns naming the socket ($sock)" \
    bash -c 'grep "did not answer 3 probes in a row; restarting the daemon" "$1" | grep -qF "$2"' _ \
    "$(lab_logfile hub)" "$sock"
# n1's daemon redials a peer whose handshake timed out once a minute.
check "the route recovers after the hang" wait_for 65 site_ok
lab_log "route back $(($(now_ms) - t0)) ms after kill -STOP"
check "WireGuard untouched by the hang" lab_ping n2 "$(lab_ov4 hub)"

# ---------------------------------------------------------------- (b) TLS
n1pid=$(ygg_field n1 .daemon.pid)
lab_stop n1
check "stopping gatewire stops its yggdrasil" wait_for 5 pid_gone "$n1pid"
ygg_node_conf n1 "tls://$HUB4:12346" >/dev/null
lab_bg n1 n1 env NO_COLOR=1 RUST_LOG=info "$GATEWIRE" node --config "$GW_TMP/conf/n1-ygg.toml"
must "n1: yggdrasil up again" wait_for 20 has_addr n1 ygg0 "$N1Y"
must "n1 peered with the hub over TLS" wait_for 30 peer_listed n1 "$HUBY"
check "n1's link is the TLS one" tls_link n1
check "pub reaches n1's site over the TLS-peered overlay" wait_for 30 site_ok

# ---------------------------------------------------------------- no orphan after kill -9 of gatewire
n1pid=$(ygg_field n1 .daemon.pid)
lab_log "kill -9 of n1's gatewire (its yggdrasil is pid $n1pid)"
lab_stop n1 KILL
check "kill -9 of gatewire leaves no yggdrasil behind" wait_for 5 pid_gone "$n1pid"

# ---------------------------------------------------------------- (d) a daemon that will not start
lab_stop hub
bad="$GW_TMP/conf/hub-false.toml"
sed "/^\[yggdrasil\]/a binary = \"/bin/false\"\nversion = \"0.4\"" "$conf" >"$bad"
GW_CONF=$bad gw_start_hub hub
check "hub with a broken daemon still serves WireGuard (n2 pings the hub)" \
    wait_for 20 lab_ping1 n2 "$(lab_ov4 hub)"
check "the failing daemon is retried" wait_for 15 restarts_at_least 3
j=$(show_json hub)
check "show reports the failure" jq -e '.yggdrasil.daemon.last_error | test("/bin/false.*status 1")' <<<"$j" >/dev/null
check "show: backoff or starting state" jq -e '.yggdrasil.daemon.status | test("backoff|starting")' <<<"$j" >/dev/null
check "the log names the binary and the retry delay" \
    grep -q "yggdrasil: daemon /bin/false exited with status 1.*" "$(lab_logfile hub)"
check "retries back off (delays grow)" delays_grow "$(lab_logfile hub)"
check "WireGuard still works after the retries" lab_ping n2 "$(lab_ov4 hub)"
check "hub process alive" lab_alive hub

lab_finish

#!/usr/bin/env bash
# Acceptance 4: a route with backends on two hidden nodes. Both serve; then n1's
# gatewire stops (its tunnel goes silent). Requests keep succeeding: the first
# ones may wait for a connect timeout and fail over within the request, and
# after at most a few seconds the active health check has taken n1's backend
# out. `gatewire show --json` shows the backend down (check failing, and later
# its tunnel down). When n1 comes back, its backend is used again. Then n1
# stops hearing the hub (nftables drops everything from it in n1's namespace)
# while its own packets still arrive: its keepalives and handshake
# initiations do not keep its tunnel up at the hub, whose answers are lost.
# timeout: 300
set -euo pipefail
export GW_TEST_NAME=72-proxy-failover
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 ss jq
need_gatewire

DOMAIN=gw.example.org
HUB4=$(lab_wan4 hub)
N1=$(lab_ov4 n1)
N2=$(lab_ov4 n2)

lab_up 2 0

conf=$(gw_hub_conf hub n1 n2)
cat >>"$conf" <<EOF

[proxy]
domains = ["$DOMAIN"]
http_listen = ["0.0.0.0:80"]
https_listen = ["0.0.0.0:443"]
connect_timeout = 2
tunnel_down_after = 12

[[route]]
name = "app"
backends = ["http://$N1:8080", "http://$N2:8080"]
health_check = "http"
health_path = "/"
health_interval = 1
health_timeout = 1
health_fall = 2
EOF

GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
gw_start_node n2 hub
must "n1 reaches the hub" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
must "n2 reaches the hub" wait_for 15 lab_ping1 n2 "$(lab_ov4 hub)"

for n in n1 n2; do
    mkdir -p "$GW_TMP/www-$n"
    echo "served-by-$n" >"$GW_TMP/www-$n/index.html"
    lab_bg "$n" "web-$n" python3 -m http.server --bind "$(lab_ov4 "$n")" --directory "$GW_TMP/www-$n" 8080
    must "web server on $n" wait_for 10 lab_sh "$n" "ss -Hltn 'sport = :8080' | grep -q ."
done

pcurl() { lab_exec pub curl -sS --max-time 8 --resolve "app.$DOMAIN:80:$HUB4" "http://app.$DOMAIN/" 2>/dev/null; }
route_json() { gw_show_json hub gw0 | jq -c '.interfaces[0].proxy.routes[] | select(.route == "name:app")'; }
backend_up() { route_json | jq -e --arg b "$1:8080" '.backends[] | select(.backend == $b) | .up == '"$2" >/dev/null; }

must "both backends up per the hub" wait_for 10 eval 'backend_up "$N1" true && backend_up "$N2" true'
seen=""
for _ in $(seq 1 10); do seen+=$(pcurl || true); done
check "round-robin reaches n1" grep -q served-by-n1 <<<"$seen"
check "round-robin reaches n2" grep -q served-by-n2 <<<"$seen"

# --- n1 goes away
lab_stop n1
t0=$(now_ms)
fails=0 ok=0 last_fail=0
while [ $(($(now_ms) - t0)) -lt 15000 ]; do
    if pcurl | grep -q served-by-n2; then
        ok=$((ok + 1))
    else
        fails=$((fails + 1))
        last_fail=$(($(now_ms) - t0))
    fi
    sleep 0.2
done
lab_log "after stopping n1: $ok ok, $fails failed, last failure at ${last_fail} ms"
check "requests kept succeeding (no failure later than 3 s after the stop)" [ "$last_fail" -le 3000 ]
check "at least 30 requests succeeded in the 15 s after the stop" [ "$ok" -ge 30 ]
js=$(route_json || true)
lab_log "route health: $js"
check "show --json: n1's backend down" backend_up "$N1" false
check "show --json: n1's health check failing" \
    jq -e --arg b "$N1:8080" '.backends[] | select(.backend == $b) | .check == "failing"' <<<"$js" >/dev/null
check "show --json: n1's tunnel down (nothing heard for 12 s)" wait_for 10 eval \
    'route_json | jq -e --arg b "$N1:8080" ".backends[] | select(.backend == \$b) | .tunnel == \"down\"" >/dev/null'
check "show --json: n2's backend up" backend_up "$N2" true

# --- n1 comes back
gw_restart_node n1
check "n1's backend comes back up" wait_for 30 backend_up "$N1" true
seen=""
for _ in $(seq 1 10); do seen+=$(pcurl || true); done
check "n1 serves again" grep -q served-by-n1 <<<"$seen"

# --- n1's return path breaks: it sends, but hears nothing from the hub
tunnel_is() {
    route_json | jq -e --arg b "$N1:8080" --arg t "$1" '.backends[] | select(.backend == $b) | .tunnel == $t' >/dev/null
}
check "n1's tunnel up before the break" tunnel_is up
lab_exec n1 nft -f - <<EOF
table inet deaf {
    chain input {
        type filter hook input priority 0;
        ip saddr $HUB4 counter drop
    }
}
EOF
t0=$(now_ms)
check "a tunnel heard one way only reads down (two answers to its initiations lost)" \
    wait_for 40 tunnel_is down
lab_log "n1's tunnel down $(($(now_ms) - t0)) ms after its return path broke"
check "the hub kept answering n1 (dropped in n1)" \
    lab_sh n1 "nft list table inet deaf | grep -Eq 'packets [1-9]'"
lab_exec n1 nft delete table inet deaf
check "n1's tunnel up again once the hub's answers arrive" wait_for 40 tunnel_is up
check "n1's backend up again" wait_for 20 backend_up "$N1" true

check "hub still running" lab_alive hub
lab_finish

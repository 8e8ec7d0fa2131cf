#!/usr/bin/env bash
# A hub whose name resolves only after the node started (DNS not up yet at
# boot): the node starts with no endpoint for it and routes its hub's
# allowed_ips, among them, by mistake, the wan prefix that holds the hub. Once
# the name resolves, the node takes that route out (the tunnel's own packets
# to the hub would loop into the tunnel), says why, and reaches the hub.
# timeout: 120
set -euo pipefail
export GW_TEST_NAME=41-late-dns
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping
need_gatewire

NAME=hub.gw.test
lab_up 1 0
gw_start_hub hub n1

# n1's own /etc/hosts and resolv.conf (see _lab_argv): the name is unknown,
# and the only name server is n1's loopback, where none listens.
d="$GW_TMP/ns/n1"
printf '127.0.0.1 localhost\n' >"$d/hosts"
printf 'nameserver 127.0.0.1\n' >"$d/resolv.conf"
check "the hub's name does not resolve in n1 yet" \
    not lab_exec n1 getent hosts "$NAME"

nconf=$(GW_ENDPOINT="$NAME:$GW_HUB_PORT" gw_node_conf n1 hub)
sed -i 's|"fd77:6777::/48"\]|"fd77:6777::/48", "203.0.113.0/24"]|' "$nconf"
grep -q '203.0.113.0/24' "$nconf" || lab_die "could not add the wan prefix to n1's allowed_ips"
RUST_LOG=info,gatewire::node=debug GW_CONF=$nconf gw_start_node n1 hub
log=$(lab_logfile n1)
wan_routed() { lab_sh n1 "ip route show 203.0.113.0/24 | grep -q 'dev gwn0'"; }
must "with no endpoint known, n1 routes 203.0.113.0/24 into the tunnel" wait_for 10 wan_routed
check "n1 says it cannot resolve the hub" wait_for 10 grep -q "WARN.*cannot resolve hub" "$log"
must "n1 tries the name again" wait_for 15 grep -q "DEBUG.*cannot resolve hub" "$log"
check "and warns once for the same error" eval '[ "$(grep -c "WARN.*cannot resolve hub" "$log")" = 1 ]'
check "n1 cannot reach the hub yet" not lab_ping1 n1 "$(lab_ov4 hub)"

# The name starts to resolve (appended in place: the bind mount follows).
echo "$(lab_wan4 hub) $NAME" >>"$d/hosts"
must "n1 reaches the hub once its name resolves" wait_for 20 lab_ping1 n1 "$(lab_ov4 hub)"
check "the route holding the hub's address is gone" not wan_routed
check "n1 says the name resolves again" grep -q "hub resolves again" "$log"
says_why() {
    grep "route removed: it holds the hub endpoint $(lab_wan4 hub)" "$log" | grep -q "route=203.0.113.0/24"
}
check "n1 says why it removed the route" says_why
for p in hub n1; do
    check "$p still running" lab_alive "$p"
done
lab_finish

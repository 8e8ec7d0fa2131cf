#!/usr/bin/env bash
# [hub] node_to_node: who decides whether nodes reach each other. "off": the
# hub drops n1 -> n2 and counts drops.node_to_node, while every node still
# reaches the hub's own address. "kernel": the hub hands node-to-node packets
# to its kernel, which forwards them back into the TUN, so the hub's nftables
# forward chain decides: n1 -> n2 passes until a rule drops it, then n2 -> d1
# and n1 -> hub still pass. The change from "off" to "kernel" is a reload. `hub --check` refuses an unknown value and a peer
# whose allowed IPs hold the hub's own address, and warns when "kernel" meets
# a host that does not forward.
# timeout: 240
set -euo pipefail
export GW_TEST_NAME=11-node-to-node
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd ping jq nft
need_gatewire

lab_up 2 1
nodes=(n1 n2 d1)
conf=$(gw_hub_conf hub "${nodes[@]}")
# set_mode MODE : [hub] node_to_node = MODE in the hub's config
set_mode() {
    sed -i -e '/^node_to_node = /d' -e "s|^keepalive = .*|&\nnode_to_node = \"$1\"|" "$conf"
}
# hub_check NAME CONFIG : `gatewire hub --check`, output in $GW_TMP/NAME.out;
# true when it accepts CONFIG
hub_check() {
    lab_exec hub timeout 10 "$GATEWIRE" hub --config "$2" --check >"$GW_TMP/$1.out" 2>&1
}
out_has() { grep -q -- "$2" "$GW_TMP/$1.out"; }

# --check: unknown values, the hub's own address in a peer's allowed IPs
lab_exec hub sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
set_mode sideways
check "hub --check refuses node_to_node = \"sideways\"" not hub_check bad-mode "$conf"
check "... naming the allowed values" out_has bad-mode '"direct", "kernel", "off"'
set_mode kernel
check "hub --check accepts node_to_node = \"kernel\"" hub_check kernel "$conf"
check "... and warns that the host does not forward" out_has kernel 'node_to_node = "kernel" but net.ipv4.ip_forward'
capture="$GW_TMP/conf/capture.toml"
sed "s|\"$(lab_ov4 n2)/32\"|\"$(lab_ov4 hub)/32\", &|" "$conf" >"$capture"
check "hub --check refuses a peer holding the hub's address" not hub_check capture "$capture"
check "... naming the peer and the address" \
    out_has capture "(n2) allowed_ips $(lab_ov4 hub)/32: holds the hub's own address $(lab_ov4 hub)"

n2n_drops() {
    gw_show_json hub | jq -r '[.interfaces[] | .drops.node_to_node // 0] | add'
}

# ---- "off"
set_mode off
GW_CONF=$conf gw_start_hub hub
gw_start_node n1 hub
gw_start_node n2 hub
gw_start_node d1 hub
for n in "${nodes[@]}"; do
    must "$n reaches the hub (v4 overlay)" wait_for 15 lab_ping1 "$n" "$(lab_ov4 hub)"
    check "$n reaches the hub (v6 overlay)" lab_ping "$n" "$(lab_ov6 hub)"
done
before=$(n2n_drops)
check "off: n1 -> n2 (v4) gets no answer" lab_ping_fails n1 "$(lab_ov4 n2)"
check "off: n1 -> n2 (v6) gets no answer" lab_ping_fails n1 "$(lab_ov6 n2)"
check "off: d1 -> n1 (v4) gets no answer" lab_ping_fails d1 "$(lab_ov4 n1)"
after=$(n2n_drops)
lab_log "drops.node_to_node: $before -> $after"
check "off: show --json counts drops.node_to_node ($before -> $after)" test "$after" -ge $((before + 9))
check "off: the hub still reaches n1" lab_ping hub "$(lab_ov4 n1)"
check "off: n1 still reaches the hub after the drops" lab_ping n1 "$(lab_ov4 hub)"

# ---- "kernel": the hub's kernel forwards, its firewall decides. Taken on a
# reload (SIGHUP): the tunnels stay up.
set_mode kernel
lab_exec hub sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
hub_pid=$(lab_pid hub)
kill -HUP "$hub_pid"
must "kernel: the hub applied it on SIGHUP" \
    wait_for 10 grep -q 'node_to_node="kernel".*traffic between nodes: applied\|traffic between nodes: applied.*kernel' "$(lab_logfile hub)"
check "kernel: the same hub process (no restart)" test "$(lab_pid hub)" = "$hub_pid"
check "kernel: the hub does not warn about forwarding" \
    not grep -q 'node_to_node = "kernel" but' "$(lab_logfile hub)"
check "kernel: n1 -> n2 (v4) through the hub's kernel" wait_for 5 lab_ping1 n1 "$(lab_ov4 n2)"
check "kernel: n1 -> n2 (v6) through the hub's kernel" wait_for 5 lab_ping1 n1 "$(lab_ov6 n2)"
check "kernel: d1 -> n1 (v4) through the hub's kernel" wait_for 5 lab_ping1 d1 "$(lab_ov4 n1)"
lab_exec hub nft -f - <<EOF
table inet gwtest {
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "gw0" oifname "gw0" ip saddr $(lab_ov4 n1) ip daddr $(lab_ov4 n2) counter drop
        iifname "gw0" oifname "gw0" ip6 saddr $(lab_ov6 n1) ip6 daddr $(lab_ov6 n2) counter drop
    }
}
EOF
fw_drops() {
    lab_exec hub nft -j list chain inet gwtest forward |
        jq '[.nftables[] | .rule? // empty | .expr[] | .counter? // empty | .packets] | add'
}
before=$(n2n_drops)
check "kernel + nft rule: n1 -> n2 (v4) gets no answer" lab_ping_fails n1 "$(lab_ov4 n2)"
check "kernel + nft rule: n1 -> n2 (v6) gets no answer" lab_ping_fails n1 "$(lab_ov6 n2)"
check "kernel + nft rule: the hub's forward chain dropped them ($(fw_drops))" test "$(fw_drops)" -ge 6
check "kernel + nft rule: the device dropped none itself" test "$(n2n_drops)" -eq "$before"
check "kernel + nft rule: n2 -> d1 (v4) still passes" lab_ping n2 "$(lab_ov4 d1)"
check "kernel + nft rule: d1 -> n2 (v6) still passes" lab_ping d1 "$(lab_ov6 n2)"
check "kernel + nft rule: n1 -> hub still passes" lab_ping n1 "$(lab_ov4 hub)"
lab_exec hub nft delete table inet gwtest
check "kernel, rule gone: n1 -> n2 (v4) passes again" wait_for 5 lab_ping1 n1 "$(lab_ov4 n2)"

for p in hub "${nodes[@]}"; do
    check "$p still running" lab_alive "$p"
done
lab_finish

#!/usr/bin/env bash
# 4to6 access ("gateway4to6"): a plain WireGuard client -- wireguard-go,
# configured only with `wg set` and `ip` -- on an IPv4-only machine (n1, behind
# the NAT: the LAN has no IPv6 at all) is given 2001:db8:64:1::2 from a prefix
# the hub routes, and fetches a page from d1, an IPv6-only server on the wan
# (its IPv4 address removed). The tunnel runs over IPv4; the hub decrypts the
# client's IPv6 packets and its own stack forwards them between the TUN and
# its wan IPv6 (2001:db8:1::/64), and back.
# timeout: 180
set -euo pipefail
export GW_TEST_NAME=82-4to6
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"
need_cmd curl python3 wireguard-go wg ip
need_gatewire

PREFIX=2001:db8:64:1::/64
CLIENT6=2001:db8:64:1::2
SERVER6=$(lab_wan6 d1)
MARK="4to6-hello-$$"

lab_up 1 1

# d1: IPv6 only; the 4to6 prefix is behind the hub
lab_exec d1 ip addr del "$(lab_wan4 d1)/24" dev wan0
lab_exec d1 ip -6 route add "$PREFIX" via "$(lab_wan6 hub)"

# hub: the client owns its 4to6 address; the prefix is routed onto the TUN
conf=$(gw_hub_conf hub n1)
sed -i "s|\"$(lab_ov6 n1)/128\"\\]|\"$(lab_ov6 n1)/128\", \"$CLIENT6/128\"]|" "$conf"
grep -q "$CLIENT6/128" "$conf" || lab_die "could not give n1 its 4to6 address"
lab_exec hub sysctl -qw net.ipv6.conf.all.forwarding=1
GW_CONF=$conf gw_start_hub hub
client_routed() { lab_exec hub ip -6 route show "$CLIENT6/128" | grep -q "dev gw0"; }
must "the hub routes the client's address into its TUN" wait_for 5 client_routed

# n1: wireguard-go, configured like any WireGuard client (wg set + ip)
check "n1 has no IPv6 route outside the tunnel" not lab_sh n1 "ip -6 route show default | grep -q ."
wg_impl_start wireguard-go n1 wg0
wg_iface_setup n1 wg0 n1 51900 "$(lab_ov4 n1)/10" "$CLIENT6/64"
wg_peer n1 wg0 hub "$GW_OV4_PREFIX,::/0" "$(lab_hub_endpoint hub)" 5
lab_exec n1 ip -6 route add default dev wg0

www="$GW_TMP/www"
mkdir -p "$www"
echo "$MARK" >"$www/hello.txt"
lab_bg d1 http python3 -m http.server --bind "$SERVER6" --directory "$www" 8080
must "d1's HTTP server listens" wait_for 10 lab_sh d1 "ss -Hltn 'sport = :8080' | grep -q ."

must "n1 reaches the hub over the tunnel" wait_for 15 lab_ping1 n1 "$(lab_ov4 hub)"
check "n1 pings d1's IPv6 address through the hub" wait_for 10 lab_ping1 n1 "$SERVER6"
http_ok() {
    [ "$(lab_exec n1 curl -s --max-time 5 "http://[$SERVER6]:8080/hello.txt")" = "$MARK" ]
}
check "wireguard-go client on IPv4-only n1 fetches a page from IPv6-only d1" wait_for 10 http_ok
check "d1 saw the client's 4to6 address" grep -q "$CLIENT6" "$(lab_logfile http)"
f=$(make_file medium 20)
check "20 MiB d1 -> n1 over 4to6, intact" tcp_transfer d1 n1 "$CLIENT6" "$f" 60
check "hub still running" lab_alive hub
lab_finish

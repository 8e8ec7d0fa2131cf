# shellcheck shell=bash
# netns/lib.sh -- network-namespace lab for gatewire. Source it; do not run it.
#
# Topology built by `lab_up N_HIDDEN N_DIRECT` (every name below is a network
# namespace called "gw${GW_RUN}-<name>"):
#
#                        wan (bridge br0)
#     203.0.113.0/24 + 2001:db8:1::/64 -- no route to anything else
#   +--------+---------+--------+-------------+------------------+
#   hub .1   [hub2 .2] pub .10  d1..dM .20+    nat .254 (masquerade, nftables)
#   ::1      [::2]     ::10     ::20+            |
#                                               lan (bridge br0), 192.168.77.0/24
#                                        nat .1  +-- n1 .11, n2 .12, ... nN (IPv4 only,
#                                                    default route via .1)
#
# Overlay (gatewire / WireGuard) addresses:
#   hub 100.64.0.1 fd77:6777::1, hub2 100.64.0.2 fd77:6777::2,
#   n<i> 100.64.1.<i> fd77:6777::1:<i>, d<i> 100.64.2.<i> fd77:6777::2:<i>
#   inside 100.64.0.0/10 and fd77:6777::/48.
#
# Every namespace gets a private /run/wireguard and /run/gatewire (bind mounts of
# per-namespace directories under $GW_TMP), as if it were its own machine: the
# UAPI socket gw0.sock of one lab never collides with another lab's or the
# host's. Always enter a namespace through lab_exec/lab_bg so those mounts apply.
#
# Nothing here sends traffic anywhere but inside the namespaces it creates.

# ---------------------------------------------------------------- globals
GW_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GW_ROOT=$(cd "$GW_LIB_DIR/.." && pwd)
GATEWIRE=${GATEWIRE:-$GW_ROOT/target/release/gatewire}
GW_RUN=${GW_RUN:-$$}
GW_PFX="gw${GW_RUN}-"
GW_TMP=${GW_TMP:-/tmp/gatewire-lab.$GW_RUN}
GW_KEEP_TMP=${GW_KEEP_TMP:-0}    # 1: keep $GW_TMP even when everything passed
GW_OWN_TRAP=${GW_OWN_TRAP:-1}    # 0: caller manages lab_down itself (demo)
GW_SETSID=${GW_SETSID:-0}        # 1: lab_bg processes get their own session (demo)
GW_PASS=0
GW_FAIL=0
GW_HUB_PORT=${GW_HUB_PORT:-51820}
GW_OV4_PREFIX=100.64.0.0/10
GW_OV6_PREFIX=fd77:6777::/48
# Directories made private per namespace.
GW_PRIVATE_DIRS=(/run/wireguard /run/gatewire)
export WG_PROCESS_FOREGROUND=1 # make wireguard-go stay attached unless told otherwise

mkdir -p "$GW_TMP"/{logs,pids,keys,conf,ns,data}
# The exit trap may fire inside a command whose output goes to /dev/null:
# keep the original stdout/stderr to report on.
exec {GW_OUT_FD}>&1 {GW_ERR_FD}>&2

# ---------------------------------------------------------------- output
lab_log() { printf '[%s %s] %s\n' "$(date +%T)" "${GW_TEST_NAME:-lab}" "$*" >&2; }
lab_die() {
    printf '[%s %s] FATAL: %s\n' "$(date +%T)" "${GW_TEST_NAME:-lab}" "$*" >&2
    exit 1
}

# now in milliseconds
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# ---------------------------------------------------------------- checks
# check DESC cmd... : run cmd, record and print PASS/FAIL, never exit.
check() {
    local desc=$1
    shift
    if "$@"; then
        GW_PASS=$((GW_PASS + 1))
        printf '  ok   %s\n' "$desc" >&2
        return 0
    fi
    GW_FAIL=$((GW_FAIL + 1))
    printf '  FAIL %s   (command: %s)\n' "$desc" "$*" >&2
    return 1
}

# must DESC cmd... : like check, but the test stops here on failure.
must() {
    local desc=$1
    shift
    check "$desc" "$@" || lab_die "required step failed: $desc"
}

# assert_eq DESC EXPECTED ACTUAL
assert_eq() {
    check "$1 (expected '$2', got '$3')" test "$2" = "$3"
}

# not cmd... : succeed when cmd fails (for check/wait_for)
not() { ! "$@"; }

# lab_finish: print the tally, exit non-zero if any check failed.
lab_finish() {
    lab_log "checks: $GW_PASS passed, $GW_FAIL failed"
    if [ "$GW_FAIL" -ne 0 ]; then
        exit 1
    fi
    exit 0
}

# wait_for TIMEOUT_SECS cmd... : poll cmd every 0.2 s until it succeeds.
wait_for() {
    local timeout=$1
    shift
    local deadline=$(($(now_ms) + timeout * 1000))
    while true; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.2
    done
}

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || lab_die "missing tool: $c (run .ci/deps)"
    done
}

# lab_selfsigned HOST CERT KEY : a self-signed P-256 certificate for HOST
# (valid two days) in CERT and its key in KEY.
lab_selfsigned() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=$1" -addext "subjectAltName=DNS:$1" \
        -keyout "$3" -out "$2" >/dev/null 2>&1 ||
        lab_die "openssl could not make a test certificate for $1"
}

# lab_pebble NS DEFAULT4 [DNS] : Debian's pebble (the ACME test CA) in NS on
# its wan address (directory https://<wan4>:14000/dir, management :15000),
# validating over ports 80 and 443, with pebble-challtestsrv as its DNS
# answering DEFAULT4 for every name (lab_pebble_a changes one); DNS (ip:port)
# is another DNS server pebble asks instead (one that forwards to
# challtestsrv on 127.0.0.1:8053). Its HTTPS certificate is signed by a test
# CA, $GW_TMP/ca/ca.pem (made here unless the test made it).
lab_pebble() {
    local ns=$1 default4=$2 dns=${3:-127.0.0.1:8053} ip ca="$GW_TMP/ca" p="$GW_TMP/pebble"
    ip=$(lab_wan4 "$ns")
    mkdir -p "$ca" "$p"
    if [ ! -s "$ca/ca.pem" ]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj "/CN=gatewire test CA" -keyout "$ca/ca.key" -out "$ca/ca.pem" >/dev/null 2>&1 ||
            lab_die "openssl (test CA)"
    fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=pebble" \
        -keyout "$p/pebble.key" -out "$p/pebble.csr" >/dev/null 2>&1 || lab_die "openssl (pebble key)"
    printf 'subjectAltName=IP:%s,DNS:localhost\nbasicConstraints=CA:FALSE\n' "$ip" >"$p/pebble.ext"
    openssl x509 -req -in "$p/pebble.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial \
        -days 2 -extfile "$p/pebble.ext" -out "$p/pebble.pem" >/dev/null 2>&1 ||
        lab_die "openssl (pebble certificate)"
    cat >"$p/pebble.json" <<EOF
{"pebble": {"listenAddress": "$ip:14000", "managementListenAddress": "$ip:15000",
  "certificate": "$p/pebble.pem", "privateKey": "$p/pebble.key",
  "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF
    lab_bg "$ns" challtestsrv pebble-challtestsrv -dns01 "127.0.0.1:8053" -http01 "" -https01 "" \
        -tlsalpn01 "" -management "127.0.0.1:8055" -defaultIPv4 "$default4" -defaultIPv6 ""
    wait_for 15 lab_sh "$ns" "ss -Hltn 'sport = :8055' | grep -q ." || lab_die "challtestsrv did not start"
    lab_bg "$ns" pebble env PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 \
        pebble -config "$p/pebble.json" -dnsserver "$dns"
    wait_for 15 lab_sh "$ns" "ss -Hltn 'sport = :14000' | grep -q ." || lab_die "pebble did not start"
}

# lab_pebble_a NS HOST IPV4 : pebble's DNS (started by lab_pebble in NS)
# answers IPV4 for HOST
lab_pebble_a() {
    lab_exec "$1" curl -sS --max-time 5 -X POST -d "{\"host\":\"$2\",\"addresses\":[\"$3\"]}" \
        http://127.0.0.1:8055/add-a >/dev/null || lab_die "challtestsrv: add-a $2"
}

# lab_acme_delegation NS DOMAIN TARGET4 : dnsmasq in NS on 127.0.0.1:5300
# (log `resolver`, queries logged) standing for the operator's NS delegation
# of _acme-challenge.DOMAIN to TARGET4 port 53; every other name goes to
# pebble-challtestsrv (127.0.0.1:8053). Give 127.0.0.1:5300 to lab_pebble as
# its DNS.
lab_acme_delegation() {
    lab_bg "$1" resolver dnsmasq -k --port=5300 --listen-address=127.0.0.1 --bind-interfaces \
        --no-resolv --no-hosts --cache-size=0 --log-queries --log-facility=- \
        --pid-file="$GW_TMP/resolver.pid" \
        --server="/_acme-challenge.$2/$3#53" --server="127.0.0.1#8053"
}

# lab_etcd NS : a one-member etcd (Debian's etcd-server) on NS's wan address,
# port 2379; `lab_etcd_url NS` is its client URL
lab_etcd_url() { echo "http://$(lab_wan4 "$1"):2379"; }
lab_etcd() {
    local url
    url=$(lab_etcd_url "$1")
    lab_bg "$1" etcd etcd --name e1 --data-dir "$GW_TMP/etcd" \
        --listen-client-urls "$url" --advertise-client-urls "$url" \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster e1=http://127.0.0.1:2380 --log-level warn
}

need_gatewire() {
    [ -x "$GATEWIRE" ] || lab_die "gatewire binary not found at $GATEWIRE (cargo build --release, or set GATEWIRE=)"
}

# ---------------------------------------------------------------- namespaces
# lab_ns NAME -> full namespace name
lab_ns() {
    case $1 in
    "$GW_PFX"*) echo "$1" ;;
    *) echo "${GW_PFX}$1" ;;
    esac
}

# short name of a namespace (strip the run prefix)
_lab_short() { echo "${1#"$GW_PFX"}"; }

lab_ns_exists() { [ -e "/run/netns/$(lab_ns "$1")" ]; }

# _lab_argv NS cmd... : set LAB_ARGV to the command line that runs cmd in NS.
# ip netns exec already runs its command in a fresh mount namespace (slave of
# the host's), so the bind mounts stay private to that command and its children.
# A test may give a namespace its own /etc/hosts and /etc/resolv.conf by
# writing them into $GW_TMP/ns/SHORT/ (names that resolve only there).
_lab_argv() {
    local short full
    short=$(_lab_short "$1")
    full=$(lab_ns "$1")
    shift
    # shellcheck disable=SC2016
    LAB_ARGV=(ip netns exec "$full" bash -c '
        d=$1; shift
        for p in /run/wireguard /run/gatewire; do
            mount --bind "$d/${p##*/}" "$p" || exit 125
        done
        for f in hosts resolv.conf; do
            if [ -e "$d/$f" ]; then mount --bind "$d/$f" "/etc/$f" || exit 125; fi
        done
        exec "$@"' lab-exec "$GW_TMP/ns/$short" "$@")
}

# lab_exec NS cmd... : run cmd inside namespace NS (short or full name).
lab_exec() {
    _lab_argv "$@"
    "${LAB_ARGV[@]}"
}

# lab_sh NS 'shell code' : convenience for pipelines inside a namespace
lab_sh() {
    local ns=$1
    shift
    lab_exec "$ns" bash -c "$*"
}

_lab_netns_add() {
    local short=$1 full
    full=$(lab_ns "$short")
    ip netns add "$full"
    local p
    for p in "${GW_PRIVATE_DIRS[@]}"; do
        mkdir -p "$p" "$GW_TMP/ns/$short/${p##*/}"
    done
    ip -n "$full" link set lo up
    # No IPv6 DAD delays, no router solicitations: addresses are usable at once.
    ip netns exec "$full" sysctl -qw net.ipv6.conf.all.accept_dad=0 \
        net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.default.accept_ra=0 \
        net.ipv6.conf.all.accept_ra=0 >/dev/null
}

# _lab_attach SEGMENT NAME IFNAME: veth from segment bridge ns to NAME's IFNAME
_lab_attach() {
    local seg=$1 name=$2 ifname=$3
    ip -n "$(lab_ns "$seg")" link add "$name" type veth peer name "$ifname" netns "$(lab_ns "$name")"
    ip -n "$(lab_ns "$seg")" link set "$name" master br0 up
    ip -n "$(lab_ns "$name")" link set "$ifname" up
}

_lab_segment() {
    local seg=$1
    _lab_netns_add "$seg"
    ip -n "$(lab_ns "$seg")" link add br0 type bridge
    ip -n "$(lab_ns "$seg")" link set br0 up
    # A segment is a plain switch: where the host has br_netfilter loaded (as
    # container hosts do), bridged frames would otherwise run through the
    # iptables hooks of the segment's namespace.
    if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
        local k
        for k in iptables ip6tables arptables; do
            ip netns exec "$(lab_ns "$seg")" sysctl -qw "net.bridge.bridge-nf-call-$k=0" ||
                lab_die "cannot turn off bridge-nf-call-$k in segment $seg"
        done
    fi
}

# underlay addresses
lab_wan4() {
    case $1 in
    hub) echo 203.0.113.1 ;;
    hub2) echo 203.0.113.2 ;;
    pub) echo 203.0.113.10 ;;
    nat) echo 203.0.113.254 ;;
    d*) echo "203.0.113.$((19 + ${1#d}))" ;;
    *) return 1 ;;
    esac
}
lab_wan6() {
    case $1 in
    hub) echo 2001:db8:1::1 ;;
    hub2) echo 2001:db8:1::2 ;;
    pub) echo 2001:db8:1::10 ;;
    nat) echo 2001:db8:1::254 ;;
    d*) echo "2001:db8:1::$((19 + ${1#d}))" ;;
    *) return 1 ;;
    esac
}
lab_lan4() {
    case $1 in
    nat) echo 192.168.77.1 ;;
    n*) echo "192.168.77.$((10 + ${1#n}))" ;;
    *) return 1 ;;
    esac
}
# overlay addresses
lab_ov4() {
    case $1 in
    hub) echo 100.64.0.1 ;;
    hub2) echo 100.64.0.2 ;;
    n*) echo "100.64.1.${1#n}" ;;
    d*) echo "100.64.2.${1#d}" ;;
    x*) echo "100.64.3.${1#x}" ;;
    *) return 1 ;;
    esac
}
lab_ov6() {
    case $1 in
    hub) echo fd77:6777::1 ;;
    hub2) echo fd77:6777::2 ;;
    n*) echo "fd77:6777::1:${1#n}" ;;
    d*) echo "fd77:6777::2:${1#d}" ;;
    x*) echo "fd77:6777::3:${1#x}" ;;
    *) return 1 ;;
    esac
}
# where a node reaches the hub (its underlay address, v4)
lab_hub_endpoint() { echo "$(lab_wan4 "${1:-hub}"):$GW_HUB_PORT"; }

# lab_wan_host NAME : add a host namespace NAME on the wan segment
lab_wan_host() {
    local name=$1
    _lab_netns_add "$name"
    _lab_attach wan "$name" wan0
    ip -n "$(lab_ns "$name")" addr add "$(lab_wan4 "$name")/24" dev wan0
    ip -n "$(lab_ns "$name")" addr add "$(lab_wan6 "$name")/64" dev wan0 nodad
}

# lab_add_hub2 : the room for a second hub
lab_add_hub2() { lab_wan_host hub2; }

# lab_up N_HIDDEN N_DIRECT
lab_up() {
    local nh=${1:-2} nd=${2:-1} i
    need_cmd ip nft
    if [ "$GW_OWN_TRAP" = 1 ]; then
        trap _lab_on_exit EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    lab_log "lab up: run $GW_RUN, $nh hidden + $nd direct nodes, tmp $GW_TMP"
    _lab_segment wan
    lab_wan_host hub
    lab_wan_host pub
    for ((i = 1; i <= nd; i++)); do lab_wan_host "d$i"; done
    if [ "$nh" -gt 0 ]; then
        lab_wan_host nat
        _lab_segment lan
        _lab_attach lan nat lan0
        local natns
        natns=$(lab_ns nat)
        ip -n "$natns" addr add "$(lab_lan4 nat)/24" dev lan0
        ip netns exec "$natns" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
        _lab_nat_rules 40000-40099
        for ((i = 1; i <= nh; i++)); do
            _lab_netns_add "n$i"
            _lab_attach lan "n$i" lan0
            ip -n "$(lab_ns "n$i")" addr add "$(lab_lan4 "n$i")/24" dev lan0
            ip -n "$(lab_ns "n$i")" route add default via "$(lab_lan4 nat)"
        done
    fi
    echo "$nh" >"$GW_TMP/n_hidden"
    echo "$nd" >"$GW_TMP/n_direct"
}

# Masquerade LAN traffic leaving on wan0; TCP/UDP source ports come from RANGE.
_lab_nat_rules() {
    local range=$1
    lab_exec nat nft -f - <<EOF
table ip gwnat
delete table ip gwnat
table ip gwnat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr 192.168.77.0/24 meta l4proto { tcp, udp } masquerade to :$range
        oifname "wan0" ip saddr 192.168.77.0/24 masquerade
    }
}
EOF
    echo "$range" >"$GW_TMP/nat_range"
}

# nat_rebind : the NAT forgets its mappings and picks source ports from the
# other range (40000-40099 <-> 50000-50099), as a home router that rebooted.
nat_rebind() {
    local cur new
    cur=$(cat "$GW_TMP/nat_range")
    if [ "$cur" = 40000-40099 ]; then new=50000-50099; else new=40000-40099; fi
    _lab_nat_rules "$new"
    lab_exec nat conntrack -F >/dev/null 2>&1 || true
    lab_log "nat_rebind: masquerade ports $cur -> $new, conntrack flushed"
}

# the lower end of the NAT's current port range
nat_port_min() { cut -d- -f1 "$GW_TMP/nat_range"; }
nat_port_max() { cut -d- -f2 "$GW_TMP/nat_range"; }

# lab_hosts NS "ADDR NAME"... : /etc/hosts as seen inside NS (ip netns exec
# bind-mounts /etc/netns/<ns>/hosts over /etc/hosts). Removed by lab_down.
lab_hosts() {
    local ns=$1 d
    shift
    d="/etc/netns/$(lab_ns "$ns")"
    mkdir -p "$d"
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost"
        printf '%s\n' "$@"
    } >"$d/hosts"
}

# all namespaces of this run
lab_list() { ip netns list | awk '{print $1}' | grep "^${GW_PFX}" || true; }

# lab_down : kill every process in this run's namespaces, delete them. Idempotent.
lab_down() {
    local ns pids f pid
    # processes we recorded (they may be outside a namespace, e.g. wrappers)
    for f in "$GW_TMP"/pids/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ns in $(lab_list); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
        fi
    done
    local tries=0
    while [ $tries -lt 25 ]; do
        pids=""
        for ns in $(lab_list); do
            pids="$pids $(ip netns pids "$ns" 2>/dev/null || true)"
        done
        [ -z "${pids// /}" ] && break
        sleep 0.2
        tries=$((tries + 1))
    done
    for ns in $(lab_list); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
    done
    for f in "$GW_TMP"/pids/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f")
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    for ns in $(lab_list); do
        rm -rf "/etc/netns/$ns"
    done
    for ns in $(lab_list); do
        ip netns del "$ns" 2>/dev/null || true
    done
    sleep 0.1
    for ns in $(lab_list); do
        ip netns del "$ns" 2>/dev/null || lab_log "warning: could not delete namespace $ns"
    done
}

_lab_dump_logs() {
    local f
    for f in "$GW_TMP"/logs/*.log; do
        [ -s "$f" ] || continue
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n "${GW_LOG_TAIL:-25}" "$f" >&2
    done
}

_lab_on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    exec 1>&"$GW_OUT_FD" 2>&"$GW_ERR_FD"
    if [ "$rc" -ne 0 ]; then
        lab_log "exit status $rc; process logs follow"
        _lab_dump_logs
    fi
    lab_down
    rm -rf "$GW_TMP/data" # big random files; logs and configs stay on failure
    if [ "$rc" -eq 0 ] && [ "$GW_KEEP_TMP" != 1 ]; then
        rm -rf "$GW_TMP"
    else
        lab_log "kept $GW_TMP"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- processes
# lab_bg NS NAME cmd... : start cmd in the background inside NS; pid in
# $GW_TMP/pids/NAME.pid, output appended to $GW_TMP/logs/NAME.log.
lab_bg() {
    local ns=$1 name=$2
    shift 2
    printf -- '--- %s start: %s\n' "$(date +%T.%N)" "$*" >>"$GW_TMP/logs/$name.log"
    _lab_argv "$ns" "$@"
    if [ "${GW_SETSID:-0}" = 1 ]; then
        # own session: survives the terminal (or job) that started it
        LAB_ARGV=(setsid "${LAB_ARGV[@]}")
    fi
    (exec "${LAB_ARGV[@]}" >>"$GW_TMP/logs/$name.log" 2>&1 </dev/null) &
    echo $! >"$GW_TMP/pids/$name.pid"
}

lab_pid() { cat "$GW_TMP/pids/$1.pid" 2>/dev/null; }

# lab_notify NS : a service manager's readiness socket (Type=notify), run in
# NS as the lab process "notify": give a daemon
# NOTIFY_SOCKET="$GW_TMP/notify.sock"; each message it sends becomes one line
# of "$GW_TMP/notify.log".
lab_notify() {
    : >"$GW_TMP/notify.log"
    cat >"$GW_TMP/notify.py" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as out:
    while True:
        out.write(s.recv(4096).decode().replace("\n", " ") + "\n")
        out.flush()
EOF
    lab_bg "$1" notify python3 "$GW_TMP/notify.py" "$GW_TMP/notify.sock" "$GW_TMP/notify.log"
    wait_for 5 test -S "$GW_TMP/notify.sock" || lab_die "the notify socket did not come up"
}

# lab_nginx NS NAME HTTP_BODY [CONNECTIONS] : runs nginx (one worker) in NS as
# the lab process NAME, with HTTP_BODY (server blocks and http directives) in
# its http block; its files are under $GW_TMP/NAME.
lab_nginx() {
    local ns=$1 name=$2 body=$3 conns=${4:-256}
    local d="$GW_TMP/$name"
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections $conns; }
http {
    access_log off;
    client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp;
    uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
$body
}
EOF
    lab_bg "$ns" "$name" nginx -c "$d/nginx.conf" -e "$d/error.log"
}
lab_logfile() { echo "$GW_TMP/logs/$1.log"; }
lab_alive() {
    local pid
    pid=$(lab_pid "$1") || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# lab_stop NAME [SIGNAL] : signal a lab_bg process and wait (5 s, then KILL).
# (stderr muted: bash reports "Killed" for a job that died of SIGKILL)
lab_stop() { _lab_stop "$@" 2>/dev/null; }
_lab_stop() {
    local name=$1 sig=${2:-TERM} pid i
    pid=$(lab_pid "$name") || return 0
    [ -n "$pid" ] || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -f "$GW_TMP/pids/$name.pid"
}

# exit status of a lab_bg process that has ended (waits for it)
lab_wait() {
    local pid
    pid=$(lab_pid "$1")
    local rc=0
    wait "$pid" || rc=$?
    rm -f "$GW_TMP/pids/$1.pid"
    return "$rc"
}

# ---------------------------------------------------------------- keys
# lab_key NAME : make a key pair for NAME (once); files keys/NAME.{key,pub}
lab_key() {
    local n=$1
    [ -s "$GW_TMP/keys/$n.key" ] && return 0
    (umask 077 && wg genkey >"$GW_TMP/keys/$n.key")
    wg pubkey <"$GW_TMP/keys/$n.key" >"$GW_TMP/keys/$n.pub"
}
lab_priv() { lab_key "$1" && cat "$GW_TMP/keys/$1.key"; }
lab_pub() { lab_key "$1" && cat "$GW_TMP/keys/$1.pub"; }
lab_keyfile() { lab_key "$1" && echo "$GW_TMP/keys/$1.key"; }

# ---------------------------------------------------------------- gatewire
# gw_hub_conf HUB PEER... : write $GW_TMP/conf/HUB.toml; print its path.
# Env: GW_HUB_KEEPALIVE (4), GW_HUB_IFACE (gw0), GW_MTU (1420)
gw_hub_conf() {
    local hub=$1 p f
    shift
    f="$GW_TMP/conf/$hub.toml"
    {
        cat <<EOF
[hub]
private_key = "$(lab_priv "$hub")"
interface = "${GW_HUB_IFACE:-gw0}"
listen_port = $GW_HUB_PORT
addresses = ["$(lab_ov4 "$hub")/10", "$(lab_ov6 "$hub")/48"]
mtu = ${GW_MTU:-1420}
keepalive = ${GW_HUB_KEEPALIVE:-4}
EOF
        for p in "$@"; do
            cat <<EOF

[[peer]]
name = "$p"
public_key = "$(lab_pub "$p")"
allowed_ips = ["$(lab_ov4 "$p")/32", "$(lab_ov6 "$p")/128"]
EOF
        done
    } >"$f"
    echo "$f"
}

# gw_node_conf NODE HUB [HUB...] : write $GW_TMP/conf/NODE.toml; print its path.
# The first hub carries the whole overlay, further ones only their own address.
# Env: GW_ENDPOINT (endpoint of the first hub, default its wan IPv4:port),
# GW_DEAD_AFTER (8), GW_PKA (5), GW_NODE_IFACE (gwn0), GW_MTU (1420)
gw_node_conf() {
    local node=$1 h first=1 allowed f ep
    shift
    f="$GW_TMP/conf/$node.toml"
    {
        cat <<EOF
[node]
private_key = "$(lab_priv "$node")"
interface = "${GW_NODE_IFACE:-gwn0}"
addresses = ["$(lab_ov4 "$node")/10", "$(lab_ov6 "$node")/48"]
mtu = ${GW_MTU:-1420}
dead_after = ${GW_DEAD_AFTER:-8}
EOF
        for h in "$@"; do
            ep=""
            if [ $first = 1 ]; then
                ep=${GW_ENDPOINT:-}
                allowed="\"$GW_OV4_PREFIX\", \"$GW_OV6_PREFIX\""
            else
                allowed="\"$(lab_ov4 "$h")/32\", \"$(lab_ov6 "$h")/128\""
            fi
            first=0
            cat <<EOF

[[hub]]
name = "$h"
public_key = "$(lab_pub "$h")"
endpoint = "${ep:-$(lab_hub_endpoint "$h")}"
allowed_ips = [$allowed]
persistent_keepalive = ${GW_PKA:-5}
EOF
        done
    } >"$f"
    echo "$f"
}

# iface_up NS IFACE : true once IFACE exists and is up in NS
iface_up() {
    lab_exec "$1" ip -o link show dev "$2" 2>/dev/null | grep -q ',UP'
}

# uapi_ready NS IFACE : the UAPI socket of IFACE exists in NS's /run/wireguard
uapi_ready() { [ -S "$GW_TMP/ns/$(_lab_short "$1")/wireguard/$2.sock" ]; }

# gw_start_hub HUB [PEER...] : write config (unless GW_CONF given) and start
# `gatewire hub` in namespace HUB as process "HUB"; wait for gw0.
gw_start_hub() {
    local hub=$1 conf
    shift
    need_gatewire
    if [ -n "${GW_CONF:-}" ]; then conf=$GW_CONF; else conf=$(gw_hub_conf "$hub" "$@"); fi
    lab_bg "$hub" "$hub" env NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$GATEWIRE" hub --config "$conf"
    if ! wait_for 10 iface_up "$hub" "${GW_HUB_IFACE:-gw0}"; then
        lab_die "gatewire hub in $hub did not bring up ${GW_HUB_IFACE:-gw0} within 10 s"
    fi
}

# gw_restart_hub HUB : start it again with the config already written
gw_restart_hub() {
    GW_CONF="$GW_TMP/conf/$1.toml" gw_start_hub "$1"
}

# gw_start_node NODE HUB... : as gw_start_hub, for node mode
gw_start_node() {
    local node=$1 conf
    shift
    need_gatewire
    if [ -n "${GW_CONF:-}" ]; then conf=$GW_CONF; else conf=$(gw_node_conf "$node" "$@"); fi
    lab_bg "$node" "$node" env NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$GATEWIRE" node --config "$conf"
    if ! wait_for 10 iface_up "$node" "${GW_NODE_IFACE:-gwn0}"; then
        lab_die "gatewire node in $node did not bring up ${GW_NODE_IFACE:-gwn0} within 10 s"
    fi
}

gw_restart_node() {
    GW_CONF="$GW_TMP/conf/$1.toml" gw_start_node "$1"
}

# gw_show_json NS [IFACE] : `gatewire show --json` inside NS
gw_show_json() {
    local ns=$1
    shift
    lab_exec "$ns" "$GATEWIRE" show --json "$@"
}

# ---------------------------------------------------------------- plain WireGuard
# wg_impl_start IMPL NS IFACE : start a userspace WireGuard implementation that
# is configured only through UAPI. IMPL: wireguard-go | gatewire | boringtun.
# Process name: "IMPL-NS-IFACE" (see lab_pid).
BORINGTUN=${BORINGTUN:-}
wg_impl_start() {
    local impl=$1 ns=$2 ifc=$3 name
    name="$impl-$(_lab_short "$ns")-$ifc"
    case $impl in
    wireguard-go)
        lab_bg "$ns" "$name" env LOG_LEVEL="${WGGO_LOG:-error}" wireguard-go -f "$ifc"
        ;;
    gatewire)
        need_gatewire
        lab_bg "$ns" "$name" env NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$GATEWIRE" wg "$ifc" --foreground
        ;;
    boringtun)
        [ -n "$BORINGTUN" ] || lab_die "BORINGTUN (path to boringtun-cli) not set"
        # shellcheck disable=SC2086 # BORINGTUN_ARGS is a word list
        lab_bg "$ns" "$name" "$BORINGTUN" --foreground --disable-drop-privileges \
            ${BORINGTUN_ARGS:-} "$ifc"
        ;;
    *) lab_die "unknown WireGuard implementation $impl" ;;
    esac
    wait_for 10 uapi_ready "$ns" "$ifc" || lab_die "$impl: no UAPI socket for $ifc in $ns after 10 s"
}

# wg_iface_setup NS IFACE KEYNAME LISTEN_PORT ADDR4/LEN [ADDR6/LEN] : key,
# port, addresses, MTU (GW_MTU, 1420), up.
wg_iface_setup() {
    local ns=$1 ifc=$2 key=$3 port=$4 a4=$5 a6=${6:-}
    lab_exec "$ns" wg set "$ifc" private-key "$(lab_keyfile "$key")" listen-port "$port"
    lab_exec "$ns" ip addr add "$a4" dev "$ifc"
    if [ -n "$a6" ]; then
        lab_exec "$ns" ip -6 addr add "$a6" dev "$ifc" nodad
    fi
    lab_exec "$ns" ip link set "$ifc" mtu "${GW_MTU:-1420}" up
}

# wg_peer NS IFACE PEERKEYNAME ALLOWED [ENDPOINT] [KEEPALIVE]
wg_peer() {
    local ns=$1 ifc=$2 peer=$3 allowed=$4 ep=${5:-} ka=${6:-}
    local args=(peer "$(lab_pub "$peer")" allowed-ips "$allowed")
    [ -n "$ep" ] && args+=(endpoint "$ep")
    [ -n "$ka" ] && args+=(persistent-keepalive "$ka")
    lab_exec "$ns" wg set "$ifc" "${args[@]}"
}

# ---------------------------------------------------------------- traffic
# lab_ping NS ADDR [COUNT] : true if at least one reply arrives
lab_ping() {
    local ns=$1 addr=$2 count=${3:-3}
    lab_exec "$ns" ping -q -n -c "$count" -i 0.2 -W 1 "$addr" >/dev/null 2>&1
}

# lab_ping1 NS ADDR : one echo, 1 s timeout
lab_ping1() { lab_exec "$1" ping -q -n -c 1 -W 1 "$2" >/dev/null 2>&1; }

# lab_ping_fails NS ADDR : true if none of 3 pings is answered
lab_ping_fails() { ! lab_exec "$1" ping -q -n -c 3 -i 0.2 -W 1 "$2" >/dev/null 2>&1; }

# make_file NAME MB : random file under $GW_TMP/data, prints its path
make_file() {
    local f="$GW_TMP/data/$1"
    [ -s "$f" ] || head -c "$2M" /dev/urandom >"$f"
    echo "$f"
}

_sock_addr() {
    case $1 in
    *:*) echo "[$1]" ;;
    *) echo "$1" ;;
    esac
}

# tcp_transfer SRC_NS DST_NS DST_ADDR FILE [TIMEOUT] [PORT] : send FILE from
# SRC to a listener in DST over TCP, compare sha256. Prints MB/s on success.
tcp_transfer() {
    local src=$1 dst=$2 addr=$3 file=$4 tmo=${5:-120} port=${6:-5201} out name
    name="rx-$(_lab_short "$dst")-$port"
    out="$GW_TMP/data/$name.out"
    rm -f "$out"
    local pf=TCP4
    case $addr in *:*) pf=TCP6 ;; esac
    lab_bg "$dst" "$name" timeout "$tmo" socat -u "$pf-LISTEN:$port,reuseaddr" "CREATE:$out"
    if ! wait_for 5 lab_sh "$dst" "ss -Hltn 'sport = :$port' | grep -q ."; then
        lab_log "tcp_transfer: listener in $dst did not start"
        return 1
    fi
    local t0 t1 rc=0
    t0=$(now_ms)
    lab_exec "$src" timeout "$tmo" socat -u "OPEN:$file,rdonly" "$pf:$(_sock_addr "$addr"):$port,connect-timeout=5" || rc=$?
    if [ $rc -ne 0 ]; then
        lab_log "tcp_transfer: sender in $src failed (rc $rc)"
        lab_stop "$name"
        return 1
    fi
    # receiver exits once it has read EOF
    lab_wait "$name" || true
    t1=$(now_ms)
    local h1 h2
    h1=$(sha256sum <"$file" | cut -d' ' -f1)
    h2=$(sha256sum <"$out" | cut -d' ' -f1)
    local sz
    sz=$(stat -c %s "$out")
    rm -f "$out"
    if [ "$h1" != "$h2" ]; then
        lab_log "tcp_transfer: hash mismatch ($sz of $(stat -c %s "$file") bytes arrived)"
        return 1
    fi
    local ms=$((t1 - t0))
    [ $ms -gt 0 ] || ms=1
    lab_log "tcp_transfer $(_lab_short "$src") -> $(_lab_short "$dst") [$addr]: $((sz / 1048576)) MiB intact in ${ms} ms ($((sz * 1000 / 1048576 / ms)) MiB/s)"
}

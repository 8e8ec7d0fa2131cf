#!/usr/bin/env bash
# Provision one VM of vagrant/Vagrantfile: provision.sh ROLE INDEX
#   ROLE hub | nat | node; INDEX is the node number (1, 2) for nodes.
# Environment: GW_KEY_HUB, GW_KEY_NODE1, GW_KEY_NODE2 (private keys, base64),
# GW_SRC (the synced repository, default /gatewire).
# Idempotent: running it again rewrites configs and restarts the services.
set -euo pipefail

role=${1:?usage: provision.sh hub|nat|node [INDEX]}
idx=${2:-0}
SRC=${GW_SRC:-/gatewire}
PORT=51820
export DEBIAN_FRONTEND=noninteractive

log() { echo "provision[$role$([ "$role" = node ] && echo "$idx")]: $*"; }

# interface that carries ADDR (the private networks' names vary by provider)
iface_of() { ip -o -4 addr show | awk -v a="$1" '{split($4, p, "/"); if (p[1] == a) print $2}'; }

apt_install() {
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
}

pubkey_of() { printf '%s\n' "$1" | wg pubkey; }

install_gatewire() {
    if [ -f /tmp/gatewire-prebuilt ] && chmod +x /tmp/gatewire-prebuilt && /tmp/gatewire-prebuilt --version >/dev/null 2>&1; then
        log "using the prebuilt binary uploaded from the host"
        install -m 0755 /tmp/gatewire-prebuilt /usr/local/bin/gatewire
        return
    fi
    log "building gatewire from $SRC"
    apt_install build-essential pkg-config curl ca-certificates
    if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
        log "installing a Rust toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
    (cd "$SRC" && CARGO_TARGET_DIR=/var/tmp/gatewire-target cargo build --release --locked)
    install -m 0755 /var/tmp/gatewire-target/release/gatewire /usr/local/bin/gatewire
}

# write_key NAME BASE64 : /etc/gatewire/NAME.key, root only
write_key() {
    install -d -m 0700 /etc/gatewire
    (umask 077 && printf '%s\n' "$2" >"/etc/gatewire/$1.key")
}

unit() { # NAME DESCRIPTION EXEC [AFTER]
    local kind="Type=simple"
    # gatewire itself says when it is ready, reloads on SIGHUP and pings the
    # watchdog (Type=notify-reload needs systemd 253; this works before it).
    case $3 in
    /usr/local/bin/gatewire\ *)
        kind="Type=notify
ExecReload=/bin/kill -HUP \$MAINPID
WatchdogSec=30"
        ;;
    esac
    cat >"/etc/systemd/system/$1.service" <<EOF
[Unit]
Description=$2
Wants=network-online.target
After=network-online.target ${4:-}

[Service]
$kind
Environment=RUST_LOG=info
ExecStart=$3
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable "$1.service"
    systemctl restart "$1.service"
}

apt_install wireguard-tools nftables conntrack iproute2 iputils-ping jq socat iperf3 curl ca-certificates python3

case $role in
hub)
    : "${GW_KEY_HUB:?}" "${GW_KEY_NODE1:?}" "${GW_KEY_NODE2:?}"
    install_gatewire
    write_key hub "$GW_KEY_HUB"
    cat >/etc/gatewire/hub.toml <<EOF
[hub]
private_key_file = "/etc/gatewire/hub.key"
interface = "gw0"
listen_port = $PORT
addresses = ["100.64.0.1/10", "fd77:6777::1/48"]
mtu = 1420
keepalive = 4

[[peer]]
name = "node1"
public_key = "$(pubkey_of "$GW_KEY_NODE1")"
allowed_ips = ["100.64.1.1/32", "fd77:6777::1:1/128"]

[[peer]]
name = "node2"
public_key = "$(pubkey_of "$GW_KEY_NODE2")"
allowed_ips = ["100.64.1.2/32", "fd77:6777::1:2/128"]

# The reverse proxy: web.gw.lab is served by both nodes' web page (IPv6-only
# backends, over their tunnels), balanced, with failover.
[proxy]
domains = ["gw.lab"]
http_listen = ["0.0.0.0:80", "[::]:80"]

[[route]]
name = "web"
backends = ["http://[fd77:6777::1:1]:8080", "http://[fd77:6777::1:2]:8080"]
health_check = "http"
EOF
    gatewire hub --config /etc/gatewire/hub.toml --check
    unit gatewire-hub "gatewire hub" "/usr/local/bin/gatewire hub --config /etc/gatewire/hub.toml"
    log "hub up on 203.0.113.1:$PORT, public key $(pubkey_of "$GW_KEY_HUB")"
    ;;

nat)
    wan=$(iface_of 203.0.113.254)
    lan=$(iface_of 192.168.77.1)
    if [ -z "$wan" ] || [ -z "$lan" ]; then
        log "cannot find the wan/lan interfaces"
        exit 1
    fi
    echo "net.ipv4.ip_forward = 1" >/etc/sysctl.d/90-gatewire-nat.conf
    sysctl -q -p /etc/sysctl.d/90-gatewire-nat.conf
    cat >/etc/nftables.conf <<EOF
#!/usr/sbin/nft -f
# gatewire lab NAT: the lan ($lan) reaches the wan ($wan) masqueraded;
# the wan reaches the lan only in answer to that.
flush ruleset
table ip gatewire_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "$wan" ip saddr 192.168.77.0/24 masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "$lan" oifname "$wan" ip saddr 192.168.77.0/24 accept
        iifname "$wan" oifname "$lan" ct state established,related accept
    }
}
EOF
    systemctl enable nftables.service
    systemctl restart nftables.service
    log "masquerading 192.168.77.0/24 ($lan) behind 203.0.113.254 ($wan)"
    ;;

node)
    case $idx in
    1) key=${GW_KEY_NODE1:?} ;;
    2) key=${GW_KEY_NODE2:?} ;;
    *)
        log "unknown node index $idx"
        exit 1
        ;;
    esac
    : "${GW_KEY_HUB:?}"
    install_gatewire
    write_key node "$key"
    # the wan only through the nat VM
    cat >/etc/systemd/system/gatewire-wan-route.service <<EOF
[Unit]
Description=route to the gatewire lab wan via the nat VM
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip route replace 203.0.113.0/24 via 192.168.77.1

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable gatewire-wan-route.service
    systemctl restart gatewire-wan-route.service
    cat >/etc/gatewire/node.toml <<EOF
[node]
private_key_file = "/etc/gatewire/node.key"
interface = "gwn0"
addresses = ["100.64.1.$idx/10", "fd77:6777::1:$idx/48"]
mtu = 1420
dead_after = 8

[[hub]]
name = "hub"
public_key = "$(pubkey_of "$GW_KEY_HUB")"
endpoint = "203.0.113.1:$PORT"
allowed_ips = ["100.64.0.0/10", "fd77:6777::/48"]
persistent_keepalive = 5
EOF
    gatewire node --config /etc/gatewire/node.toml --check
    unit gatewire-node "gatewire node" "/usr/local/bin/gatewire node --config /etc/gatewire/node.toml" \
        gatewire-wan-route.service
    # A web page on the overlay only: a backend of web.gw.lab on the hub.
    install -d /var/www/gatewire
    echo "hello from node$idx" >/var/www/gatewire/index.html
    unit gatewire-web "web page for web.gw.lab" \
        "/usr/bin/python3 -m http.server 8080 --bind fd77:6777::1:$idx --directory /var/www/gatewire" \
        gatewire-node.service
    ok=0
    for _ in $(seq 30); do
        if ping -q -c 1 -W 1 100.64.0.1 >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 1
    done
    if [ $ok = 1 ]; then
        log "node$idx reaches the hub at 100.64.0.1 through the NAT"
    else
        log "WARNING: node$idx does not reach the hub yet (is the nat VM up?)"
    fi
    ;;

*)
    log "unknown role $role"
    exit 1
    ;;
esac

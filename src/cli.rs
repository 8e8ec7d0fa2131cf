//! The command line: `gatewire genkey|pubkey|hub|node|show|wg`.

use crate::config::{HubConfig, NodeConfig};
use crate::keys::PrivateKey;
use crate::wg::api::{self, ApiServer};
use crate::wg::device::{Device, DeviceConfig, Mode, ShowInterface};
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{debug, error, warn};

#[derive(Parser)]
#[command(
    name = "gatewire",
    version,
    about = "A web gateway for hidden nodes over userspace WireGuard"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Run the hub: concentrate node tunnels on a public gateway.
    Hub {
        #[arg(short, long)]
        config: PathBuf,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Run a hidden node: dial out to one or more hubs.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Node {
        #[arg(short, long, required = true)]
        config: Option<PathBuf>,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
        #[command(subcommand)]
        cmd: Option<NodeCmd>,
    },
    /// Show running gatewire interfaces (like `wg show`, plus drop counters).
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// One interface; all gatewire interfaces when omitted.
        interface: Option<String>,
    },
    /// A plain userspace WireGuard interface configured through the UAPI socket
    /// (`wg setconf`), like wireguard-go; usable as wg-quick's
    /// WG_QUICK_USERSPACE_IMPLEMENTATION.
    Wg {
        interface: String,
        /// Stay in the foreground (also when WG_PROCESS_FOREGROUND=1).
        #[arg(short, long)]
        foreground: bool,
    },
    /// Yggdrasil identities: `keygen`, `address <pubkey>`.
    Ygg {
        #[command(subcommand)]
        cmd: YggCmd,
    },
    /// The hub's admin API: peers, routes, names, join tokens, metrics.
    Ctl(Box<crate::control::client::CtlArgs>),
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Enrol with a hub using a join token, and write the node config.
    Join(crate::control::join::JoinArgs),
}

#[derive(Subcommand)]
enum YggCmd {
    /// Print a new Yggdrasil private key (the daemon's 128-hex PrivateKey, for
    /// `[yggdrasil] private_key`), its public key, address and subnet.
    Keygen {
        /// Print JSON (the daemon's `PrivateKey`/`PublicKey` fields and more).
        #[arg(long)]
        json: bool,
    },
    /// Print the 200::/7 address and 300::/64 subnet of a public key (64 hex).
    Address { public_key: String },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Completes on the first SIGINT or SIGTERM.
type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Installs the SIGINT and SIGTERM handlers at once (inside the runtime), so
/// a signal that arrives while the daemon is still starting stops it cleanly
/// instead of killing it, and returns the future that waits for them.
fn shutdown_signal() -> Shutdown {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    Box::pin(async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without signal handlers the daemon can still be stopped by SIGKILL.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
    })
}

/// For the short-lived commands that print: die quietly on a closed pipe
/// (`gatewire show | head`) like other command-line tools, instead of panicking
/// in `println!`. Daemons keep Rust's default (SIGPIPE ignored, EPIPE returned).
fn default_sigpipe() {
    // SAFETY: resetting a signal disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Genkey | Cmd::Pubkey | Cmd::Show { .. } | Cmd::Ygg { .. } | Cmd::Ctl(_)
    ) {
        default_sigpipe();
    }
    match cli.cmd {
        Cmd::Genkey => {
            println!("{}", PrivateKey::generate().expose_base64());
            ExitCode::SUCCESS
        }
        Cmd::Pubkey => {
            let mut s = String::new();
            if std::io::stdin().take(1024).read_to_string(&mut s).is_err() {
                eprintln!("gatewire: cannot read a key on stdin");
                return ExitCode::FAILURE;
            }
            match PrivateKey::from_base64(&s) {
                Ok(k) => {
                    println!("{}", k.public_key());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gatewire: key is not the correct length or format: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Hub { config, check } => {
            let cfg = match HubConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("gatewire: {e}");
                    return ExitCode::from(2);
                }
            };
            if check {
                println!(
                    "{}: ok ({})",
                    config.display(),
                    counted(cfg.peers.len(), "peer")
                );
                if let Some(why) = crate::hub::keepalive_warning(cfg.keepalive) {
                    println!("warning: {why}");
                }
                if let Some(why) = crate::hub::forwarding_warning(cfg.node_to_node) {
                    println!("warning: {why}");
                }
                return ExitCode::SUCCESS;
            }
            init_tracing();
            run_daemon(|shutdown| crate::hub::run_watching(cfg, config.clone(), shutdown))
        }
        Cmd::Node {
            cmd: Some(NodeCmd::Join(args)),
            ..
        } => match crate::control::join::main(&args) {
            Ok(Some(config)) => run_node(config, false),
            Ok(None) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatewire: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Node { config, check, .. } => match config {
            Some(config) => run_node(config, check),
            None => {
                eprintln!("gatewire: node: --config is required");
                ExitCode::from(2)
            }
        },
        Cmd::Show { json, interface } => show(json, interface),
        Cmd::Wg {
            interface,
            foreground,
        } => {
            let fg = foreground || std::env::var("WG_PROCESS_FOREGROUND").is_ok_and(|v| v == "1");
            wg_mode(interface, fg)
        }
        Cmd::Ygg { cmd } => ygg_cmd(cmd),
        Cmd::Ctl(args) => crate::control::client::main(*args),
    }
}

/// `gatewire node --config PATH [--check]` (also after `node join --run`).
fn run_node(config: PathBuf, check: bool) -> ExitCode {
    let cfg = match NodeConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatewire: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!(
            "{}: ok ({})",
            config.display(),
            counted(cfg.hubs.len(), "hub")
        );
        return ExitCode::SUCCESS;
    }
    init_tracing();
    run_daemon(|shutdown| crate::node::run_watching(cfg, config, shutdown))
}

fn ygg_cmd(cmd: YggCmd) -> ExitCode {
    use crate::ygg::identity::{Identity, PublicKey};
    match cmd {
        YggCmd::Keygen { json } => {
            let id = Identity::generate(&mut rand_core::OsRng);
            let private = id.private_key().to_config_hex();
            if json {
                let v = serde_json::json!({
                    "PrivateKey": private,
                    "PublicKey": id.public_key().to_hex(),
                    "Address": id.address().to_string(),
                    "Subnet": id.subnet().to_string(),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("PrivateKey: {private}");
                println!("PublicKey: {}", id.public_key().to_hex());
                println!("Address: {}", id.address());
                println!("Subnet: {}", id.subnet());
            }
            ExitCode::SUCCESS
        }
        YggCmd::Address { public_key } => match PublicKey::from_hex(public_key.trim()) {
            Ok(k) => {
                println!("Address: {}", k.address());
                println!("Subnet: {}", k.subnet());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gatewire: public key `{}`: {e}", public_key.trim());
                ExitCode::from(2)
            }
        },
    }
}

/// Runs a daemon on a fresh runtime; the signal handlers are installed before
/// `daemon` starts anything.
/// Raises the soft limit on open files to the hard one, as Go programs and
/// nginx's `worker_rlimit_nofile` do: a hub holds a descriptor per tunnel
/// carried over TLS, per proxied connection (two) and per UDP flow, and the
/// usual soft limit of 1024 would run out long before its own limits do.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a pointer to an rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above; only the soft limit changes, within the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        debug!(from = before, to = lim.rlim_cur, "open files limit raised");
    } else {
        warn!(
            limit = before,
            error = %std::io::Error::last_os_error(),
            "cannot raise the open files limit"
        );
    }
}

fn run_daemon<F: std::future::Future<Output = anyhow::Result<()>>>(
    daemon: impl FnOnce(Shutdown) -> F,
) -> ExitCode {
    raise_open_files();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatewire: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(async { daemon(shutdown_signal()).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn wg_mode(interface: String, foreground: bool) -> ExitCode {
    // Daemonise before any thread exists: the parent returns once the child
    // reports that the interface and its socket are ready (as wireguard-go does).
    let mut ready_fd: Option<std::fs::File> = None;
    if !foreground {
        match daemonize() {
            Ok(Some(fd)) => ready_fd = Some(fd),
            Ok(None) => unreachable_parent(),
            Err(e) => {
                eprintln!("gatewire: cannot daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    init_tracing();
    let name = interface.clone();
    run_daemon(|shutdown| async move {
        let started = async {
            let dev = Device::start(DeviceConfig {
                name: name.clone(),
                mode: Mode::Wg,
                private_key: None,
                listen_port: 0,
                addresses: Vec::new(),
                mtu: crate::config::DEFAULT_MTU,
                forward: crate::wg::device::NodeToNode::Kernel,
                keepalive: 0,
                peers: Vec::new(),
                xlat: None,
                nat64: None,
                xlat_via_pool6: Vec::new(),
                xlat_icmp_rate: 0,
            })
            .await?;
            let api = ApiServer::start(dev.inner.clone()).await?;
            anyhow::Ok((dev, api))
        }
        .await;
        let (dev, api) = match started {
            Ok(x) => x,
            Err(e) => {
                // The parent prints it: this process's stderr is /dev/null.
                if let Some(mut f) = ready_fd.take() {
                    let _ = f.write_all(format!("0{e:#}").as_bytes());
                }
                return Err(e);
            }
        };
        if let Some(mut f) = ready_fd.take() {
            let _ = f.write_all(b"1");
        }
        // A forked daemon's parent has exited: the service manager would
        // not take its child's word (the unit should run it in the foreground).
        let _watchdog = if foreground {
            crate::sd_notify::ready();
            crate::sd_notify::spawn_watchdog()
        } else {
            None
        };
        let ended = tokio::select! {
            () = shutdown => Ok(()),
            () = dev.inner.lost() => Err(anyhow::anyhow!("the TUN interface {name} is gone")),
        };
        if foreground {
            crate::sd_notify::stopping();
        }
        drop(api);
        drop(dev);
        ended
    })
}

/// Only reached in a parent whose child failed before reporting readiness.
fn unreachable_parent() -> ! {
    std::process::exit(1)
}

/// Forks. In the parent: waits for the child's readiness byte and exits (0 if
/// ready, 1 if not, printing the error the child sent after a `0`). In the
/// child: returns the write end of the readiness pipe (not inherited by
/// programs it runs), with stdio on /dev/null and a new session.
fn daemonize() -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: plain libc calls on a fresh process with no other threads yet.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        match libc::fork() {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                libc::close(fds[0]);
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    if null > 2 {
                        libc::close(null);
                    }
                }
                Ok(Some(std::fs::File::from_raw_fd(fds[1])))
            }
            _ => {
                libc::close(fds[1]);
                let mut f = std::fs::File::from_raw_fd(fds[0]);
                let mut b = [0u8; 1];
                if matches!(f.read(&mut b), Ok(1)) && b[0] == b'1' {
                    std::process::exit(0);
                }
                let mut why = Vec::new();
                let _ = f.take(4096).read_to_end(&mut why);
                let why = String::from_utf8_lossy(&why);
                if why.is_empty() {
                    eprintln!("gatewire: the daemon ended before it was ready");
                } else {
                    eprintln!("gatewire: {why}");
                }
                std::process::exit(1);
            }
        }
    }
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

fn ago(secs: u64) -> String {
    since(crate::clock::unix_secs().saturating_sub(secs))
}

/// `d` seconds, as `ago` words them.
fn since(d: u64) -> String {
    match d {
        0..=59 => format!("{d} seconds ago"),
        60..=3599 => format!("{} minutes, {} seconds ago", d / 60, d % 60),
        _ => format!("{} hours, {} minutes ago", d / 3600, (d % 3600) / 60),
    }
}

/// Lines for the extra sections of a daemon's `show` object: a node's
/// `hub_paths` (hubs it may reach over TLS), a hub's `tls_tunnels`, `mesh`,
/// the proxy's certificates and a failed config reload.
fn carrier_lines(v: &serde_json::Value) -> Vec<String> {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string()
    };
    let mut out = Vec::new();
    for p in v
        .get("hub_paths")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        if s(p, "transport") == "udp" {
            continue;
        }
        let t = p.get("tls").cloned().unwrap_or_default();
        let proxy = match p.get("tls_proxy").and_then(|x| x.as_str()) {
            Some(x) => format!(" through proxy {x}"),
            None => String::new(),
        };
        let to = match p.get("websocket").and_then(|x| x.as_str()) {
            Some(u) => format!("WebSocket to {u}"),
            None => format!("TLS to {}", s(p, "tls_endpoint")),
        };
        out.push(format!(
            "hub {}: over {} (transport {}); {to}{proxy}: {} streams, {} failed, {} received, {} sent",
            s(p, "hub"),
            s(p, "via"),
            s(p, "transport"),
            n(&t, "streams"),
            n(&t, "failed"),
            human_bytes(n(&t, "bytes_in")),
            human_bytes(n(&t, "bytes_out")),
        ));
    }
    if let Some(t) = v.get("tls_tunnels") {
        out.push(format!(
            "tunnels over TLS: {} open, {} set up, {} failed, {} evicted, {} superseded, {} received, {} sent",
            n(t, "open"),
            n(t, "streams"),
            n(t, "failed"),
            n(t, "evicted"),
            n(t, "superseded"),
            human_bytes(n(t, "bytes_in")),
            human_bytes(n(t, "bytes_out")),
        ));
    }
    if let Some(m) = v.get("mesh") {
        let etcd = match m.get("etcd_connected").and_then(|x| x.as_bool()) {
            Some(true) => "connected to etcd".to_string(),
            _ => match m.get("last_error").and_then(|x| x.as_str()) {
                Some(e) => format!("etcd unreachable ({e}), serving the last table"),
                None => "etcd unreachable, serving the last table".to_string(),
            },
        };
        let count =
            |k: u64, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
        let sealed = match (m.get("sealed").and_then(|x| x.as_bool()), n(m, "bad_seals")) {
            (Some(true), 0) => "; headers sealed".to_string(),
            (Some(true), b) => format!("; headers sealed, {b} refused"),
            _ => String::new(),
        };
        out.push(format!(
            "mesh {}: {etcd}; {} published, {} sent to other hubs, {} received{sealed}",
            s(m, "name"),
            count(n(m, "published_hosts"), "host", "hosts"),
            count(n(m, "forwarded"), "connection", "connections"),
            n(m, "received"),
        ));
        let (refused, silent, declined) =
            (n(m, "refused"), n(m, "unacknowledged"), n(m, "declined"));
        if refused + silent + declined > 0 {
            out.push(format!(
                "  not taken: {refused} refused by other hubs, {silent} unanswered (the next hub tried); {declined} refused here"
            ));
        }
        for h in m
            .get("hubs")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            let hosts = count(n(h, "hosts"), "host", "hosts");
            out.push(format!("  hub {}: {hosts}", s(h, "name")));
        }
        let orders: Vec<String> = m
            .get("acme_orders")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
            .map(|o| format!("{} by {}", s(o, "host"), s(o, "hub")))
            .collect();
        let (certs, answered) = (n(m, "acme_certificates"), n(m, "acme_answered"));
        if certs > 0 || answered > 0 || !orders.is_empty() {
            let ordering = if orders.is_empty() {
                String::new()
            } else {
                format!("; ordering {}", orders.join(", "))
            };
            out.push(format!(
                "  acme: {} shared, {} answered for other hubs{ordering}",
                count(certs, "certificate", "certificates"),
                count(answered, "validation", "validations"),
            ));
        }
        let conflicts: Vec<String> = m
            .get("name_conflicts")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} (held for {} through {})",
                    s(c, "host"),
                    s(c, "held_by"),
                    s(c, "hub")
                )
            })
            .collect();
        let claims = n(m, "own_name_claims");
        if claims > 0 || !conflicts.is_empty() {
            let refused = if conflicts.is_empty() {
                String::new()
            } else {
                format!("; refused here: {}", conflicts.join(", "))
            };
            out.push(format!(
                "  names: {} claimed by this hub, {} in the mesh{refused}",
                count(claims, "host", "hosts"),
                n(m, "name_claims"),
            ));
        }
    }
    out.extend(certificate_line(v, crate::clock::unix_secs()));
    out.extend(reload_line(v, crate::clock::unix_secs()));
    out
}

/// `config reload FAILED …` while a hub's last config reload failed (it
/// applied nothing).
fn reload_line(v: &serde_json::Value, now: u64) -> Option<String> {
    let last = v.get("config_reload")?.get("last")?;
    if last.get("ok")?.as_bool()? {
        return None;
    }
    let at = last.get("at").and_then(|x| x.as_u64()).unwrap_or(now);
    let why: String = last
        .get("error")
        .and_then(|x| x.as_str())
        .unwrap_or("?")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Some(format!(
        "config reload FAILED {}, nothing applied: {why}",
        since(now.saturating_sub(at))
    ))
}

/// `certificates: …` for a hub's proxy: how many, the next to expire, and
/// the ACME orders that fail.
fn certificate_line(v: &serde_json::Value, now: u64) -> Option<String> {
    let certs = v.get("proxy")?.get("certificates")?.as_array()?;
    if certs.is_empty() {
        return None;
    }
    fn host(c: &serde_json::Value) -> &str {
        c.get("host").and_then(|x| x.as_str()).unwrap_or("?")
    }
    let mut line = format!("certificates: {}", certs.len());
    let next = certs
        .iter()
        .filter_map(|c| Some((c.get("not_after")?.as_u64()?, host(c))))
        .min();
    if let Some((na, h)) = next {
        let left = if na <= now {
            "EXPIRED".to_string()
        } else {
            let d = na - now;
            match d {
                0..=86_399 => format!("in {} hours", d / 3600),
                _ => format!("in {} days", d / 86_400),
            }
        };
        line.push_str(&format!("; next to expire {h} {left}"));
    }
    let missing = certs
        .iter()
        .filter(|c| c.get("not_after").is_some_and(|x| x.is_null()));
    let missing: Vec<&str> = missing.map(host).collect();
    if !missing.is_empty() {
        line.push_str(&format!("; not issued yet: {}", missing.join(", ")));
    }
    let failing: Vec<String> = certs
        .iter()
        .filter_map(|c| Some(format!("{} ({})", host(c), c.get("error")?.as_str()?)))
        .collect();
    if !failing.is_empty() {
        line.push_str(&format!("; ACME failing: {}", failing.join(", ")));
    }
    Some(line)
}

fn print_text(i: &ShowInterface) {
    println!(
        "interface: {} ({})",
        i.name,
        serde_json::to_value(i.mode)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    if let Some(k) = &i.public_key {
        println!("  public key: {k}");
    }
    println!("  listening port: {}", i.listen_port);
    let drops: Vec<String> = i
        .drops
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !drops.is_empty() {
        println!("  drops: {}", drops.join(" "));
    }
    for p in &i.peers {
        println!();
        match &p.name {
            Some(n) => println!("peer: {} ({n})", p.public_key),
            None => println!("peer: {}", p.public_key),
        }
        if let Some(e) = &p.endpoint {
            println!("  endpoint: {e}");
        }
        println!(
            "  allowed ips: {}",
            if p.allowed_ips.is_empty() {
                "(none)".into()
            } else {
                p.allowed_ips.join(", ")
            }
        );
        if let Some(h) = p.latest_handshake {
            println!("  latest handshake: {}", ago(h));
        }
        if p.rx_bytes > 0 || p.tx_bytes > 0 {
            println!(
                "  transfer: {} received, {} sent",
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes)
            );
        }
        if let Some(k) = p.persistent_keepalive {
            println!("  persistent keepalive: every {k} seconds");
        }
        let drops: Vec<String> = p
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !drops.is_empty() {
            println!("  drops: {}", drops.join(" "));
        }
    }
}

fn show(json: bool, interface: Option<String>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatewire: {e}");
            return ExitCode::FAILURE;
        }
    };
    let names: Vec<String> = match &interface {
        Some(i) => vec![i.clone()],
        None => std::fs::read_dir(api::SOCKET_DIR)
            .map(|d| {
                let mut v: Vec<String> = d
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".sock"))
                            .map(String::from)
                    })
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default(),
    };
    // The Yggdrasil overlay: supervisor status files plus its admin socket.
    let overlays = crate::ygg::report::collect(std::path::Path::new(
        crate::ygg::settings::DEFAULT_STATE_DIR,
    ));
    let overlay = overlays
        .into_iter()
        .find(|o| interface.as_ref().is_none_or(|i| *i == o.interface));
    let names: Vec<String> = match (&interface, &overlay) {
        // `gatewire show ygg0`: the overlay only.
        (Some(_), Some(_)) => Vec::new(),
        _ => names,
    };
    let mut out = Vec::new();
    // The raw objects keep extra sections (`proxy`, ...) for --json.
    let mut raw = Vec::new();
    let mut failed = false;
    for n in &names {
        let got = rt.block_on(api::query_show_value(n)).and_then(|v| {
            let i: ShowInterface = serde_json::from_value(v.clone())?;
            Ok((i, v))
        });
        match got {
            Ok((i, v)) => {
                out.push(i);
                raw.push(v);
            }
            Err(e) => {
                // Without a name, sockets of other WireGuard implementations are skipped.
                if interface.is_some() {
                    eprintln!("gatewire: {n}: {e}");
                    failed = true;
                }
            }
        }
    }
    if json {
        let v = serde_json::json!({ "interfaces": raw, "yggdrasil": overlay });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for (k, i) in out.iter().enumerate() {
            if k > 0 {
                println!();
            }
            print_text(i);
            let lines = raw.get(k).map(carrier_lines).unwrap_or_default();
            if !lines.is_empty() {
                println!();
                for l in lines {
                    println!("{l}");
                }
            }
        }
        if let Some(o) = &overlay {
            if !out.is_empty() {
                println!();
            }
            crate::ygg::report::print_text(o);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `n` things, in words: "1 peer", "2 peers".
fn counted(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_lines_for_node_and_hub() {
        let node = serde_json::json!({"hub_paths": [
            {"hub": "h1", "transport": "auto", "via": "tls", "tls_endpoint": "h1.example:443",
             "tls_proxy": null, "tls": {"streams": 2, "open": 1, "failed": 0, "bad_frames": 0,
             "bytes_in": 2048, "bytes_out": 10}},
            {"hub": "h2", "transport": "udp", "via": "udp", "tls_endpoint": "h2.example:443",
             "tls_proxy": null, "tls": {"streams": 0}},
            {"hub": "h3", "transport": "tls", "via": "tls", "tls_endpoint": "h3.example:443",
             "tls_proxy": "proxy.corp:3128", "tls": {"streams": 1, "failed": 3}}
        ]});
        assert_eq!(
            carrier_lines(&node),
            vec![
                "hub h1: over tls (transport auto); TLS to h1.example:443: 2 streams, 0 failed, 2.00 KiB received, 10 B sent",
                "hub h3: over tls (transport tls); TLS to h3.example:443 through proxy proxy.corp:3128: 1 streams, 3 failed, 0 B received, 0 B sent",
            ]
        );
        let hub = serde_json::json!({"tls_tunnels": {"streams": 5, "open": 2, "failed": 1,
            "bad_frames": 0, "evicted": 3, "superseded": 4, "bytes_in": 0, "bytes_out": 0}});
        assert_eq!(
            carrier_lines(&hub),
            vec!["tunnels over TLS: 2 open, 5 set up, 1 failed, 3 evicted, 4 superseded, 0 B received, 0 B sent"]
        );
        assert!(carrier_lines(&serde_json::json!({})).is_empty());
        let mesh = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": true,
            "last_error": null, "published_hosts": 2, "forwarded": 7, "received": 1,
            "bad_records": 0, "hubs": [{"name": "hub-b", "hosts": 1}]}});
        assert_eq!(
            carrier_lines(&mesh),
            vec![
                "mesh hub-a: connected to etcd; 2 hosts published, 7 connections sent to other hubs, 1 received",
                "  hub hub-b: 1 host",
            ]
        );
        let sealed = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": true,
            "hubs": [], "sealed": true, "bad_seals": 2}});
        assert!(carrier_lines(&sealed)[0].ends_with("0 received; headers sealed, 2 refused"));
        let refused = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": true,
            "hubs": [], "refused": 3, "unacknowledged": 1, "declined": 2}});
        assert_eq!(
            carrier_lines(&refused)[1],
            "  not taken: 3 refused by other hubs, 1 unanswered (the next hub tried); 2 refused here"
        );
        let acme = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": true,
            "hubs": [], "acme_certificates": 2, "acme_answered": 1,
            "acme_orders": [{"host": "blog.gw.test", "hub": "hub-b"}]}});
        assert_eq!(
            carrier_lines(&acme)[1],
            "  acme: 2 certificates shared, 1 validation answered for other hubs; ordering blog.gw.test by hub-b"
        );
        let names = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": true,
            "hubs": [], "own_name_claims": 1, "name_claims": 3,
            "name_conflicts": [{"host": "shop.gw.test", "granted_to": "K1", "held_by": "K2", "hub": "hub-b"}]}});
        assert_eq!(
            carrier_lines(&names)[1],
            "  names: 1 host claimed by this hub, 3 in the mesh; refused here: shop.gw.test (held for K2 through hub-b)"
        );
        let down = serde_json::json!({"mesh": {"name": "hub-a", "etcd_connected": false,
            "last_error": "connection refused", "hubs": []}});
        assert!(carrier_lines(&down)[0].contains("etcd unreachable (connection refused)"));
    }

    #[test]
    fn a_failed_config_reload_is_named_until_one_works() {
        let now = 1_800_000_000;
        let last = |ok: bool, error: Option<&str>| {
            serde_json::json!({"config_reload": {"reloads": 3, "failures": 1,
                "last": {"at": now - 75, "ok": ok, "error": error}}})
        };
        assert_eq!(
            reload_line(&last(false, Some("[[route]] name:x: cert\nline 2")), now).unwrap(),
            "config reload FAILED 1 minutes, 15 seconds ago, nothing applied: [[route]] name:x: cert line 2"
        );
        assert_eq!(reload_line(&last(true, None), now), None);
        let none =
            serde_json::json!({"config_reload": {"reloads": 0, "failures": 0, "last": null}});
        assert_eq!(reload_line(&none, now), None);
        assert_eq!(reload_line(&serde_json::json!({}), now), None);
    }

    #[test]
    fn certificate_line_names_the_next_expiry_and_failures() {
        let now = 1_800_000_000;
        let v = serde_json::json!({"proxy": {"routes": [], "certificates": [
            {"host": "www.example.net", "source": "file", "not_after": now + 90 * 86_400},
            {"host": "*.gw.test", "source": "acme", "not_after": now + 20 * 86_400 + 5,
             "renew_at": now - 10 * 86_400},
            {"host": "shop.example.com", "source": "acme", "not_after": null,
             "error": "validation failed", "retry_at": now + 60}
        ]}});
        assert_eq!(
            certificate_line(&v, now).unwrap(),
            "certificates: 3; next to expire *.gw.test in 20 days; not issued yet: shop.example.com; ACME failing: shop.example.com (validation failed)"
        );
        let v = serde_json::json!({"proxy": {"certificates": [
            {"host": "a.test", "source": "file", "not_after": now - 1}]}});
        assert_eq!(
            certificate_line(&v, now).unwrap(),
            "certificates: 1; next to expire a.test EXPIRED"
        );
        let v = serde_json::json!({"proxy": {"certificates": [
            {"host": "a.test", "source": "file", "not_after": now + 7200}]}});
        assert!(certificate_line(&v, now)
            .unwrap()
            .ends_with("a.test in 2 hours"));
        assert_eq!(
            certificate_line(&serde_json::json!({"proxy": {"certificates": []}}), now),
            None
        );
        assert_eq!(certificate_line(&serde_json::json!({}), now), None);
    }
}

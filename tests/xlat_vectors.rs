//! Replays Jool's graybox SIIT vectors (`shared/vectors/jool-graybox/`) through
//! the pure translator: every listed case, with its settings and ignored offsets.

mod siit;

use std::net::{Ipv4Addr, Ipv6Addr};

use gatewire::xlat::{translate_4to6, translate_6to4, Config, Eam, Outcome, Pool6, OUT_BUF_LEN};

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("ipv4")
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("ipv6")
}

fn eam(v4p: &str, v6p: &str) -> Eam {
    let (a4, l4) = v4p.split_once('/').expect("v4 prefix");
    let (a6, l6) = v6p.split_once('/').expect("v6 prefix");
    Eam::new(
        v4(a4),
        l4.parse().expect("len"),
        v6(a6),
        l6.parse().expect("len"),
    )
    .expect("eam")
}

/// The configuration the graybox suite assumes (README "defaults").
fn default_config() -> Config {
    Config {
        pool6: Some(Pool6::new(v6("2001:db8:100::"), 40).expect("pool6")),
        eamt: vec![
            eam("1.0.0.0/24", "2001:db8:3::/120"),
            eam("10.0.0.0/24", "2001:db8:2::/120"),
        ],
        rfc6791_v4: Some((v4("203.0.113.8"), 32)),
        rfc6791_v6: None,
        self_v4: Some(v4("198.51.100.1")),
        self_v6: Some(v6("2001:db8:1c0:2:1::")),
        lowest_ipv6_mtu: 1280,
        amend_udp_checksum_zero: false,
        ipv4_mtu: 1500,
        ipv6_mtu: 1500,
        id_salt: 0x5eed,
        // Jool does not clamp the MSS; the cases expect SYNs untouched.
        mss_clamp: false,
    }
}

fn apply_settings(cfg: &mut Config, settings: &str) {
    for kv in settings.split(';').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("bad setting {kv}"));
        match k {
            "lowest-ipv6-mtu" => cfg.lowest_ipv6_mtu = v.parse().expect("mtu"),
            "amend-udp-checksum-zero" => {
                cfg.amend_udp_checksum_zero = matches!(v, "true" | "on" | "1")
            }
            "rfc6791v4-prefix" => {
                cfg.rfc6791_v4 = match v {
                    "null" => None,
                    _ => {
                        let (a, l) = v.split_once('/').unwrap_or((v, "32"));
                        Some((v4(a), l.parse().expect("len")))
                    }
                }
            }
            "rfc6791v6-prefix" => {
                cfg.rfc6791_v6 = match v {
                    "null" => None,
                    _ => Some(v6(v.split('/').next().unwrap_or(v))),
                }
            }
            "mtu:to_client_v4" => cfg.ipv4_mtu = v.parse().expect("mtu"),
            "mtu:to_client_v6" => cfg.ipv6_mtu = v.parse().expect("mtu"),
            // MTU of the sender's link toward the translator: only limits what
            // the sender can inject, nothing for the translator to do.
            "mtu:to_jool_v4" => {}
            "pool6" => {
                cfg.pool6 = match v {
                    "null" => None,
                    _ => {
                        let (a, l) = v.split_once('/').expect("pool6 prefix");
                        Some(Pool6::new(v6(a), l.parse().expect("len")).expect("pool6"))
                    }
                }
            }
            "extra-eam" => {
                for e in v.split(',') {
                    let (a, b) = e.split_once('=').expect("eam a=b");
                    if a.contains(':') {
                        cfg.eamt.push(eam(b, a));
                    } else {
                        cfg.eamt.push(eam(a, b));
                    }
                }
            }
            _ => panic!("unknown setting {k}"),
        }
    }
}

/// Compares one emitted packet with one expected packet; `None` when equal.
fn diff(got: &[u8], want: &[u8], ignored: &[usize]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..want.len())
        .filter(|i| !ignored.contains(i) && got.get(*i) != want.get(*i))
        .collect();
    if bad.is_empty() {
        return None;
    }
    let shown: Vec<String> = bad
        .iter()
        .take(8)
        .map(|&i| {
            format!(
                "@{i}: {:02x}!={:02x}",
                got.get(i).copied().unwrap_or(0),
                want.get(i).copied().unwrap_or(0)
            )
        })
        .collect();
    Some(format!("{} bytes differ: {}", bad.len(), shown.join(" ")))
}

#[test]
fn graybox_siit_vectors() {
    let tsv = std::fs::read_to_string(format!("{}/siit-cases.tsv", siit::vectors()))
        .expect("siit-cases.tsv");
    let mut out = vec![0u8; OUT_BUF_LEN];
    let mut total = 0;
    let mut failures: Vec<String> = Vec::new();
    for line in tsv
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let col = |i: usize| cols.get(i).copied().unwrap_or("");
        let (id, dir, sent, expected, ignored, settings) =
            (col(0), col(2), col(3), col(4), col(5), col(6));
        total += 1;
        let mut cfg = default_config();
        apply_settings(&mut cfg, settings);
        let ignored: Vec<usize> = ignored
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("offset"))
            .collect();
        let input = siit::read(sent);
        // Dirty buffer: the translator must not rely on zeroed output.
        out.fill(0xa5);
        let outcome = if dir.starts_with('4') {
            translate_4to6(&cfg, &input, &mut out)
        } else {
            translate_6to4(&cfg, &input, &mut out)
        };
        let kind_ok = matches!(
            (dir, &outcome),
            ("46" | "64", Outcome::Forward(_))
                | ("44" | "66", Outcome::Reply { .. } | Outcome::Hairpin(_))
        );
        let wants: Vec<Vec<u8>> = expected.split(',').map(siit::read).collect();
        let Some(packets) = outcome.packets().filter(|_| kind_ok) else {
            failures.push(format!("{id} ({sent}): unexpected outcome {outcome:?}"));
            continue;
        };
        let gots: Vec<&[u8]> = packets.iter(&out).collect();
        if gots.len() != wants.len() {
            failures.push(format!(
                "{id} ({sent}): {} packets, expected {}",
                gots.len(),
                wants.len()
            ));
            continue;
        }
        for (n, (g, w)) in gots.iter().zip(&wants).enumerate() {
            if let Some(d) = diff(g, w, &ignored) {
                failures.push(format!("{id} ({sent}) packet {n}: {d}"));
            }
        }
    }
    let failed_ids: std::collections::BTreeSet<&str> = failures
        .iter()
        .filter_map(|f| f.split(' ').next())
        .collect();
    println!(
        "graybox SIIT vectors: {} of {total} cases pass",
        total - failed_ids.len()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed",
        failed_ids.len()
    );
}

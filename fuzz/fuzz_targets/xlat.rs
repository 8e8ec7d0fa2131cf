//! Fuzz target for the SIIT translator core: feeds arbitrary bytes to both
//! directions (and to the version-dispatching entry point) with a default
//! configuration plus EAM entries, RFC 6791 pools and error source addresses,
//! so that the error-generating and hairpinning paths are reachable too.
//! The translator must never panic, whatever the input.
#![no_main]

use std::cell::RefCell;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use gatewire::xlat::{
    translate, translate_4to6, translate_6to4, Config, Eam, Outcome, Pool6, OUT_BUF_LEN,
};
use libfuzzer_sys::fuzz_target;

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        // A network-specific prefix: behind the Well-Known Prefix the
        // documentation addresses below would be refused (RFC 6052 §3.1),
        // hairpinning included.
        let mut cfg = Config {
            pool6: Pool6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0), 96).ok(),
            ..Config::default()
        };
        let eams = [
            (
                Ipv4Addr::new(192, 0, 2, 0),
                24,
                Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0),
                120,
            ),
            (
                Ipv4Addr::new(198, 51, 100, 0),
                24,
                Ipv6Addr::new(0x2001, 0xdb8, 0x1c6, 0x3364, 0, 0, 0, 0),
                72,
            ),
        ];
        for (a4, l4, a6, l6) in eams {
            if let Ok(e) = Eam::new(a4, l4, a6, l6) {
                cfg.eamt.push(e);
            }
        }
        cfg.rfc6791_v4 = Some((Ipv4Addr::new(203, 0, 113, 0), 24));
        cfg.self_v4 = Some(Ipv4Addr::new(203, 0, 113, 1));
        cfg.self_v6 = Some(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1));
        cfg.amend_udp_checksum_zero = true;
        cfg
    })
}

thread_local! {
    static OUT: RefCell<Vec<u8>> = RefCell::new(vec![0u8; OUT_BUF_LEN]);
}

fn check(o: Outcome, out: &[u8]) {
    if let Some(p) = o.packets() {
        assert!(!p.is_empty());
        assert!(p.total_len() <= out.len());
        assert_eq!(p.iter(out).count(), p.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = config();
    OUT.with(|buf| {
        let mut out = buf.borrow_mut();
        let o = translate_4to6(cfg, data, &mut out);
        check(o, &out);
        let o = translate_6to4(cfg, data, &mut out);
        check(o, &out);
        let o = translate(cfg, data, &mut out);
        check(o, &out);
        // A too-small output buffer must be reported, not panic.
        let n = data.len().min(out.len());
        let o = translate(cfg, data, &mut out[..n]);
        check(o, &out[..n]);
    });
});

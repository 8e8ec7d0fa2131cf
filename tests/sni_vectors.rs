//! Captured ClientHellos (`tests/vectors/tls/*.bin`) checked at every prefix length,
//! re-fragmented across TLS records, and fed as TCP segments.
//!
//! The vectors were captured from real clients against a `socat` listener on
//! 127.0.0.1 (OpenSSL 3.0 `s_client`, curl 7.88 / OpenSSL):
//! `socat -u TCP-LISTEN:$port,bind=127.0.0.1 CREATE:$name.bin` while the client ran.

use std::path::PathBuf;

use gatewire::proxy::detect::{
    detect, parse_client_hello, parse_client_hello_capped, ClientHelloInfo, Detected, SniError,
    TlsVersion,
};

struct Expect {
    file: &'static str,
    sni: Option<&'static str>,
    alpn: &'static [&'static str],
    max_version: TlsVersion,
    records: usize,
}

const VECTORS: &[Expect] = &[
    Expect {
        file: "openssl_tls13_sni_alpn_h2.bin",
        // sent as `App.GW.Example.com`: normalised to lowercase
        sni: Some("app.gw.example.com"),
        alpn: &["h2", "http/1.1"],
        max_version: TlsVersion::TLS1_3,
        records: 1,
    },
    Expect {
        file: "openssl_tls12_sni.bin",
        sni: Some("www.example.org"),
        alpn: &[],
        max_version: TlsVersion::TLS1_2,
        records: 1,
    },
    Expect {
        file: "openssl_tls13_nosni.bin",
        sni: None,
        alpn: &[],
        max_version: TlsVersion::TLS1_3,
        records: 1,
    },
    Expect {
        file: "curl_h2_sni.bin",
        sni: Some("node1.gw.example.net"),
        alpn: &["h2", "http/1.1"],
        max_version: TlsVersion::TLS1_3,
        records: 1,
    },
    Expect {
        file: "curl_tls12_ip_nosni.bin",
        // curl to https://127.0.0.1 sends no SNI
        sni: None,
        alpn: &["h2", "http/1.1"],
        max_version: TlsVersion::TLS1_2,
        records: 1,
    },
    Expect {
        file: "curl_h11_sni_tls12.bin",
        sni: Some("shop.customer.io"),
        alpn: &["http/1.1"],
        max_version: TlsVersion::TLS1_2,
        records: 1,
    },
    Expect {
        // `s_client -max_send_frag 512` with a long ALPN list: the ClientHello is
        // split over two handshake records by the client itself.
        file: "openssl_tls13_fragmented_records.bin",
        sni: Some("frag.gw.example.com"),
        alpn: &[
            "h2",
            "http/1.1",
            "x-proto-00-padding-padding",
            "x-proto-01-padding-padding",
            "x-proto-02-padding-padding",
            "x-proto-03-padding-padding",
            "x-proto-04-padding-padding",
            "x-proto-05-padding-padding",
            "x-proto-06-padding-padding",
            "x-proto-07-padding-padding",
            "x-proto-08-padding-padding",
            "x-proto-09-padding-padding",
            "x-proto-10-padding-padding",
            "x-proto-11-padding-padding",
            "x-proto-12-padding-padding",
            "x-proto-13-padding-padding",
            "x-proto-14-padding-padding",
            "x-proto-15-padding-padding",
            "x-proto-16-padding-padding",
            "x-proto-17-padding-padding",
            "x-proto-18-padding-padding",
            "x-proto-19-padding-padding",
        ],
        max_version: TlsVersion::TLS1_3,
        records: 2,
    },
];

fn load(file: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/vectors/tls", file]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Splits a record stream into (record version, handshake payloads).
fn split_records(buf: &[u8]) -> (u16, Vec<&[u8]>) {
    let version = u16::from_be_bytes([buf[1], buf[2]]);
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        assert_eq!(rest[0], 22, "handshake record");
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        out.push(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    (version, out)
}

/// Re-frames a handshake message into records whose payload sizes cycle through `sizes`.
fn refragment(msg: &[u8], sizes: &[usize], version: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = msg;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        out.push(22);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
        rest = tail;
    }
    out
}

fn check(info: &ClientHelloInfo<'_>, e: &Expect, len: usize) {
    assert_eq!(info.server_name().map(|n| n.as_str()), e.sni, "{}", e.file);
    let alpn: Vec<&[u8]> = info.alpn_protocols().collect();
    let want: Vec<&[u8]> = e.alpn.iter().map(|s| s.as_bytes()).collect();
    assert_eq!(alpn, want, "{}", e.file);
    assert_eq!(info.has_alpn(), !e.alpn.is_empty(), "{}", e.file);
    assert_eq!(
        info.offers_alpn(b"h2"),
        e.alpn.contains(&"h2"),
        "{}",
        e.file
    );
    assert_eq!(info.max_version(), e.max_version, "{}", e.file);
    assert_eq!(info.legacy_version(), TlsVersion::TLS1_2, "{}", e.file);
    assert_eq!(info.record_version(), TlsVersion::TLS1_0, "{}", e.file);
    assert_eq!(info.records_len(), len, "{}", e.file);
}

/// Incomplete (with a sound `needed`) for every strict prefix; the result at full length.
fn every_prefix<'a>(buf: &'a [u8], what: &str) -> ClientHelloInfo<'a> {
    for n in 0..buf.len() {
        match parse_client_hello(&buf[..n]) {
            Err(SniError::Incomplete { needed: Some(k) }) => {
                assert!(
                    k >= 1 && n + k <= buf.len(),
                    "{what}: prefix {n}: needed {k}"
                )
            }
            other => panic!("{what}: prefix {n}/{}: {other:?}", buf.len()),
        }
        let d = detect(&buf[..n]);
        assert_eq!(
            d,
            if n < 3 {
                Detected::Incomplete
            } else {
                Detected::Tls
            },
            "{what}: detect prefix {n}"
        );
    }
    parse_client_hello(buf).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn vectors_at_every_prefix() {
    for e in VECTORS {
        let buf = load(e.file);
        let info = every_prefix(&buf, e.file);
        check(&info, e, buf.len());
        assert_eq!(split_records(&buf).1.len(), e.records, "{}", e.file);
    }
}

#[test]
fn vectors_refragmented_across_records() {
    for e in VECTORS {
        let buf = load(e.file);
        let (version, payloads) = split_records(&buf);
        let msg = payloads.concat();
        for sizes in [
            &[1usize][..],
            &[2],
            &[3],
            &[4, 1],
            &[7],
            &[64, 5],
            &[100],
            &[512],
        ] {
            for version in [version, 0x0303] {
                let frag = refragment(&msg, sizes, version);
                let what = format!("{} split {sizes:?} v{version:#06x}", e.file);
                let info = every_prefix(&frag, &what).into_owned();
                assert_eq!(info.server_name().map(|n| n.as_str()), e.sni, "{what}");
                assert_eq!(info.alpn_protocols().count(), e.alpn.len(), "{what}");
                assert_eq!(info.max_version(), e.max_version, "{what}");
                assert_eq!(info.records_len(), frag.len(), "{what}");
            }
        }
    }
}

/// What a driver does: append each TCP segment and re-parse until complete.
#[test]
fn vectors_fed_as_tcp_segments() {
    for e in VECTORS {
        let wire = load(e.file);
        for seg in [1usize, 5, 6, 100, 1460] {
            let mut acc = Vec::new();
            let mut calls = 0;
            let result = loop {
                let start = acc.len();
                acc.extend_from_slice(&wire[start..(start + seg).min(wire.len())]);
                calls += 1;
                match parse_client_hello(&acc) {
                    Err(SniError::Incomplete { .. }) => assert!(acc.len() < wire.len()),
                    other => break other.map(ClientHelloInfo::into_owned),
                }
            };
            let info = result.unwrap();
            check(&info, e, wire.len());
            assert_eq!(calls, wire.len().div_ceil(seg), "{} seg {seg}", e.file);
        }
    }
}

#[test]
fn vectors_with_following_records() {
    for e in VECTORS {
        let mut buf = load(e.file);
        let len = buf.len();
        // TLS 1.3 middlebox-compat ChangeCipherSpec, then the start of early data.
        buf.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0]);
        let info = parse_client_hello(&buf).unwrap();
        check(&info, e, len);
    }
}

#[test]
fn vectors_respect_the_cap() {
    for e in VECTORS {
        let buf = load(e.file);
        assert!(parse_client_hello_capped(&buf, buf.len()).is_ok());
        assert_eq!(
            parse_client_hello_capped(&buf, buf.len() - 1),
            Err(SniError::TooLarge {
                limit: buf.len() - 1
            }),
            "{}",
            e.file
        );
    }
}

#[test]
fn mutated_vectors_never_panic() {
    for e in VECTORS {
        let buf = load(e.file);
        for i in 0..buf.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff, buf[i] ^ 0x20] {
                let mut m = buf.clone();
                m[i] = v;
                let _ = parse_client_hello(&m);
                let _ = parse_client_hello(&m[..i]);
            }
        }
    }
}

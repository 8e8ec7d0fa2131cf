#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
//! PROXY protocol headers (haproxy's `proxy-protocol.txt`: version 1, the text
//! line, section 2.1; version 2, binary, section 2.2).
//!
//! Pure: [`encode_v2`] and [`encode_v1`] build the header the proxy writes to
//! a backend before any client byte on TCP forwards and TLS passthrough
//! routes, so the backend learns the real client address. [`decode`] (either
//! version; [`decode_v1`], [`decode_v2`]) parses the header a load balancer
//! in front of the hub sends (`[proxy] proxy_protocol_from`); it is fuzzed.
//!
//! Addresses are normalised first: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
//! sent as IPv4. If the two ends then still differ in family, both are sent as IPv6
//! (IPv4 mapped), because the header has a single family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Length of the fixed part: signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;
/// Address block length for `AF_INET`.
pub const V4_ADDR_LEN: usize = 12;
/// Address block length for `AF_INET6`.
pub const V6_ADDR_LEN: usize = 36;
/// Longest header [`encode_v2`] produces.
pub const MAX_ENCODED_LEN: usize = FIXED_LEN + V6_ADDR_LEN;

/// The transport the proxied connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `SOCK_STREAM`.
    Tcp,
    /// `SOCK_DGRAM`.
    Udp,
}

/// What a v2 header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `LOCAL`: the connection was made by the proxy itself (health checks); no addresses.
    Local,
    /// `PROXY`: relayed on behalf of `src`, which connected to `dst`.
    Proxy {
        /// The transport.
        transport: Transport,
        /// The client address.
        src: SocketAddr,
        /// The address the client connected to (the proxy's listener).
        dst: SocketAddr,
    },
    /// `PROXY` with an unspecified or unknown family: the receiver must use the real
    /// connection addresses.
    ProxyUnspec,
}

/// A decoded header and the number of bytes it occupied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The command.
    pub command: Command,
    /// Header length in bytes (fixed part plus the announced length, TLVs included).
    pub len: usize,
}

/// Why [`decode`] returned no header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A valid prefix so far: read more.
    #[error("incomplete PROXY v2 header")]
    Incomplete,
    /// The bytes do not start with the v2 signature.
    #[error("no PROXY v2 signature")]
    NoSignature,
    /// The version nibble is not 2.
    #[error("PROXY header version {0} is not 2")]
    Version(u8),
    /// The command nibble is neither LOCAL nor PROXY.
    #[error("unknown PROXY command {0}")]
    Command(u8),
    /// The announced length is too short for the family.
    #[error("PROXY address block too short for its family")]
    Short,
    /// A version 1 line that breaks the grammar.
    #[error("bad PROXY v1 header: {0}")]
    Malformed(&'static str),
    /// A v2 TLV that runs past the end of its header.
    #[error("PROXY v2 TLV runs past the end of the header")]
    Tlv,
}

/// Longest version 1 header, `\r\n` included.
pub const V1_MAX_LEN: usize = 107;

/// Parses a version 1 header (`PROXY TCP4 src dst sport dport\r\n`, or
/// `PROXY UNKNOWN ...\r\n`) at the start of `buf`.
pub fn decode_v1(buf: &[u8]) -> Result<Decoded, DecodeError> {
    const TAG: &[u8] = b"PROXY ";
    let have = buf.len().min(TAG.len());
    if buf.get(..have) != TAG.get(..have) {
        return Err(DecodeError::NoSignature);
    }
    let window = buf.get(..buf.len().min(V1_MAX_LEN)).unwrap_or(buf);
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Err(DecodeError::Malformed("no CRLF within 107 bytes"))
        } else {
            Err(DecodeError::Incomplete)
        };
    };
    let line = buf
        .get(TAG.len()..end)
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(DecodeError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let command = match parts.next() {
        // The receiver uses the connection's own addresses; the rest of the
        // line is to be ignored.
        Some("UNKNOWN") => Command::ProxyUnspec,
        Some(fam @ ("TCP4" | "TCP6")) => {
            let mut next = || parts.next().ok_or(DecodeError::Malformed("missing field"));
            let (s, d, sp, dp) = (next()?, next()?, next()?, next()?);
            if parts.next().is_some() {
                return Err(DecodeError::Malformed("extra field"));
            }
            let ip = |s: &str| -> Result<IpAddr, DecodeError> {
                let ok = if fam == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4).ok()
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
                };
                ok.ok_or(DecodeError::Malformed("address does not match the family"))
            };
            let port = |s: &str| -> Result<u16, DecodeError> {
                if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(DecodeError::Malformed("bad port"));
                }
                s.parse().map_err(|_| DecodeError::Malformed("bad port"))
            };
            Command::Proxy {
                transport: Transport::Tcp,
                src: SocketAddr::new(ip(s)?, port(sp)?),
                dst: SocketAddr::new(ip(d)?, port(dp)?),
            }
        }
        _ => {
            return Err(DecodeError::Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Decoded {
        command,
        len: end + 2,
    })
}

/// Parses a version 1 or version 2 header at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    match buf.first() {
        None => Err(DecodeError::Incomplete),
        Some(b'P') => decode_v1(buf),
        Some(0x0D) => decode_v2(buf),
        Some(_) => Err(DecodeError::NoSignature),
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends the v2 `PROXY` header for a connection from `src` to `dst` to `out`.
///
/// ```
/// use gatewire::proxy::proxy_protocol::{decode_v2, encode_v2, Command, Transport};
/// let (src, dst) = ("198.51.100.7:40000".parse().unwrap(), "203.0.113.1:443".parse().unwrap());
/// let mut hdr = Vec::new();
/// encode_v2(&mut hdr, Transport::Tcp, src, dst);
/// assert_eq!(hdr.len(), 28);
/// let d = decode_v2(&hdr).unwrap();
/// assert_eq!(d.command, Command::Proxy { transport: Transport::Tcp, src, dst });
/// ```
pub fn encode_v2(out: &mut Vec<u8>, transport: Transport, src: SocketAddr, dst: SocketAddr) {
    let (sip, dip) = (unmap(src.ip()), unmap(dst.ip()));
    let proto: u8 = match transport {
        Transport::Tcp => 0x1,
        Transport::Udp => 0x2,
    };
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (sip, dip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x10 | proto);
            out.extend_from_slice(&(V4_ADDR_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x20 | proto);
            out.extend_from_slice(&(V6_ADDR_LEN as u16).to_be_bytes());
            out.extend_from_slice(&to_v6(s).octets());
            out.extend_from_slice(&to_v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// Appends the v1 (text) `PROXY` header for a TCP connection from `src` to `dst`.
/// IPv4-mapped addresses are written as IPv4; mixed families as IPv6.
///
/// ```
/// use gatewire::proxy::proxy_protocol::encode_v1;
/// let mut hdr = Vec::new();
/// encode_v1(&mut hdr, "198.51.100.7:40000".parse().unwrap(), "203.0.113.1:443".parse().unwrap());
/// assert_eq!(hdr, b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n");
/// ```
pub fn encode_v1(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr) {
    let line = match (unmap(src.ip()), unmap(dst.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} "),
        (s, d) => format!("PROXY TCP6 {} {} ", to_v6(s), to_v6(d)),
    };
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(format!("{} {}\r\n", src.port(), dst.port()).as_bytes());
}

/// Appends a v2 `LOCAL` header (no addresses) to `out`.
pub fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    out.push(0x20);
    out.push(0x00);
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends the TLV `kind`, `value` to `header` (one v2 header from its
/// first byte, as [`encode_v2`] writes it) and makes its length field take
/// the TLV in. A value longer than a TLV holds is cut to 65,535 bytes.
pub fn push_tlv(header: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = value
        .get(..value.len().min(usize::from(u16::MAX)))
        .unwrap_or(value);
    header.push(kind);
    header.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    header.extend_from_slice(value);
    let body = u16::try_from(header.len().saturating_sub(FIXED_LEN)).unwrap_or(u16::MAX);
    if let Some(l) = header.get_mut(14..FIXED_LEN) {
        l.copy_from_slice(&body.to_be_bytes());
    }
}

/// One TLV of a v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Its type (`0xE0` to `0xEF` are for custom use).
    pub kind: u8,
    pub value: &'a [u8],
}

/// The TLVs of the v2 header at the start of `buf`, in order: what follows
/// the address block of its family, up to the end its length field sets.
/// A header of a family with no known address block (neither `AF_INET`,
/// `AF_INET6`, `AF_UNIX` nor `AF_UNSPEC`) has none that can be found.
pub fn tlvs_v2(buf: &[u8]) -> Result<Vec<Tlv<'_>>, DecodeError> {
    let d = decode_v2(buf)?;
    let fam = buf.get(13).copied().unwrap_or(0) >> 4;
    let addr_len = match fam {
        0 => 0,
        1 => V4_ADDR_LEN,
        2 => V6_ADDR_LEN,
        3 => 216,
        _ => return Ok(Vec::new()),
    };
    let body = buf.get(FIXED_LEN..d.len).ok_or(DecodeError::Incomplete)?;
    let mut rest = body.get(addr_len..).ok_or(DecodeError::Short)?;
    let mut out = Vec::new();
    while let [kind, l0, l1, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*l0, *l1]));
        let value = tail.get(..n).ok_or(DecodeError::Tlv)?;
        out.push(Tlv { kind: *kind, value });
        rest = tail.get(n..).unwrap_or_default();
    }
    if rest.is_empty() {
        Ok(out)
    } else {
        Err(DecodeError::Tlv)
    }
}

fn arr<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Parses a v2 header at the start of `buf`. TLVs after the addresses are skipped.
pub fn decode_v2(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let sig_have = buf.len().min(SIGNATURE.len());
    if buf.get(..sig_have) != SIGNATURE.get(..sig_have) {
        return Err(DecodeError::NoSignature);
    }
    let Some(fixed) = arr::<FIXED_LEN>(buf, 0) else {
        return Err(DecodeError::Incomplete);
    };
    let [.., ver_cmd, fam, l0, l1] = fixed;
    if ver_cmd >> 4 != 2 {
        return Err(DecodeError::Version(ver_cmd >> 4));
    }
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    let total = FIXED_LEN + len;
    let body = buf.get(FIXED_LEN..total).ok_or(DecodeError::Incomplete)?;
    let command = match ver_cmd & 0x0F {
        0 => Command::Local,
        1 => {
            let transport = match fam & 0x0F {
                1 => Some(Transport::Tcp),
                2 => Some(Transport::Udp),
                _ => None,
            };
            match (fam >> 4, transport) {
                (1, Some(transport)) => {
                    let a = arr::<V4_ADDR_LEN>(body, 0).ok_or(DecodeError::Short)?;
                    let [s0, s1, s2, s3, d0, d1, d2, d3, sp0, sp1, dp0, dp1] = a;
                    Command::Proxy {
                        transport,
                        src: SocketAddr::new(
                            Ipv4Addr::new(s0, s1, s2, s3).into(),
                            u16::from_be_bytes([sp0, sp1]),
                        ),
                        dst: SocketAddr::new(
                            Ipv4Addr::new(d0, d1, d2, d3).into(),
                            u16::from_be_bytes([dp0, dp1]),
                        ),
                    }
                }
                (2, Some(transport)) => {
                    let s = arr::<16>(body, 0).ok_or(DecodeError::Short)?;
                    let d = arr::<16>(body, 16).ok_or(DecodeError::Short)?;
                    let sp = arr::<2>(body, 32).ok_or(DecodeError::Short)?;
                    let dp = arr::<2>(body, 34).ok_or(DecodeError::Short)?;
                    Command::Proxy {
                        transport,
                        src: SocketAddr::new(Ipv6Addr::from(s).into(), u16::from_be_bytes(sp)),
                        dst: SocketAddr::new(Ipv6Addr::from(d).into(), u16::from_be_bytes(dp)),
                    }
                }
                _ => Command::ProxyUnspec,
            }
        }
        c => return Err(DecodeError::Command(c)),
    };
    Ok(Decoded {
        command,
        len: total,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_bytes_exact() {
        let mut out = Vec::new();
        encode_v2(
            &mut out,
            Transport::Tcp,
            sa("192.0.2.1:1234"),
            sa("203.0.113.1:443"),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[192, 0, 2, 1, 203, 0, 113, 1, 0x04, 0xD2, 0x01, 0xBB]);
        assert_eq!(out, want);
    }

    #[test]
    fn v6_and_udp() {
        let mut out = Vec::new();
        let (s, d) = (sa("[2001:db8::1]:5353"), sa("[2001:db8::2]:53"));
        encode_v2(&mut out, Transport::Udp, s, d);
        assert_eq!(out.len(), FIXED_LEN + V6_ADDR_LEN);
        assert_eq!(out[13], 0x22);
        assert_eq!(
            decode_v2(&out).unwrap().command,
            Command::Proxy {
                transport: Transport::Udp,
                src: s,
                dst: d
            }
        );
    }

    #[test]
    fn mapped_addresses_become_v4_and_mixed_become_v6() {
        let mut out = Vec::new();
        encode_v2(
            &mut out,
            Transport::Tcp,
            sa("[::ffff:198.51.100.9]:1000"),
            sa("[::ffff:203.0.113.1]:80"),
        );
        assert_eq!(out[13], 0x11);
        out.clear();
        encode_v2(
            &mut out,
            Transport::Tcp,
            sa("198.51.100.9:1000"),
            sa("[2001:db8::1]:80"),
        );
        assert_eq!(out[13], 0x21);
        let Command::Proxy { src, .. } = decode_v2(&out).unwrap().command else {
            panic!("not PROXY")
        };
        assert_eq!(src, sa("[::ffff:198.51.100.9]:1000"));
    }

    #[test]
    fn local_and_errors() {
        let mut out = Vec::new();
        encode_v2_local(&mut out);
        assert_eq!(
            decode_v2(&out).unwrap(),
            Decoded {
                command: Command::Local,
                len: 16
            }
        );
        assert_eq!(decode_v2(b"GET / HTTP/1.1"), Err(DecodeError::NoSignature));
        assert_eq!(decode_v2(&SIGNATURE[..5]), Err(DecodeError::Incomplete));
        let mut bad = SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x11, 0x11, 0, 0]);
        assert_eq!(decode_v2(&bad), Err(DecodeError::Version(1)));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(decode_v2(&short), Err(DecodeError::Short));
        let mut unspec = SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(decode_v2(&unspec).unwrap().command, Command::ProxyUnspec);
    }

    #[test]
    fn tlvs_are_skipped() {
        let mut out = Vec::new();
        encode_v2(&mut out, Transport::Tcp, sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        out[15] += 4; // announce a 4-byte TLV
        out.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA, b'x']);
        let d = decode_v2(&out).unwrap();
        assert_eq!(d.len, FIXED_LEN + V4_ADDR_LEN + 4);
    }

    #[test]
    fn tlvs_are_listed_and_overruns_refused() {
        let mut out = Vec::new();
        encode_v2(&mut out, Transport::Tcp, sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        assert_eq!(tlvs_v2(&out).unwrap(), []);
        push_tlv(&mut out, 0xE8, &[1]);
        push_tlv(&mut out, 0x04, b"");
        push_tlv(&mut out, 0xE7, b"xyz");
        assert_eq!(decode_v2(&out).unwrap().len, out.len());
        assert_eq!(
            tlvs_v2(&out).unwrap(),
            [
                Tlv {
                    kind: 0xE8,
                    value: &[1]
                },
                Tlv {
                    kind: 0x04,
                    value: b""
                },
                Tlv {
                    kind: 0xE7,
                    value: b"xyz"
                },
            ]
        );
        // Bytes after the header are not its TLVs.
        let mut more = out.clone();
        more.extend_from_slice(&[0xE9, 0, 0]);
        assert_eq!(tlvs_v2(&more).unwrap().len(), 3);
        // A TLV longer than the header, or a stub of one.
        let mut over = out.clone();
        let at = over.len() - 4;
        over[at] = 9;
        assert_eq!(tlvs_v2(&over), Err(DecodeError::Tlv));
        let mut stub = Vec::new();
        encode_v2(&mut stub, Transport::Tcp, sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        stub.extend_from_slice(&[0xE8, 0]);
        stub[15] += 2;
        assert_eq!(tlvs_v2(&stub), Err(DecodeError::Tlv));
        // IPv6 and LOCAL headers.
        let mut v6 = Vec::new();
        encode_v2(
            &mut v6,
            Transport::Tcp,
            sa("[2001:db8::1]:5"),
            sa("[2001:db8::2]:6"),
        );
        push_tlv(&mut v6, 0xE8, &[1]);
        assert_eq!(tlvs_v2(&v6).unwrap().len(), 1);
        let mut local = Vec::new();
        encode_v2_local(&mut local);
        push_tlv(&mut local, 0x01, b"h2");
        assert_eq!(tlvs_v2(&local).unwrap()[0].value, b"h2");
        assert_eq!(tlvs_v2(b"PROXY TCP4 "), Err(DecodeError::NoSignature));
    }

    #[test]
    fn v1_vectors() {
        let d = decode(b"PROXY TCP4 192.0.2.7 203.0.113.1 56324 443\r\nGET /").unwrap();
        assert_eq!(d.len, 44);
        assert_eq!(
            d.command,
            Command::Proxy {
                transport: Transport::Tcp,
                src: sa("192.0.2.7:56324"),
                dst: sa("203.0.113.1:443"),
            }
        );
        let d = decode(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 80\r\n").unwrap();
        assert_eq!(
            d.command,
            Command::Proxy {
                transport: Transport::Tcp,
                src: sa("[2001:db8::7]:40000"),
                dst: sa("[2001:db8::1]:80"),
            }
        );
        let d = decode(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap();
        assert_eq!((d.command, d.len), (Command::ProxyUnspec, 35));
        assert_eq!(decode(b"PROXY UNKNOWN\r\n").unwrap().len, 15);
        assert_eq!(
            decode(b"PROXY TCP4 192.0.2.7"),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(decode(b"PROX"), Err(DecodeError::Incomplete));
        assert_eq!(decode(b""), Err(DecodeError::Incomplete));
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 1 2 3\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 1\r\n",
            b"PROXY UDP4 192.0.2.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4  192.0.2.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.\xff 192.0.2.1 1 2\r\n",
        ];
        for b in bad {
            assert!(
                matches!(decode(b), Err(DecodeError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(b),
                decode(b)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat();
        assert_eq!(
            decode(&long),
            Err(DecodeError::Malformed("no CRLF within 107 bytes"))
        );
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(DecodeError::NoSignature));
        assert_eq!(decode(b"PRI * HTTP/2.0"), Err(DecodeError::NoSignature));
        // Version 2 through the same entry point.
        let mut v2 = Vec::new();
        encode_v2(
            &mut v2,
            Transport::Tcp,
            sa("192.0.2.7:1"),
            sa("203.0.113.1:443"),
        );
        assert_eq!(decode(&v2).unwrap().len, v2.len());
        let mut local = Vec::new();
        encode_v2_local(&mut local);
        assert_eq!(decode(&local).unwrap().command, Command::Local);
    }

    proptest! {
        #[test]
        fn roundtrip(s in any::<SocketAddr>(), d in any::<SocketAddr>(), udp in any::<bool>()) {
            let t = if udp { Transport::Udp } else { Transport::Tcp };
            let mut out = Vec::new();
            encode_v2(&mut out, t, s, d);
            let dec = decode_v2(&out).unwrap();
            prop_assert_eq!(dec.len, out.len());
            let Command::Proxy { transport, src, dst } = dec.command else { panic!() };
            prop_assert_eq!(transport, t);
            prop_assert_eq!(unmap(src.ip()), unmap(s.ip()));
            prop_assert_eq!(unmap(dst.ip()), unmap(d.ip()));
            prop_assert_eq!((src.port(), dst.port()), (s.port(), d.port()));
            // every strict prefix is Incomplete
            for cut in 0..out.len() {
                prop_assert_eq!(decode_v2(&out[..cut]), Err(DecodeError::Incomplete));
            }
        }

        #[test]
        fn v1_roundtrip(s in any::<SocketAddr>(), d in any::<SocketAddr>(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut out = Vec::new();
            encode_v1(&mut out, s, d);
            prop_assert!(out.len() <= V1_MAX_LEN);
            let n = out.len();
            out.extend_from_slice(&tail);
            let dec = decode(&out).unwrap();
            prop_assert_eq!(dec.len, n);
            let Command::Proxy { transport, src, dst } = dec.command else { panic!() };
            prop_assert_eq!(transport, Transport::Tcp);
            prop_assert_eq!(unmap(src.ip()), unmap(s.ip()));
            prop_assert_eq!(unmap(dst.ip()), unmap(d.ip()));
            prop_assert_eq!((src.port(), dst.port()), (s.port(), d.port()));
            for cut in 0..n {
                prop_assert_eq!(decode(&out[..cut]), Err(DecodeError::Incomplete));
            }
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&b);
            let _ = decode_v1(&[b"PROXY ".as_slice(), &b].concat());
            let _ = decode_v2(&b);
            let mut s = SIGNATURE.to_vec();
            s.extend_from_slice(&b);
            let _ = decode_v2(&s);
            let _ = tlvs_v2(&s);
        }
    }
}

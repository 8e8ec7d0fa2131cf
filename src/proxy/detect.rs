#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
//! Protocol detection for the proxy listeners: TLS ClientHello parsing (SNI, ALPN,
//! versions) for :443 and HTTP/1.x `Host` sniffing for :80.
//!
//! Pure and sans-IO, in the style of linkerd's `parse_sni(&[u8])`: the driver peeks or
//! reads into a buffer and calls these functions with **everything received so far**.
//! `Incomplete` means "keep reading and call again with the longer buffer"; every
//! other result is final. The functions never panic, never allocate in the common case
//! (one ClientHello in one record), and stop at a size cap ([`MAX_CLIENT_HELLO_LEN`],
//! [`MAX_HTTP_HEAD_LEN`]) so a slow client cannot make the driver buffer forever. The
//! driver is still responsible for a read deadline.
//!
//! ```
//! use gatewire::proxy::detect::{detect, parse_client_hello, Detected, SniError};
//! # let captured: &[u8] = &[0x16, 0x03, 0x01, 0x00];
//! match detect(captured) {
//!     Detected::Tls => match parse_client_hello(captured) {
//!         Ok(hello) => { let _route_by = hello.server_name(); }
//!         Err(SniError::Incomplete { .. }) => { /* read more */ }
//!         Err(_other) => { /* close */ }
//!     },
//!     Detected::Incomplete => { /* read more */ }
//!     Detected::Http | Detected::Unknown => { /* ... */ }
//! }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use super::names::{DomainName, NameError};

/// Default cap on the bytes [`parse_client_hello`] will look at: record headers plus
/// the ClientHello. A buffer that would have to grow past this gives
/// [`SniError::TooLarge`]. Real ClientHellos are 200–2000 bytes (post-quantum key
/// shares included).
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

/// Default cap on an HTTP/1.x request head (request line plus headers plus the blank line).
pub const MAX_HTTP_HEAD_LEN: usize = 16 * 1024;

/// TLS record header length (type, version, length).
pub const RECORD_HEADER_LEN: usize = 5;
/// TLSPlaintext.length limit (2^14).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// Handshake header length (type, 24-bit length).
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SNI_HOST_NAME: u8 = 0;

// ---------------------------------------------------------------------------------
// Protocol detection
// ---------------------------------------------------------------------------------

/// What the first bytes of a connection look like. See [`detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS handshake record (`0x16 0x03 0x00..=0x04`): call [`parse_client_hello`].
    Tls,
    /// An HTTP/1.x request line starting with a known method and a space: call
    /// [`sniff_http_host`].
    Http,
    /// Neither (including SSLv2-format hellos and the HTTP/2 prior-knowledge preface
    /// `PRI * HTTP/2.0`, which carries no `Host`).
    Unknown,
    /// Too few bytes to decide (at most 8 are ever needed).
    Incomplete,
}

/// Methods [`detect`] recognises as HTTP/1.x, each followed by a space.
const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Classifies a connection by its first bytes.
///
/// TLS needs 3 bytes (`0x16`, then record version `0x03 0x00..=0x04`); HTTP needs the
/// method and the following space. Returns [`Detected::Incomplete`] while the bytes so
/// far are a prefix of something recognisable.
pub fn detect(buf: &[u8]) -> Detected {
    match buf {
        [] => Detected::Incomplete,
        [CONTENT_TYPE_HANDSHAKE, rest @ ..] => match rest {
            [] | [3] => Detected::Incomplete,
            [3, minor, ..] if *minor <= 4 => Detected::Tls,
            _ => Detected::Unknown,
        },
        _ => {
            let mut maybe = false;
            for m in HTTP_METHODS {
                if buf.starts_with(m) {
                    return Detected::Http;
                }
                maybe |= m.starts_with(buf);
            }
            if maybe {
                Detected::Incomplete
            } else {
                Detected::Unknown
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// TLS ClientHello
// ---------------------------------------------------------------------------------

/// A TLS protocol version number as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsVersion(pub u16);

impl TlsVersion {
    /// SSL 3.0.
    pub const SSL3_0: TlsVersion = TlsVersion(0x0300);
    /// TLS 1.0.
    pub const TLS1_0: TlsVersion = TlsVersion(0x0301);
    /// TLS 1.1.
    pub const TLS1_1: TlsVersion = TlsVersion(0x0302);
    /// TLS 1.2.
    pub const TLS1_2: TlsVersion = TlsVersion(0x0303);
    /// TLS 1.3.
    pub const TLS1_3: TlsVersion = TlsVersion(0x0304);

    /// True for the RFC 8701 GREASE values (`0x0a0a`, `0x1a1a`, … `0xfafa`).
    pub fn is_grease(self) -> bool {
        let [hi, lo] = self.0.to_be_bytes();
        hi == lo && lo & 0x0f == 0x0a
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TlsVersion::SSL3_0 => f.write_str("SSLv3"),
            TlsVersion::TLS1_0 => f.write_str("TLSv1.0"),
            TlsVersion::TLS1_1 => f.write_str("TLSv1.1"),
            TlsVersion::TLS1_2 => f.write_str("TLSv1.2"),
            TlsVersion::TLS1_3 => f.write_str("TLSv1.3"),
            TlsVersion(v) => write!(f, "{v:#06x}"),
        }
    }
}

/// Why [`parse_client_hello`] could not return a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniError {
    /// The buffer is a valid prefix so far; read more and call again.
    ///
    /// `needed`, when known, is a lower bound on how many more bytes are required
    /// (the exact amount if the rest of the ClientHello arrives in the current record).
    #[error("incomplete ClientHello ({needed:?} more bytes needed)")]
    Incomplete {
        /// Lower bound on the additional bytes needed, if known.
        needed: Option<usize>,
    },
    /// The first record is not a TLS handshake record (wrong content type or record
    /// version; SSLv2-format hellos land here).
    #[error("not a TLS handshake")]
    NotTls,
    /// The ClientHello (or the records carrying it) would exceed the size cap.
    #[error("ClientHello exceeds {limit} bytes")]
    TooLarge {
        /// The cap that was applied.
        limit: usize,
    },
    /// A TLS handshake record whose contents are not a valid ClientHello.
    #[error("malformed ClientHello: {0}")]
    Malformed(HelloMalformed),
}

impl SniError {
    /// A short, stable identifier suitable as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            SniError::Incomplete { .. } => "incomplete",
            SniError::NotTls => "not_tls",
            SniError::TooLarge { .. } => "too_large",
            SniError::Malformed(m) => m.as_str(),
        }
    }
}

impl From<HelloMalformed> for SniError {
    fn from(m: HelloMalformed) -> Self {
        SniError::Malformed(m)
    }
}

/// The specific reason a ClientHello is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloMalformed {
    /// A record with length 0 (forbidden for handshake records).
    #[error("empty handshake record")]
    EmptyRecord,
    /// A record longer than 2^14 bytes.
    #[error("record longer than 16384 bytes")]
    RecordOverflow,
    /// A later record carrying the ClientHello is not a handshake record.
    #[error("record of content type {0} interleaved with the ClientHello")]
    UnexpectedContentType(u8),
    /// A later record has a record-layer version other than `0x0300..=0x0304`.
    #[error("record-layer version {0:#06x}")]
    BadRecordVersion(u16),
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message has type {0}, not ClientHello (1)")]
    NotClientHello(u8),
    /// More handshake bytes follow the ClientHello in its last record.
    #[error("handshake data after the ClientHello")]
    TrailingHandshakeData,
    /// A length field runs past the end of its enclosing structure.
    #[error("{0} is truncated")]
    Truncated(&'static str),
    /// Bytes left over after the last field of a structure.
    #[error("trailing bytes after {0}")]
    TrailingBytes(&'static str),
    /// A length field has an impossible value (odd, zero, too big).
    #[error("invalid length for {0}")]
    InvalidLength(&'static str),
    /// `legacy_version` is not `3.x`.
    #[error("ClientHello version {0:#06x}")]
    BadLegacyVersion(u16),
    /// The same extension type appears twice.
    #[error("duplicate extension {0}")]
    DuplicateExtension(u16),
    /// `server_name` lists more than one `host_name`.
    #[error("more than one host_name in server_name")]
    DuplicateServerName,
    /// The SNI `host_name` is not a valid DNS host name.
    #[error("invalid SNI host name: {0}")]
    InvalidServerName(NameError),
    /// An empty protocol name in ALPN.
    #[error("empty ALPN protocol name")]
    EmptyAlpnProtocol,
}

impl HelloMalformed {
    /// A short, stable identifier suitable as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            HelloMalformed::EmptyRecord => "empty_record",
            HelloMalformed::RecordOverflow => "record_overflow",
            HelloMalformed::UnexpectedContentType(_) => "unexpected_content_type",
            HelloMalformed::BadRecordVersion(_) => "bad_record_version",
            HelloMalformed::NotClientHello(_) => "not_client_hello",
            HelloMalformed::TrailingHandshakeData => "trailing_handshake_data",
            HelloMalformed::Truncated(_) => "truncated",
            HelloMalformed::TrailingBytes(_) => "trailing_bytes",
            HelloMalformed::InvalidLength(_) => "invalid_length",
            HelloMalformed::BadLegacyVersion(_) => "bad_legacy_version",
            HelloMalformed::DuplicateExtension(_) => "duplicate_extension",
            HelloMalformed::DuplicateServerName => "duplicate_server_name",
            HelloMalformed::InvalidServerName(_) => "invalid_server_name",
            HelloMalformed::EmptyAlpnProtocol => "empty_alpn_protocol",
        }
    }
}

/// What the proxy needs from a ClientHello. See [`parse_client_hello`].
///
/// Borrows from the input buffer when the ClientHello sits in one record; when it is
/// fragmented across records the (small) ALPN and version lists are owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo<'a> {
    record_version: TlsVersion,
    legacy_version: TlsVersion,
    server_name: Option<DomainName>,
    /// Raw ALPN `protocol_name_list` body, validated (non-empty entries, exact fit).
    alpn: Option<Cow<'a, [u8]>>,
    /// Raw `supported_versions` body, validated (even length).
    supported_versions: Option<Cow<'a, [u8]>>,
    records_len: usize,
}

impl<'a> ClientHelloInfo<'a> {
    /// The SNI host name, validated and lowercased. `None` if the client sent no
    /// `server_name` extension, only non-`host_name` entries, or an IP literal
    /// (RFC 6066 forbids IP literals; they are ignored, not rejected).
    pub fn server_name(&self) -> Option<&DomainName> {
        self.server_name.as_ref()
    }

    /// True if the client sent an ALPN extension.
    pub fn has_alpn(&self) -> bool {
        self.alpn.is_some()
    }

    /// The ALPN protocols in client preference order (empty if no extension).
    pub fn alpn_protocols(&self) -> impl Iterator<Item = &[u8]> + '_ {
        LengthPrefixed8(self.alpn.as_deref().unwrap_or_default())
    }

    /// True if the client offers the ALPN protocol `proto` (e.g. `b"h2"`).
    pub fn offers_alpn(&self, proto: &[u8]) -> bool {
        self.alpn_protocols().any(|p| p == proto)
    }

    /// The record-layer version of the first record (usually TLS 1.0 or 1.2; ignored
    /// by TLS 1.3).
    pub fn record_version(&self) -> TlsVersion {
        self.record_version
    }

    /// `ClientHello.legacy_version` (TLS 1.2 for TLS 1.3 clients).
    pub fn legacy_version(&self) -> TlsVersion {
        self.legacy_version
    }

    /// True if the client sent a `supported_versions` extension.
    pub fn has_supported_versions(&self) -> bool {
        self.supported_versions.is_some()
    }

    /// The `supported_versions` list as sent, GREASE included (empty if absent).
    pub fn supported_versions(&self) -> impl Iterator<Item = TlsVersion> + '_ {
        self.supported_versions
            .as_deref()
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| match c {
                [a, b] => TlsVersion(u16::from_be_bytes([*a, *b])),
                _ => TlsVersion(0),
            })
    }

    /// The highest version the client offers: the maximum non-GREASE entry of
    /// `supported_versions` if present (RFC 8446 §4.2.1), else `legacy_version`.
    pub fn max_version(&self) -> TlsVersion {
        if self.has_supported_versions() {
            self.supported_versions()
                .filter(|v| !v.is_grease())
                .max()
                .unwrap_or(self.legacy_version)
        } else {
            self.legacy_version
        }
    }

    /// Bytes of the input taken by the records that carry the ClientHello. Anything
    /// after that (e.g. a ChangeCipherSpec or early-data record) was not examined.
    pub fn records_len(&self) -> usize {
        self.records_len
    }

    /// Detaches the result from the input buffer.
    pub fn into_owned(self) -> ClientHelloInfo<'static> {
        ClientHelloInfo {
            record_version: self.record_version,
            legacy_version: self.legacy_version,
            server_name: self.server_name,
            alpn: self.alpn.map(|c| Cow::Owned(c.into_owned())),
            supported_versions: self.supported_versions.map(|c| Cow::Owned(c.into_owned())),
            records_len: self.records_len,
        }
    }
}

/// Iterator over a validated sequence of `u8`-length-prefixed, non-empty items.
struct LengthPrefixed8<'a>(&'a [u8]);

impl<'a> Iterator for LengthPrefixed8<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let mut r = Reader(self.0);
        let item = r.vec_u8();
        // On (impossible, pre-validated) truncation, stop rather than loop.
        self.0 = if item.is_some() { r.0 } else { &[] };
        item
    }
}

/// A bounds-checked big-endian cursor; every read is `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        let (&b, tail) = self.0.split_first()?;
        self.0 = tail;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        match *self.take(2)? {
            [a, b] => Some(u16::from_be_bytes([a, b])),
            _ => None,
        }
    }
    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Where the ClientHello lies in the buffer, found by [`scan_records`].
struct Layout {
    /// End of the last record carrying the ClientHello.
    records_end: usize,
    /// Handshake message length including its 4-byte header.
    msg_len: usize,
    /// True if the whole message is in the first record.
    single_record: bool,
}

/// Parses a TLS ClientHello from the start of `buf`, with the default size cap
/// [`MAX_CLIENT_HELLO_LEN`].
///
/// `buf` is everything received on the connection so far. The ClientHello may be
/// fragmented over several handshake records, and the records over several reads:
/// until the last byte of the message has arrived the result is
/// [`SniError::Incomplete`]. Errors that can be decided early (wrong content type,
/// non-ClientHello message, a declared size over the cap) are returned early.
///
/// Accepts record-layer versions `0x0300..=0x0304` (TLS 1.0–1.3 clients send
/// `0x0301` or `0x0303`). Rejects duplicate extensions, more than one SNI `host_name`,
/// and an SNI `host_name` that is not a valid DNS name; ignores SNI entries of other
/// name types and IP-literal `host_name`s (reported as no SNI).
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHelloInfo<'_>, SniError> {
    parse_client_hello_capped(buf, MAX_CLIENT_HELLO_LEN)
}

/// [`parse_client_hello`] with a caller-chosen cap on the bytes examined (record
/// headers included).
pub fn parse_client_hello_capped(
    buf: &[u8],
    limit: usize,
) -> Result<ClientHelloInfo<'_>, SniError> {
    let layout = scan_records(buf, limit)?;
    let record_version = match buf {
        [_, a, b, ..] => TlsVersion(u16::from_be_bytes([*a, *b])),
        _ => return Err(HelloMalformed::Truncated("record header").into()),
    };
    let info = if layout.single_record {
        let start = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN;
        let end = RECORD_HEADER_LEN + layout.msg_len;
        let body = buf
            .get(start..end)
            .ok_or(HelloMalformed::Truncated("record"))?;
        parse_body(body, record_version, layout.records_end)?
    } else {
        let msg = reassemble(buf, &layout)?;
        let body = msg
            .get(HANDSHAKE_HEADER_LEN..)
            .ok_or(HelloMalformed::Truncated("handshake header"))?;
        parse_body(body, record_version, layout.records_end)?.into_owned()
    };
    Ok(info)
}

/// Walks the records at the start of `buf` and finds the extent of the first
/// handshake message, checking everything that can be checked on a prefix.
fn scan_records(buf: &[u8], limit: usize) -> Result<Layout, SniError> {
    let mut pos = 0usize; // start of the current record
    let mut first = true;
    let mut hs_header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut hs_header_have = 0usize;
    let mut msg_len: Option<usize> = None; // once the handshake header is known
    let mut msg_have = 0usize; // handshake bytes in records fully scanned so far

    loop {
        let avail = buf.get(pos..).unwrap_or_default();
        // Record header, checked byte by byte so garbage is rejected early.
        if let Some(&ct) = avail.first() {
            if ct != CONTENT_TYPE_HANDSHAKE {
                return Err(if first {
                    SniError::NotTls
                } else {
                    HelloMalformed::UnexpectedContentType(ct).into()
                });
            }
        }
        if let Some(&major) = avail.get(1) {
            let minor = avail.get(2).copied().unwrap_or(0);
            if major != 3 || minor > 4 {
                return Err(if first {
                    SniError::NotTls
                } else {
                    HelloMalformed::BadRecordVersion(u16::from_be_bytes([major, minor])).into()
                });
            }
        }
        let Some(&[_, _, _, len_hi, len_lo]) = avail.first_chunk::<RECORD_HEADER_LEN>() else {
            // Need the rest of the header plus at least the rest of the message.
            let more_msg = match msg_len {
                Some(total) => total.saturating_sub(msg_have),
                None => HANDSHAKE_HEADER_LEN.saturating_sub(hs_header_have),
            };
            let need_total = pos + RECORD_HEADER_LEN + more_msg;
            if need_total > limit {
                return Err(SniError::TooLarge { limit });
            }
            return Err(SniError::Incomplete {
                needed: Some(need_total.saturating_sub(buf.len())),
            });
        };
        let rec_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if rec_len == 0 {
            return Err(HelloMalformed::EmptyRecord.into());
        }
        if rec_len > MAX_RECORD_PAYLOAD {
            return Err(HelloMalformed::RecordOverflow.into());
        }
        let rec_end = pos + RECORD_HEADER_LEN + rec_len;
        let payload = avail.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let payload = payload.get(..rec_len).unwrap_or(payload);

        // Feed handshake-header bytes from this record, if still needed.
        let mut header_bytes = payload;
        while hs_header_have < HANDSHAKE_HEADER_LEN {
            let Some((&b, rest)) = header_bytes.split_first() else {
                break;
            };
            header_bytes = rest;
            if let Some(slot) = hs_header.get_mut(hs_header_have) {
                *slot = b;
            }
            hs_header_have += 1;
            if hs_header_have == 1 && b != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloMalformed::NotClientHello(b).into());
            }
            if hs_header_have == HANDSHAKE_HEADER_LEN {
                let [_, a, b, c] = hs_header;
                let body = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
                msg_len = Some(HANDSHAKE_HEADER_LEN + body);
            }
        }

        // Account for this record as if it will arrive in full.
        let msg_have_after = msg_have + rec_len;
        let more_after = match msg_len {
            Some(total) if msg_have_after > total => {
                return Err(HelloMalformed::TrailingHandshakeData.into());
            }
            Some(total) => total - msg_have_after,
            // The rest of this record may still hold the missing header bytes.
            None => HANDSHAKE_HEADER_LEN.saturating_sub(hs_header_have + (rec_len - payload.len())),
        };
        // Lower bound on the buffer needed to complete the message.
        let need_total = if more_after > 0 {
            rec_end + RECORD_HEADER_LEN + more_after
        } else {
            rec_end
        };
        if need_total > limit {
            return Err(SniError::TooLarge { limit });
        }
        if payload.len() < rec_len {
            return Err(SniError::Incomplete {
                needed: Some(need_total.saturating_sub(buf.len())),
            });
        }

        msg_have = msg_have_after;
        pos = rec_end;
        if let Some(total) = msg_len {
            if msg_have == total {
                return Ok(Layout {
                    records_end: rec_end,
                    msg_len: total,
                    single_record: first,
                });
            }
        }
        first = false;
    }
}

/// Concatenates the handshake payloads of the records found by [`scan_records`].
fn reassemble(buf: &[u8], layout: &Layout) -> Result<Vec<u8>, SniError> {
    let mut msg = Vec::with_capacity(layout.msg_len);
    let mut r = Reader(buf.get(..layout.records_end).unwrap_or_default());
    while !r.is_empty() {
        r.take(3)
            .ok_or(HelloMalformed::Truncated("record header"))?;
        let payload = r.vec_u16().ok_or(HelloMalformed::Truncated("record"))?;
        msg.extend_from_slice(payload);
    }
    Ok(msg)
}

/// A 65536-bit set for duplicate-extension detection (8 KiB on the stack).
struct ExtensionSet([u64; 1024]);

impl ExtensionSet {
    /// Inserts `t`; false if it was already present.
    fn insert(&mut self, t: u16) -> bool {
        let word = usize::from(t >> 6);
        let bit = 1u64 << (t & 63);
        match self.0.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            _ => false,
        }
    }
}

/// Parses the ClientHello body (after the 4-byte handshake header).
fn parse_body(
    body: &[u8],
    record_version: TlsVersion,
    records_len: usize,
) -> Result<ClientHelloInfo<'_>, SniError> {
    use HelloMalformed::*;
    let mut r = Reader(body);
    let legacy_version = TlsVersion(r.u16().ok_or(Truncated("legacy_version"))?);
    if legacy_version.0 >> 8 != 3 {
        return Err(BadLegacyVersion(legacy_version.0).into());
    }
    r.take(32).ok_or(Truncated("random"))?;
    let session_id = r.vec_u8().ok_or(Truncated("legacy_session_id"))?;
    if session_id.len() > 32 {
        return Err(InvalidLength("legacy_session_id").into());
    }
    let suites = r.vec_u16().ok_or(Truncated("cipher_suites"))?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(InvalidLength("cipher_suites").into());
    }
    let compression = r.vec_u8().ok_or(Truncated("compression_methods"))?;
    if compression.is_empty() {
        return Err(InvalidLength("compression_methods").into());
    }

    let mut info = ClientHelloInfo {
        record_version,
        legacy_version,
        server_name: None,
        alpn: None,
        supported_versions: None,
        records_len,
    };
    // SSLv3/TLS 1.0 clients may omit the extensions block entirely.
    if r.is_empty() {
        return Ok(info);
    }
    let exts = r.vec_u16().ok_or(Truncated("extensions"))?;
    if !r.is_empty() {
        return Err(TrailingBytes("extensions").into());
    }

    let mut seen = ExtensionSet([0; 1024]);
    let mut r = Reader(exts);
    while !r.is_empty() {
        let ext_type = r.u16().ok_or(Truncated("extension header"))?;
        let data = r.vec_u16().ok_or(Truncated("extension"))?;
        if !seen.insert(ext_type) {
            return Err(DuplicateExtension(ext_type).into());
        }
        match ext_type {
            EXT_SERVER_NAME => info.server_name = parse_sni(data)?,
            EXT_ALPN => info.alpn = Some(Cow::Borrowed(parse_alpn(data)?)),
            EXT_SUPPORTED_VERSIONS => {
                let mut v = Reader(data);
                let list = v.vec_u8().ok_or(Truncated("supported_versions"))?;
                if !v.is_empty() {
                    return Err(TrailingBytes("supported_versions").into());
                }
                if list.is_empty() || list.len() % 2 != 0 {
                    return Err(InvalidLength("supported_versions").into());
                }
                info.supported_versions = Some(Cow::Borrowed(list));
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Parses the `server_name` extension body (RFC 6066 §3).
fn parse_sni(data: &[u8]) -> Result<Option<DomainName>, SniError> {
    use HelloMalformed::*;
    let mut r = Reader(data);
    let list = r.vec_u16().ok_or(Truncated("server_name_list"))?;
    if !r.is_empty() {
        return Err(TrailingBytes("server_name_list").into());
    }
    if list.is_empty() {
        return Err(InvalidLength("server_name_list").into());
    }
    let mut r = Reader(list);
    let mut host: Option<&[u8]> = None;
    while !r.is_empty() {
        let name_type = r.u8().ok_or(Truncated("server_name"))?;
        let name = r.vec_u16().ok_or(Truncated("server_name"))?;
        if name_type != SNI_HOST_NAME {
            continue; // other name types are ignored
        }
        if host.replace(name).is_some() {
            return Err(DuplicateServerName.into());
        }
    }
    let Some(host) = host else {
        return Ok(None);
    };
    if host.is_empty() {
        return Err(InvalidLength("host_name").into());
    }
    if is_ip_literal(host) {
        return Ok(None);
    }
    DomainName::from_ascii(host)
        .map(Some)
        .map_err(|e| InvalidServerName(e).into())
}

/// True for an IPv4/IPv6 literal (optionally bracketed or with a trailing dot).
fn is_ip_literal(name: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(name) else {
        return false;
    };
    let s = s.strip_suffix('.').unwrap_or(s);
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse::<IpAddr>().is_ok()
}

/// Validates the ALPN extension body and returns the raw `protocol_name_list`.
fn parse_alpn(data: &[u8]) -> Result<&[u8], SniError> {
    use HelloMalformed::*;
    let mut r = Reader(data);
    let list = r.vec_u16().ok_or(Truncated("protocol_name_list"))?;
    if !r.is_empty() {
        return Err(TrailingBytes("protocol_name_list").into());
    }
    if list.is_empty() {
        return Err(InvalidLength("protocol_name_list").into());
    }
    let mut r = Reader(list);
    while !r.is_empty() {
        let proto = r.vec_u8().ok_or(Truncated("protocol_name"))?;
        if proto.is_empty() {
            return Err(EmptyAlpnProtocol.into());
        }
    }
    Ok(list)
}

// ---------------------------------------------------------------------------------
// HTTP/1.x Host sniffing
// ---------------------------------------------------------------------------------

/// Why [`sniff_http_host`] could not return a request head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniffError {
    /// No complete header block yet; read more and call again.
    #[error("incomplete HTTP request head")]
    Incomplete,
    /// The request line does not start with an HTTP method token.
    #[error("not an HTTP/1.x request")]
    NotHttp,
    /// The head is longer than the cap.
    #[error("HTTP request head exceeds {limit} bytes")]
    TooLarge {
        /// The cap that was applied.
        limit: usize,
    },
    /// An HTTP/1.x request that a server must reject with 400 (or that we cannot route).
    #[error("malformed HTTP request: {0}")]
    Malformed(HttpMalformed),
}

impl SniffError {
    /// A short, stable identifier suitable as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            SniffError::Incomplete => "incomplete",
            SniffError::NotHttp => "not_http",
            SniffError::TooLarge { .. } => "too_large",
            SniffError::Malformed(m) => m.as_str(),
        }
    }
}

impl From<HttpMalformed> for SniffError {
    fn from(m: HttpMalformed) -> Self {
        SniffError::Malformed(m)
    }
}

/// The specific reason an HTTP request head is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpMalformed {
    /// The request line is not `method SP target SP version`.
    #[error("bad request line")]
    RequestLine,
    /// The request target has invalid characters or an unsupported form.
    #[error("bad request target")]
    Target,
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    Version,
    /// A header line without a valid `name:`.
    #[error("bad header name")]
    HeaderName,
    /// A header value with control characters.
    #[error("bad header value")]
    HeaderValue,
    /// A line folded with leading whitespace (obsolete, RFC 9112 §5.2).
    #[error("obsolete line folding")]
    ObsFold,
    /// More than one `Host` header.
    #[error("duplicate Host header")]
    DuplicateHost,
    /// HTTP/1.1 without a `Host` header.
    #[error("missing Host header")]
    MissingHost,
    /// An empty host in `Host` or the target authority.
    #[error("empty host")]
    EmptyHost,
    /// A host that is neither a DNS name nor an IP literal.
    #[error("invalid host: {0}")]
    InvalidHost(NameError),
    /// A malformed IP literal or authority (`[` without `]`, userinfo, …).
    #[error("invalid authority")]
    Authority,
    /// A port that is not a number in 0–65535.
    #[error("invalid port")]
    Port,
}

impl HttpMalformed {
    /// A short, stable identifier suitable as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            HttpMalformed::RequestLine => "request_line",
            HttpMalformed::Target => "target",
            HttpMalformed::Version => "version",
            HttpMalformed::HeaderName => "header_name",
            HttpMalformed::HeaderValue => "header_value",
            HttpMalformed::ObsFold => "obs_fold",
            HttpMalformed::DuplicateHost => "duplicate_host",
            HttpMalformed::MissingHost => "missing_host",
            HttpMalformed::EmptyHost => "empty_host",
            HttpMalformed::InvalidHost(_) => "invalid_host",
            HttpMalformed::Authority => "authority",
            HttpMalformed::Port => "port",
        }
    }
}

/// HTTP/1.x minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0 (`Host` optional).
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// A request host: a validated DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercased, trailing dot stripped.
    Name(DomainName),
    /// An IPv4 literal or a bracketed IPv6 literal (brackets removed).
    Ip(IpAddr),
}

/// `host[:port]` from a `Host` header or an absolute-form target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The host.
    pub host: Host,
    /// The port, if one was given (an empty port after `:` counts as none).
    pub port: Option<u16>,
}

/// The parts of an HTTP/1.x request head the proxy routes on. See [`sniff_http_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead<'a> {
    /// Request method (a token, case preserved).
    pub method: &'a str,
    /// Request target as sent.
    pub target: &'a str,
    /// HTTP version.
    pub version: HttpVersion,
    /// The effective host: the authority of an absolute-form (or CONNECT
    /// authority-form) target if present, else the `Host` header. `None` only for an
    /// HTTP/1.0 request with neither.
    pub authority: Option<Authority>,
    /// Length of the head in bytes, including the terminating blank line.
    pub head_len: usize,
}

impl HttpHead<'_> {
    /// The host name to route on, if the host is a DNS name.
    pub fn host_name(&self) -> Option<&DomainName> {
        match &self.authority {
            Some(Authority {
                host: Host::Name(n),
                ..
            }) => Some(n),
            _ => None,
        }
    }
}

/// Sniffs an HTTP/1.x request head with the default cap [`MAX_HTTP_HEAD_LEN`].
///
/// `buf` is everything received so far. Returns [`SniffError::Incomplete`] until the
/// blank line that ends the header block has arrived (lines may end in CRLF or bare
/// LF), but rejects a bad request line as soon as that line is complete. Header names
/// are matched case-insensitively; the `Host` value has its port stripped and an IPv6
/// literal must be bracketed. Per RFC 9112 §3.2.2 an absolute-form target's authority
/// overrides `Host`, so routing cannot be confused by a `Host` that disagrees with the
/// target. HTTP/1.1 requires exactly one `Host`; HTTP/1.0 allows none. Leading blank
/// lines before the request line are not accepted.
pub fn sniff_http_host(buf: &[u8]) -> Result<HttpHead<'_>, SniffError> {
    sniff_http_host_capped(buf, MAX_HTTP_HEAD_LEN)
}

/// [`sniff_http_host`] with a caller-chosen cap on the head length.
pub fn sniff_http_host_capped(buf: &[u8], limit: usize) -> Result<HttpHead<'_>, SniffError> {
    let window = buf.get(..limit).unwrap_or(buf);
    let mut lines = Lines {
        buf: window,
        pos: 0,
    };

    let Some(request_line) = lines.next_line() else {
        // Reject early if what we have cannot begin a request line.
        let partial = window.split(|&b| b == b' ').next().unwrap_or_default();
        if !partial.iter().all(|&b| is_tchar(b)) || window.first() == Some(&b' ') {
            return Err(SniffError::NotHttp);
        }
        return Err(incomplete_or_too_large(buf, limit));
    };
    let (method, target, version) = parse_request_line(request_line)?;

    let mut host_header: Option<&[u8]> = None;
    let head_len = loop {
        let Some(line) = lines.next_line() else {
            return Err(incomplete_or_too_large(buf, limit));
        };
        if line.is_empty() {
            break lines.pos;
        }
        let (name, value) = parse_header_line(line)?;
        if name.eq_ignore_ascii_case(b"host") && host_header.replace(value).is_some() {
            return Err(HttpMalformed::DuplicateHost.into());
        }
    };

    let host_header = match host_header {
        Some(v) => Some(parse_authority(v)?),
        None if version == HttpVersion::Http11 => return Err(HttpMalformed::MissingHost.into()),
        None => None,
    };
    let authority = match target_authority(method, target)? {
        Some(a) => Some(parse_authority(a)?),
        None => host_header,
    };
    Ok(HttpHead {
        method: ascii_str(method)?,
        target: ascii_str(target)?,
        version,
        authority,
        head_len,
    })
}

fn incomplete_or_too_large(buf: &[u8], limit: usize) -> SniffError {
    if buf.len() >= limit {
        SniffError::TooLarge { limit }
    } else {
        SniffError::Incomplete
    }
}

/// Splits complete lines (terminated by LF, with an optional CR before it).
struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    fn next_line(&mut self) -> Option<&'a [u8]> {
        let rest = self.buf.get(self.pos..)?;
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = rest.get(..nl)?;
        self.pos += nl + 1;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn ascii_str(b: &[u8]) -> Result<&str, SniffError> {
    std::str::from_utf8(b).map_err(|_| HttpMalformed::RequestLine.into())
}

fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], HttpVersion), SniffError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(SniffError::NotHttp);
    }
    let (Some(target), Some(version)) = (parts.next(), parts.next()) else {
        return Err(HttpMalformed::RequestLine.into());
    };
    if target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(HttpMalformed::Target.into());
    }
    let version = match version {
        b"HTTP/1.1" => HttpVersion::Http11,
        b"HTTP/1.0" => HttpVersion::Http10,
        v if v.starts_with(b"HTTP/") => return Err(HttpMalformed::Version.into()),
        _ => return Err(HttpMalformed::RequestLine.into()),
    };
    Ok((method, target, version))
}

fn parse_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), SniffError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HttpMalformed::ObsFold.into());
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HttpMalformed::HeaderName)?;
    let (name, value) = line
        .split_at_checked(colon)
        .ok_or(HttpMalformed::HeaderName)?;
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HttpMalformed::HeaderName.into());
    }
    let value = value.get(1..).unwrap_or_default();
    if !value
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80)
    {
        return Err(HttpMalformed::HeaderValue.into());
    }
    Ok((name, value.trim_ascii()))
}

/// The authority embedded in the target, for absolute-form and CONNECT
/// authority-form targets; `None` for origin-form (`/…`) and asterisk-form (`*`).
fn target_authority<'a>(method: &[u8], target: &'a [u8]) -> Result<Option<&'a [u8]>, SniffError> {
    if method == b"CONNECT" {
        return Ok(Some(target));
    }
    if target.starts_with(b"/") || target == b"*" {
        return Ok(None);
    }
    let scheme_end = target
        .windows(3)
        .position(|w| w == b"://")
        .ok_or(HttpMalformed::Target)?;
    let (scheme, rest) = target
        .split_at_checked(scheme_end)
        .ok_or(HttpMalformed::Target)?;
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return Err(HttpMalformed::Target.into());
    }
    let rest = rest.get(3..).unwrap_or_default();
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Ok(Some(rest.get(..end).unwrap_or(rest)))
}

/// Parses `host[:port]` / `[v6]:port`.
fn parse_authority(raw: &[u8]) -> Result<Authority, SniffError> {
    let s = std::str::from_utf8(raw).map_err(|_| HttpMalformed::Authority)?;
    if s.is_empty() {
        return Err(HttpMalformed::EmptyHost.into());
    }
    if s.contains('@') {
        return Err(HttpMalformed::Authority.into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(HttpMalformed::Authority)?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| HttpMalformed::Authority)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(HttpMalformed::Authority)?),
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (h, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if h.is_empty() {
            return Err(HttpMalformed::EmptyHost.into());
        }
        let host = match h.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => Host::Ip(IpAddr::V4(ip)),
            Err(_) => Host::Name(DomainName::parse(h).map_err(HttpMalformed::InvalidHost)?),
        };
        (host, port)
    };
    let port = match port {
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| HttpMalformed::Port)?)
        }
        Some(_) => return Err(HttpMalformed::Port.into()),
    };
    Ok(Authority { host, port })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- ClientHello builder -----------------------------------------------------

    fn u16be(v: usize) -> [u8; 2] {
        u16::try_from(v).unwrap().to_be_bytes()
    }

    fn ext(t: u16, data: &[u8]) -> Vec<u8> {
        let mut v = t.to_be_bytes().to_vec();
        v.extend_from_slice(&u16be(data.len()));
        v.extend_from_slice(data);
        v
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&u16be(n.len()));
            list.extend_from_slice(n);
        }
        let mut v = u16be(list.len()).to_vec();
        v.extend(list);
        ext(EXT_SERVER_NAME, &v)
    }

    fn alpn_ext(protos: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protos {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend_from_slice(p);
        }
        let mut v = u16be(list.len()).to_vec();
        v.extend(list);
        ext(EXT_ALPN, &v)
    }

    fn versions_ext(vs: &[u16]) -> Vec<u8> {
        let mut v = vec![u8::try_from(vs.len() * 2).unwrap()];
        for x in vs {
            v.extend_from_slice(&x.to_be_bytes());
        }
        ext(EXT_SUPPORTED_VERSIONS, &v)
    }

    /// A handshake message (header included) with the given extensions
    /// (`None` = no extensions block at all).
    fn hello_msg(exts: Option<&[Vec<u8>]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0xab; 32]);
        body.push(32);
        body.extend_from_slice(&[0xcd; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2f]);
        body.extend_from_slice(&[1, 0]);
        if let Some(exts) = exts {
            let all: Vec<u8> = exts.concat();
            body.extend_from_slice(&u16be(all.len()));
            body.extend(all);
        }
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    /// Splits `msg` into handshake records whose payload sizes cycle through `sizes`.
    fn records(msg: &[u8], sizes: &[usize], version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = msg;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            i += 1;
            let (chunk, tail) = rest.split_at(n);
            out.push(CONTENT_TYPE_HANDSHAKE);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&u16be(n));
            out.extend_from_slice(chunk);
            rest = tail;
        }
        out
    }

    fn one_record(msg: &[u8]) -> Vec<u8> {
        records(msg, &[usize::MAX], 0x0301)
    }

    fn standard_exts() -> Vec<Vec<u8>> {
        vec![
            sni_ext(&[(0, b"App.GW.Example.com")]),
            ext(0x000a, &[0, 2, 0, 0x1d]),
            alpn_ext(&[b"h2", b"http/1.1"]),
            versions_ext(&[0x3a3a, 0x0304, 0x0303]),
        ]
    }

    fn malformed(buf: &[u8]) -> HelloMalformed {
        match parse_client_hello(buf) {
            Err(SniError::Malformed(m)) => m,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// Every strict prefix is Incomplete with a sound `needed`, the full buffer parses.
    fn check_prefixes(buf: &[u8]) -> ClientHelloInfo<'_> {
        for n in 0..buf.len() {
            match parse_client_hello(&buf[..n]) {
                Err(SniError::Incomplete { needed: Some(k) }) => {
                    assert!(k >= 1 && n + k <= buf.len(), "prefix {n}: needed {k}")
                }
                other => panic!("prefix {n}/{}: {other:?}", buf.len()),
            }
        }
        parse_client_hello(buf).unwrap()
    }

    // ---- detect ------------------------------------------------------------------

    #[test]
    fn detect_by_first_bytes() {
        assert_eq!(detect(b""), Detected::Incomplete);
        assert_eq!(detect(&[0x16]), Detected::Incomplete);
        assert_eq!(detect(&[0x16, 3]), Detected::Incomplete);
        assert_eq!(detect(&[0x16, 3, 1]), Detected::Tls);
        assert_eq!(detect(&[0x16, 3, 4, 0]), Detected::Tls);
        assert_eq!(detect(&[0x16, 3, 5]), Detected::Unknown);
        assert_eq!(detect(&[0x16, 2]), Detected::Unknown);
        assert_eq!(detect(&[0x80, 0x2e, 0x01]), Detected::Unknown);
        assert_eq!(detect(b"G"), Detected::Incomplete);
        assert_eq!(detect(b"GET"), Detected::Incomplete);
        assert_eq!(detect(b"GET "), Detected::Http);
        assert_eq!(detect(b"OPTIONS * HTTP/1.1"), Detected::Http);
        assert_eq!(detect(b"P"), Detected::Incomplete);
        assert_eq!(detect(b"PR"), Detected::Unknown);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n"), Detected::Unknown);
        assert_eq!(detect(b"get / HTTP/1.1"), Detected::Unknown);
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), Detected::Unknown);
        assert_eq!(detect(b"GETX"), Detected::Unknown);
    }

    // ---- ClientHello -------------------------------------------------------------

    #[test]
    fn parses_standard_hello_at_every_prefix() {
        let buf = one_record(&hello_msg(Some(&standard_exts())));
        let info = check_prefixes(&buf);
        assert_eq!(info.server_name().unwrap().as_str(), "app.gw.example.com");
        assert!(info.has_alpn());
        assert_eq!(
            info.alpn_protocols().collect::<Vec<_>>(),
            vec![&b"h2"[..], b"http/1.1"]
        );
        assert!(info.offers_alpn(b"h2"));
        assert!(!info.offers_alpn(b"h3"));
        assert_eq!(info.record_version(), TlsVersion::TLS1_0);
        assert_eq!(info.legacy_version(), TlsVersion::TLS1_2);
        assert_eq!(
            info.supported_versions().collect::<Vec<_>>(),
            vec![TlsVersion(0x3a3a), TlsVersion::TLS1_3, TlsVersion::TLS1_2]
        );
        assert_eq!(info.max_version(), TlsVersion::TLS1_3);
        assert_eq!(info.records_len(), buf.len());
        // Borrowed in the single-record case.
        assert!(matches!(info.alpn, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn fragmented_across_records_gives_same_result() {
        let msg = hello_msg(Some(&standard_exts()));
        let want = parse_client_hello(&one_record(&msg)).unwrap().into_owned();
        for sizes in [
            &[1usize][..],
            &[2],
            &[3],
            &[4],
            &[5, 1],
            &[40, 7],
            &[msg.len() - 1],
        ] {
            for version in [0x0300, 0x0301, 0x0302, 0x0303, 0x0304] {
                let buf = records(&msg, sizes, version);
                let got = check_prefixes(&buf).into_owned();
                assert_eq!(got.server_name(), want.server_name());
                assert_eq!(
                    got.alpn_protocols().collect::<Vec<_>>(),
                    want.alpn_protocols().collect::<Vec<_>>()
                );
                assert_eq!(got.max_version(), TlsVersion::TLS1_3);
                assert_eq!(got.records_len(), buf.len());
            }
        }
    }

    #[test]
    fn trailing_records_are_not_examined() {
        let mut buf = one_record(&hello_msg(Some(&standard_exts())));
        let len = buf.len();
        buf.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3]); // CCS + partial app data
        let info = parse_client_hello(&buf).unwrap();
        assert_eq!(info.records_len(), len);
    }

    #[test]
    fn record_layer_errors() {
        assert_eq!(parse_client_hello(&[0x17]), Err(SniError::NotTls));
        assert_eq!(parse_client_hello(&[0x16, 2]), Err(SniError::NotTls));
        assert_eq!(parse_client_hello(&[0x16, 3, 5]), Err(SniError::NotTls));
        assert_eq!(
            parse_client_hello(&[0x80, 0x2e, 1, 3, 1]),
            Err(SniError::NotTls)
        );
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(malformed(&[0x16, 3, 1, 0, 0]), HelloMalformed::EmptyRecord);
        assert_eq!(
            malformed(&[0x16, 3, 1, 0x40, 1]),
            HelloMalformed::RecordOverflow
        );
        // Not a ClientHello: rejected as soon as the handshake type byte arrives.
        assert_eq!(
            malformed(&[0x16, 3, 1, 0, 50, 2]),
            HelloMalformed::NotClientHello(2)
        );
        // A later record of another type.
        let msg = hello_msg(Some(&standard_exts()));
        let mut buf = records(&msg[..10], &[10], 0x0301);
        buf.extend_from_slice(&[21, 3, 1, 0, 2, 2, 40]);
        assert_eq!(malformed(&buf), HelloMalformed::UnexpectedContentType(21));
        let mut buf = records(&msg[..10], &[10], 0x0301);
        buf.extend_from_slice(&[22, 4, 1]);
        assert_eq!(malformed(&buf), HelloMalformed::BadRecordVersion(0x0401));
        // Extra handshake bytes after the ClientHello in the same record.
        let mut extra = msg.clone();
        extra.extend_from_slice(&[11, 0, 0, 0]);
        assert_eq!(
            malformed(&one_record(&extra)),
            HelloMalformed::TrailingHandshakeData
        );
        // ... detected from the record header, before the bytes arrive.
        let buf = one_record(&extra);
        assert_eq!(
            malformed(&buf[..RECORD_HEADER_LEN + 4]),
            HelloMalformed::TrailingHandshakeData
        );
    }

    #[test]
    fn size_cap() {
        // Declared 1 MiB message: rejected from the first 9 bytes.
        assert_eq!(
            parse_client_hello(&[0x16, 3, 1, 0x40, 0, 1, 0x10, 0, 0]),
            Err(SniError::TooLarge {
                limit: MAX_CLIENT_HELLO_LEN
            })
        );
        let buf = one_record(&hello_msg(Some(&standard_exts())));
        assert!(parse_client_hello_capped(&buf, buf.len()).is_ok());
        assert_eq!(
            parse_client_hello_capped(&buf, buf.len() - 1),
            Err(SniError::TooLarge {
                limit: buf.len() - 1
            })
        );
        // Many tiny records: the record headers count against the cap too.
        let msg = hello_msg(Some(&standard_exts()));
        let tiny = records(&msg, &[1], 0x0301);
        assert_eq!(tiny.len(), msg.len() * 6);
        assert!(parse_client_hello_capped(&tiny, tiny.len()).is_ok());
        assert_eq!(
            parse_client_hello_capped(&tiny, tiny.len() - 1),
            Err(SniError::TooLarge {
                limit: tiny.len() - 1
            })
        );
        // A hello with a 15 KiB padding extension fits in the default cap.
        let big = hello_msg(Some(&[ext(21, &vec![0; 15 * 1024])]));
        assert!(parse_client_hello(&records(&big, &[4096], 0x0301)).is_ok());
        let huge = hello_msg(Some(&[ext(21, &vec![0; 16 * 1024])]));
        assert!(matches!(
            parse_client_hello(&records(&huge, &[4096], 0x0301)),
            Err(SniError::TooLarge { .. })
        ));
    }

    #[test]
    fn sni_variants() {
        let parse = |exts: &[Vec<u8>]| {
            parse_client_hello(&one_record(&hello_msg(Some(exts))))
                .map(|i| i.server_name().map(|n| n.as_str().to_owned()))
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(
            parse(&[sni_ext(&[(0, b"Example.COM.")])]),
            Ok(Some("example.com".into()))
        );
        // Non-host_name entries are ignored, before or after the host_name.
        assert_eq!(
            parse(&[sni_ext(&[(7, b"whatever"), (0, b"a.example"), (9, b"")])]),
            Ok(Some("a.example".into()))
        );
        assert_eq!(parse(&[sni_ext(&[(1, b"x")])]), Ok(None));
        // IP literals are not allowed by RFC 6066: treated as no SNI.
        assert_eq!(parse(&[sni_ext(&[(0, b"127.0.0.1")])]), Ok(None));
        assert_eq!(parse(&[sni_ext(&[(0, b"::1")])]), Ok(None));
        assert_eq!(parse(&[sni_ext(&[(0, b"[2001:db8::1]")])]), Ok(None));
        let err = |exts: &[Vec<u8>]| malformed(&one_record(&hello_msg(Some(exts))));
        assert_eq!(
            err(&[sni_ext(&[(0, b"a.example"), (0, b"b.example")])]),
            HelloMalformed::DuplicateServerName
        );
        assert_eq!(
            err(&[sni_ext(&[(0, b"foo_bar.example")])]).to_string(),
            "invalid SNI host name: label `foo_bar` contains `_`"
        );
        assert!(matches!(
            err(&[sni_ext(&[(0, b"\xff.example")])]),
            HelloMalformed::InvalidServerName(NameError::NotUtf8)
        ));
        assert_eq!(
            err(&[sni_ext(&[(0, b"")])]),
            HelloMalformed::InvalidLength("host_name")
        );
        assert_eq!(
            err(&[ext(EXT_SERVER_NAME, &[])]),
            HelloMalformed::Truncated("server_name_list")
        );
        assert_eq!(
            err(&[ext(EXT_SERVER_NAME, &[0, 0])]),
            HelloMalformed::InvalidLength("server_name_list")
        );
        assert_eq!(
            err(&[ext(EXT_SERVER_NAME, &[0, 4, 0, 0, 5, b'a'])]),
            HelloMalformed::Truncated("server_name")
        );
        assert_eq!(
            err(&[sni_ext(&[(0, b"a.example")]), sni_ext(&[(0, b"a.example")])]),
            HelloMalformed::DuplicateExtension(0)
        );
        assert_eq!(
            err(&[ext(0xff01, &[0]), ext(0xff01, &[0])]),
            HelloMalformed::DuplicateExtension(0xff01)
        );
    }

    #[test]
    fn alpn_and_versions_variants() {
        let err = |exts: &[Vec<u8>]| malformed(&one_record(&hello_msg(Some(exts))));
        assert_eq!(
            err(&[alpn_ext(&[b"h2", b""])]),
            HelloMalformed::EmptyAlpnProtocol
        );
        assert_eq!(
            err(&[ext(EXT_ALPN, &[0, 0])]),
            HelloMalformed::InvalidLength("protocol_name_list")
        );
        assert_eq!(
            err(&[ext(EXT_ALPN, &[0, 3, 2, b'h', b'2', 0])]),
            HelloMalformed::TrailingBytes("protocol_name_list")
        );
        assert_eq!(
            err(&[ext(EXT_SUPPORTED_VERSIONS, &[3, 3, 4, 3])]),
            HelloMalformed::InvalidLength("supported_versions")
        );
        // No extensions block at all (old clients): no SNI, no ALPN, legacy version.
        let info = parse_client_hello(&one_record(&hello_msg(None)))
            .unwrap()
            .into_owned();
        assert_eq!(info.server_name(), None);
        assert!(!info.has_alpn());
        assert_eq!(info.alpn_protocols().count(), 0);
        assert!(!info.has_supported_versions());
        assert_eq!(info.max_version(), TlsVersion::TLS1_2);
        // Only GREASE in supported_versions falls back to legacy_version.
        let info = parse_client_hello(&one_record(&hello_msg(Some(&[versions_ext(&[0x0a0a])]))))
            .unwrap()
            .into_owned();
        assert_eq!(info.max_version(), TlsVersion::TLS1_2);
        assert!(TlsVersion(0xfafa).is_grease());
        assert!(!TlsVersion::TLS1_3.is_grease());
        assert_eq!(TlsVersion::TLS1_3.to_string(), "TLSv1.3");
        assert_eq!(TlsVersion(0x7f1c).to_string(), "0x7f1c");
    }

    #[test]
    fn body_errors() {
        let msg = hello_msg(Some(&standard_exts()));
        // Corrupt legacy_version.
        let mut m = msg.clone();
        m[4] = 2;
        assert_eq!(
            malformed(&one_record(&m)),
            HelloMalformed::BadLegacyVersion(0x0203)
        );
        // session_id longer than 32.
        let mut m = msg.clone();
        m[4 + 34] = 33;
        assert_eq!(
            malformed(&one_record(&m)),
            HelloMalformed::InvalidLength("legacy_session_id")
        );
        // Handshake length shorter than the body: extensions truncated.
        let mut m = msg.clone();
        m.truncate(m.len() - 3);
        let body_len = u32::try_from(m.len() - 4).unwrap().to_be_bytes();
        m[1..4].copy_from_slice(&body_len[1..]);
        assert_eq!(
            malformed(&one_record(&m)),
            HelloMalformed::Truncated("extensions")
        );
        // Empty message.
        assert_eq!(
            malformed(&one_record(&[1, 0, 0, 0])),
            HelloMalformed::Truncated("legacy_version")
        );
        assert_eq!(SniError::NotTls.as_str(), "not_tls");
        assert_eq!(
            SniError::Malformed(HelloMalformed::DuplicateExtension(0)).as_str(),
            "duplicate_extension"
        );
    }

    // ---- HTTP --------------------------------------------------------------------

    fn sniff_err(buf: &[u8]) -> SniffError {
        sniff_http_host(buf).unwrap_err()
    }

    fn host_of(buf: &[u8]) -> Authority {
        sniff_http_host(buf).unwrap().authority.unwrap()
    }

    fn name(s: &str) -> Host {
        Host::Name(DomainName::parse(s).unwrap())
    }

    #[test]
    fn http_basic_every_prefix() {
        let buf = b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: curl/8\r\nhOsT:  App.GW.example.com:8080 \r\nAccept: */*\r\n\r\nbody";
        let head_end = buf.len() - 4;
        for n in 0..head_end {
            assert_eq!(
                sniff_http_host(&buf[..n]),
                Err(SniffError::Incomplete),
                "prefix {n}"
            );
        }
        let head = sniff_http_host(buf).unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/index.html?q=1");
        assert_eq!(head.version, HttpVersion::Http11);
        assert_eq!(head.head_len, head_end);
        assert_eq!(head.host_name().unwrap().as_str(), "app.gw.example.com");
        assert_eq!(head.authority.unwrap().port, Some(8080));
    }

    #[test]
    fn http_host_forms() {
        let req = |h: &str| format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n").into_bytes();
        assert_eq!(
            host_of(&req("example.com")),
            Authority {
                host: name("example.com"),
                port: None
            }
        );
        assert_eq!(host_of(&req("example.com.:")).port, None);
        assert_eq!(
            host_of(&req("[::1]:8443")).host,
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(host_of(&req("[::1]:8443")).port, Some(8443));
        assert_eq!(host_of(&req("[2001:DB8::1]")).port, None);
        assert_eq!(
            host_of(&req("10.0.0.1:80")).host,
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        let m = |h: &str| match sniff_err(&req(h)) {
            SniffError::Malformed(m) => m,
            e => panic!("{e:?}"),
        };
        assert_eq!(m(""), HttpMalformed::EmptyHost);
        assert_eq!(m(":80"), HttpMalformed::EmptyHost);
        assert_eq!(m("::1"), HttpMalformed::EmptyHost);
        assert_eq!(m("fe80::1"), HttpMalformed::Port);
        assert_eq!(m("[::1"), HttpMalformed::Authority);
        assert_eq!(m("[::1]x"), HttpMalformed::Authority);
        assert_eq!(m("[nope]"), HttpMalformed::Authority);
        assert_eq!(m("a.com:99999"), HttpMalformed::Port);
        assert_eq!(m("a.com:8x"), HttpMalformed::Port);
        assert_eq!(m("user@a.com"), HttpMalformed::Authority);
        assert_eq!(
            m("foo_bar.example").to_string(),
            "invalid host: label `foo_bar` contains `_`"
        );
        assert_eq!(
            m("1.2.3.999").to_string(),
            "invalid host: name `1.2.3.999` ends in the all-digit label `999`; IP addresses are not domain names"
        );
    }

    #[test]
    fn http_head_rules() {
        use HttpMalformed::*;
        let m = |b: &[u8]| match sniff_err(b) {
            SniffError::Malformed(m) => m,
            e => panic!("{e:?}"),
        };
        assert_eq!(m(b"GET / HTTP/1.1\r\n\r\n"), MissingHost);
        let h10 = sniff_http_host(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((h10.version, h10.authority), (HttpVersion::Http10, None));
        assert_eq!(
            m(b"GET / HTTP/1.1\r\nHost: a.com\r\nHOST: b.com\r\n\r\n"),
            DuplicateHost
        );
        assert_eq!(
            m(b"GET / HTTP/1.1\r\nHost: a.com\r\n folded\r\n\r\n"),
            ObsFold
        );
        assert_eq!(m(b"GET / HTTP/1.1\r\nHost : a.com\r\n\r\n"), HeaderName);
        assert_eq!(m(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), HeaderName);
        assert_eq!(
            m(b"GET / HTTP/1.1\r\nX: a\x00b\r\nHost: a.com\r\n\r\n"),
            HeaderValue
        );
        assert_eq!(
            m(b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: a.com\r\n\r\n"),
            HeaderValue
        );
        assert_eq!(m(b"GET / HTTP/2.0\r\n\r\n"), Version);
        assert_eq!(m(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Version);
        assert_eq!(m(b"GET /\r\n\r\n"), RequestLine);
        assert_eq!(m(b"GET  / HTTP/1.1\r\n\r\n"), Target);
        assert_eq!(m(b"GET / HTTP/1.1 \r\n\r\n"), Version);
        assert_eq!(
            m(b"GET ftp://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Target
        );
        assert_eq!(m(b"GET nope HTTP/1.1\r\nHost: a.com\r\n\r\n"), Target);
        // Request-line errors are reported before the head is complete.
        assert_eq!(m(b"GET / HTTP/3\r\n"), Version);
        assert_eq!(sniff_err(b"\x16\x03\x01"), SniffError::NotHttp);
        assert_eq!(sniff_err(b"\r\nGET / HTTP/1.1\r\n"), SniffError::NotHttp);
        assert_eq!(sniff_err(b" GET"), SniffError::NotHttp);
        assert_eq!(sniff_err(b"G(T"), SniffError::NotHttp);
        // Bare LF line endings are accepted.
        let h = sniff_http_host(b"GET / HTTP/1.1\nHost: a.com\n\n").unwrap();
        assert_eq!(h.head_len, 28);
        // Absolute-form target overrides Host.
        let h =
            sniff_http_host(b"GET HTTP://B.com:81/x?y HTTP/1.1\r\nHost: a.com\r\n\r\n").unwrap();
        assert_eq!(h.host_name().unwrap().as_str(), "b.com");
        assert_eq!(h.authority.unwrap().port, Some(81));
        let h = sniff_http_host(b"GET https://[::1]?q HTTP/1.1\r\nHost: a.com\r\n\r\n").unwrap();
        assert_eq!(h.authority.unwrap().host, Host::Ip("::1".parse().unwrap()));
        // A bad Host is rejected even when the target overrides it.
        assert_eq!(
            m(b"GET http://b.com/ HTTP/1.1\r\nHost: a_b\r\n\r\n").as_str(),
            "invalid_host"
        );
        // CONNECT uses the authority-form target.
        let h = sniff_http_host(b"CONNECT c.com:443 HTTP/1.1\r\nHost: c.com:443\r\n\r\n").unwrap();
        assert_eq!(h.host_name().unwrap().as_str(), "c.com");
        // asterisk-form.
        let h = sniff_http_host(b"OPTIONS * HTTP/1.1\r\nHost: d.com\r\n\r\n").unwrap();
        assert_eq!(h.host_name().unwrap().as_str(), "d.com");
        // Size cap.
        let mut big = b"GET / HTTP/1.1\r\nHost: a.com\r\nX: ".to_vec();
        big.extend(vec![b'a'; MAX_HTTP_HEAD_LEN]);
        assert_eq!(
            sniff_err(&big),
            SniffError::TooLarge {
                limit: MAX_HTTP_HEAD_LEN
            }
        );
        let ok = b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n";
        assert!(sniff_http_host_capped(ok, ok.len()).is_ok());
        assert_eq!(
            sniff_http_host_capped(ok, ok.len() - 1),
            Err(SniffError::TooLarge {
                limit: ok.len() - 1
            })
        );
    }

    // ---- proptests ---------------------------------------------------------------

    fn hello_strategy() -> impl Strategy<Value = (Vec<u8>, Option<String>, Vec<Vec<u8>>)> {
        let host = prop::option::of("[a-z][a-z0-9]{0,9}(\\.[a-z]([a-z0-9-]{0,8}[a-z])?){0,4}");
        let alpn = prop::collection::vec(prop::collection::vec(any::<u8>(), 1..12), 0..5);
        let other = prop::collection::vec(
            (100u16..200, prop::collection::vec(any::<u8>(), 0..64)),
            0..6,
        );
        (host, alpn, other).prop_map(|(host, alpn, other)| {
            let mut exts: Vec<Vec<u8>> = other
                .iter()
                .enumerate()
                .map(|(i, (t, d))| ext(t + 100 * u16::try_from(i).unwrap(), d))
                .collect();
            if let Some(h) = &host {
                exts.insert(0, sni_ext(&[(0, h.as_bytes())]));
            }
            if !alpn.is_empty() {
                let refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
                exts.push(alpn_ext(&refs));
            }
            (hello_msg(Some(&exts)), host, alpn)
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = detect(&buf);
            let _ = parse_client_hello(&buf);
            let _ = parse_client_hello_capped(&buf, 64);
            let _ = sniff_http_host(&buf);
            let _ = sniff_http_host_capped(&buf, 16);
        }

        #[test]
        fn tls_shaped_random_bytes_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..600),
            len in 0u16..700,
            hs_len in 0u32..700,
        ) {
            let mut buf = vec![0x16, 3, 1];
            buf.extend_from_slice(&len.to_be_bytes());
            buf.push(1);
            buf.extend_from_slice(&hs_len.to_be_bytes()[1..]);
            buf.extend_from_slice(&[3, 3]);
            buf.extend(tail);
            for n in 0..=buf.len() {
                let _ = parse_client_hello(&buf[..n]);
            }
        }

        #[test]
        fn any_prefix_of_valid_hello_is_incomplete(
            (msg, host, alpn) in hello_strategy(),
            sizes in prop::collection::vec(1usize..300, 1..4),
            version in 0x0300u16..=0x0304,
        ) {
            let buf = records(&msg, &sizes, version);
            for n in 0..buf.len() {
                match parse_client_hello(&buf[..n]) {
                    Err(SniError::Incomplete { needed: Some(k) }) => prop_assert!(n + k <= buf.len()),
                    other => prop_assert!(false, "prefix {}: {:?}", n, other),
                }
            }
            let info = parse_client_hello(&buf).unwrap();
            prop_assert_eq!(info.server_name().map(|d| d.as_str().to_owned()), host);
            prop_assert_eq!(info.alpn_protocols().map(<[u8]>::to_vec).collect::<Vec<_>>(), alpn);
            prop_assert_eq!(info.records_len(), buf.len());
            prop_assert_eq!(detect(&buf), Detected::Tls);
        }

        #[test]
        fn mutated_hello_never_panics(
            (msg, _, _) in hello_strategy(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut buf = records(&msg, &[97], 0x0301);
            for (i, b) in flips {
                let i = i.index(buf.len());
                buf[i] = b;
            }
            let _ = parse_client_hello(&buf);
        }

        #[test]
        fn any_prefix_of_valid_http_head_is_incomplete(
            method in "GET|POST|PUT|DELETE|X-CUSTOM",
            path in "/[a-zA-Z0-9/._?=&%-]{0,40}",
            host in "[a-z][a-z0-9]{0,9}(\\.[a-z]([a-z0-9-]{0,8}[a-z])?){0,3}",
            port in prop::option::of(any::<u16>()),
            headers in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,40}"), 0..6),
            lf_only in any::<bool>(),
        ) {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut s = format!("{method} {path} HTTP/1.1{eol}");
            for (k, v) in &headers {
                if !k.eq_ignore_ascii_case("host") {
                    s.push_str(&format!("{k}: {v}{eol}"));
                }
            }
            match port {
                Some(p) => s.push_str(&format!("Host: {host}:{p}{eol}")),
                None => s.push_str(&format!("Host: {host}{eol}")),
            }
            s.push_str(eol);
            let buf = s.as_bytes();
            for n in 0..buf.len() {
                prop_assert_eq!(sniff_http_host(&buf[..n]), Err(SniffError::Incomplete));
            }
            let head = sniff_http_host(buf).unwrap();
            prop_assert_eq!(head.host_name().unwrap().as_str(), host.as_str());
            prop_assert_eq!(head.authority.unwrap().port, port);
            prop_assert_eq!(head.head_len, buf.len());
        }
    }
}

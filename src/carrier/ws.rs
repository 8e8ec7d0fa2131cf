//! WireGuard over WebSocket (RFC 6455), for nodes whose only way out is an
//! HTTP intermediary that terminates TLS: a TLS-inspecting corporate proxy,
//! a CDN, a reverse proxy in front of the hub. Those pass WebSocket
//! upgrades but not the hub's own ALPN. Each WireGuard datagram is one
//! binary message.
//!
//! Pure: the opening handshake (the node's request, the hub's checks and
//! answer) and the frames, bytes in and out; the caller brings the random
//! key and masks. No sockets.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The path the hub answers carried tunnels on, whatever the host.
pub const PATH: &str = "/.well-known/gatewire/wg";
/// The subprotocol both ends name (`Sec-WebSocket-Protocol`).
pub const PROTOCOL: &str = "gatewire-wg";
/// The largest message taken (a WireGuard message is far smaller).
pub const MAX_MESSAGE: usize = 65_535;
/// The longest response header accepted from the hub or an intermediary.
pub const MAX_HEADER: usize = 8 * 1024;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The handshake failed (the text says why).
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
    /// A frame no conforming peer sends.
    #[error("WebSocket frame: {0}")]
    Frame(&'static str),
    /// A message longer than [`MAX_MESSAGE`].
    #[error("WebSocket message of more than {MAX_MESSAGE} bytes")]
    TooLong,
}

impl WsError {
    /// Short name, for counters and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            WsError::Handshake(_) => "ws_handshake",
            WsError::Frame(_) => "ws_frame",
            WsError::TooLong => "ws_too_long",
        }
    }
}

/// True if a request target (`/path?query`) is the tunnel path.
pub fn is_tunnel_target(target: &str) -> bool {
    target.split('?').next() == Some(PATH)
}

/// `Sec-WebSocket-Key` from 16 random bytes.
pub fn client_key(random: [u8; 16]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(random)
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_for(key: &str) -> String {
    use base64::Engine as _;
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{}{GUID}", key.trim()).as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// The node's opening request for `path` on `host` (the `Host` header:
/// `name` or `name:port`).
pub fn request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {PROTOCOL}\r\nUser-Agent: gatewire\r\n\r\n"
    )
    .into_bytes()
}

fn has_token(v: &str, token: &str) -> bool {
    v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads the hub's answer at the start of `buf`: `Ok(None)` while the
/// header is incomplete, `Ok(Some(len))` once a `101` with the right
/// `Sec-WebSocket-Accept` for `key` is there (`len` header bytes; what
/// follows is already frames).
pub fn parse_response(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let bad = |m: String| Err(WsError::Handshake(m));
    // Intermediaries add headers of their own.
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER => {
            return bad(format!("a response header over {MAX_HEADER} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(e) => return bad(format!("not an HTTP response ({e})")),
    };
    if len > MAX_HEADER {
        return bad(format!("a response header over {MAX_HEADER} bytes"));
    }
    let code = r.code.unwrap_or(0);
    if code != 101 {
        let reason: String = r.reason.unwrap_or("").chars().take(100).collect();
        return bad(format!("answered {code} {reason}, not 101"));
    }
    let get = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if !get("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return bad("101 without Upgrade: websocket".into());
    }
    if !get("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return bad("101 without Connection: Upgrade".into());
    }
    if get("sec-websocket-accept").map(str::trim) != Some(accept_for(key).as_str()) {
        return bad("a wrong Sec-WebSocket-Accept".into());
    }
    Ok(Some(len))
}

/// The hub's check of an opening request (method, path and headers as
/// hyper gives them): the `Sec-WebSocket-Accept` to answer with, or why it
/// is refused.
pub fn check_request(
    method: &http::Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<String, &'static str> {
    if method != http::Method::GET {
        return Err("not a GET");
    }
    if !is_tunnel_target(path) {
        return Err("not the tunnel path");
    }
    let get = |n: http::header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if !get(http::header::UPGRADE).is_some_and(|v| has_token(v, "websocket")) {
        return Err("no Upgrade: websocket");
    }
    if !headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| has_token(v, "upgrade"))
    {
        return Err("no Connection: Upgrade");
    }
    if get(http::header::SEC_WEBSOCKET_VERSION).map(str::trim) != Some("13") {
        return Err(VERSION_REFUSED);
    }
    if !headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| has_token(v, PROTOCOL))
    {
        return Err("no Sec-WebSocket-Protocol: gatewire-wg");
    }
    let key = get(http::header::SEC_WEBSOCKET_KEY)
        .map(str::trim)
        .unwrap_or("");
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => Ok(accept_for(key)),
        _ => Err("a Sec-WebSocket-Key that is not 16 bytes in base64"),
    }
}

/// [`check_request`]'s refusal of another WebSocket version (answered with
/// `426` and `Sec-WebSocket-Version: 13`, as RFC 6455 4.4 asks).
pub const VERSION_REFUSED: &str = "not WebSocket version 13";

const OP_CONT: u8 = 0x0;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

fn put_frame(op: u8, payload: &[u8], mask: Option<[u8; 4]>, out: &mut BytesMut) {
    out.reserve(14 + payload.len());
    out.put_u8(0x80 | op);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(m | n as u8),
        n @ 126..=65_535 => {
            out.put_u8(m | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(m | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        None => out.put_slice(payload),
        Some(k) => {
            out.put_slice(&k);
            out.extend(payload.iter().zip(k.iter().cycle()).map(|(b, k)| b ^ k));
        }
    }
}

/// Appends `datagram` as one binary message; `mask`: the node's (a client
/// masks every frame), `None` at the hub. An empty datagram (no WireGuard
/// message is) or one over [`MAX_MESSAGE`] is left out: `false`.
pub fn encode(datagram: &[u8], mask: Option<[u8; 4]>, out: &mut BytesMut) -> bool {
    if datagram.is_empty() || datagram.len() > MAX_MESSAGE {
        return false;
    }
    put_frame(OP_BINARY, datagram, mask, out);
    true
}

/// Appends a pong answering a ping's `payload`.
pub fn pong(payload: &[u8], mask: Option<[u8; 4]>, out: &mut BytesMut) {
    put_frame(OP_PONG, payload.get(..125).unwrap_or(payload), mask, out);
}

/// Appends a close frame (status 1000, normal closure), answering the
/// other end's or closing first.
pub fn close(mask: Option<[u8; 4]>, out: &mut BytesMut) {
    put_frame(OP_CLOSE, &1000u16.to_be_bytes(), mask, out);
}

/// What [`Decoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// A whole binary message: a datagram.
    Data(Bytes),
    /// A ping, to answer with [`pong`].
    Ping(Bytes),
    /// The peer closes.
    Close,
}

/// Reads frames off a stream, joining fragmented messages and unmasking.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The hub's decoder: every frame must be masked (RFC 6455 5.1).
    expect_masked: bool,
    /// A fragmented message so far.
    partial: Option<BytesMut>,
}

impl Decoder {
    /// `expect_masked`: at the hub (frames come from a client).
    pub fn new(expect_masked: bool) -> Decoder {
        Decoder {
            expect_masked,
            partial: None,
        }
    }

    /// Takes what frames are complete at the front of `buf` up to the next
    /// message: `Ok(None)` when `buf` holds only part of one (read more and
    /// call again). Pongs are consumed silently.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Msg>, WsError> {
        loop {
            let Some((fin, op, payload)) = self.frame(buf)? else {
                return Ok(None);
            };
            match op {
                OP_PING => return Ok(Some(Msg::Ping(payload))),
                OP_PONG => continue,
                OP_CLOSE => return Ok(Some(Msg::Close)),
                OP_BINARY if self.partial.is_some() => {
                    return Err(WsError::Frame("a new message inside a fragmented one"))
                }
                // No WireGuard message is empty; RFC 6455 allows them.
                OP_BINARY if fin && payload.is_empty() => continue,
                OP_BINARY if fin => return Ok(Some(Msg::Data(payload))),
                OP_BINARY => self.partial = Some(BytesMut::from(payload.as_ref())),
                OP_CONT => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(WsError::Frame("a continuation with no message"));
                    };
                    if p.len() + payload.len() > MAX_MESSAGE {
                        return Err(WsError::TooLong);
                    }
                    p.extend_from_slice(&payload);
                    if fin {
                        let whole = self.partial.take().unwrap_or_default();
                        if whole.is_empty() {
                            continue;
                        }
                        return Ok(Some(Msg::Data(whole.freeze())));
                    }
                }
                0x1 => return Err(WsError::Frame("a text message")),
                _ => return Err(WsError::Frame("an unknown opcode")),
            }
        }
    }

    /// One whole frame off the front of `buf`: (fin, opcode, unmasked payload).
    fn frame(&self, buf: &mut BytesMut) -> Result<Option<(bool, u8, Bytes)>, WsError> {
        let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(WsError::Frame("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let op = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        if masked != self.expect_masked {
            return Err(WsError::Frame(if masked {
                "a masked frame from the hub"
            } else {
                "an unmasked frame from a node"
            }));
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
                _ => return Ok(None),
            },
            127 => match buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        let control = op & 0x8 != 0;
        if control && (len > 125 || !fin) {
            return Err(WsError::Frame("a control frame too long or fragmented"));
        }
        if len > MAX_MESSAGE as u64 {
            return Err(WsError::TooLong);
        }
        let len = len as usize;
        let key = if masked {
            match buf
                .get(at..at + 4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
            {
                Some(k) => {
                    at += 4;
                    Some(k)
                }
                None => return Ok(None),
            }
        } else {
            None
        };
        if buf.len() < at + len {
            buf.reserve(at + len - buf.len());
            return Ok(None);
        }
        buf.advance(at);
        let mut payload = buf.split_to(len);
        if let Some(k) = key {
            for (b, k) in payload.iter_mut().zip(k.iter().cycle()) {
                *b ^= k;
            }
        }
        Ok(Some((fin, op, payload.freeze())))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_vector() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(client_key([0u8; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
    }

    #[test]
    fn rfc6455_frame_vectors() {
        // RFC 6455 section 5.7: an unmasked "Hello" is a text frame (refused
        // here); the same as binary, masked with 37 fa 21 3d.
        let mut out = BytesMut::new();
        assert!(encode(b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]), &mut out));
        assert_eq!(
            &out[..],
            &[0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let mut d = Decoder::new(true);
        assert_eq!(
            d.decode(&mut out).unwrap(),
            Some(Msg::Data(Bytes::from_static(b"Hello")))
        );
        assert!(out.is_empty());
        let mut text = BytesMut::from(&[0x81u8, 0x05, b'H', b'e', b'l', b'l', b'o'][..]);
        assert_eq!(
            Decoder::new(false).decode(&mut text),
            Err(WsError::Frame("a text message"))
        );
        // Fragmented, unmasked: "Hel" then "lo".
        let mut b = BytesMut::from(&[0x02u8, 0x03, b'H', b'e', b'l', 0x80, 0x02, b'l', b'o'][..]);
        assert_eq!(
            Decoder::new(false).decode(&mut b).unwrap(),
            Some(Msg::Data(Bytes::from_static(b"Hello")))
        );
        // A ping between fragments is answered; a pong is skipped.
        let mut b = BytesMut::from(
            &[
                0x02u8, 0x01, b'a', 0x89, 0x02, b'h', b'i', 0x8A, 0x00, 0x80, 0x01, b'b',
            ][..],
        );
        let mut d = Decoder::new(false);
        assert_eq!(
            d.decode(&mut b).unwrap(),
            Some(Msg::Ping(Bytes::from_static(b"hi")))
        );
        assert_eq!(
            d.decode(&mut b).unwrap(),
            Some(Msg::Data(Bytes::from_static(b"ab")))
        );
        let mut out = BytesMut::new();
        pong(b"hi", None, &mut out);
        assert_eq!(&out[..], &[0x8A, 0x02, b'h', b'i']);
    }

    #[test]
    fn lengths_and_byte_by_byte() {
        for n in [1usize, 125, 126, 1420, 65_535] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
                let mut wire = BytesMut::new();
                assert!(encode(&data, mask, &mut wire));
                wire.extend_from_slice(&wire.clone());
                let mut d = Decoder::new(mask.is_some());
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for b in wire.iter() {
                    buf.put_u8(*b);
                    while let Some(m) = d.decode(&mut buf).unwrap() {
                        got.push(m);
                    }
                }
                assert_eq!(got.len(), 2, "{n} {mask:?}");
                assert_eq!(got[0], Msg::Data(Bytes::from(data.clone())));
            }
        }
        let mut out = BytesMut::new();
        assert!(!encode(&[], None, &mut out));
        assert!(!encode(&vec![0; MAX_MESSAGE + 1], None, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn bad_frames() {
        for (bytes, masked, want) in [
            (
                &[0x82u8, 0x01, 0][..],
                true,
                WsError::Frame("an unmasked frame from a node"),
            ),
            (
                &[0x82, 0x81, 0, 0, 0, 0, 0][..],
                false,
                WsError::Frame("a masked frame from the hub"),
            ),
            (
                &[0xC2, 0x00][..],
                false,
                WsError::Frame("reserved bits set"),
            ),
            (
                &[0x80, 0x00][..],
                false,
                WsError::Frame("a continuation with no message"),
            ),
            (
                &[0x09, 0x00][..],
                false,
                WsError::Frame("a control frame too long or fragmented"),
            ),
            (
                &[0x89, 0x7E, 0, 126][..],
                false,
                WsError::Frame("a control frame too long or fragmented"),
            ),
            (
                &[0x83, 0x00][..],
                false,
                WsError::Frame("an unknown opcode"),
            ),
            (
                &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0][..],
                false,
                WsError::TooLong,
            ),
            (
                &[0x02, 0x01, 1, 0x82, 0x01, 1][..],
                false,
                WsError::Frame("a new message inside a fragmented one"),
            ),
        ] {
            let mut b = BytesMut::from(bytes);
            let mut d = Decoder::new(masked);
            let r = loop {
                match d.decode(&mut b) {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            assert_eq!(r, Err(want), "{bytes:02x?}");
        }
        // Fragments adding up to more than a message may hold.
        let mut b = BytesMut::new();
        b.put_u8(0x02);
        b.put_u8(126);
        b.put_u16(40_000);
        b.put_slice(&[0; 40_000]);
        b.put_u8(0x80);
        b.put_u8(126);
        b.put_u16(40_000);
        b.put_slice(&[0; 40_000]);
        assert_eq!(Decoder::new(false).decode(&mut b), Err(WsError::TooLong));
        // A close.
        let mut b = BytesMut::from(&[0x88u8, 0x00][..]);
        assert_eq!(Decoder::new(false).decode(&mut b), Ok(Some(Msg::Close)));
        // Empty messages (whole or in fragments) are skipped.
        let mut b = BytesMut::from(&[0x82u8, 0x00, 0x02, 0x00, 0x80, 0x00, 0x82, 0x01, 5][..]);
        assert_eq!(
            Decoder::new(false).decode(&mut b),
            Ok(Some(Msg::Data(Bytes::from_static(&[5]))))
        );
        let mut out = BytesMut::new();
        close(None, &mut out);
        assert_eq!(&out[..], &[0x88, 0x02, 0x03, 0xE8]);
        assert!(is_tunnel_target("/.well-known/gatewire/wg?x=1"));
        assert!(!is_tunnel_target("/.well-known/gatewire/wgx"));
    }

    #[test]
    fn handshake() {
        let key = client_key([7; 16]);
        let req = request("hub.example.org", PATH, &key);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut headers);
        assert!(r.parse(&req).unwrap().is_complete());
        let mut map = http::HeaderMap::new();
        for h in r.headers.iter() {
            map.append(
                http::header::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        let accept = check_request(&http::Method::GET, r.path.unwrap(), &map).unwrap();
        assert_eq!(accept, accept_for(&key));
        assert_eq!(
            check_request(&http::Method::POST, PATH, &map),
            Err("not a GET")
        );
        assert_eq!(
            check_request(&http::Method::GET, "/", &map),
            Err("not the tunnel path")
        );
        let mut m2 = map.clone();
        m2.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            "chat".parse().unwrap(),
        );
        assert_eq!(
            check_request(&http::Method::GET, PATH, &m2),
            Err("no Sec-WebSocket-Protocol: gatewire-wg")
        );
        let mut m3 = map.clone();
        m3.insert(http::header::SEC_WEBSOCKET_KEY, "c2hvcnQ=".parse().unwrap());
        assert!(check_request(&http::Method::GET, PATH, &m3).is_err());

        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: gatewire-wg\r\n\r\n"
        );
        let mut with_frame = resp.clone().into_bytes();
        with_frame.extend_from_slice(&[0x82, 0x01, 9]);
        assert_eq!(parse_response(&with_frame, &key), Ok(Some(resp.len())));
        for cut in 0..resp.len() {
            assert_eq!(parse_response(&resp.as_bytes()[..cut], &key), Ok(None));
        }
        assert!(matches!(
            parse_response(resp.as_bytes(), &client_key([8; 16])),
            Err(WsError::Handshake(m)) if m.contains("Sec-WebSocket-Accept")
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 403 Forbidden\r\n\r\n", &key),
            Err(WsError::Handshake(m)) if m.contains("403 Forbidden")
        ));
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic.
        #[test]
        fn any_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200), masked: bool) {
            let mut b = BytesMut::from(&data[..]);
            let mut d = Decoder::new(masked);
            while let Ok(Some(_)) = d.decode(&mut b) {}
            let _ = parse_response(&data, "AAAAAAAAAAAAAAAAAAAAAA==");
        }

        /// Datagrams encoded back to back come out whole and in order.
        #[test]
        fn round_trip(
            dgrams in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 1..10),
            mask: Option<[u8; 4]>,
        ) {
            let mut wire = BytesMut::new();
            for d in &dgrams {
                proptest::prop_assert!(encode(d, mask, &mut wire));
            }
            let mut dec = Decoder::new(mask.is_some());
            for d in &dgrams {
                proptest::prop_assert_eq!(dec.decode(&mut wire), Ok(Some(Msg::Data(Bytes::from(d.clone())))));
            }
            proptest::prop_assert!(wire.is_empty());
        }
    }
}

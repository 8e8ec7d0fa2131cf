//! HTTP `CONNECT` through a forward proxy, for nodes whose network lets
//! nothing out but a web proxy (pure: the request's bytes out, the proxy's
//! reply parsed; no sockets).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

/// The longest reply header accepted from a proxy.
pub const MAX_REPLY: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The proxy answered, but not with a 2xx.
    #[error("the proxy refused: {0} {1}")]
    Refused(u16, String),
    /// Not an HTTP reply.
    #[error("not an HTTP reply from the proxy ({0})")]
    Malformed(String),
    /// No end of the header within [`MAX_REPLY`] bytes.
    #[error("the proxy's reply header is longer than {MAX_REPLY} bytes")]
    TooLarge,
    /// Bytes after the reply: the tunnel must start with our ClientHello.
    #[error("the proxy sent {0} bytes after its reply")]
    Trailing(usize),
}

/// The request that asks the proxy for a tunnel to `authority` (`host:port`,
/// an IPv6 host in brackets).
pub fn request(authority: &str) -> Vec<u8> {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: gatewire\r\n\r\n")
        .into_bytes()
}

/// Reads the proxy's reply at the start of `buf`: `Ok(None)` while it is
/// incomplete, `Ok(Some(()))` once a whole 2xx reply (and nothing after it)
/// is there, an error for anything else.
pub fn parse_reply(buf: &[u8]) -> Result<Option<()>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > MAX_REPLY => Err(ConnectError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let code = r.code.unwrap_or(0);
            if !(200..300).contains(&code) {
                let reason: String = r.reason.unwrap_or("").chars().take(100).collect();
                return Err(ConnectError::Refused(code, reason));
            }
            if len > MAX_REPLY {
                return Err(ConnectError::TooLarge);
            }
            match buf.len() - len {
                0 => Ok(Some(())),
                n => Err(ConnectError::Trailing(n)),
            }
        }
        Err(e) => Err(ConnectError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn the_request() {
        assert_eq!(
            request("hub.example:443"),
            b"CONNECT hub.example:443 HTTP/1.1\r\nHost: hub.example:443\r\nUser-Agent: gatewire\r\n\r\n"
        );
        assert!(std::str::from_utf8(&request("[2001:db8::1]:443"))
            .unwrap()
            .starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"));
    }

    #[test]
    fn replies() {
        let ok = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: tinyproxy/1.11.1\r\n\r\n";
        assert_eq!(parse_reply(ok), Ok(Some(())));
        assert_eq!(parse_reply(b"HTTP/1.0 200 OK\r\n\r\n"), Ok(Some(())));
        for cut in 0..ok.len() {
            assert_eq!(parse_reply(&ok[..cut]), Ok(None), "prefix {cut}");
        }
        assert_eq!(
            parse_reply(b"HTTP/1.1 403 Access violation\r\n\r\n"),
            Err(ConnectError::Refused(403, "Access violation".into()))
        );
        assert_eq!(
            parse_reply(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"
            ),
            Err(ConnectError::Refused(
                407,
                "Proxy Authentication Required".into()
            ))
        );
        assert!(matches!(
            parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ConnectError::Malformed(_))
        ));
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01"),
            Err(ConnectError::Trailing(3))
        );
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_REPLY));
        assert_eq!(parse_reply(&long), Err(ConnectError::TooLarge));
    }

    proptest::proptest! {
        /// Any bytes give an answer, never a panic; a 2xx answer is never
        /// given for bytes that do not hold a complete reply.
        #[test]
        fn any_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if parse_reply(&data) == Ok(Some(())) {
                proptest::prop_assert!(data.ends_with(b"\n\r\n") || data.ends_with(b"\n\n"));
            }
        }
    }
}

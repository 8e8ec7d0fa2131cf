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

/// A user name and password for a proxy that asks for them (HTTP Basic,
/// `Proxy-Authorization`). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:<redacted>)", self.user)
    }
}

impl Credentials {
    /// `user:password` as in a URL's user information: percent-encoded
    /// bytes decoded, the user before the first `:` (a password may hold
    /// more). The user must not be empty; neither may hold control
    /// characters (they would end the header line).
    pub fn parse(userinfo: &str) -> Result<Credentials, String> {
        let (user, password) = userinfo.split_once(':').ok_or("expected user:password")?;
        let decode = |s: &str, what: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("the {what} is not UTF-8 once decoded"))
        };
        let user = decode(user, "user")?;
        let password = decode(password, "password")?;
        if user.is_empty() {
            return Err("the user is empty".into());
        }
        if user.contains(':') {
            return Err("the user holds a `:`".into());
        }
        if user.chars().chain(password.chars()).any(char::is_control) {
            return Err("control characters in the user or password".into());
        }
        Ok(Credentials { user, password })
    }

    /// The user name (not secret; for messages).
    pub fn user(&self) -> &str {
        &self.user
    }

    fn header(&self) -> String {
        use base64::Engine as _;
        let pair = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// The request that asks the proxy for a tunnel to `authority` (`host:port`,
/// an IPv6 host in brackets), with `Proxy-Authorization` when there are
/// credentials.
pub fn request(authority: &str, auth: Option<&Credentials>) -> Vec<u8> {
    let mut r = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = auth {
        r.push_str("Proxy-Authorization: ");
        r.push_str(&a.header());
        r.push_str("\r\n");
    }
    r.push_str("User-Agent: gatewire\r\n\r\n");
    r.into_bytes()
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
            request("hub.example:443", None),
            b"CONNECT hub.example:443 HTTP/1.1\r\nHost: hub.example:443\r\nUser-Agent: gatewire\r\n\r\n"
        );
        assert!(std::str::from_utf8(&request("[2001:db8::1]:443", None))
            .unwrap()
            .starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"));
        // RFC 7617's example pair.
        let a = Credentials::parse("Aladdin:open%20sesame").unwrap();
        assert_eq!(
            request("hub.example:443", Some(&a)),
            b"CONNECT hub.example:443 HTTP/1.1\r\nHost: hub.example:443\r\n\
              Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\
              User-Agent: gatewire\r\n\r\n"
        );
    }

    #[test]
    fn credentials() {
        let a = Credentials::parse("gw:p%40ss:w%3Ard").unwrap();
        assert_eq!(a.user(), "gw");
        assert_eq!(a.password, "p@ss:w:rd");
        assert_eq!(format!("{a:?}"), "Credentials(gw:<redacted>)");
        assert!(!format!("{a:?}").contains("ss"));
        assert_eq!(Credentials::parse("gw:").unwrap().password, "");
        for (bad, says) in [
            ("gw", "expected user:password"),
            (":pw", "the user is empty"),
            ("g%3Aw:pw", "holds a `:`"),
            ("gw:p%0D%0AX: y", "control characters"),
            ("gw:%FF", "not UTF-8"),
        ] {
            let e = Credentials::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
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

//! A small blocking admin-socket client over a Unix stream (the driver for
//! the pure [`super::admin`] codec). Meant for tests and tools; the gateway
//! proper can wrap the same codec in an async driver.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::admin::{
    detect_version, next_message, parse_reply, AdminError, AdminRequest, AdminResponse, PeerInfo,
    SelfInfo, SessionInfo, MAX_MESSAGE,
};
use super::identity::LinkUri;
use super::Version;

/// How long one request may take in all, sending it and reading its whole
/// reply. The per-read timeout alone would let a socket that trickles a
/// byte now and then hold a caller (`gatewire show`) until the reply cap.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Errors from the blocking client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Socket I/O failed (including read/write timeouts).
    #[error("admin socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding, decoding or a daemon-side error.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The daemon closed the connection before a full reply.
    #[error("admin socket closed before a complete reply")]
    Closed,
    /// The reply did not match the request type.
    #[error("admin reply of an unexpected kind for {0}")]
    Mismatch(&'static str),
}

/// A keep-alive connection to a daemon's admin Unix socket.
#[derive(Debug)]
pub struct AdminClient {
    stream: UnixStream,
    buf: Vec<u8>,
    version: Version,
    timeout: Duration,
    deadline: Duration,
}

impl AdminClient {
    /// Connects to `path`, speaking `version`'s dialect; `timeout` bounds
    /// every read and write, and [`REQUEST_DEADLINE`] each request.
    pub fn connect(
        path: impl AsRef<Path>,
        version: Version,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            version,
            timeout,
            deadline: REQUEST_DEADLINE,
        })
    }

    /// Sets how long each request may take in all (default
    /// [`REQUEST_DEADLINE`]).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The dialect in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends `req` with `keepalive` set and waits for its reply.
    ///
    /// The whole exchange ends within the deadline (see
    /// [`AdminClient::with_deadline`]), failing with a timed-out I/O error.
    pub fn request(&mut self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        let bytes = req.encode(self.version, true)?;
        let end = Instant::now() + self.deadline;
        // The time left, at most the per-read timeout; an error once none is.
        let left = |end: Instant, timeout: Duration| {
            let left = end.saturating_duration_since(Instant::now()).min(timeout);
            if left.is_zero() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "admin request took longer than its deadline",
                ))
            } else {
                Ok(left)
            }
        };
        self.stream
            .set_write_timeout(Some(left(end, self.timeout)?))?;
        self.stream.write_all(&bytes)?;
        // A reply is a JSON object: it can only be complete once a `}`
        // arrived, so the buffer is parsed again only then (and at first,
        // where bytes left from before or garbage show at once).
        let mut parse = true;
        let reply = loop {
            if parse {
                if let Some((v, used)) = next_message(&self.buf)? {
                    self.buf.drain(..used);
                    break v;
                }
            } else if self.buf.len() > MAX_MESSAGE {
                return Err(AdminError::TooLarge.into());
            }
            let mut chunk = [0u8; 8192];
            self.stream
                .set_read_timeout(Some(left(end, self.timeout)?))?;
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let new = chunk.get(..n).unwrap_or_default();
            parse = new.contains(&b'}');
            self.buf.extend_from_slice(new);
        };
        Ok(parse_reply(req, reply)?)
    }

    /// `list`, then switches this client to the detected dialect.
    pub fn detect_version(&mut self) -> Result<Option<Version>, ClientError> {
        match self.request(&AdminRequest::List)? {
            AdminResponse::List(names) => {
                let v = detect_version(&names);
                if let Some(v) = v {
                    self.version = v;
                }
                Ok(v)
            }
            _ => Err(ClientError::Mismatch("list")),
        }
    }

    /// `getSelf`.
    pub fn get_self(&mut self) -> Result<SelfInfo, ClientError> {
        match self.request(&AdminRequest::GetSelf)? {
            AdminResponse::SelfInfo(s) => Ok(s),
            _ => Err(ClientError::Mismatch("getSelf")),
        }
    }

    /// `getPeers`.
    pub fn get_peers(&mut self) -> Result<Vec<PeerInfo>, ClientError> {
        match self.request(&AdminRequest::GetPeers)? {
            AdminResponse::Peers(p) => Ok(p),
            _ => Err(ClientError::Mismatch("getPeers")),
        }
    }

    /// `getSessions`.
    pub fn get_sessions(&mut self) -> Result<Vec<SessionInfo>, ClientError> {
        match self.request(&AdminRequest::GetSessions)? {
            AdminResponse::Sessions(s) => Ok(s),
            _ => Err(ClientError::Mismatch("getSessions")),
        }
    }

    /// `addPeer`.
    pub fn add_peer(&mut self, uri: &LinkUri, interface: Option<&str>) -> Result<(), ClientError> {
        self.request(&AdminRequest::AddPeer {
            uri: uri.clone(),
            interface: interface.map(str::to_owned),
        })
        .map(|_| ())
    }

    /// `removePeer`.
    pub fn remove_peer(
        &mut self,
        uri: &LinkUri,
        interface: Option<&str>,
    ) -> Result<(), ClientError> {
        self.request(&AdminRequest::RemovePeer {
            uri: uri.clone(),
            interface: interface.map(str::to_owned),
        })
        .map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_trickling_socket_ends_the_request_at_its_deadline() {
        let dir = std::env::temp_dir().join(format!("gw-ygg-trickle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("admin.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // A `{` and then a space every 50 ms, for 3 s at most: each read
        // gets a byte well within the per-read timeout.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let start = Instant::now();
            let mut out: &[u8] = b"{";
            while start.elapsed() < Duration::from_secs(3) {
                if s.write_all(out).is_err() {
                    break;
                }
                out = b" ";
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut c = AdminClient::connect(&sock, Version::V0_4, Duration::from_secs(2))
            .unwrap()
            .with_deadline(Duration::from_millis(400));
        let start = Instant::now();
        let e = c.request(&AdminRequest::GetSelf).unwrap_err();
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "took {took:?}, ended with {e}"
        );
        assert!(
            matches!(&e, ClientError::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{e}"
        );
        drop(c);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! A small blocking admin-socket client over a Unix stream (the driver for
//! the pure [`super::admin`] codec). Meant for tests and tools; the gateway
//! proper can wrap the same codec in an async driver.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::admin::{
    detect_version, next_message, parse_reply, AdminError, AdminRequest, AdminResponse, PeerInfo,
    SelfInfo, SessionInfo,
};
use super::identity::LinkUri;
use super::Version;

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
}

impl AdminClient {
    /// Connects to `path`, speaking `version`'s dialect; `timeout` bounds
    /// every read and write.
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
        })
    }

    /// The dialect in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends `req` with `keepalive` set and waits for its reply.
    pub fn request(&mut self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        let bytes = req.encode(self.version, true)?;
        self.stream.write_all(&bytes)?;
        let reply = loop {
            if let Some((v, used)) = next_message(&self.buf)? {
                self.buf.drain(..used);
                break v;
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
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

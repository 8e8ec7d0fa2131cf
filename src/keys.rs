//! WireGuard keys in the formats `wg` uses: 32 bytes, base64 in configs and on the
//! command line, lowercase hex on the UAPI socket.
//!
//! [`PrivateKey`] never prints its secret: its `Debug` and `Display` are masked.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use std::fmt;
use std::io::Read as _;
use std::path::Path;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Errors from parsing a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not valid base64")]
    Base64,
    #[error("not valid hex")]
    Hex,
    #[error("a key is 32 bytes, this one decodes to {0}")]
    Length(usize),
}

/// The decoded bytes are wiped once copied out: the same decoders read
/// private and preshared keys.
fn decode_b64(s: &str) -> Result<[u8; 32], KeyError> {
    let v = Zeroizing::new(B64.decode(s.trim()).map_err(|_| KeyError::Base64)?);
    key_bytes(&v)
}

fn decode_hex(s: &str) -> Result<[u8; 32], KeyError> {
    let v = Zeroizing::new(hex::decode(s.trim()).map_err(|_| KeyError::Hex)?);
    key_bytes(&v)
}

fn key_bytes(v: &[u8]) -> Result<[u8; 32], KeyError> {
    v.try_into().map_err(|_| KeyError::Length(v.len()))
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_b64(s).map(Self)
    }
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(Self)
    }
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn as_x25519(&self) -> XPublic {
        XPublic::from(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A Curve25519 private key, clamped as `wg genkey` clamps it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PrivateKey {
    /// A fresh random key, clamped like `wg genkey`.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        Self(k)
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_b64(s).map(Self)
    }
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(Self)
    }
    /// The secret in base64. Only for writing key files and `genkey`.
    pub fn expose_base64(&self) -> String {
        B64.encode(self.0)
    }
    /// The secret in hex. Only for the UAPI `get` reply, which `wg` expects.
    pub fn expose_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(XPublic::from(&self.secret()).to_bytes())
    }
    pub fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A 32-byte preshared key; masked like [`PrivateKey`].
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl Drop for PresharedKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PresharedKey {
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_b64(s).map(Self)
    }
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(Self)
    }
    pub fn expose_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

/// The largest secret file read (keys, passwords, tokens are far smaller).
pub const SECRET_FILE_MAX: u64 = 64 * 1024;

/// Reads a secret file (key, password, token): a regular file (symlinks
/// followed) of at most [`SECRET_FILE_MAX`] bytes, so a FIFO or a device
/// cannot block or exhaust the config load. Warns, naming only the path,
/// when group or others have any access to it.
pub fn read_secret_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // Non-blocking: opening a FIFO waits for a writer otherwise.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a secret must be in a plain file)",
        ));
    }
    let mut buf = Vec::new();
    f.take(SECRET_FILE_MAX + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > SECRET_FILE_MAX {
        buf.zeroize();
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "larger than {} KiB, not a secret file",
                SECRET_FILE_MAX / 1024
            ),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "secret file is readable by group or others; chmod 600"
        );
    }
    Ok(buf)
}

/// [`read_secret_bytes`] for a text secret (UTF-8).
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_secret_bytes(path)?).map_err(|e| {
        e.into_bytes().zeroize();
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_matches_wg() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let k = PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            k.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_roundtrip() {
        let k = PrivateKey::generate();
        let b = k.expose_base64();
        let k2 = PrivateKey::from_base64(&b).unwrap();
        assert_eq!(k, k2);
        assert_eq!(k.0[0] & 7, 0);
        assert_eq!(k.0[31] & 0xc0, 0x40);
        assert_eq!(PrivateKey::from_hex(&k.expose_hex()).unwrap(), k);
    }

    #[test]
    fn debug_is_masked() {
        let k = PrivateKey::generate();
        let d = format!("{k:?}");
        assert!(!d.contains(&k.expose_base64()));
        assert!(!d.contains(&k.expose_hex()));
    }

    #[test]
    fn bad_keys_are_errors() {
        assert_eq!(PublicKey::from_base64("abc!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PublicKey::from_hex("zz"), Err(KeyError::Hex));
    }

    fn secret_tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gw-keys-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn secret_file_from_a_fifo_is_an_error_not_a_hang() {
        use std::os::unix::fs::OpenOptionsExt;
        let d = secret_tmp("fifo");
        let p = d.join("key");
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_secret_file(&q).map_err(|e| e.to_string()));
        });
        // A timeout here: reading the FIFO blocked.
        let r = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert!(r.unwrap_err().contains("not a regular file"));
        assert!(read_secret_file(Path::new("/dev/zero")).is_err());
        assert!(read_secret_file(&d).is_err());
        // Unblock the reader thread should it still wait for a writer.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn secret_file_size_is_capped_and_group_readable_loads() {
        use std::os::unix::fs::PermissionsExt;
        let d = secret_tmp("size");
        let big = d.join("big");
        std::fs::write(&big, vec![b'a'; SECRET_FILE_MAX as usize + 1]).unwrap();
        let e = read_secret_file(&big).unwrap_err().to_string();
        assert!(e.contains("larger than 64 KiB"), "{e}");
        let max = d.join("max");
        std::fs::write(&max, vec![b'a'; SECRET_FILE_MAX as usize]).unwrap();
        assert_eq!(read_secret_bytes(&max).unwrap().len(), 64 * 1024);
        // Too open only warns.
        let k = d.join("key");
        std::fs::write(&k, "secret\n").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_secret_file(&k).unwrap(), "secret\n");
        let link = d.join("link");
        std::os::unix::fs::symlink(&k, &link).unwrap();
        assert_eq!(read_secret_file(&link).unwrap(), "secret\n");
        std::fs::write(&k, b"\xff\xfe").unwrap();
        assert!(read_secret_file(&k).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}

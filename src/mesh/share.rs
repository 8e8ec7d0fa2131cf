//! The ACME side of the mesh's store: [`Mesh`] as an [`AcmeShare`]. The
//! driver ([`super::etcd`]) keeps [`Mesh`]'s view of the shared keys up to
//! date from a watch ([`apply_acme`]) and lends it the session's client and
//! lease; the calls here read and write etcd with them.

use super::acme::{encode_digest, AcmeKey, AcmeValue, CertHost, CertPem, Change};
use super::vault::VaultError;
use super::Mesh;
use crate::proxy::acme::{AcmeShare, Challenge, ShareFuture};
use crate::proxy::names::DomainName;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use std::borrow::Cow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::warn;

impl Mesh {
    /// Lends the ACME side the session's client and lease (`None`: no session).
    pub(crate) fn set_session(&self, s: Option<(Client, i64)>) {
        *self.session.lock() = s;
    }

    fn client(&self) -> Result<(Client, i64), String> {
        self.session
            .lock()
            .clone()
            .ok_or_else(|| "not connected to etcd".to_string())
    }

    fn acme_key(&self, k: &AcmeKey) -> String {
        format!("{}{}", self.settings.acme_prefix(), k.path())
    }

    /// A certificate record as read from etcd, its key opened when sealed
    /// with the mesh secret.
    fn open_cert<'v>(&self, host: &str, value: &'v [u8]) -> Result<Cow<'v, [u8]>, VaultError> {
        super::vault::open_record(&self.vault, host, value)
    }

    /// Applies a put or delete under `<prefix>acme/` read from etcd; bad keys
    /// and values are counted and logged (never their contents).
    pub(crate) fn apply_acme(&self, key: &[u8], value: Option<&[u8]>) {
        let prefix = self.settings.acme_prefix();
        let path = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix.as_str()));
        let r = match path {
            Some(p) => {
                let cert_host = p.strip_prefix("certs/");
                match (cert_host, value) {
                    (Some(h), Some(v)) => match self.open_cert(h, v) {
                        Ok(plain) => {
                            let mut a = self.acme.write();
                            let r = a.apply(p, Some(&plain));
                            if r.is_ok() {
                                a.set_clear(h, !super::vault::is_sealed(v));
                            }
                            r
                        }
                        Err(e) => {
                            // Not usable here; its notAfter still keeps this
                            // hub from offering an older certificate instead.
                            let chain = super::vault::sealed_chain(v).unwrap_or_default();
                            self.acme.write().hold_unopened(h, &chain);
                            if let Some(k) = self.acme_kick.lock().as_ref() {
                                k.notify_one();
                            }
                            Err(super::acme::AcmeRecordError::Cert(e.to_string()))
                        }
                    },
                    _ => self.acme.write().apply(p, value),
                }
            }
            None => Err(super::acme::AcmeRecordError::Key(String::new())),
        };
        match r {
            Ok(Change::Challenge) => {}
            Ok(Change::CertOrLock) => {
                if let Some(k) = self.acme_kick.lock().as_ref() {
                    k.notify_one();
                }
            }
            Err(e) => {
                self.note_bad_record();
                warn!(key = %String::from_utf8_lossy(key), error = %e, "mesh: shared ACME key not used");
            }
        }
    }

    /// Forgets the shared ACME keys (before a fresh read of all of them).
    pub(crate) fn clear_acme(&self) {
        *self.acme.write() = super::acme::Shared::default();
    }
}

fn host_key(host: &str) -> Result<DomainName, String> {
    DomainName::parse(host).map_err(|e| format!("host `{host}`: {e}"))
}

fn cert_host(host: &str) -> Result<CertHost, String> {
    CertHost::parse(host).ok_or_else(|| format!("host `{host}` is not a host name"))
}

/// The key and value a challenge answer is published under.
fn challenge_kv(ch: &Challenge) -> Result<(AcmeKey, Vec<u8>), String> {
    Ok(match ch {
        Challenge::Http01 {
            token,
            key_authorization,
        } => (
            AcmeKey::Http01(token.clone()),
            key_authorization.clone().into_bytes(),
        ),
        Challenge::Alpn01 { host, digest } => (
            AcmeKey::Alpn01(host_key(host)?),
            encode_digest(digest).into_bytes(),
        ),
        Challenge::Dns01 { domain, value } => (
            AcmeKey::Dns01(host_key(domain)?, value.clone()),
            value.clone().into_bytes(),
        ),
    })
}

impl AcmeShare for Mesh {
    fn ready(&self) -> bool {
        self.etcd_connected() && self.session.lock().is_some()
    }

    fn shares_certificates(&self) -> bool {
        self.settings.share_certificates
    }

    fn http01(&self, token: &str) -> Option<String> {
        let ka = self.acme.read().http01(token).map(str::to_string)?;
        self.acme_answered.fetch_add(1, Relaxed);
        Some(ka)
    }

    fn alpn01(&self, host: &str) -> Option<[u8; 32]> {
        let d = self.acme.read().alpn01(host)?;
        self.acme_answered.fetch_add(1, Relaxed);
        Some(d)
    }

    fn dns01(&self, domain: &str) -> Vec<String> {
        let v = self.acme.read().dns01(domain);
        if !v.is_empty() {
            self.acme_answered.fetch_add(1, Relaxed);
        }
        v
    }

    fn cert(&self, host: &str) -> Option<CertPem> {
        self.acme.read().cert(host).cloned()
    }

    fn cert_not_after(&self, host: &str) -> Option<u64> {
        self.acme.read().cert_not_after(host)
    }

    fn wants_sealing(&self, host: &str) -> bool {
        !self.vault.is_empty() && self.acme.read().in_clear(host)
    }

    fn on_change(&self, kick: Arc<Notify>) {
        *self.acme_kick.lock() = Some(kick);
    }

    fn session(&self) -> Option<i64> {
        self.session.lock().as_ref().map(|(_, lease)| *lease)
    }

    fn lock<'a>(&'a self, host: &'a str) -> ShareFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let key = self.acme_key(&AcmeKey::Lock(cert_host(host)?));
            let (mut c, lease) = self.client()?;
            let me = self.settings.name.as_bytes().to_vec();
            let put = || {
                TxnOp::put(
                    key.clone(),
                    me.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            };
            // Free: take it. Held by this hub (an earlier session's lease):
            // take it under this session's lease.
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let r = c.txn(txn).await.map_err(|e| e.to_string())?;
            if r.succeeded() {
                return Ok(true);
            }
            let holder = r.op_responses().into_iter().find_map(|o| match o {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            if holder.as_deref() != Some(me.as_slice()) {
                return Ok(false);
            }
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, me.clone())])
                .and_then([put()]);
            let r = c.txn(txn).await.map_err(|e| e.to_string())?;
            Ok(r.succeeded())
        })
    }

    fn unlock<'a>(&'a self, host: &'a str) -> ShareFuture<'a, bool> {
        Box::pin(async move {
            let Ok(h) = cert_host(host) else { return true };
            let key = self.acme_key(&AcmeKey::Lock(h));
            let Ok((mut c, _)) = self.client() else {
                // The lease takes the lock away.
                return true;
            };
            let me = self.settings.name.as_bytes().to_vec();
            // A few tries: a lock left behind holds the other hubs back
            // until this hub's session ends (the manager tries again on its
            // next rounds).
            for attempt in 1..=3 {
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, me.clone())])
                    .and_then([TxnOp::delete(key.clone(), None)]);
                match c.txn(txn).await {
                    Ok(_) => return true,
                    Err(e) if attempt == 3 => {
                        warn!(host, error = %e, "mesh: ACME lock not released; tried again on the next rounds, and it goes when this hub's etcd session ends");
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                }
            }
            false
        })
    }

    fn publish<'a>(&'a self, ch: &'a Challenge) -> ShareFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let (key, value) = challenge_kv(ch)?;
            // What is published must read back.
            super::acme::decode(&key, &value).map_err(|e| e.to_string())?;
            let (mut c, lease) = self.client()?;
            c.put(
                self.acme_key(&key),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    fn withdraw<'a>(&'a self, ch: &'a Challenge) -> ShareFuture<'a, ()> {
        Box::pin(async move {
            let Ok((key, value)) = challenge_kv(ch) else {
                return;
            };
            let Ok((mut c, _)) = self.client() else {
                return;
            };
            // Only this hub's answer: after a lost session another hub may
            // have taken the lock and published its own under the same key.
            let key = self.acme_key(&key);
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, value)])
                .and_then([TxnOp::delete(key, None)]);
            if let Err(e) = c.txn(txn).await {
                warn!(error = %e, "mesh: ACME challenge not withdrawn; it goes with the lease");
            }
        })
    }

    fn fetch_cert<'a>(&'a self, host: &'a str) -> ShareFuture<'a, Result<Option<CertPem>, String>> {
        Box::pin(async move {
            let key_host = cert_host(host)?;
            let key = AcmeKey::Cert(key_host.clone());
            let (mut c, _) = self.client()?;
            let r = c
                .get(self.acme_key(&key), None)
                .await
                .map_err(|e| e.to_string())?;
            let Some(kv) = r.kvs().first() else {
                return Ok(None);
            };
            let plain = self
                .open_cert(key_host.as_str(), kv.value())
                .map_err(|e| e.to_string())?;
            match super::acme::decode(&key, &plain) {
                Ok(AcmeValue::Cert(p, _)) => Ok(Some(p)),
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn store_cert<'a>(
        &'a self,
        host: &'a str,
        pem: &'a CertPem,
    ) -> ShareFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let h = cert_host(host)?;
            let key = AcmeKey::Cert(h.clone());
            super::acme::decode(&key, &pem.encode()).map_err(|e| e.to_string())?;
            // With a mesh secret, the private key goes to etcd sealed.
            let mut nonce = [0u8; 12];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
            let value = super::vault::seal_record(self.vault.first(), h.as_str(), nonce, pem);
            let (mut c, _) = self.client()?;
            c.put(self.acme_key(&key), value, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

//! `--mtls`: a short-lived tunnel client certificate from the coordinator, presented in every
//! QUIC handshake and renewed at half-life.
//!
//! The key pair is made here and never leaves the process: the coordinator sees only a CSR,
//! authenticated by the agent token. Each renewal uses a fresh key. The current certificate sits
//! behind an `ArcSwap` that rustls reads per handshake, so a renewal reaches the next
//! connection without rebuilding any TLS config; established connections keep the certificate
//! they were admitted with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// First retry after a failed fetch; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Never wait less than this before a renewal (a certificate issued almost expired).
const RENEW_MIN: Duration = Duration::from_secs(5);

/// The client certificate rustls presents; none until the first fetch succeeds.
#[derive(Debug, Default)]
pub(crate) struct ClientCert {
    current: ArcSwapOption<CertifiedKey>,
    /// `not_after` of the current certificate (Unix ms; 0 = none), for `/metrics`.
    pub(crate) not_after_ms: AtomicU64,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CertError {
    #[error("making a key pair or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("coordinator: {0}")]
    Coordinator(#[from] coordinator_api::ClientError),
    #[error(
        "the coordinator issued a certificate for service {got:?}, but this agent serves {want:?} (wrong token?)"
    )]
    WrongService { got: String, want: String },
    #[error("unusable certificate: {0}")]
    Unusable(String),
}

/// A fetched certificate and when to renew it.
struct Fetched {
    key: Arc<CertifiedKey>,
    not_after_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Half of the remaining lifetime, at least [`RENEW_MIN`].
pub(crate) fn renew_after(now_ms: u64, not_after_ms: u64) -> Duration {
    Duration::from_millis(not_after_ms.saturating_sub(now_ms) / 2).max(RENEW_MIN)
}

async fn fetch(client: &coordinator_api::Client, service: &str) -> Result<Fetched, CertError> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let issued = client.agent_certificate(&csr).await?;
    if issued.service != service {
        return Err(CertError::WrongService {
            got: issued.service,
            want: service.to_owned(),
        });
    }
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut issued.certificate.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::Unusable(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::Unusable("no certificate in the answer".into()));
    }
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der.into())
        .map_err(|e| CertError::Unusable(e.to_string()))?;
    Ok(Fetched {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_after_ms: issued.not_after_ms,
    })
}

/// Fetches a certificate, then renews it at half-life, until `shutdown`. `ready` turns true
/// after the first success. Failures are retried with capped backoff; a refused token (401)
/// is logged as an error, since only a new token helps.
pub(crate) async fn renew_loop(
    client: coordinator_api::Client,
    service: String,
    cert: Arc<ClientCert>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut retry = RETRY_MIN;
    loop {
        let wait = match fetch(&client, &service).await {
            Ok(f) => {
                cert.current.store(Some(f.key));
                cert.not_after_ms.store(f.not_after_ms, Ordering::Relaxed);
                ready.send_replace(true);
                retry = RETRY_MIN;
                let after = renew_after(unix_ms(SystemTime::now()), f.not_after_ms);
                info!(
                    service,
                    not_after_ms = f.not_after_ms,
                    renew_in = ?after,
                    "got a tunnel client certificate"
                );
                after
            }
            Err(e) => {
                if matches!(&e, CertError::Coordinator(c) if c.status() == Some(401)) {
                    error!(error = %e, "the coordinator refused the agent token; no client certificate (edges will refuse this agent once its certificate expires)");
                } else {
                    warn!(error = %e, ?retry, "fetching a tunnel client certificate failed; retrying");
                }
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_never_in_a_tight_loop() {
        let day = 24 * 3600 * 1000;
        assert_eq!(renew_after(0, day), Duration::from_millis(day / 2));
        assert_eq!(renew_after(day / 2, day), Duration::from_millis(day / 4));
        assert_eq!(renew_after(day, day), RENEW_MIN);
        assert_eq!(renew_after(2 * day, day), RENEW_MIN);
    }

    #[test]
    fn presents_nothing_until_fetched() {
        let c = ClientCert::default();
        assert!(c.has_certs());
        assert!(c.resolve(&[], &[]).is_none());
    }
}

//! rustls configurations for the HTTPS listener and the QUIC tunnel listener.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// A certificate chain and its key, loaded once and shared by both listeners.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Identity {
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let cert_pem =
            std::fs::read(cert).map_err(|e| Error::Tls(format!("read {}: {e}", cert.display())))?;
        let key_pem =
            std::fs::read(key).map_err(|e| Error::Tls(format!("read {}: {e}", key.display())))?;
        let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("parse {}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(Error::Tls(format!(
                "{}: no certificate found",
                cert.display()
            )));
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| Error::Tls(format!("parse {}: {e}", key.display())))?
            .ok_or_else(|| Error::Tls(format!("{}: no private key found", key.display())))?;
        Ok(Self { chain, key })
    }

    fn clone_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// HTTPS: TLS 1.2 + 1.3, ALPN h2 then http/1.1.
pub(crate) fn https_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.clone_key())
        .map_err(|e| Error::Tls(format!("certificate/key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Transport parameters of the tunnel: keepalives well inside the idle timeout, bounded windows,
/// and far more concurrent streams than quinn's default 100 (one stream per proxied request).
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // 20 s always fits a QUIC idle timeout (VarInt milliseconds).
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(20)).ok());
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    t.send_window(8 * 1024 * 1024);
    t
}

/// QUIC tunnel: TLS 1.3 only (QUIC requires it), ALPN `meridian-tunnel/1`, no 0-RTT. Client
/// certificates are asked for but optional: services with `require_mtls` check them at `Hello`
/// (see [`crate::client_auth`]). Agents on the TCP fallback present theirs in the same QUIC
/// handshake, inside the outer TLS.
pub(crate) fn tunnel_config(id: &Identity) -> Result<quinn::ServerConfig, Error> {
    let provider = ring::default_provider();
    let client_certs = Arc::new(crate::client_auth::OptionalClientCert::new(&provider));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(client_certs)
        .with_single_cert(id.chain.clone(), id.clone_key())
        .map_err(|e| Error::Tls(format!("certificate/key: {e}")))?;
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    // No 0-RTT: replayable early data has no place on a control channel.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

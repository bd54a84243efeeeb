//! QUIC client configuration: TLS 1.3 with the edge CA, our ALPN, bounded windows, keepalives.

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::ring;

use crate::Error;

/// Streams the edge may have open to us at once (quinn's default of 100 stalls busy agents).
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 1024;
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(5);
pub(crate) const IDLE_TIMEOUT_MS: u32 = 20_000;

pub(crate) fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))));
    t
}

/// TLS client configs for both transports, verifying the edge against the same CA.
pub(crate) struct ClientConfigs {
    /// QUIC (its own TLS 1.3 inside).
    pub(crate) quic: quinn::ClientConfig,
    /// The outer TLS of the TCP fallback (QUIC then runs inside it, verifying the edge again).
    pub(crate) tcp: Arc<rustls::ClientConfig>,
}

/// Builds the client configs from PEM CA certificates (no insecure mode: a CA is required).
/// With `client_cert` (`--mtls`), QUIC handshakes present its current certificate.
pub(crate) fn client_configs(
    ca_pem: &[u8],
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<ClientConfigs, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| Error::Config(format!("parsing --ca PEM: {e}")))?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(Error::Config("--ca contains no PEM certificates".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    // The outer TLS of the TCP fallback never carries the client certificate: the QUIC
    // handshake inside it does, so the edge checks one place for both transports.
    let mut tcp = builder.clone().with_no_client_auth();
    tcp.enable_early_data = false;
    let mut tls = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    // Registration must not be replayable.
    tls.enable_early_data = false;
    tcp.alpn_protocols = vec![tunnel_proto::TCP_ALPN.to_vec()];
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Config(format!("QUIC TLS config: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok(ClientConfigs {
        quic: cfg,
        tcp: Arc::new(tcp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_ca() {
        assert!(matches!(client_configs(b"", None), Err(Error::Config(_))));
        assert!(client_configs(b"not pem", None).is_err());
    }
}

//! Optional agent mTLS on the tunnel listener.
//!
//! The QUIC handshake asks every agent for a client certificate but requires none (most services
//! do not use them), and only proves that an agent presenting one holds its key. Whether the
//! certificate chains to the coordinator's tunnel client CA, is current, and names the service
//! is decided at `Hello` time by [`check`], per service (`require_mtls`), against the CA in the
//! current snapshot: so the refusal carries a reason the agent can log, and a CA that arrives
//! after the listener started needs no new TLS config.

use std::sync::Arc;

use coordinator_api::{Snapshot, service_cert_uri};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

/// Asks for a client certificate, lets anonymous clients in, and checks only the handshake
/// signature (proof of possession of the certificate's key). Chain, validity and name are
/// checked per service by [`check`].
#[derive(Debug)]
pub(crate) struct OptionalClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl OptionalClientCert {
    pub(crate) fn new(provider: &CryptoProvider) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred to `check` at Hello time; nothing is granted on the certificate before that.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The certificate chain an agent presented in the QUIC handshake, if any.
pub(crate) fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
        .filter(|c| !c.is_empty())
}

/// Whether `service` requires agents to present a client certificate.
pub(crate) fn required(snapshot: &Snapshot, service: &str) -> bool {
    snapshot
        .services
        .iter()
        .any(|s| s.name == service && s.require_mtls)
}

/// Admits an agent of `service` by its certificate `chain` when the service requires mTLS:
/// `Ok(true)` verified, `Ok(false)` not required (nothing checked), `Err` the reason for
/// `Reject`.
pub(crate) fn admit(
    snapshot: &Snapshot,
    service: &str,
    chain: Option<&[CertificateDer<'static>]>,
    now: UnixTime,
) -> Result<bool, String> {
    if !required(snapshot, service) {
        return Ok(false);
    }
    let Some(chain) = chain else {
        return Err(format!(
            "service {service:?} requires mTLS: no client certificate presented (run the agent with --mtls)"
        ));
    };
    check(snapshot.tunnel_client_ca.as_deref(), chain, service, now).map(|()| true)
}

/// Verifies `chain` against the tunnel client CA `ca_pem` at `now`, for client auth, and that
/// its leaf names `service` ([`service_cert_uri`]).
pub(crate) fn check(
    ca_pem: Option<&str>,
    chain: &[CertificateDer<'static>],
    service: &str,
    now: UnixTime,
) -> Result<(), String> {
    let ca_pem = ca_pem.ok_or("this edge has no tunnel client CA from the coordinator yet")?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or("empty client certificate chain")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("tunnel client CA unreadable: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("tunnel client CA unusable: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("tunnel client CA unusable: {e}"))?;
    verifier
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("client certificate refused: {e}"))?;
    let want = service_cert_uri(service);
    let names = uri_sans(leaf)?;
    if names.contains(&want) {
        Ok(())
    } else {
        Err(format!(
            "client certificate names {names:?}, not service {service:?}"
        ))
    }
}

/// The URI subject alternative names of a certificate.
fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("client certificate unparsable: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("client certificate SAN unparsable: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use coordinator_api::Service;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    use super::*;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate as the coordinator issues it: URI SAN, clientAuth; `expired` ended
    /// in 2021, otherwise current.
    fn leaf(ca: &Ca, uri: &str, expired: bool) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = if expired {
            rcgen::date_time_ymd(2021, 1, 1)
        } else {
            rcgen::date_time_ymd(4000, 1, 1)
        };
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    fn snapshot(ca: &Ca, require: bool) -> Snapshot {
        Snapshot {
            services: vec![
                Service {
                    name: "web".into(),
                    require_mtls: require,
                    ..Default::default()
                },
                Service {
                    name: "api".into(),
                    ..Default::default()
                },
            ],
            tunnel_client_ca: Some(ca.pem.clone()),
            ..Default::default()
        }
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn a_current_certificate_for_the_service_is_admitted() {
        let ca = ca();
        let s = snapshot(&ca, true);
        let cert = leaf(&ca, "meridian://service/web", false);
        assert_eq!(admit(&s, "web", Some(&[cert]), now()), Ok(true));
    }

    #[test]
    fn refused_without_certificate_with_a_clear_reason() {
        let ca = ca();
        let s = snapshot(&ca, true);
        let e = admit(&s, "web", None, now()).unwrap_err();
        assert!(e.contains("requires mTLS") && e.contains("--mtls"), "{e}");
        // Services that do not require it ignore certificates entirely.
        assert_eq!(admit(&s, "api", None, now()), Ok(false));
        assert_eq!(admit(&snapshot(&ca, false), "web", None, now()), Ok(false));
    }

    #[test]
    fn a_certificate_for_another_service_is_refused() {
        let ca = ca();
        let s = snapshot(&ca, true);
        let cert = leaf(&ca, "meridian://service/api", false);
        let e = admit(&s, "web", Some(&[cert]), now()).unwrap_err();
        assert!(e.contains("not service \"web\""), "{e}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = ca();
        let s = snapshot(&ca, true);
        let cert = leaf(&ca, "meridian://service/web", true);
        let e = admit(&s, "web", Some(&[cert]), now()).unwrap_err();
        assert!(
            e.contains("refused") && e.to_lowercase().contains("expired"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let (ours, theirs) = (ca(), ca());
        let s = snapshot(&ours, true);
        let cert = leaf(&theirs, "meridian://service/web", false);
        let e = admit(&s, "web", Some(&[cert]), now()).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // No CA known yet: refused, not admitted.
        let mut no_ca = snapshot(&ours, true);
        no_ca.tunnel_client_ca = None;
        let cert = leaf(&ours, "meridian://service/web", false);
        let e = admit(&no_ca, "web", Some(&[cert]), now()).unwrap_err();
        assert!(e.contains("no tunnel client CA"), "{e}");
    }
}

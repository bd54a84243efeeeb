//! The tunnel client CA: issues short-lived agent certificates for optional mTLS.
//!
//! One CA per network, generated once and kept with the desired state in the store (SQLite or
//! etcd), so every coordinator sharing a store issues under the same CA and edges trust one
//! certificate. Its key never leaves the coordinator; its certificate travels in the snapshot.
//! Issuing is pure (`now` is an argument) and unit tested without a server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coordinator_api::{AgentCertificate, service_cert_uri};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::store::{StoreError, StoreHandle};

/// Lifetime of an agent certificate; agents renew at half of it. Short enough that a stolen
/// certificate is worth a day at most (revoking the token stops renewals), long enough that a
/// coordinator outage of hours does not take agents down.
pub(crate) const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Backdating of `not_before`, for agents and edges whose clocks run a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// The CA's own lifetime.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The store's name for the CA (see [`crate::store::Store::put_secret_if_absent`]).
pub(crate) const CA_SECRET: &str = "tunnel_client_ca";

#[derive(Debug, thiserror::Error)]
pub(crate) enum PkiError {
    #[error("generating the tunnel client CA: {0}")]
    Generate(rcgen::Error),
    #[error("stored tunnel client CA is unreadable: {0}")]
    Stored(String),
    #[error("certificate signing request refused: {0}")]
    Csr(rcgen::Error),
    #[error("issuing the certificate: {0}")]
    Issue(rcgen::Error),
    #[error("time out of range")]
    Time,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The CA as stored: PEM certificate and PKCS#8 PEM key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredCa {
    cert: String,
    key: String,
}

/// A loaded CA, ready to sign.
pub(crate) struct TunnelCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TunnelCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TunnelCa").finish_non_exhaustive()
    }
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Time)?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).map_err(|_| PkiError::Time)?)
        .map_err(|_| PkiError::Time)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl TunnelCa {
    /// A new CA (ECDSA P-256), as the JSON the store keeps.
    fn generate(now: SystemTime) -> Result<String, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Meridian");
        dn.push(DnType::CommonName, "Meridian tunnel client CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).ok_or(PkiError::Time)?)?;
        params.not_after = to_offset(now.checked_add(CA_VALIDITY).ok_or(PkiError::Time)?)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        let stored = StoredCa {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        serde_json::to_string(&stored).map_err(|e| PkiError::Stored(e.to_string()))
    }

    /// Loads the CA from the store's JSON.
    fn load(json: &str) -> Result<Self, PkiError> {
        let stored: StoredCa =
            serde_json::from_str(json).map_err(|e| PkiError::Stored(e.to_string()))?;
        let key = KeyPair::from_pem(&stored.key).map_err(|e| PkiError::Stored(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&stored.cert, key)
            .map_err(|e| PkiError::Stored(e.to_string()))?;
        Ok(Self {
            cert_pem: stored.cert,
            issuer,
        })
    }

    /// The CA certificate (PEM), for snapshots and answers.
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Certifies the public key of `csr_pem` for `service`, valid `validity` from `now`. Only the
    /// key is taken from the request: the subject, SAN (the service URI), usages and lifetime are
    /// ours, so an agent cannot ask for a name its token does not grant.
    pub(crate) fn issue(
        &self,
        csr_pem: &str,
        service: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<AgentCertificate, PkiError> {
        // Parses and checks the request's self-signature (proof the agent holds the key).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;
        let not_before = now.checked_sub(CLOCK_SKEW).ok_or(PkiError::Time)?;
        let not_after = now.checked_add(validity).ok_or(PkiError::Time)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Meridian");
        dn.push(DnType::CommonName, format!("agent of {service}"));
        params.distinguished_name = dn;
        let uri = service_cert_uri(service)
            .try_into()
            .map_err(PkiError::Issue)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request.signed_by(&self.issuer).map_err(PkiError::Issue)?;
        Ok(AgentCertificate {
            certificate: cert.pem(),
            ca: self.cert_pem.clone(),
            service: service.to_owned(),
            not_before_ms: unix_ms(not_before),
            not_after_ms: unix_ms(not_after),
        })
    }
}

/// The network's tunnel client CA: the stored one, or a new one stored first. With a shared
/// store, concurrent first starts race on one put-if-absent, and every coordinator loads the
/// winner.
pub(crate) async fn load_or_create(store: &StoreHandle) -> Result<TunnelCa, PkiError> {
    let candidate = TunnelCa::generate(SystemTime::now())?;
    let stored = store
        .call(move |s| s.put_secret_if_absent(CA_SECRET, &candidate))
        .await?;
    TunnelCa::load(&stored)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ca() -> TunnelCa {
        TunnelCa::load(&TunnelCa::generate(SystemTime::now()).unwrap()).unwrap()
    }

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // Whatever the agent asks for is ignored: it cannot name another service.
        params.subject_alt_names = vec![SanType::URI(
            service_cert_uri("someone-else").try_into().unwrap(),
        )];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn issues_a_client_certificate_naming_only_the_tokens_service() {
        let ca = ca();
        let now = SystemTime::now();
        let c = ca.issue(&csr(), "web", now, AGENT_CERT_VALIDITY).unwrap();
        assert_eq!(c.ca, ca.cert_pem());
        assert_eq!(c.service, "web");
        assert_eq!(
            c.not_after_ms - c.not_before_ms,
            u64::try_from((AGENT_CERT_VALIDITY + CLOCK_SKEW).as_millis()).unwrap()
        );
        let der = rustls_pki_der(&c.certificate);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let uris: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(uris, vec!["meridian://service/web".to_owned()]);
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!parsed.is_ca());
    }

    #[test]
    fn refuses_bad_requests() {
        let ca = ca();
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue("not a csr", "web", now, AGENT_CERT_VALIDITY),
            Err(PkiError::Csr(_))
        ));
        // A request whose signature does not match its key (proof of possession fails): flip
        // a base64 character inside the signature, at the end of the body.
        let good = csr();
        let lines: Vec<&str> = good.lines().collect();
        let sig_line = lines.len() - 2;
        let tampered: String = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == sig_line {
                    let c = if l.starts_with('A') { 'B' } else { 'A' };
                    format!("{c}{}\n", &l[1..])
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert_ne!(tampered, good);
        assert!(matches!(
            ca.issue(&tampered, "web", now, AGENT_CERT_VALIDITY),
            Err(PkiError::Csr(_))
        ));
    }

    #[test]
    fn stored_ca_round_trips_and_keeps_signing() {
        let json = TunnelCa::generate(SystemTime::now()).unwrap();
        let a = TunnelCa::load(&json).unwrap();
        let b = TunnelCa::load(&json).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert!(format!("{a:?}").len() < 40, "Debug shows no key");
        assert!(TunnelCa::load("{}").is_err());
    }

    fn rustls_pki_der(pem: &str) -> Vec<u8> {
        let mut bytes = pem.as_bytes();
        let mut certs = rustls_pemfile::certs(&mut bytes);
        certs.next().unwrap().unwrap().to_vec()
    }
}

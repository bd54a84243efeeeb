//! The dev CA: a local root that signs the edges' certificate, so `curl --cacert` works with no flags off.

use std::{net::IpAddr, path::Path};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Paths of the files the dev CA writes into the data dir.
pub(crate) struct DevPki {
    pub(crate) ca_cert: std::path::PathBuf,
    pub(crate) edge_cert: std::path::PathBuf,
    pub(crate) edge_key: std::path::PathBuf,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Meridian dev CA");
    dn.push(DnType::OrganizationName, "Meridian dev");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Loads the CA from `dir` (or creates it) and issues a fresh edge certificate for `names` and `ips`.
///
/// The CA key is kept so a CA the user already trusts stays valid across restarts; the CA
/// certificate is re-derived from fixed parameters and the same key.
pub(crate) fn ensure(dir: &Path, names: &[&str], ips: &[IpAddr]) -> anyhow::Result<DevPki> {
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path).context("reading the dev CA key")?;
        KeyPair::from_pem(&pem).context("parsing the dev CA key")?
    } else {
        let key = KeyPair::generate().context("generating the dev CA key")?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        key
    };
    if !ca_cert_path.exists() {
        let cert = ca_params()
            .self_signed(&ca_key)
            .context("signing the dev CA")?;
        std::fs::write(&ca_cert_path, cert.pem()).context("writing the dev CA certificate")?;
    }
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .context("edge certificate names")?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Meridian dev edge");
    params.distinguished_name = dn;
    let edge_key = KeyPair::generate().context("generating the edge key")?;
    let edge_cert = params
        .signed_by(&edge_key, &issuer)
        .context("signing the edge certificate")?;

    let edge_cert_path = dir.join("edge.pem");
    let edge_key_path = dir.join("edge.key");
    std::fs::write(&edge_cert_path, edge_cert.pem()).context("writing the edge certificate")?;
    write_private(&edge_key_path, &edge_key.serialize_pem())?;
    Ok(DevPki {
        ca_cert: ca_cert_path,
        edge_cert: edge_cert_path,
        edge_key: edge_key_path,
    })
}

/// Writes a secret readable by the owner only.
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

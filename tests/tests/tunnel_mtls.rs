//! Optional agent mTLS end to end, with real coordinator, edge and agent processes: an agent run
//! with `--mtls` gets a client certificate from the coordinator and serves a service created
//! with `--require-mtls`; an agent without one is refused with a reason naming the problem; a
//! certificate issued for one service cannot register for another; a revoked token gets no
//! new certificate.
//!
//! Addresses: coordinator 127.0.6.200, edge HTTP 127.0.3.200, tunnel 127.0.4.200, origin
//! 127.0.3.201.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use coordinator_api::{Client, CreateToken, Mount};
use meridian_tests::clients::raw_http;
use meridian_tests::dev::{Proc, coordinator, demo_app, eventually, free_port};
use meridian_tests::meridian_bin;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const ADMIN: &str = "mrd_api_tunnelmtls_tunnelmtlsadmintokensecret";
const NODE: &str = "mrd_api_tunnelmtlsnode_tunnelmtlsnodetokensecret";
const WAIT: Duration = Duration::from_secs(20);

/// The edge's tunnel certificate, signed by a throwaway CA the agents trust (`--ca`).
fn edge_identity(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.4.200".into(), "mtls.test".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn ctl(url: &str, args: &[&str]) {
    let out = Command::new(meridian_bin())
        .args(["ctl", "--coordinator", url])
        .args(args)
        .env("MERIDIAN_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("run meridian ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn agent(
    dir: &Path,
    name: &str,
    tunnel: SocketAddr,
    token: &str,
    service: &str,
    origin: &str,
    extra: &[&str],
) -> Proc {
    Proc(
        Command::new(meridian_bin())
            .args(["agent", "--edge", &tunnel.to_string(), "--ca"])
            .arg(dir.join("ca.pem"))
            .args(["--service", service, "--to", origin, "--agent-id", name])
            .args(["--transport", "quic", "--health-interval", "0"])
            .args(extra)
            .env("MERIDIAN_AGENT_TOKEN", token)
            .env("MERIDIAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("start agent"),
    )
}

async fn status(http: SocketAddr, host: &str) -> Option<String> {
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    let resp = raw_http(http, req.as_bytes()).await.ok()?;
    let code = resp.split(' ').nth(1)?.to_owned();
    Some(if code == "200" {
        // The demo app names itself in its JSON body.
        resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
    } else {
        code
    })
}

/// Like an agent: QUIC handshake (presenting `client` when given), `Hello`, the edge's answer.
async fn hello(
    ca: &Path,
    tunnel: SocketAddr,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    token: &str,
    service: &str,
) -> tunnel_proto::Frame {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut tls = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep
        .connect(tunnel, &tunnel.ip().to_string())
        .unwrap()
        .await
        .expect("QUIC handshake: the edge requests but does not require client certificates");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    tunnel_proto::encode(
        &tunnel_proto::Frame::Hello {
            version: tunnel_proto::VERSION,
            token: token.to_owned(),
            agent_id: "mtls-probe".into(),
            services: vec![service.to_owned()],
        },
        &mut buf,
    )
    .unwrap();
    send.write_all(&buf).await.unwrap();
    let mut decoder = tunnel_proto::Decoder::default();
    let mut inbox = BytesMut::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(frame) = decoder.decode(&mut inbox).unwrap() {
            return frame;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut chunk))
            .await
            .expect("an answer to Hello")
            .unwrap()
            .expect("control stream open");
        inbox.extend_from_slice(&chunk[..n]);
    }
}

/// A certificate for `token`'s service with a key made here, as `--mtls` agents get one.
async fn certificate(
    url: &str,
    token: &str,
) -> (
    coordinator_api::AgentCertificate,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let issued = Client::new(url, token)
        .unwrap()
        .agent_certificate(&csr)
        .await
        .unwrap();
    let chain = rustls_pemfile::certs(&mut issued.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (issued, chain, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_agents_serve_required_services_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    edge_identity(d);
    let coord_addr: SocketAddr = format!("127.0.6.200:{}", free_port("127.0.6.200", false))
        .parse()
        .unwrap();
    let url = format!("http://{coord_addr}");
    let _coordinator = coordinator(coord_addr, &d.join("coord"), ADMIN, NODE);
    let admin = Client::new(url.clone(), ADMIN).unwrap();
    eventually(WAIT, || async { admin.status().await.ok() })
        .await
        .expect("coordinator up");

    // `sec` requires mTLS from creation; `other` is switched to it by an update.
    ctl(&url, &["service", "create", "sec", "--require-mtls"]);
    ctl(&url, &["service", "create", "other"]);
    ctl(&url, &["service", "update", "other", "--require-mtls"]);
    let services = admin.list_services().await.unwrap();
    assert!(
        services.iter().all(|s| s.require_mtls),
        "--require-mtls is stored: {services:?}"
    );
    for (host, service) in [("sec.test", "sec"), ("other.test", "other")] {
        admin
            .add_mount(
                &serde_json::from_value::<Mount>(serde_json::json!({
                    "host": host, "path_prefix": "/", "service": service,
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let token = |service: &str| {
        let admin = admin.clone();
        let service = service.to_owned();
        async move { admin.create_token(&CreateToken { service }).await.unwrap() }
    };
    let (sec_token, other_token) = (token("sec").await, token("other").await);

    let origin = format!("127.0.3.201:{}", free_port("127.0.3.201", false));
    let _app = demo_app(&origin, "sec-origin");
    let http: SocketAddr = format!("127.0.3.200:{}", free_port("127.0.3.200", false))
        .parse()
        .unwrap();
    let tunnel: SocketAddr = format!("127.0.4.200:{}", free_port("127.0.4.200", true))
        .parse()
        .unwrap();
    let _edge = Proc(
        Command::new(meridian_bin())
            .args(["edge", "--id", "mtls-edge", "--region", "mt"])
            .args(["--http-listen", &http.to_string()])
            .args(["--tunnel-listen", &tunnel.to_string(), "--no-tunnel-tcp"])
            .arg("--tls-cert")
            .arg(d.join("cert.pem"))
            .arg("--tls-key")
            .arg(d.join("key.pem"))
            .args(["--coordinator", &url])
            .env("MERIDIAN_NODE_TOKEN", NODE)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("edge.log")).unwrap())
            .spawn()
            .expect("start edge"),
    );
    // Configured (the mount is known: 503 for no agent rather than 404).
    eventually(WAIT, || async {
        (status(http, "sec.test").await? == "503").then_some(())
    })
    .await
    .expect("the edge has the coordinator's snapshot");

    // An agent with --mtls fetches a certificate and serves the service.
    let origin_url = format!("http://{origin}");
    let _good = agent(
        d,
        "good",
        tunnel,
        &sec_token.token,
        "sec",
        &origin_url,
        &["--mtls", "--coordinator", &url],
    );
    let body = eventually(WAIT, || async {
        status(http, "sec.test")
            .await
            .filter(|b| b.contains("sec-origin"))
    })
    .await;
    assert!(
        body.is_some(),
        "the --mtls agent serves sec; agent log:\n{}",
        std::fs::read_to_string(d.join("good.log")).unwrap_or_default()
    );

    // The same token without --mtls: refused, and the agent's log says why.
    let _plain = agent(
        d,
        "plain",
        tunnel,
        &sec_token.token,
        "sec",
        &origin_url,
        &[],
    );
    let log = eventually(WAIT, || async {
        let log = std::fs::read_to_string(d.join("plain.log")).ok()?;
        log.contains("edge rejected this agent").then_some(log)
    })
    .await
    .expect("the agent without a certificate is rejected");
    assert!(
        log.contains("requires mTLS") && log.contains("no client certificate"),
        "{log}"
    );
    // The same, probed directly: a clear Reject, not a failed handshake.
    let ca = d.join("ca.pem");
    match hello(&ca, tunnel, None, &sec_token.token, "sec").await {
        tunnel_proto::Frame::Reject { reason } => {
            assert!(reason.contains("requires mTLS"), "{reason}");
        }
        other => panic!("expected Reject, got {other:?}"),
    }

    // A certificate issued for `sec` does not register for `other` (with other's valid token).
    let (issued, chain, key) = certificate(&url, &sec_token.token).await;
    assert_eq!(issued.service, "sec");
    match hello(
        &ca,
        tunnel,
        Some((chain.clone(), key.clone_key())),
        &other_token.token,
        "other",
    )
    .await
    {
        tunnel_proto::Frame::Reject { reason } => {
            assert!(reason.contains("not service \"other\""), "{reason}");
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    // ... while it does register for `sec` (the probe's Welcome; it then goes away).
    assert!(
        matches!(
            hello(&ca, tunnel, Some((chain, key)), &sec_token.token, "sec").await,
            tunnel_proto::Frame::Welcome { .. }
        ),
        "a certificate for sec registers for sec"
    );
    // A certificate from the right service but another CA is refused too.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "meridian://service/sec".try_into().unwrap(),
    )];
    let stranger = p.self_signed(&stranger_key).unwrap();
    let forged = (
        vec![stranger.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(stranger_key.serialize_der())),
    );
    match hello(&ca, tunnel, Some(forged), &sec_token.token, "sec").await {
        tunnel_proto::Frame::Reject { reason } => {
            assert!(reason.contains("client certificate refused"), "{reason}");
        }
        other => panic!("expected Reject, got {other:?}"),
    }

    // Revoking the token: no new certificate, and the agent is cut off as before.
    admin.revoke_token(&sec_token.id).await.unwrap();
    let refused = eventually(WAIT, || async {
        let key = rcgen::KeyPair::generate().ok()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .ok()?
            .pem()
            .ok()?;
        let r = Client::new(url.clone(), sec_token.token.clone())
            .ok()?
            .agent_certificate(&csr)
            .await;
        r.err().and_then(|e| e.status()).filter(|s| *s == 401)
    })
    .await;
    assert_eq!(refused, Some(401), "a revoked token gets no certificate");
    eventually(WAIT, || async {
        (status(http, "sec.test").await? == "503").then_some(())
    })
    .await
    .expect("the revoked agent is disconnected");
}

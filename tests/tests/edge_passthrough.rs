//! L4 at the edge (issue 3): SNI passthrough and PROXY protocol v2, with real processes — a
//! coordinator, an edge, and a tunnel agent with a `--tcp` origin that terminates TLS itself
//! (its own certificate, from its own CA). On the edge's one HTTPS port:
//! - a passthrough host's client gets the ORIGIN's certificate and the origin's answer;
//! - another host still gets the edge's certificate and normal HTTP routing;
//! - with `proxy_protocol` the origin learns the client's real address from a PROXY v2 header,
//!   as it does through `--tcp-service PORT=SERVICE,proxy-protocol` and through a TCP port the
//!   coordinator gives the service (`ctl service update --tcp-port`), opened and closed live;
//! - a passthrough service without agents reaches its https origin URL directly;
//! - junk and a trickled ClientHello are closed, and the edge keeps serving;
//! - an L4 connection silent for `--l4-idle-timeout` is closed (and counted), a busy one is not;
//! - `/metrics` counts passthrough connections by service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_api::{Client, CreateToken, Mount, Origin, Region, Service};
use meridian_tests::clients::tls_client_config;
use meridian_tests::dev::{Proc, coordinator, demo_app, eventually, free_port};
use meridian_tests::meridian_bin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ADMIN: &str = "mrd_api_edgepassthru_edgepassthroughadmintoken";
const NODE: &str = "mrd_api_edgepassthrunode_edgepassthroughnodetoken";
const WAIT: Duration = Duration::from_secs(20);
const EDGE_IP: &str = "127.0.3.40";
const TUNNEL_IP: &str = "127.0.4.40";
const COORD_IP: &str = "127.0.6.40";
const WEB_IP: &str = "127.0.3.41";
/// The test's clients connect from here, so the origin can tell them from the agent (127.0.0.1).
const CLIENT_IP: &str = "127.0.3.49";
const SECURE: &str = "secure.example.test";
const PP: &str = "pp.example.test";
const EDGE_HOST: &str = "edge.meridian.test";
/// A passthrough host whose service has no agent, only the origin's URL.
const DIRECT: &str = "direct.example.test";

/// PROXY protocol v2 signature.
const PP2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// A self-signed certificate for `names`, written as `<stem>.pem` / `<stem>.key`; returns the DER.
fn cert(dir: &Path, stem: &str, names: &[&str]) -> Vec<u8> {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{stem}.key")),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    ck.cert.der().to_vec()
}

/// Reads a PROXY v2 header if the connection starts with one: `Some(source)` for PROXY over
/// TCP/IPv4, `None` without a header.
async fn read_proxy_header(tcp: &mut TcpStream) -> Option<SocketAddr> {
    let mut first = [0u8; 1];
    tcp.peek(&mut first).await.ok()?;
    if first[0] != PP2_SIG[0] {
        return None;
    }
    let mut head = [0u8; 16];
    tcp.read_exact(&mut head).await.ok()?;
    assert_eq!(head[..12], PP2_SIG, "PROXY v2 signature");
    assert_eq!(head[12], 0x21, "version 2, PROXY command");
    assert_eq!(head[13], 0x11, "TCP over IPv4");
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.ok()?;
    let ip = std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]);
    let port = u16::from_be_bytes([body[8], body[9]]);
    Some(SocketAddr::new(ip.into(), port))
}

/// The zero-trust origin: terminates TLS with its own certificate and answers
/// `origin sni=<SNI> client=<PROXY source or "direct">`.
async fn tls_origin(dir: &Path) -> SocketAddr {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let certs = rustls_pemfile::certs(&mut read("origin.pem").as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut read("origin.key").as_slice())
        .unwrap()
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let client = read_proxy_header(&mut tcp).await;
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!(
                    "origin sni={sni} client={}",
                    client.map_or("direct".to_owned(), |c| c.to_string())
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// What a client saw on one HTTPS connection.
#[derive(Debug)]
struct Seen {
    /// The server's leaf certificate.
    cert: Vec<u8>,
    /// The whole response, head and body.
    response: String,
    /// The client's own address.
    local: SocketAddr,
}

/// `GET /` with SNI `host` over TLS to `edge`, trusting only `ca`, from [`CLIENT_IP`].
async fn https(edge: SocketAddr, host: &str, ca: &Path) -> anyhow::Result<Seen> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(CLIENT_IP.parse()?, 0))?;
    let tcp = sock.connect(edge).await?;
    let local = tcp.local_addr()?;
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, &[b"http/1.1"])?);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    tls.write_all(
        format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await;
    Ok(Seen {
        cert,
        response: String::from_utf8_lossy(&response).into_owned(),
        local,
    })
}

/// The first TLS flight of a real client for `host`.
fn client_hello(host: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Whether the edge closes a connection after `sent`, within `within`.
async fn closes_after(edge: SocketAddr, sent: &[u8], within: Duration) -> bool {
    let mut s = TcpStream::connect(edge).await.unwrap();
    s.write_all(sent).await.unwrap();
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(within, s.read_to_end(&mut sink)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

fn metrics_now(admin: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    out
}

async fn metrics(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_passthrough_to_a_tls_origin_with_proxy_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let edge_der = cert(d, "edge", &[EDGE_HOST, TUNNEL_IP, "localhost"]);
    let origin_der = cert(d, "origin", &[SECURE, PP, DIRECT]);
    let (edge_ca, origin_ca) = (d.join("edge.pem"), d.join("origin.pem"));

    let api: SocketAddr = format!("{COORD_IP}:{}", free_port(COORD_IP, false))
        .parse()
        .unwrap();
    let data = d.join("coordinator");
    std::fs::create_dir_all(&data).unwrap();
    let _coordinator = coordinator(api, &data, ADMIN, NODE);
    let admin = Client::new(format!("http://{api}"), ADMIN).unwrap();
    eventually(WAIT, || async { admin.list_regions().await.ok() })
        .await
        .expect("coordinator up");
    admin
        .create_region(&Region {
            name: "pt".into(),
            latitude: None,
            longitude: None,
            admin_state: Default::default(),
        })
        .await
        .unwrap();

    // `vault`: reached through an agent whose `--tcp` origin terminates TLS. `web`: plain HTTP.
    let web_port = free_port(WEB_IP, false);
    let _web = demo_app(&format!("{WEB_IP}:{web_port}"), "web");
    admin
        .create_service_spec(&Service {
            name: "web".into(),
            origins: vec![Origin {
                url: format!("http://{WEB_IP}:{web_port}"),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_service_spec(&Service {
            name: "vault".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mount = |host: &str, service: &str, passthrough: bool, proxy_protocol: bool| Mount {
        host: host.into(),
        path_prefix: "/".into(),
        service: service.into(),
        passthrough,
        proxy_protocol,
        ..Default::default()
    };
    admin
        .add_mount(&mount(EDGE_HOST, "web", false, false))
        .await
        .unwrap();
    admin
        .add_mount(&mount(SECURE, "vault", true, false))
        .await
        .unwrap();
    admin
        .add_mount(&mount(PP, "vault", true, true))
        .await
        .unwrap();
    let token = admin
        .create_token(&CreateToken {
            service: "vault".into(),
        })
        .await
        .unwrap()
        .token;

    let origin = tls_origin(d).await;
    let https_addr: SocketAddr = format!("{EDGE_IP}:{}", free_port(EDGE_IP, false))
        .parse()
        .unwrap();
    let admin_addr: SocketAddr = format!("{EDGE_IP}:{}", free_port(EDGE_IP, false))
        .parse()
        .unwrap();
    let tcp_service: SocketAddr = format!("{EDGE_IP}:{}", free_port(EDGE_IP, false))
        .parse()
        .unwrap();
    let tunnel: SocketAddr = format!("{TUNNEL_IP}:{}", free_port(TUNNEL_IP, true))
        .parse()
        .unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_owned();
    let _edge = Proc(
        Command::new(meridian_bin())
            .args(["edge", "--id", "pt-1", "--region", "pt"])
            .args(["--https-listen", &https_addr.to_string()])
            .args(["--admin-listen", &admin_addr.to_string()])
            .args(["--tunnel-listen", &tunnel.to_string()])
            .args([
                "--tls-cert",
                &arg(&edge_ca),
                "--tls-key",
                &arg(&d.join("edge.key")),
            ])
            .args(["--coordinator", &format!("http://{api}")])
            .args(["--header-read-timeout", "1s"])
            .args(["--l4-idle-timeout", "2s"])
            .args([
                "--tcp-service",
                &format!("{tcp_service}=vault,proxy-protocol"),
            ])
            .env("MERIDIAN_NODE_TOKEN", NODE)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edge"),
    );
    let _agent = Proc(
        Command::new(meridian_bin())
            .args([
                "agent",
                "--edge",
                &tunnel.to_string(),
                "--ca",
                &arg(&edge_ca),
            ])
            .args([
                "--service",
                "vault",
                "--regions",
                "1",
                "--agent-id",
                "vault-1",
            ])
            .args(["--tcp", &origin.to_string(), "--health-interval", "0"])
            .env("MERIDIAN_AGENT_TOKEN", &token)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent"),
    );

    // Passthrough: the client trusts only the origin's CA and gets the origin's certificate, so
    // the edge never decrypted the connection; no PROXY header on this mount.
    let seen = eventually(WAIT, || async {
        https(https_addr, SECURE, &origin_ca)
            .await
            .ok()
            .filter(|s| s.response.contains("origin sni="))
    })
    .await;
    let Some(seen) = seen else {
        panic!(
            "no passthrough answer: {:?}",
            https(https_addr, SECURE, &origin_ca).await
        )
    };
    assert_eq!(
        seen.cert, origin_der,
        "the origin's certificate, not the edge's"
    );
    assert!(
        seen.response.starts_with("HTTP/1.1 200"),
        "{}",
        seen.response
    );
    assert!(
        seen.response
            .ends_with(&format!("origin sni={SECURE} client=direct")),
        "{}",
        seen.response
    );

    // PROXY v2 on the other passthrough mount: the origin sees this client's own address.
    let seen = https(https_addr, PP, &origin_ca).await.unwrap();
    assert_eq!(seen.cert, origin_der);
    assert!(
        seen.response
            .ends_with(&format!("origin sni={PP} client={}", seen.local)),
        "the origin sees the real client {}: {}",
        seen.local,
        seen.response
    );
    assert_eq!(seen.local.ip(), CLIENT_IP.parse::<IpAddr>().unwrap());

    // A plain TCP service with `,proxy-protocol` (the client speaks TLS to the origin through
    // it): the same header, with this client's address.
    let seen = https(tcp_service, SECURE, &origin_ca).await.unwrap();
    assert_eq!(seen.cert, origin_der);
    assert!(
        seen.response
            .ends_with(&format!("origin sni={SECURE} client={}", seen.local)),
        "{}",
        seen.response
    );

    // The same as a coordinator-driven TCP port (`ctl service update --tcp-port`): every edge
    // opens it on its tunnel IP, with no edge flag; removing it closes the listener.
    let port = free_port(TUNNEL_IP, false);
    let ctl = |args: &[&str]| {
        let out = Command::new(meridian_bin())
            .args(["ctl", "--coordinator", &format!("http://{api}")])
            .args(args)
            .env("MERIDIAN_ADMIN_TOKEN", ADMIN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&[
        "service",
        "update",
        "vault",
        "--tcp-port",
        &format!("{port},proxy-protocol"),
    ]);
    let coordinated: SocketAddr = format!("{TUNNEL_IP}:{port}").parse().unwrap();
    let seen = eventually(WAIT, || async {
        https(coordinated, SECURE, &origin_ca).await.ok()
    })
    .await
    .expect("the coordinator's TCP port opened on the edge");
    assert_eq!(seen.cert, origin_der);
    assert!(
        seen.response
            .ends_with(&format!("origin sni={SECURE} client={}", seen.local)),
        "{}",
        seen.response
    );
    ctl(&["service", "update", "vault", "--no-tcp-ports"]);
    eventually(WAIT, || async {
        TcpStream::connect(coordinated).await.err().map(|_| ())
    })
    .await
    .expect("the TCP port closed once the service dropped it");

    // A service with no agent, only an https origin URL: passthrough goes to it directly, PROXY
    // header included.
    admin
        .create_service_spec(&Service {
            name: "direct".into(),
            origins: vec![Origin {
                url: format!("https://127.0.0.1:{}", origin.port()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .add_mount(&mount(DIRECT, "direct", true, true))
        .await
        .unwrap();
    let seen = eventually(WAIT, || async {
        https(https_addr, DIRECT, &origin_ca)
            .await
            .ok()
            .filter(|s| s.response.contains("origin sni="))
    })
    .await
    .expect("passthrough to a direct origin");
    assert_eq!(seen.cert, origin_der);
    assert!(
        seen.response
            .ends_with(&format!("origin sni={DIRECT} client={}", seen.local)),
        "{}",
        seen.response
    );

    // The same port, another name: the edge's own certificate and normal HTTP routing.
    let seen = eventually(WAIT, || async {
        https(https_addr, EDGE_HOST, &edge_ca)
            .await
            .ok()
            .filter(|s| s.response.starts_with("HTTP/1.1 200"))
    })
    .await;
    let Some(seen) = seen else {
        panic!(
            "no routed answer: {:?}",
            https(https_addr, EDGE_HOST, &edge_ca).await
        )
    };
    assert_eq!(
        seen.cert, edge_der,
        "the edge terminates TLS for other names"
    );
    assert!(
        seen.response.contains("\"instance\":\"web\""),
        "{}",
        seen.response
    );
    assert!(
        seen.response
            .to_ascii_lowercase()
            .contains("meridian-edge: pt-1"),
        "{}",
        seen.response
    );
    // A passthrough name trusted only through the edge's CA fails: it is not the edge's cert.
    assert!(https(https_addr, SECURE, &edge_ca).await.is_err());

    // Not TLS, and a ClientHello trickled and never finished: both closed (the second by the
    // 1 s handshake timeout), and the edge serves on.
    let t = Instant::now();
    assert!(
        closes_after(
            https_addr,
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_secs(5)
        )
        .await
    );
    let hello = client_hello(SECURE);
    assert!(
        closes_after(
            https_addr,
            &hello[..hello.len() / 2],
            Duration::from_secs(5)
        )
        .await
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let seen = https(https_addr, SECURE, &origin_ca).await.unwrap();
    assert_eq!(seen.cert, origin_der);

    // An L4 connection that goes silent is closed by the edge after --l4-idle-timeout (2 s),
    // although the origin behind it would wait for the rest of the ClientHello forever; bytes
    // keep it open past that.
    let mut quiet = TcpStream::connect(tcp_service).await.unwrap();
    quiet.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), quiet.read_to_end(&mut sink))
        .await
        .expect("the edge closes an idle L4 connection")
        .ok();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "closed after {waited:?}, not after the 2 s idle timeout"
    );
    let mut busy = TcpStream::connect(tcp_service).await.unwrap();
    for b in hello.iter().take(4) {
        busy.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let mut one = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), busy.read(&mut one))
            .await
            .is_err(),
        "a connection with traffic every 0.9 s is still open after 3.6 s"
    );
    eventually(Duration::from_secs(5), || async {
        metrics(admin_addr).await.lines().any(|l| {
            l.starts_with(
                "meridian_edge_l4_connections_total{kind=\"tcp\",service=\"vault\",outcome=\"idle_timeout\"}",
            )
        }).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("idle L4 closes counted:\n{}", metrics_now(admin_addr)));

    // Passthrough connections by service on /metrics (counted as each one ends).
    let counted = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("meridian_edge_l4_connections_total{kind=\"passthrough\",service=\"vault\",outcome=\"ok\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    eventually(Duration::from_secs(5), || async {
        counted(&metrics(admin_addr).await).filter(|n| *n >= 3)
    })
    .await
    .unwrap_or_else(|| panic!("passthrough counter:\n{}", metrics_now(admin_addr)));
}

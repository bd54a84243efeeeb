//! Cross-region forwarding for a service of direct origins: an edge whose origins all fail sends
//! the request to an edge of another region, which serves it from origins it can reach. Two
//! in-process edges fed different snapshots (each edge's view of the origins differs the way two
//! regions' networks would).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordinator_api::{EdgeInfo, EdgeStatus, Mount, Origin, Region, Service, Snapshot};
use edge_proxy::{Config, Edge};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "node-token-for-peer-origins";

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An origin answering `origin-<name>` to everything.
async fn origin(addr: &str, name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "origin-{name}"
                        )))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn snapshot(origin: SocketAddr, peer: Option<(&str, &str, SocketAddr)>) -> Snapshot {
    let region = |name: &str, lat, lon| Region {
        name: name.into(),
        latitude: Some(lat),
        longitude: Some(lon),
        admin_state: Default::default(),
    };
    Snapshot {
        revision: 1,
        regions: vec![region("ams", 52.37, 4.90), region("iad", 38.95, -77.45)],
        services: vec![Service {
            name: "direct".into(),
            origins: vec![Origin {
                url: format!("http://{origin}"),
                ..Default::default()
            }],
            ..Default::default()
        }],
        mounts: vec![
            serde_json::from_value::<Mount>(serde_json::json!({
                "host": "app.test", "path_prefix": "/", "service": "direct",
            }))
            .unwrap(),
        ],
        edges: peer
            .map(|(id, region, addr)| EdgeStatus {
                info: EdgeInfo {
                    id: id.into(),
                    region: region.into(),
                    public_ips: vec![],
                    http_addr: None,
                    https_addr: Some(addr.to_string()),
                    tunnel_addr: None,
                    anycast: None,
                    healthy_services: None,
                },
                alive: true,
                last_seen_ms: 0,
                agents: vec![],
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

async fn get(addr: SocketAddr) -> (u16, Vec<String>, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        lines.map(|l| l.to_ascii_lowercase()).collect(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn an_edge_whose_origins_fail_forwards_to_another_region() {
    let dir = std::env::temp_dir().join(format!("edge-peer-origins-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = TempDir(dir.clone());
    // iad's edge: TLS for peers on 127.0.3.101 (its certificate names that address).
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.3.101".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let good = origin("127.0.3.102:0", "iad").await;
    // A port nothing listens on: every connection to ams's origin is refused.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.3.103:0").unwrap();
        l.local_addr().unwrap()
    };

    let mut c = Config::new("iad", "127.0.3.101:0".parse().unwrap());
    c.id = "iad-1".into();
    c.https_listen = Some("127.0.3.101:0".parse().unwrap());
    c.tls_cert = Some(dir.join("cert.pem"));
    c.tls_key = Some(dir.join("key.pem"));
    c.node_token = Some(TOKEN.into());
    let iad = Edge::bind(c).await.unwrap();
    let iad_https = iad.https_addr().unwrap();
    let (_iad_tx, rx) = watch::channel(Some(Arc::new(snapshot(good, None))));
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    tokio::spawn(iad.serve(rx, stop.clone()));

    let mut c = Config::new("ams", "127.0.3.100:0".parse().unwrap());
    c.id = "ams-1".into();
    c.http_listen = Some("127.0.3.100:0".parse().unwrap());
    c.tls_cert = Some(dir.join("cert.pem"));
    c.tls_key = Some(dir.join("key.pem"));
    c.node_token = Some(TOKEN.into());
    c.peer_ca = Some(dir.join("cert.pem"));
    let ams = Edge::bind(c).await.unwrap();
    let ams_http = ams.http_addr().unwrap();
    let (_ams_tx, rx) = watch::channel(Some(Arc::new(snapshot(
        dead,
        Some(("iad-1", "iad", iad_https)),
    ))));
    tokio::spawn(ams.serve(rx, stop.clone()));

    // ams has no agent and its only origin refuses: iad serves from its own origin.
    for _ in 0..5 {
        let (status, headers, body) = get(ams_http).await;
        assert_eq!(status, 200, "{headers:?} {body}");
        assert_eq!(body, "origin-iad");
        assert!(
            headers.iter().any(|h| h == "meridian-upstream-edge: iad-1"),
            "{headers:?}"
        );
    }
}

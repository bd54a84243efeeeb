//! Cross-region forwarding: when this edge has no usable agent for a service, the request goes to
//! the nearest other edge that has one, so a region losing all its agents costs its clients
//! latency, not errors.
//!
//! One hop at most: a request that arrived from a peer is never forwarded again, which makes
//! loops impossible whatever stale view two edges have of each other. Peers authenticate each
//! other both ways: the caller verifies the peer's certificate against `--peer-ca`, and the
//! callee checks the node token the caller presents in [`HOP_HEADER`] (the same secret edges use
//! with the coordinator), so a client cannot pose as an edge. Connections are pooled HTTP/2.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coordinator_api::Snapshot;
use http::{HeaderMap, HeaderValue};
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::crypto::ring;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::forward::BoxError;

/// Carries the caller's node token on requests between edges; stripped before any origin.
pub(crate) const HOP_HEADER: &str = "meridian-hop";
/// Names the peer edge that served a forwarded request, on the response to the client.
pub(crate) const UPSTREAM_EDGE_HEADER: &str = "meridian-upstream-edge";
/// Peers tried per request: the nearest, and one more if it could not take the request at all.
pub(crate) const MAX_PEERS: usize = 2;
/// Time to set up a connection (TCP + TLS + HTTP/2) to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Another edge that reports an agent of the service.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Peer {
    pub(crate) edge_id: String,
    pub(crate) region: String,
    pub(crate) addr: SocketAddr,
}

/// Peers able to serve `service`, best first: edges of this region, then of nearer regions
/// (great-circle distance between region coordinates), then of regions without coordinates;
/// ties by edge id so every request makes the same choice. Sans-IO.
///
/// An edge qualifies when it reports an agent of the service whose origin passes its checks,
/// or, for a service with direct origins (every edge fronts the same origin list), when it is
/// in another region: this edge only asks when its own origins all fail here, and edges of its
/// own region most likely see the same, while another region's network may still reach them.
pub(crate) fn candidates(snap: &Snapshot, me: &str, my_region: &str, service: &str) -> Vec<Peer> {
    let coords = |name: &str| {
        snap.regions
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| Some((r.latitude?, r.longitude?)))
    };
    let here = coords(my_region);
    let has_origins = snap
        .services
        .iter()
        .any(|s| s.name == service && !s.origins.is_empty());
    let mut peers: Vec<(f64, Peer)> = snap
        .edges
        .iter()
        .filter(|e| {
            e.alive
                && e.info.id != me
                && (e
                    .agents
                    .iter()
                    .any(|a| a.service == service && a.origin_healthy)
                    || (has_origins && e.info.region != my_region))
        })
        .filter_map(|e| {
            let addr = e.info.https_addr.as_deref()?.parse().ok()?;
            let rank = if e.info.region == my_region {
                -1.0
            } else {
                match (here, coords(&e.info.region)) {
                    (Some(a), Some(b)) => distance_km(a, b),
                    _ => f64::MAX,
                }
            };
            Some((
                rank,
                Peer {
                    edge_id: e.info.id.clone(),
                    region: e.info.region.clone(),
                    addr,
                },
            ))
        })
        .collect();
    peers.sort_by(|(ra, a), (rb, b)| ra.total_cmp(rb).then_with(|| a.edge_id.cmp(&b.edge_id)));
    peers.into_iter().map(|(_, p)| p).collect()
}

/// Great-circle distance (haversine) between two (latitude, longitude) points in degrees.
fn distance_km((lat1, lon1): (f64, f64), (lat2, lon2): (f64, f64)) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

/// Body of a request sent to a peer.
pub(crate) type PeerBody = BoxBody<Bytes, BoxError>;

/// A peer could not be reached; nothing was sent to it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, String),
}

/// Pooled, authenticated HTTP/2 client to other edges.
pub(crate) struct PeerClient {
    tls: tokio_rustls::TlsConnector,
    /// `HOP_HEADER` value this edge sends.
    token: HeaderValue,
    /// SHA-256 of the node token, to check incoming hops in constant time.
    token_digest: [u8; 32],
    pool: Mutex<HashMap<SocketAddr, http2::SendRequest<PeerBody>>>,
    /// Connections opened and requests sent, for `/metrics`.
    pub(crate) stats: crate::metrics::PoolCounters,
}

impl PeerClient {
    pub(crate) fn new(ca: &Path, node_token: &str) -> Result<Self, Error> {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::Tls(format!("read peer CA {}: {e}", ca.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| Error::Tls(format!("parse peer CA {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("peer CA {}: {e}", ca.display())))?;
        }
        if roots.is_empty() {
            return Err(Error::Tls(format!(
                "peer CA {}: no certificate found",
                ca.display()
            )));
        }
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let token = HeaderValue::from_str(node_token)
            .map_err(|_| Error::Config("node token is not a valid header value".into()))?;
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            token,
            token_digest: Sha256::digest(node_token.as_bytes()).into(),
            pool: Mutex::new(HashMap::new()),
            stats: Default::default(),
        })
    }

    /// Whether `headers` carry this network's node token, i.e. the request comes from a peer.
    pub(crate) fn is_peer_hop(&self, headers: &HeaderMap) -> bool {
        headers.get(HOP_HEADER).is_some_and(|v| {
            let got: [u8; 32] = Sha256::digest(v.as_bytes()).into();
            // Constant time: the difference of every byte is folded before the one comparison.
            got.iter()
                .zip(self.token_digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }

    /// The `HOP_HEADER` value this edge presents to its peers.
    pub(crate) fn hop_value(&self) -> &HeaderValue {
        &self.token
    }

    /// A connection to `peer` ready for a request: pooled, or new.
    pub(crate) async fn connect(
        &self,
        peer: &Peer,
    ) -> Result<http2::SendRequest<PeerBody>, PeerError> {
        let mut sender = self.sender(peer.addr).await?;
        if let Err(e) = sender.ready().await {
            self.forget(peer.addr);
            return Err(PeerError::Connect(peer.addr, e.to_string()));
        }
        Ok(sender)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, http2::SendRequest<PeerBody>>> {
        // Held for a map lookup or insert, never across `.await`; the map stays valid if poisoned.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, addr: SocketAddr) {
        self.pool().remove(&addr);
    }

    /// A pooled connection to `addr`, or a new one.
    async fn sender(&self, addr: SocketAddr) -> Result<http2::SendRequest<PeerBody>, PeerError> {
        let pooled = self.pool().get(&addr).filter(|s| !s.is_closed()).cloned();
        if let Some(s) = pooled {
            self.stats.request(true);
            return Ok(s);
        }
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("peer did not negotiate HTTP/2".to_owned());
            }
            let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "peer connection closed");
                }
            });
            Ok::<_, String>(sender)
        };
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| PeerError::Connect(addr, "timed out".into()))?
            .map_err(|e| PeerError::Connect(addr, e))?;
        self.pool().insert(addr, sender.clone());
        self.stats.opened();
        self.stats.request(false);
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_api::{AgentConn, EdgeInfo, EdgeStatus, Region};

    fn region(name: &str, lat: f64, lon: f64) -> Region {
        Region {
            name: name.into(),
            latitude: Some(lat),
            longitude: Some(lon),
            admin_state: Default::default(),
        }
    }

    fn edge(id: &str, region: &str, port: u16, alive: bool, services: &[&str]) -> EdgeStatus {
        EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: Some(format!("127.0.0.1:{port}")),
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive,
            last_seen_ms: 0,
            agents: services
                .iter()
                .map(|s| AgentConn {
                    agent_id: format!("{s}-agent"),
                    service: (*s).into(),
                    token_id: String::new(),
                    remote_addr: String::new(),
                    connected_at_ms: 0,
                    origin_healthy: true,
                })
                .collect(),
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            regions: vec![
                region("ams", 52.37, 4.90),
                region("iad", 38.95, -77.45),
                region("sin", 1.35, 103.99),
                region("fra", 50.11, 8.68),
            ],
            edges: vec![
                edge("ams-1", "ams", 1, true, &[]),
                edge("ams-2", "ams", 2, true, &["web"]),
                edge("iad-1", "iad", 3, true, &["web"]),
                edge("sin-1", "sin", 4, true, &["web", "api"]),
                edge("fra-1", "fra", 5, false, &["web"]),
                edge("nowhere-1", "nowhere", 6, true, &["web"]),
            ],
            ..Snapshot::default()
        }
    }

    fn ids(p: &[Peer]) -> Vec<&str> {
        p.iter().map(|p| p.edge_id.as_str()).collect()
    }

    #[test]
    fn own_region_first_then_nearest_then_unknown_and_never_self_or_dead() {
        let s = snap();
        // From ams: the other ams edge, then iad (~6,200 km) before sin (~10,500 km); fra is
        // nearest but dead; a region without coordinates comes last.
        assert_eq!(
            ids(&candidates(&s, "ams-1", "ams", "web")),
            ["ams-2", "iad-1", "sin-1", "nowhere-1"]
        );
        assert_eq!(ids(&candidates(&s, "ams-2", "ams", "api")), ["sin-1"]);
        assert!(
            candidates(&s, "sin-1", "sin", "api").is_empty(),
            "never itself"
        );
        assert!(candidates(&s, "ams-1", "ams", "other").is_empty());
    }

    #[test]
    fn agents_with_failing_origins_do_not_count_and_origin_services_look_to_other_regions() {
        let mut s = snap();
        // iad's only web agent has a failing origin: sin is the nearest that can serve.
        s.edges[2].agents[0].origin_healthy = false;
        assert_eq!(
            ids(&candidates(&s, "ams-1", "ams", "web")),
            ["ams-2", "sin-1", "nowhere-1"]
        );
        // A service of direct origins only: no edge has an agent, yet every live edge of
        // another region fronts the same origins, nearest first; this region's are skipped.
        s.services.push(coordinator_api::Service {
            name: "direct".into(),
            origins: vec![coordinator_api::Origin {
                url: "http://10.0.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(
            ids(&candidates(&s, "ams-1", "ams", "direct")),
            ["iad-1", "sin-1", "nowhere-1"]
        );
        assert!(candidates(&s, "ams-1", "ams", "other").is_empty());
    }

    #[test]
    fn distances_are_sane() {
        let ams = (52.37, 4.90);
        let iad = (38.95, -77.45);
        let d = distance_km(ams, iad);
        assert!((6_000.0..6_500.0).contains(&d), "{d}");
        assert_eq!(distance_km(ams, ams), 0.0);
    }

    #[test]
    fn only_this_networks_node_token_marks_a_peer_hop() {
        let dir = std::env::temp_dir().join(format!("meridian-peer-ca-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["ca.test".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(&ca, cert.pem()).expect("write");
        let client = PeerClient::new(&ca, "s3cret").expect("client");
        let mut h = HeaderMap::new();
        assert!(!client.is_peer_hop(&h));
        h.insert(HOP_HEADER, HeaderValue::from_static("guess"));
        assert!(!client.is_peer_hop(&h));
        h.insert(HOP_HEADER, HeaderValue::from_static("s3cret"));
        assert!(client.is_peer_hop(&h));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

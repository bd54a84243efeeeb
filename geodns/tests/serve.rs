//! End to end over real sockets: a static snapshot in, DNS packets over UDP and TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use coordinator_api::{AdminState, EdgeInfo, EdgeStatus, Region, Snapshot};
use geodns::{Config, Server};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use common::{Running, TIMEOUT, start_with};

fn dev_snapshot() -> Snapshot {
    let region = |name: &str, lat, lon| Region {
        name: name.into(),
        latitude: Some(lat),
        longitude: Some(lon),
        admin_state: Default::default(),
    };
    let edge = |region: &str, ip: &str| EdgeStatus {
        info: EdgeInfo {
            id: format!("{region}-1"),
            region: region.into(),
            public_ips: vec![ip.parse().unwrap()],
            http_addr: None,
            https_addr: None,
            tunnel_addr: None,
            anycast: None,
            healthy_services: None,
        },
        alive: true,
        last_seen_ms: 0,
        agents: Vec::new(),
    };
    Snapshot {
        revision: 3,
        regions: vec![
            region("ams", 52.37, 4.90),
            region("iad", 38.95, -77.45),
            region("sin", 1.35, 103.99),
        ],
        edges: vec![
            edge("ams", "127.0.0.11"),
            edge("iad", "127.0.0.12"),
            edge("sin", "127.0.0.13"),
        ],
        ..Snapshot::default()
    }
}

fn dev_config() -> Config {
    let mut c = Config::with_defaults();
    c.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.nets = [
        "192.0.2.0/24=ams",
        "198.51.100.0/24=iad",
        "203.0.113.0/24=sin",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    c.default_region = Some("ams".into());
    c
}

async fn start(snapshot: Option<Snapshot>) -> Running {
    start_with(dev_config(), snapshot).await
}

fn query(name: &str, qtype: RecordType, ecs: Option<&str>) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(ecs) = ecs {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::from_str(ecs).unwrap()));
        m.set_edns(e);
    }
    m
}

async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(addr: SocketAddr, q: &Message) -> Message {
    let reply = tokio::time::timeout(TIMEOUT, udp_raw(addr, &q.to_vec().unwrap()))
        .await
        .unwrap()
        .expect("udp reply");
    let r = Message::from_vec(&reply).unwrap();
    assert_eq!(r.id, q.id);
    r
}

async fn tcp(stream: &mut TcpStream, q: &Message) -> Message {
    let bytes = q.to_vec().unwrap();
    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    stream.write_all(&frame).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.unwrap();
    let r = Message::from_vec(&buf).unwrap();
    assert_eq!(r.id, q.id);
    r
}

fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
}

fn scope(m: &Message) -> Option<u8> {
    match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(cs) => Some(cs.scope_prefix()),
        _ => None,
    }
}

#[tokio::test]
async fn answers_over_udp_and_tcp() {
    let s = start(Some(dev_snapshot())).await;

    // ECS from iad's net → the iad edge, with the scope echoed.
    let r = udp(
        s.addr,
        &query(
            "edge.meridian.test.",
            RecordType::A,
            Some("198.51.100.7/24"),
        ),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(r.authoritative && !r.recursion_available);
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 12])]);
    assert_eq!(scope(&r), Some(24));

    // No ECS: the source is 127.0.0.1, unmatched → default ams.
    let r = udp(s.addr, &query("edge.meridian.test.", RecordType::A, None)).await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);

    let r = udp(s.addr, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(r.response_code, ResponseCode::Refused);
    let r = udp(s.addr, &query("nope.meridian.test.", RecordType::A, None)).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities.len(), 1);

    // Garbage and a truncated query: no reply or FORMERR, and the server keeps answering.
    assert!(udp_raw(s.addr, &[0xde, 0xad]).await.is_none());
    let good = query("edge.meridian.test.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let cut = udp_raw(s.addr, &good[..good.len() - 3])
        .await
        .expect("FORMERR");
    assert_eq!(
        Message::from_vec(&cut).unwrap().response_code,
        ResponseCode::FormErr
    );
    let r = udp(
        s.addr,
        &query(
            "edge.meridian.test.",
            RecordType::A,
            Some("203.0.113.50/24"),
        ),
    )
    .await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 13])]);

    // TCP: several queries on one connection.
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    let r = tcp(
        &mut conn,
        &query(
            "edge.meridian.test.",
            RecordType::A,
            Some("198.51.100.7/24"),
        ),
    )
    .await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 12])]);
    assert_eq!(scope(&r), Some(24));
    let r = tcp(&mut conn, &query("meridian.test.", RecordType::SOA, None)).await;
    assert_eq!(r.answers.len(), 1);
    let r = tcp(&mut conn, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(r.response_code, ResponseCode::Refused);

    // A garbage TCP frame closes that connection only.
    let mut bad = TcpStream::connect(s.addr).await.unwrap();
    bad.write_all(&[0x00, 0x03, 1, 2, 3]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(TIMEOUT, bad.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    let r = tcp(
        &mut conn,
        &query("edge.meridian.test.", RecordType::A, None),
    )
    .await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);

    assert!(s.stats.malformed.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    assert_eq!(s.stats.panics.load(std::sync::atomic::Ordering::Relaxed), 0);
    s.stop().await;
}

#[tokio::test]
async fn follows_snapshot_changes() {
    let s = start(None).await;
    let q = query(
        "edge.meridian.test.",
        RecordType::A,
        Some("198.51.100.7/24"),
    );
    assert_eq!(udp(s.addr, &q).await.response_code, ResponseCode::ServFail);

    let mut snap = dev_snapshot();
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while ips(&udp(s.addr, &q).await).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "snapshot never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        ips(&udp(s.addr, &q).await),
        vec![IpAddr::from([127, 0, 0, 12])]
    );

    // iad goes down: its clients move to the nearest live region (ams), with a short TTL.
    snap.revision = 4;
    snap.edges[1].alive = false;
    s.snapshots.send_replace(Some(Arc::new(snap)));
    loop {
        let r = udp(s.addr, &q).await;
        if ips(&r) == vec![IpAddr::from([127, 0, 0, 11])] {
            assert_eq!(r.answers[0].ttl, 5);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "change never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn serve_helper_and_bind_errors() {
    // Binding the same fixed port twice fails with a clear error, not a panic.
    let first = Server::bind(&dev_config()).await.unwrap();
    let mut c = dev_config();
    c.listen = vec![first.local_addrs()[0]];
    let err = Server::bind(&c).await.unwrap_err();
    assert!(err.to_string().contains("cannot bind"), "{err}");

    let mut c = dev_config();
    c.zone = String::new();
    assert!(matches!(
        Server::bind(&c).await,
        Err(geodns::Error::Config(_))
    ));

    let (_tx, rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(geodns::serve(dev_config(), rx, shutdown.clone()));
    shutdown.cancel();
    tokio::time::timeout(TIMEOUT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A wildcard listener must answer from the address the query was sent to: resolvers drop
/// replies from any other source (a connected socket here does the same).
#[tokio::test]
async fn wildcard_listeners_answer_from_the_address_asked() {
    let q = query("edge.meridian.test.", RecordType::A, None);
    let bytes = q.to_vec().unwrap();
    let mut cases = vec![("0.0.0.0:0", "127.0.0.2", "127.0.0.1:0")];
    // Dual-stack: IPv6 and IPv4 (mapped) clients of one [::] socket, where the host has IPv6.
    if std::net::UdpSocket::bind("[::1]:0").is_ok() {
        cases.push(("[::]:0", "::1", "[::1]:0"));
        cases.push(("[::]:0", "127.0.0.3", "127.0.0.1:0"));
    }
    for (listen, asked, client) in cases {
        let mut c = dev_config();
        c.listen = vec![listen.parse().unwrap()];
        let s = start_with(c, Some(dev_snapshot())).await;
        let to = SocketAddr::new(asked.parse().unwrap(), s.addr.port());
        let sock = UdpSocket::bind(client).await.unwrap();
        sock.connect(to).await.unwrap();
        sock.send(&bytes).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no reply from {asked} (listening on {listen})"))
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!((r.id, r.response_code), (q.id, ResponseCode::NoError));
        assert_eq!(ips(&r).len(), 1, "{listen} via {asked}: {r:?}");
        s.stop().await;
    }
}

#[tokio::test]
async fn tcp_connection_limit_and_idle_timeout() {
    let s = start(Some(dev_snapshot())).await;
    let mut held = Vec::new();
    for _ in 0..geodns::server::MAX_TCP_CONNECTIONS {
        held.push(TcpStream::connect(s.addr).await.unwrap());
    }
    // One over the limit: accepted and closed at once.
    let mut extra = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(TIMEOUT, extra.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        s.stats
            .tcp_rejected
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // UDP is unaffected.
    let r = udp(s.addr, &query("edge.meridian.test.", RecordType::A, None)).await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);

    // Idle connections are closed after the timeout, which frees slots.
    let started = tokio::time::Instant::now();
    let n = tokio::time::timeout(geodns::server::TCP_IDLE_TIMEOUT * 2, held[0].read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= geodns::server::TCP_IDLE_TIMEOUT - Duration::from_millis(500));
    drop(held);
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    let r = tcp(
        &mut conn,
        &query("edge.meridian.test.", RecordType::A, None),
    )
    .await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);
    s.stop().await;
}

/// The SOA serial is the snapshot revision: polls until the server answers from `revision`.
async fn wait_for_revision(addr: SocketAddr, revision: u32) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let r = udp(addr, &query("meridian.test.", RecordType::SOA, None)).await;
        if let Some(hickory_proto::rr::RData::SOA(soa)) = r.answers.first().map(|a| &a.data)
            && soa.serial == revision
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "revision {revision} never applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `q` until it answers `want`; returns how long that took.
async fn wait_for_answer(addr: SocketAddr, q: &Message, want: [u8; 4]) -> (Duration, Message) {
    let start = tokio::time::Instant::now();
    loop {
        let r = udp(addr, q).await;
        if ips(&r) == vec![IpAddr::from(want)] {
            return (start.elapsed(), r);
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "never answered {want:?}: {:?}",
            ips(&r)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn failover_and_recovery_with_hysteresis_and_admin_override() {
    let mut cfg = dev_config();
    cfg.health_fall_ms = 400;
    cfg.health_rise_ms = 800;
    let mut snap = dev_snapshot();
    let s = start_with(cfg, Some(snap.clone())).await;
    let q = query(
        "edge.meridian.test.",
        RecordType::A,
        Some("198.51.100.7/24"),
    );
    let iad = [127, 0, 0, 12];
    let ams = [127, 0, 0, 11];
    assert_eq!(ips(&udp(s.addr, &q).await), vec![IpAddr::from(iad)]);

    // iad's only edge dies. The snapshot is applied at once, but one observation is not enough:
    // iad keeps answering (with every edge it has) until the fall window has passed.
    snap.revision = 4;
    snap.edges[1].alive = false;
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    wait_for_revision(s.addr, 4).await;
    let r = udp(s.addr, &q).await;
    assert_eq!(
        ips(&r),
        vec![IpAddr::from(iad)],
        "no failover on one observation"
    );
    let (took, r) = wait_for_answer(s.addr, &q, ams).await;
    assert!(
        took >= Duration::from_millis(250),
        "failed over after {took:?}"
    );
    assert_eq!(
        r.answers[0].ttl, 5,
        "short TTL (--degraded-ttl) while the client's preferred region is down"
    );
    assert_eq!(scope(&r), Some(24));
    // Amsterdam's own clients get their first choice: the full TTL.
    let home = udp(
        s.addr,
        &query("edge.meridian.test.", RecordType::A, Some("192.0.2.7/24")),
    )
    .await;
    assert_eq!(ips(&home), vec![IpAddr::from(ams)]);
    assert_eq!(home.answers[0].ttl, 30);
    // Negative answers (SOA minimum) are short while anything is down.
    let neg = udp(s.addr, &query("nope.meridian.test.", RecordType::A, None)).await;
    assert_eq!(neg.response_code, ResponseCode::NXDomain);
    assert_eq!(neg.authorities[0].ttl, 5);

    // iad comes back: still ams until the rise window has passed.
    snap.revision = 5;
    snap.edges[1].alive = true;
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    wait_for_revision(s.addr, 5).await;
    assert_eq!(
        ips(&udp(s.addr, &q).await),
        vec![IpAddr::from(ams)],
        "no flap back"
    );
    let (took, r) = wait_for_answer(s.addr, &q, iad).await;
    assert!(
        took >= Duration::from_millis(600),
        "recovered after {took:?}"
    );
    assert_eq!(r.answers[0].ttl, 30);

    // Operator takes iad down: immediate, no hysteresis. Then up again.
    snap.revision = 6;
    snap.regions[1].admin_state = AdminState::Down;
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    wait_for_revision(s.addr, 6).await;
    assert_eq!(ips(&udp(s.addr, &q).await), vec![IpAddr::from(ams)]);
    // Forced up while its edge is dead: answers with its edges anyway.
    snap.revision = 7;
    snap.regions[1].admin_state = AdminState::Up;
    snap.edges[1].alive = false;
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    wait_for_revision(s.addr, 7).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // past the fall window: still up
    assert_eq!(ips(&udp(s.addr, &q).await), vec![IpAddr::from(iad)]);

    // Everything down: fail open with the client's first region, all its edges.
    snap.revision = 8;
    for r in &mut snap.regions {
        r.admin_state = AdminState::Down;
    }
    s.snapshots.send_replace(Some(Arc::new(snap)));
    wait_for_revision(s.addr, 8).await;
    let r = udp(s.addr, &q).await;
    assert_eq!(ips(&r), vec![IpAddr::from(iad)], "fail open");
    assert_eq!(r.answers[0].ttl, 5, "fail open answers carry the short TTL");

    s.stop().await;
}

/// The test GeoIP database over documentation prefixes.
fn geo_db(frankfurt_country: &str) -> Vec<u8> {
    use geodns::mmdb_writer::{Value, write};
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    write(
        "GeoIP2-City",
        &[
            (
                net("192.0.2.0/25"),
                Value::geoip2_city("EU", frankfurt_country, "Frankfurt", 50.11, 8.68),
            ),
            (
                net("192.0.2.128/25"),
                Value::geoip2_city("EU", "NL", "Amsterdam", 52.37, 4.90),
            ),
            (
                net("198.51.100.0/24"),
                Value::geoip2_city("NA", "US", "Ashburn", 39.04, -77.49),
            ),
            (
                net("203.0.113.0/24"),
                Value::geoip2_city("AS", "SG", "Singapore", 1.29, 103.85),
            ),
            (
                net("2001:db8::/48"),
                Value::geoip2_city("AS", "JP", "Tokyo", 35.68, 139.69),
            ),
            (
                net("2001:db8:1::/48"),
                Value::geoip2_city("SA", "BR", "Sao Paulo", -23.55, -46.63),
            ),
        ],
    )
    .unwrap()
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("geodns-test-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test]
async fn geoip_database_policies_over_real_packets() {
    let path = temp_path("city.mmdb");
    std::fs::write(&path, geo_db("DE")).unwrap();
    let mut cfg = Config::with_defaults();
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.default_region = Some("ams".into());
    cfg.geoip_db = Some(path.clone());
    cfg.geoip_reload_secs = 1;
    cfg.nearest_limit_km = Some(6000.0);
    cfg.maps = vec![
        "country:DE=iad,ams".parse().unwrap(),
        "continent:NA=iad".parse().unwrap(),
    ];
    cfg.nets = vec!["192.0.2.64/26=sin".parse().unwrap()];
    let s = start_with(cfg, Some(dev_snapshot())).await;
    let (ams, iad, sin) = ([127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 13]);
    let ask = |ecs: &'static str| {
        let addr = s.addr;
        async move {
            let r = udp(
                addr,
                &query("edge.meridian.test.", RecordType::A, Some(ecs)),
            )
            .await;
            (ips(&r), scope(&r))
        }
    };
    // Country map beats nearness (Frankfurt is nearest to ams); the scope is the database
    // network, lengthened to keep the --net rule's /26 out.
    assert_eq!(
        ask("192.0.2.10/32").await,
        (vec![IpAddr::from(iad)], Some(26))
    );
    // --net wins over the database.
    assert_eq!(
        ask("192.0.2.70/32").await,
        (vec![IpAddr::from(sin)], Some(26))
    );
    // No map for NL: nearest by coordinates.
    assert_eq!(
        ask("192.0.2.200/32").await,
        (vec![IpAddr::from(ams)], Some(25))
    );
    // Continent map.
    assert_eq!(
        ask("198.51.100.7/24").await,
        (vec![IpAddr::from(iad)], Some(24))
    );
    // Singapore: nearest.
    assert_eq!(
        ask("203.0.113.9/24").await,
        (vec![IpAddr::from(sin)], Some(24))
    );
    // IPv6: Tokyo → sin (≈5,300 km, inside the limit).
    assert_eq!(
        ask("2001:db8::1/56").await,
        (vec![IpAddr::from(sin)], Some(48))
    );
    // São Paulo: no region within 6,000 km → default (ams).
    assert_eq!(
        ask("2001:db8:1::1/56").await,
        (vec![IpAddr::from(ams)], Some(48))
    );
    // Not in the database at all: default, and scope wide enough to exclude the DB's networks.
    let (got, sc) = ask("100.64.0.1/24").await;
    assert_eq!(got, vec![IpAddr::from(ams)]);
    assert!(sc.unwrap() <= 24);

    // Replace the file: Frankfurt is now "NL" (no map) → nearest → ams. No restart.
    tokio::time::sleep(Duration::from_millis(20)).await; // a distinct mtime
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, geo_db("NL")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while ask("192.0.2.10/32").await.0 != vec![IpAddr::from(ams)] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "database never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken file keeps the last good database.
    std::fs::write(&path, b"not a database").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ask("192.0.2.10/32").await.0, vec![IpAddr::from(ams)]);
    assert_eq!(ask("198.51.100.7/24").await.0, vec![IpAddr::from(iad)]);

    s.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Each name its own policy (`--policy-file`), over one database: maps, nearness limits, its
/// own `nets`, and weights within a region, asked with real packets.
#[tokio::test]
async fn per_name_policies_and_weights_over_real_packets() {
    let db = temp_path("city.mmdb");
    std::fs::write(&db, geo_db("DE")).unwrap();
    let policy = db.with_file_name("policy.toml");
    std::fs::write(
        &policy,
        r#"
        [name.api]
        maps = ["country:DE=sin"]
        [name.cdn]
        nets = ["192.0.2.0/24=iad"]
        weights = { "iad-1" = 3, "127.0.0.22" = 1 }
        "#,
    )
    .unwrap();
    let mut cfg = Config::with_defaults();
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.default_region = Some("ams".into());
    cfg.geoip_db = Some(db.clone());
    cfg.maps = vec!["country:DE=ams".parse().unwrap()];
    cfg.policy_file = Some(policy);
    let mut snap = dev_snapshot();
    let mut second = snap.edges[1].clone();
    second.info.id = "iad-2".into();
    second.info.public_ips = vec!["127.0.0.22".parse().unwrap()];
    snap.edges.push(second);
    let s = start_with(cfg, Some(snap)).await;
    // One socket: the kernel hands one client's packets to one worker, whose rotation is
    // then walked slot by slot.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |name: &'static str, ecs: &'static str| {
        let (sock, addr) = (&sock, s.addr);
        async move {
            let q = query(name, RecordType::A, Some(ecs));
            sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let (n, _) = tokio::time::timeout(TIMEOUT, sock.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let r = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(r.id, q.id);
            (ips(&r), scope(&r))
        }
    };
    let (ams, iad, sin) = ([127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 13]);
    // Frankfurt (DE): the flags' map sends `edge` to ams, api's own map to sin; cdn's own
    // --net beats the database for it alone, with that rule's scope.
    assert_eq!(
        ask("edge.meridian.test.", "192.0.2.10/32").await,
        (vec![IpAddr::from(ams)], Some(25))
    );
    assert_eq!(
        ask("api.meridian.test.", "192.0.2.10/32").await,
        (vec![IpAddr::from(sin)], Some(25))
    );
    assert_eq!(ask("cdn.meridian.test.", "192.0.2.10/32").await.1, Some(24));
    // cdn: one address per answer, 3:1 by weight over a full rotation (answers are cached
    // per rotation slot, so the second lap is served from the cache and must agree).
    let mut firsts = std::collections::BTreeMap::<IpAddr, usize>::new();
    for _ in 0..2 * 64 {
        let (got, _) = ask("cdn.meridian.test.", "192.0.2.10/32").await;
        assert_eq!(got.len(), 1, "{got:?}");
        *firsts.entry(got[0]).or_default() += 1;
    }
    let want: std::collections::BTreeMap<IpAddr, usize> =
        [(IpAddr::from(iad), 96), (IpAddr::from([127, 0, 0, 22]), 32)].into();
    assert_eq!(firsts, want);
    // The flags' name still lists every live edge of iad.
    let (mut got, _) = ask("edge.meridian.test.", "198.51.100.1/32").await;
    got.sort();
    assert_eq!(got, vec![IpAddr::from(iad), IpAddr::from([127, 0, 0, 22])]);

    s.stop().await;
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[tokio::test]
async fn missing_geoip_database_is_a_config_error() {
    let mut cfg = Config::with_defaults();
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.geoip_db = Some("/nonexistent/geo.mmdb".into());
    let err = Server::bind(&cfg).await.unwrap_err();
    assert!(matches!(err, geodns::Error::Config(_)), "{err}");
}

#[tokio::test]
async fn rate_limit_per_prefix_with_slip() {
    let mut cfg = dev_config();
    cfg.rrl_rate = 5;
    cfg.rrl_slip = 2;
    let s = start_with(cfg, Some(dev_snapshot())).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    const N: usize = 30;
    for i in 0..N {
        let mut q = query("edge.meridian.test.", RecordType::A, None);
        q.metadata.id = i as u16;
        sock.send_to(&q.to_vec().unwrap(), s.addr).await.unwrap();
    }
    let (mut full, mut slipped) = (0, 0);
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
    {
        let r = Message::from_vec(&buf[..n]).unwrap();
        if r.truncation {
            assert!(r.answers.is_empty());
            slipped += 1;
        } else {
            assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);
            full += 1;
        }
    }
    let dropped = N - full - slipped;
    assert!((5..=7).contains(&full), "full={full}");
    assert!(slipped >= 8, "slipped={slipped}");
    assert!(dropped >= 8, "dropped={dropped}");
    let st = &s.stats;
    assert_eq!(
        st.rrl_dropped.load(std::sync::atomic::Ordering::Relaxed) as usize,
        dropped
    );
    // Another /24 has its own budget; TCP is never limited.
    let other = UdpSocket::bind("127.0.1.1:0").await.unwrap();
    other
        .send_to(
            &query("edge.meridian.test.", RecordType::A, None)
                .to_vec()
                .unwrap(),
            s.addr,
        )
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(TIMEOUT, other.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(!Message::from_vec(&buf[..n]).unwrap().answers.is_empty());
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    for _ in 0..10 {
        let r = tcp(
            &mut conn,
            &query("edge.meridian.test.", RecordType::A, None),
        )
        .await;
        assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);
    }
    s.stop().await;
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let mut snap = dev_snapshot();
    for i in 0..100u8 {
        let mut e = snap.edges[0].clone();
        e.info.id = format!("ams-{i}");
        e.info.public_ips = vec![IpAddr::from([127, 0, 1, i])];
        snap.edges.push(e);
    }
    let s = start(Some(snap)).await;
    // Without EDNS (512 bytes) and with EDNS (1232): TC, no partial RRset.
    for ecs in [None, Some("192.0.2.7/24")] {
        let r = udp(s.addr, &query("edge.meridian.test.", RecordType::A, ecs)).await;
        assert!(r.truncation, "ecs={ecs:?}");
        assert!(r.answers.is_empty());
    }
    // The TCP retry gets every edge.
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    let r = tcp(
        &mut conn,
        &query("edge.meridian.test.", RecordType::A, Some("192.0.2.7/24")),
    )
    .await;
    assert!(!r.truncation);
    assert_eq!(ips(&r).len(), 101);
    assert_eq!(scope(&r), Some(24));
    // ANY stays small: minimal (one RRset), even at the apex.
    let r = tcp(&mut conn, &query("meridian.test.", RecordType::ANY, None)).await;
    assert_eq!(r.answers.len(), 1);
    assert!(s.stats.truncated.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    s.stop().await;
}

#[tokio::test]
async fn prometheus_metrics_by_name_type_rcode_and_region() {
    let mut cfg = dev_config();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.query_log_sample = 1;
    let server = Server::bind(&cfg).await.unwrap();
    let addr = server.local_addrs()[0];
    let metrics = server.metrics_addr().unwrap();
    let (_tx, rx) = watch::channel(Some(Arc::new(dev_snapshot())));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(rx, shutdown.clone()));
    for ecs in ["198.51.100.7/24", "198.51.100.8/24", "203.0.113.1/24"] {
        udp(
            addr,
            &query("edge.meridian.test.", RecordType::A, Some(ecs)),
        )
        .await;
    }
    udp(addr, &query("nope.meridian.test.", RecordType::AAAA, None)).await;
    udp(addr, &query("example.com.", RecordType::A, None)).await;
    let mut conn = TcpStream::connect(metrics).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(TIMEOUT, conn.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for line in [
        "geodns_queries_total{name=\"edge.meridian.test.\",type=\"A\",rcode=\"NOERROR\"} 3",
        "geodns_queries_total{name=\"@other\",type=\"AAAA\",rcode=\"NXDOMAIN\"} 1",
        "geodns_queries_total{name=\"@outside\",type=\"A\",rcode=\"REFUSED\"} 1",
        "geodns_region_answers_total{region=\"iad\"} 2",
        "geodns_region_answers_total{region=\"sin\"} 1",
        "geodns_packets_total 5",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    let mut conn = TcpStream::connect(metrics).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 404"));
    shutdown.cancel();
    tokio::time::timeout(TIMEOUT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

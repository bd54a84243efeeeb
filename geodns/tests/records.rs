//! Zone records from the coordinator and per-name service health, over real UDP and TCP
//! packets: CNAME chasing from a customer zone into the edge zone (with the geo answer and its
//! ECS scope), NODATA/NXDOMAIN with the right zone's SOA, TXT/MX/CAA encoding, and a name tied
//! to a service failing over when that service's only agent in a region leaves.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use coordinator_api::{
    AgentConn, DnsRecord, DnsRecordType, EdgeInfo, EdgeStatus, Region, Service, Snapshot,
};
use geodns::Config;
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use common::{Running, TIMEOUT, start_with};

fn agent(service: &str, id: &str) -> AgentConn {
    AgentConn {
        agent_id: id.into(),
        service: service.into(),
        token_id: "t".into(),
        remote_addr: "127.0.0.1:1".into(),
        connected_at_ms: 0,
        origin_healthy: true,
    }
}

fn rec(name: &str, zone: &str, t: DnsRecordType, values: &[&str]) -> DnsRecord {
    DnsRecord {
        name: name.into(),
        zone: zone.into(),
        rtype: t,
        ttl: 0,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
    .normalized()
    .unwrap()
}

fn snapshot() -> Snapshot {
    let region = |name: &str, lat, lon| Region {
        name: name.into(),
        latitude: Some(lat),
        longitude: Some(lon),
        admin_state: Default::default(),
    };
    let edge = |region: &str, ip: &str, agents: Vec<AgentConn>| EdgeStatus {
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
        agents,
    };
    let long_txt = "x".repeat(300);
    Snapshot {
        revision: 3,
        regions: vec![
            region("ams", 52.37, 4.90),
            region("iad", 38.95, -77.45),
            region("sin", 1.35, 103.99),
        ],
        services: ["web", "api"]
            .iter()
            .map(|n| Service {
                name: (*n).into(),
                ..Default::default()
            })
            .collect(),
        edges: vec![
            edge(
                "ams",
                "127.0.0.11",
                vec![agent("web", "web-ams"), agent("api", "api-ams")],
            ),
            edge(
                "iad",
                "127.0.0.12",
                vec![agent("web", "web-iad"), agent("api", "api-iad")],
            ),
            edge("sin", "127.0.0.13", vec![agent("web", "web-sin")]),
        ],
        records: vec![
            rec(
                "www.customer.example",
                "customer.example",
                DnsRecordType::Cname,
                &["edge.meridian.test"],
            ),
            rec(
                "chain.customer.example",
                "customer.example",
                DnsRecordType::Cname,
                &["www.customer.example"],
            ),
            rec(
                "away.customer.example",
                "customer.example",
                DnsRecordType::Cname,
                &["somewhere.example.net"],
            ),
            rec(
                "loop1.customer.example",
                "customer.example",
                DnsRecordType::Cname,
                &["loop2.customer.example"],
            ),
            rec(
                "loop2.customer.example",
                "customer.example",
                DnsRecordType::Cname,
                &["loop1.customer.example"],
            ),
            rec(
                "_acme.deep.customer.example",
                "customer.example",
                DnsRecordType::Txt,
                &["token-1", &long_txt],
            ),
            rec(
                "customer.example",
                "customer.example",
                DnsRecordType::Mx,
                &["10 mail.customer.example", "20 backup.customer.example"],
            ),
            rec(
                "customer.example",
                "customer.example",
                DnsRecordType::Caa,
                &["0 issue \"letsencrypt.org\""],
            ),
            rec(
                "static.customer.example",
                "customer.example",
                DnsRecordType::Aaaa,
                &["2001:db8::53"],
            ),
            rec(
                "info.meridian.test",
                "meridian.test",
                DnsRecordType::Txt,
                &["hello from the edge zone"],
            ),
        ],
        ..Snapshot::default()
    }
}

fn config() -> Config {
    let mut c = Config::with_defaults();
    c.listen = vec!["127.0.5.1:0".parse().unwrap()];
    c.nets = [
        "192.0.2.0/24=ams",
        "198.51.100.0/24=iad",
        "203.0.113.0/24=sin",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    c.default_region = Some("ams".into());
    c.geo_names = vec!["edge".into(), "api".into()];
    c.geo_services = vec!["api=api".parse().unwrap()];
    c.health_fall_ms = 300;
    c.health_rise_ms = 600;
    c
}

async fn start(config: Config, snap: Snapshot) -> Running {
    start_with(config, Some(snap)).await
}

fn query(name: &str, qtype: RecordType, ecs: Option<&str>) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    if let Some(ecs) = ecs {
        e.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::from_str(ecs).unwrap()));
    }
    m.set_edns(e);
    m
}

async fn udp(addr: SocketAddr, q: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.5.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(TIMEOUT, sock.recv_from(&mut buf))
        .await
        .expect("udp reply")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.id, q.id);
    r
}

async fn tcp(addr: SocketAddr, q: &Message) -> Message {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let bytes = q.to_vec().unwrap();
    let mut frame = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    stream.write_all(&frame).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
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

fn cname_targets(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::CNAME(c) => Some(format!("{} -> {}", r.name, c.0)),
            _ => None,
        })
        .collect()
}

fn soa_owner(m: &Message) -> Option<String> {
    m.authorities
        .iter()
        .find(|r| r.record_type() == RecordType::SOA)
        .map(|r| r.name.to_ascii())
}

/// Waits until the snapshot was applied (answers come from the table, not SERVFAIL).
async fn ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let r = udp(addr, &query("edge.meridian.test.", RecordType::A, None)).await;
        if r.response_code == ResponseCode::NoError && !r.answers.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn customer_cname_into_the_edge_zone_gets_the_geo_answer_with_its_scope() {
    let s = start(config(), snapshot()).await;
    ready(s.addr).await;
    for (ecs, want) in [
        ("198.51.100.7/24", [127, 0, 0, 12]),
        ("203.0.113.9/24", [127, 0, 0, 13]),
    ] {
        let q = query("WWW.Customer.Example.", RecordType::A, Some(ecs));
        for r in [udp(s.addr, &q).await, tcp(s.addr, &q).await] {
            assert_eq!(r.response_code, ResponseCode::NoError);
            assert!(r.authoritative);
            assert_eq!(
                cname_targets(&r),
                vec!["WWW.Customer.Example. -> edge.meridian.test.".to_owned()]
            );
            assert_eq!(ips(&r), vec![IpAddr::from(want)], "ECS {ecs}");
            let a = r
                .answers
                .iter()
                .find(|a| a.record_type() == RecordType::A)
                .unwrap();
            assert_eq!(a.name.to_ascii(), "edge.meridian.test.");
            // The answer depends on the client through the CNAME's target: scope /24.
            assert_eq!(scope(&r), Some(24));
        }
    }
    // A two-hop chain inside our zones.
    let r = udp(
        s.addr,
        &query(
            "chain.customer.example.",
            RecordType::A,
            Some("192.0.2.1/24"),
        ),
    )
    .await;
    assert_eq!(cname_targets(&r).len(), 2);
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);
    // Asked for the CNAME itself: just the CNAME, and the answer is the same for everyone.
    let r = udp(
        s.addr,
        &query(
            "www.customer.example.",
            RecordType::CNAME,
            Some("192.0.2.1/24"),
        ),
    )
    .await;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(scope(&r), Some(0));
    // A target outside our zones: the CNAME only, NOERROR; the resolver follows it.
    let r = udp(
        s.addr,
        &query("away.customer.example.", RecordType::A, None),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert_eq!(
        cname_targets(&r),
        vec!["away.customer.example. -> somewhere.example.net.".to_owned()]
    );
    assert!(ips(&r).is_empty());
    // A loop ends after a bounded chain instead of spinning.
    let r = udp(
        s.addr,
        &query("loop1.customer.example.", RecordType::A, None),
    )
    .await;
    assert!(!r.answers.is_empty() && r.answers.len() <= 10);
    assert!(ips(&r).is_empty());
    s.stop().await;
}

#[tokio::test]
async fn nodata_nxdomain_and_refused_carry_the_right_soa() {
    let s = start(config(), snapshot()).await;
    ready(s.addr).await;
    // A name with only TXT asked for A: NODATA (NOERROR, no answer, the customer zone's SOA).
    let r = udp(
        s.addr,
        &query("_acme.deep.customer.example.", RecordType::A, None),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty() && r.authoritative);
    assert_eq!(soa_owner(&r).as_deref(), Some("customer.example."));
    // An empty non-terminal above it exists too.
    let r = udp(
        s.addr,
        &query("deep.customer.example.", RecordType::TXT, None),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // A name that does not exist in the customer zone: NXDOMAIN with that zone's SOA.
    let r = tcp(
        s.addr,
        &query("nope.customer.example.", RecordType::A, None),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert!(r.authoritative);
    assert_eq!(soa_owner(&r).as_deref(), Some("customer.example."));
    // The customer zone's apex has a synthesized SOA and NS (our server).
    let r = udp(s.addr, &query("customer.example.", RecordType::SOA, None)).await;
    let RData::SOA(soa) = &r.answers[0].data else {
        panic!("{r:?}")
    };
    assert_eq!(soa.mname.to_ascii(), "ns1.meridian.test.");
    assert_eq!(soa.serial, 3);
    let r = udp(s.addr, &query("customer.example.", RecordType::NS, None)).await;
    assert_eq!(r.answers[0].record_type(), RecordType::NS);
    // Zones we do not serve: REFUSED.
    let r = udp(s.addr, &query("www.other.example.", RecordType::A, None)).await;
    assert_eq!(r.response_code, ResponseCode::Refused);
    // A record in the edge zone itself, and NODATA for its other types.
    let r = udp(s.addr, &query("info.meridian.test.", RecordType::TXT, None)).await;
    assert_eq!(r.answers.len(), 1);
    let r = udp(s.addr, &query("info.meridian.test.", RecordType::A, None)).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert_eq!(soa_owner(&r).as_deref(), Some("meridian.test."));
    s.stop().await;
}

#[tokio::test]
async fn txt_mx_caa_and_aaaa_encode() {
    let s = start(config(), snapshot()).await;
    ready(s.addr).await;
    let r = tcp(
        s.addr,
        &query("_acme.deep.customer.example.", RecordType::TXT, None),
    )
    .await;
    let mut txts: Vec<Vec<usize>> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|c| c.len()).collect()),
            _ => None,
        })
        .collect();
    txts.sort();
    // 300 bytes travel as two character-strings (255 + 45).
    assert_eq!(txts, vec![vec![7], vec![255, 45]]);
    assert_eq!(r.answers[0].ttl, 30, "TTL 0 means --ttl");

    let r = udp(s.addr, &query("customer.example.", RecordType::MX, None)).await;
    let mut mx: Vec<(u16, String)> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    mx.sort();
    assert_eq!(
        mx,
        vec![
            (10, "mail.customer.example.".to_owned()),
            (20, "backup.customer.example.".to_owned())
        ]
    );

    let r = udp(s.addr, &query("customer.example.", RecordType::CAA, None)).await;
    let RData::CAA(caa) = &r.answers[0].data else {
        panic!("{r:?}")
    };
    assert_eq!(caa.tag, "issue");
    let (issuer, _) = caa.value_as_issue().unwrap();
    assert_eq!(issuer.unwrap().to_ascii(), "letsencrypt.org");

    let r = udp(
        s.addr,
        &query("static.customer.example.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(ips(&r), vec!["2001:db8::53".parse::<IpAddr>().unwrap()]);
    // ANY: one RRset (RFC 8482).
    let r = udp(s.addr, &query("customer.example.", RecordType::ANY, None)).await;
    assert_eq!(r.answers.len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn a_name_tied_to_a_service_skips_regions_without_its_agents() {
    let mut snap = snapshot();
    let s = start(config(), snap.clone()).await;
    ready(s.addr).await;
    let ams_client = Some("192.0.2.7/24");
    let api_q = query("api.meridian.test.", RecordType::A, ams_client);
    let edge_q = query("edge.meridian.test.", RecordType::A, ams_client);
    let ams = IpAddr::from([127, 0, 0, 11]);
    let iad = IpAddr::from([127, 0, 0, 12]);
    assert_eq!(ips(&udp(s.addr, &api_q).await), vec![ams]);

    // api's only agent in ams disconnects; the ams edge stays alive (web's agent is there).
    snap.revision = 4;
    snap.edges[0].agents.retain(|a| a.service != "api");
    s.snapshots.send_replace(Some(Arc::new(snap.clone())));
    let start = tokio::time::Instant::now();
    let r = loop {
        let r = udp(s.addr, &api_q).await;
        if ips(&r) == vec![iad] {
            break r;
        }
        assert_eq!(ips(&r), vec![ams]);
        assert!(start.elapsed() < TIMEOUT, "api never failed over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "failed over after {:?}: no hysteresis",
        start.elapsed()
    );
    assert_eq!(
        r.answers[0].ttl, 5,
        "short TTL while the first choice is down"
    );
    assert_eq!(scope(&r), Some(24));
    // The name of another service (edge: any service) still answers ams, full TTL.
    let r = udp(s.addr, &edge_q).await;
    assert_eq!(ips(&r), vec![ams]);
    assert_eq!(r.answers[0].ttl, 30);
    // And a customer CNAME into api follows api's health.
    // Singapore never had an api agent: its clients go elsewhere from the start.
    let r = udp(
        s.addr,
        &query("api.meridian.test.", RecordType::A, Some("203.0.113.1/24")),
    )
    .await;
    assert_ne!(ips(&r), vec![IpAddr::from([127, 0, 0, 13])]);

    // The agent is back: after the rise window, ams again.
    snap.revision = 5;
    snap.edges[0].agents.push(agent("api", "api-ams"));
    s.snapshots.send_replace(Some(Arc::new(snap)));
    let start = tokio::time::Instant::now();
    loop {
        let r = udp(s.addr, &api_q).await;
        if ips(&r) == vec![ams] {
            assert_eq!(r.answers[0].ttl, 30);
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "api never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(500));
    s.stop().await;
}

/// IPv6 end to end: a client on an IPv6 socket asking AAAA, by its source address and by an
/// IPv6 ECS prefix, over UDP and TCP; a customer CNAME to the geo name answers AAAA too.
#[tokio::test]
async fn ipv6_clients_get_aaaa_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let mut cfg = config();
    cfg.listen = vec!["[::1]:0".parse().unwrap()];
    cfg.nets.push("2001:db8:aa::/48=iad".parse().unwrap());
    let mut snap = snapshot();
    for (e, v6) in snap.edges.iter_mut().zip(["2001:db8::11", "2001:db8::12"]) {
        e.info.public_ips.push(v6.parse().unwrap());
    }
    let s = start(cfg, snap).await;
    let udp6 = |q: Message| async move {
        let sock = UdpSocket::bind("[::1]:0").await.unwrap();
        sock.send_to(&q.to_vec().unwrap(), s.addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(TIMEOUT, sock.recv_from(&mut buf))
            .await
            .expect("udp reply")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // No ECS: the source ::1 matches no rule → the default region, ams.
    let r = loop {
        let r = udp6(query("edge.meridian.test.", RecordType::AAAA, None)).await;
        if !r.answers.is_empty() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(ips(&r), vec!["2001:db8::11".parse::<IpAddr>().unwrap()]);
    // An IPv6 ECS prefix inside the iad rule: iad, scope /48, source echoed.
    let q = query(
        "edge.meridian.test.",
        RecordType::AAAA,
        Some("2001:db8:aa:1::/56"),
    );
    for r in [udp6(q.clone()).await, tcp(s.addr, &q).await] {
        assert_eq!(ips(&r), vec!["2001:db8::12".parse::<IpAddr>().unwrap()]);
        assert_eq!(scope(&r), Some(48));
        let Some(EdnsOption::Subnet(cs)) = r.edns.as_ref().unwrap().option(EdnsCode::Subnet) else {
            panic!("no ECS echo")
        };
        assert_eq!(cs.source_prefix(), 56);
    }
    // AAAA through a customer CNAME.
    let r = udp6(query(
        "www.customer.example.",
        RecordType::AAAA,
        Some("2001:db8:aa:1::/56"),
    ))
    .await;
    assert_eq!(cname_targets(&r).len(), 1);
    assert_eq!(ips(&r), vec!["2001:db8::12".parse::<IpAddr>().unwrap()]);
    // A v4-only question from a v6 client still gets A.
    let r = udp6(query("edge.meridian.test.", RecordType::A, None)).await;
    assert_eq!(ips(&r), vec![IpAddr::from([127, 0, 0, 11])]);
    s.stop().await;
}

/// `--record-zone` limits which zones records may bring; the edge zone's own records stay.
#[tokio::test]
async fn record_zone_allowlist() {
    let mut cfg = config();
    cfg.record_zones = vec!["other.example".into()];
    let s = start(cfg, snapshot()).await;
    ready(s.addr).await;
    let r = udp(s.addr, &query("www.customer.example.", RecordType::A, None)).await;
    assert_eq!(
        r.response_code,
        ResponseCode::Refused,
        "customer.example not allowed"
    );
    let r = udp(s.addr, &query("info.meridian.test.", RecordType::TXT, None)).await;
    assert_eq!(r.answers.len(), 1, "records in --zone need no allowance");
    s.stop().await;
}

//! The walking skeleton, end to end: `meridian dev` as a user starts it, driven by real HTTPS,
//! DNS and QUIC clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use meridian_tests::{
    clients::{self, answer_ips, dns_query, dns_tcp, dns_udp, echoed_subnet, https_get, rcode},
    dev::{DevNetwork, eventually, is_alive, kill9, start_agent},
};

const AMS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const SIN: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13));
const EDGES: [IpAddr; 3] = [AMS, IAD, SIN];
const HOST: &str = "edge.meridian.test";

fn dns() -> SocketAddr {
    "127.0.0.1:5353".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread")]
async fn request_reaches_the_demo_app_through_edge_and_tunnel() {
    let net = DevNetwork::start();
    let r = https_get(&net.ca(), IAD, 8443, HOST, "/demo/headers", &[])
        .await
        .expect("https");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("meridian-region"), Some("iad"));
    let headers = &r.json()["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert!(
        headers["x-request-id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{headers}"
    );

    // A request id the client sent is kept.
    let r = https_get(
        &net.ca(),
        AMS,
        8443,
        HOST,
        "/demo/headers",
        &[("x-request-id", "abc-123")],
    )
    .await
    .unwrap();
    assert_eq!(r.json()["headers"]["x-request-id"], "abc-123");
    assert_eq!(r.header("meridian-region"), Some("ams"));

    // The prefix is stripped: /demo/ is the app's `/`.
    let r = https_get(&net.ca(), SIN, 8443, HOST, "/demo/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["instance"], "demo-1");

    // Unknown mounts are a clear 404 from the edge, not a forward.
    let r = https_get(&net.ca(), IAD, 8443, HOST, "/nowhere", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("meridian-region"), Some("iad"));
    let r = https_get(&net.ca(), IAD, 8443, HOST, "/demox", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404, "prefixes match whole path segments");
}

#[tokio::test(flavor = "multi_thread")]
async fn geodns_answers_with_the_region_of_the_client_subnet() {
    let net = DevNetwork::start();
    let cases = [
        (Some(("198.51.100.7", 24)), IAD),
        (Some(("192.0.2.1", 24)), AMS),
        (Some(("203.0.113.200", 24)), SIN),
        (None, AMS), // 127.0.0.1 itself is in no net → the default region
    ];
    for (subnet, want) in cases {
        let subnet = subnet.map(|(ip, p)| (ip.parse::<IpAddr>().unwrap(), p));
        let q = dns_query("edge.meridian.test.", RecordType::A, subnet);
        for answer in [
            dns_udp(dns(), &q).await.unwrap(),
            dns_tcp(dns(), &q).await.unwrap(),
        ] {
            assert_eq!(rcode(&answer), ResponseCode::NoError);
            assert!(answer.metadata.authoritative);
            assert!(!answer.metadata.recursion_available, "never a resolver");
            assert_eq!(answer_ips(&answer), vec![want], "subnet {subnet:?}");
            if subnet.is_some() {
                let ecs = echoed_subnet(&answer).expect("ECS echoed");
                assert_eq!(ecs.scope_prefix(), 24, "scope is the matched prefix");
            }
        }
    }
    let out = dns_udp(dns(), &dns_query("example.com.", RecordType::A, None))
        .await
        .unwrap();
    assert_eq!(rcode(&out), ResponseCode::Refused, "not an open resolver");
    let out = dns_udp(
        dns(),
        &dns_query("nope.meridian.test.", RecordType::A, None),
    )
    .await
    .unwrap();
    assert_eq!(rcode(&out), ResponseCode::NXDomain);
    drop(net);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_turns_into_503_and_a_new_agent_heals_without_touching_the_edge() {
    let net = DevNetwork::start();
    let edge_pid = net.pid("edge-iad");
    let ok = https_get(&net.ca(), IAD, 8443, HOST, "/demo/", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);

    kill9(net.pid("agent"));
    let started = Instant::now();
    // Within seconds: agents heartbeat every second and the edge drops one silent for 4 s,
    // well before QUIC's 20 s idle timeout would.
    let r = eventually(Duration::from_secs(8), || async {
        let r = https_get(&net.ca(), IAD, 8443, HOST, "/demo/", &[])
            .await
            .ok()?;
        (r.status == 503).then_some(r)
    })
    .await
    .expect("the mount turns into a 503 once the agent is gone");
    eprintln!("agent death noticed in {:?}", started.elapsed());
    assert!(
        r.text().contains("demo"),
        "the 503 says which service has no agent: {}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());

    let token = net.read("demo-agent.token");
    let mut agent = start_agent(&net, &token, "demo", "http://127.0.0.1:7781", &[]);
    let started = Instant::now();
    eventually(Duration::from_secs(30), || async {
        let r = https_get(&net.ca(), IAD, 8443, HOST, "/demo/", &[])
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .expect("a restarted agent heals the mount");
    eprintln!("agent restart healed in {:?}", started.elapsed());
    assert!(is_alive(edge_pid), "the edge was not restarted");
    assert_eq!(net.pid("edge-iad"), edge_pid);
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_added_with_ctl_is_served_by_every_edge_without_a_restart() {
    let net = DevNetwork::start();
    let pids: Vec<i32> = ["edge-ams", "edge-iad", "edge-sin"]
        .iter()
        .map(|e| net.pid(e))
        .collect();
    let mounts = net.ctl(&["mounts"]);
    assert!(
        mounts
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["path_prefix"] == "/demo")),
        "{mounts}"
    );

    // Before: nothing is mounted at shop.meridian.test.
    let r = https_get(&net.ca(), AMS, 8443, "shop.meridian.test", "/headers", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);

    let started = Instant::now();
    net.ctl(&["mount", "add", "shop.meridian.test/", "demo"]);
    let mut elapsed = Vec::new();
    for ip in EDGES {
        eventually(Duration::from_secs(10), || async {
            let r = https_get(&net.ca(), ip, 8443, "shop.meridian.test", "/headers", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("edge {ip} serves the new mount"));
        elapsed.push(started.elapsed());
    }
    eprintln!(
        "mount add → served at all three edges: {:?}",
        elapsed.last()
    );
    for (name, pid) in ["edge-ams", "edge-iad", "edge-sin"].iter().zip(pids) {
        assert!(is_alive(pid) && net.pid(name) == pid, "{name} kept running");
    }

    let edges = net.ctl(&["edges"]);
    assert_eq!(edges.as_array().map(|e| e.len()), Some(3), "{edges}");
    let agents = net.ctl(&["agents"]);
    assert!(agents.as_array().is_some_and(|a| a.len() >= 3), "{agents}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_gets_a_clear_error_and_others_keep_being_served() {
    let net = DevNetwork::start();

    // Garbage on the QUIC port.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in [1usize, 20, 1200, 1500] {
        sock.send_to(&vec![0xa5; len], (IAD, 7443)).await.unwrap();
    }
    // A bad token is refused with a reason.
    let answer = clients::tunnel_hello(
        &net.ca(),
        SocketAddr::new(IAD, 7443),
        "mrd_agent_nope_nope",
        "demo",
    )
    .await
    .expect("the edge answers a bad Hello");
    match answer {
        tunnel_proto::Frame::Reject { reason } => assert!(reason.contains("token"), "{reason}"),
        other => panic!("expected Reject, got {other:?}"),
    }
    // A good token for another service cannot claim this one.
    let token = net.read("demo-agent.token");
    let answer = clients::tunnel_hello(&net.ca(), SocketAddr::new(IAD, 7443), &token, "other")
        .await
        .unwrap();
    assert!(
        matches!(answer, tunnel_proto::Frame::Reject { .. }),
        "{answer:?}"
    );

    // Truncated and garbage DNS packets.
    let q = dns_query("edge.meridian.test.", RecordType::A, None)
        .to_vec()
        .unwrap();
    for bad in [&q[..5], &q[..q.len() - 3], &[0xffu8; 3][..]] {
        sock.send_to(bad, dns()).await.unwrap();
    }
    let ok = dns_udp(
        dns(),
        &dns_query("edge.meridian.test.", RecordType::A, None),
    )
    .await
    .unwrap();
    assert_eq!(
        answer_ips(&ok),
        vec![AMS],
        "DNS still answers after garbage"
    );

    // An oversized header gets 431 and the edge keeps serving.
    let big = "x".repeat(100 * 1024);
    let reply = clients::raw_http(
        SocketAddr::new(IAD, 8080),
        format!("GET /demo/ HTTP/1.1\r\nhost: {HOST}\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "{}",
        reply.lines().next().unwrap_or("")
    );

    let r = https_get(&net.ca(), IAD, 8443, HOST, "/demo/", &[])
        .await
        .unwrap();
    assert_eq!(
        r.status, 200,
        "the edge keeps serving after all of the above"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_every_part_of_the_network() {
    let mut net = DevNetwork::start();
    let children = [
        "coordinator",
        "edge-ams",
        "edge-iad",
        "edge-sin",
        "geodns",
        "demo-app",
        "agent",
    ];
    let pids: Vec<i32> = children.iter().map(|c| net.pid(c)).collect();
    assert!(pids.iter().all(|p| is_alive(*p)));
    let status = net.interrupt().expect("meridian dev exits after Ctrl-C");
    assert!(status.success(), "clean exit: {status}");
    for (name, pid) in children.iter().zip(pids) {
        assert!(!is_alive(pid), "{name} ({pid}) still running after Ctrl-C");
    }
    // Every listener is released: the addresses can be bound again at once.
    for addr in ["127.0.0.1:7700", "127.0.0.12:8443", "127.0.0.12:8080"] {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
    std::net::UdpSocket::bind("127.0.0.1:5353").expect("DNS port released");
    std::net::UdpSocket::bind("127.0.0.12:7443").expect("tunnel port released");
}

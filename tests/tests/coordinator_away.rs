//! Users can lose the coordinator without an outage: kill -9 it under `meridian dev`, traffic and
//! DNS keep working on the last good snapshot, then start it again (same flags, same data dir)
//! and the network converges on changes made after it came back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use coordinator_api::{Client, Mount};
use hickory_proto::{op::ResponseCode, rr::RecordType};
use meridian_tests::{
    clients::{answer_ips, dns_query, dns_udp, https_get, rcode},
    dev::{DevNetwork, eventually, is_alive, kill9},
    meridian_bin,
};

const EDGES: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13)),
];
const HOST: &str = "edge.meridian.test";
/// How long the coordinator stays away: a minute, as users must be able to lose it for much
/// longer. `MERIDIAN_AWAY_SECS` shortens it for a quick local run (anything past the 3.5 s
/// edge-liveness timeout exercises the same code).
fn away_period() -> Duration {
    let secs = std::env::var("MERIDIAN_AWAY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn dns() -> SocketAddr {
    "127.0.0.1:5353".parse().unwrap()
}

async fn everything_serves(net: &DevNetwork) {
    for ip in EDGES {
        let r = https_get(&net.ca(), ip, 8443, HOST, "/demo/", &[])
            .await
            .expect("https");
        assert_eq!(r.status, 200, "edge {ip}: {}", r.text());
    }
    for (subnet, want) in [("198.51.100.7", EDGES[1]), ("192.0.2.1", EDGES[0])] {
        let q = dns_query(
            "edge.meridian.test.",
            RecordType::A,
            Some((subnet.parse().unwrap(), 24)),
        );
        let a = dns_udp(dns(), &q).await.expect("dns");
        assert_eq!(rcode(&a), ResponseCode::NoError);
        assert_eq!(answer_ips(&a), vec![want], "subnet {subnet}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_and_dns_survive_the_coordinator_and_converge_when_it_returns() {
    let net = DevNetwork::start();
    everything_serves(&net).await;
    let coordinator = net.pid("coordinator");
    kill9(coordinator);
    eventually(Duration::from_secs(5), || async {
        (!is_alive(coordinator)).then_some(())
    })
    .await
    .expect("coordinator died");

    let admin = Client::new("http://127.0.0.1:7700", net.admin_token()).unwrap();
    assert!(
        admin.list_mounts().await.is_err(),
        "the coordinator is gone"
    );
    let away = Instant::now();
    let away_for = away_period();
    while away.elapsed() < away_for {
        everything_serves(&net).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Back, exactly as dev started it.
    let mut coord = Command::new(meridian_bin())
        .args(["coordinator", "--listen", "127.0.0.1:7700", "--data-dir"])
        .arg(net.path("coordinator"))
        .env("MERIDIAN_ADMIN_TOKEN", net.admin_token())
        .env("MERIDIAN_NODE_TOKEN", net.read("node.token"))
        .env("MERIDIAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart the coordinator");
    eventually(Duration::from_secs(20), || async {
        admin.list_mounts().await.ok()
    })
    .await
    .expect("coordinator back");
    // Its first snapshot after the restart must not declare the edges dead: it restored them.
    let snap = admin.snapshot().await.unwrap();
    assert_eq!(snap.edges.len(), 3, "edges restored: {:?}", snap.edges);
    assert!(snap.edges.iter().all(|e| e.alive));
    everything_serves(&net).await;

    // Converges: a change made now reaches every edge.
    admin
        .add_mount(&Mount {
            host: "back.meridian.test".into(),
            path_prefix: "/".into(),
            service: "demo".into(),
            strip_prefix: false,
            ..Default::default()
        })
        .await
        .unwrap();
    for ip in EDGES {
        eventually(Duration::from_secs(30), || async {
            let r = https_get(&net.ca(), ip, 8443, "back.meridian.test", "/headers", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("edge {ip} never picked up the mount made after the restart"));
    }
    // And live heartbeats resume (observed state is fresh, not only restored).
    eventually(Duration::from_secs(10), || async {
        let st = admin.status().await.ok()?;
        (st.edges_alive == 3 && st.regions.iter().all(|r| r.healthy && !r.stale)).then_some(())
    })
    .await
    .expect("all regions healthy again");
    everything_serves(&net).await;
    let _ = coord.kill();
    let _ = coord.wait();
}

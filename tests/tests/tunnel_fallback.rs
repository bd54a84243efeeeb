//! UDP blocked between agent and edge: the agent runs in its own network namespace (`tun-fb`),
//! reaching an extra edge of `meridian dev` over a veth pair, and nftables in that namespace
//! drops its UDP to the edge's tunnel port. The agent falls back to QUIC inside TLS over TCP
//! (same port), requests through the edge keep succeeding, its `/metrics` says `tcp`; once the
//! rule is gone its re-probe moves it back to QUIC without failing a request.
//!
//! A rule in the agent's own namespace makes its UDP sends fail with EPERM: an agent started
//! while UDP is blocked sees that and registers over TCP at once, far inside its
//! `--quic-timeout` (10 s here). (A silent drop further away cannot be seen; the timeout stays
//! for that.) The edge reports the agent's real address, not the fallback's `100::` pseudo-peer,
//! and counts it under `meridian_edge_agent_connections{transport="tcp"}`.
//!
//! Needs root (namespaces), iproute2 and nftables; skips with the reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::clients::{http_status, raw_http};
use meridian_tests::dev::{DevNetwork, Proc};
use meridian_tests::{have_tool, meridian_bin, must, sh};

const NS: &str = "tun-fb";
const VETH_HOST: &str = "tun-fb-h";
const VETH_NS: &str = "tun-fb-n";
const HOST_IP: &str = "198.19.77.1";
const NS_IP: &str = "198.19.77.2";
const TUNNEL_PORT: u16 = 7443;
/// The extra edge's HTTP listener (port 8080, as `http_status` expects).
const EDGE_HTTP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 4, 1));
const HOST: &str = "edge.meridian.test";
/// The agent's admin listener, on the namespace side of the veth.
const AGENT_ADMIN: &str = "198.19.77.2:9790";
/// A second agent's, started while UDP is blocked.
const LATE_AGENT_ADMIN: &str = "198.19.77.2:9791";
/// The extra edge's admin listener (`/metrics`).
const EDGE_ADMIN: &str = "127.0.4.1:9792";

/// The namespace and its veth pair, removed however the test ends.
struct Netns;

impl Netns {
    fn create() -> Self {
        let _ = sh(&["ip", "netns", "del", NS]);
        let _ = sh(&["ip", "link", "del", VETH_HOST]);
        must(&["ip", "netns", "add", NS]);
        let guard = Self;
        must(&[
            "ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS,
        ]);
        must(&["ip", "link", "set", VETH_NS, "netns", NS]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            VETH_HOST,
        ]);
        must(&["ip", "link", "set", VETH_HOST, "up"]);
        must(&[
            "ip",
            "-n",
            NS,
            "addr",
            "add",
            &format!("{NS_IP}/30"),
            "dev",
            VETH_NS,
        ]);
        must(&["ip", "-n", NS, "link", "set", VETH_NS, "up"]);
        must(&["ip", "-n", NS, "link", "set", "lo", "up"]);
        guard
    }

    fn block_udp(&self) {
        must(&[
            "ip", "netns", "exec", NS, "nft", "add", "table", "inet", "tun_fb",
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            NS,
            "nft",
            "add chain inet tun_fb out { type filter hook output priority 0; policy accept; }",
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            NS,
            "nft",
            &format!("add rule inet tun_fb out ip daddr {HOST_IP} udp dport {TUNNEL_PORT} drop"),
        ]);
    }

    fn unblock_udp(&self) {
        must(&[
            "ip", "netns", "exec", NS, "nft", "delete", "table", "inet", "tun_fb",
        ]);
    }

    fn spawn(&self, args: &[&str], log: &std::path::Path) -> Proc {
        Proc(
            Command::new("ip")
                .args(["netns", "exec", NS])
                .arg(meridian_bin())
                .args(args)
                .env("MERIDIAN_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("log file"))
                .spawn()
                .expect("spawn in namespace"),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", NS]);
        let _ = sh(&["ip", "link", "del", VETH_HOST]);
    }
}

fn why_skip() -> Option<String> {
    let uid = sh(&["id", "-u"]);
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root for network namespaces".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        if !have_tool(tool) {
            return Some(format!("`{tool}` not found (apt-get install {pkg})"));
        }
    }
    let probe = sh(&["ip", "netns", "add", "tun-probe"]);
    let _ = sh(&["ip", "netns", "del", "tun-probe"]);
    if !probe.status.success() {
        return Some(format!(
            "cannot create network namespaces: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    None
}

/// `(quic, tcp)` edge connections the agent reports on `/metrics`.
async fn transports() -> Option<(u64, u64)> {
    transports_of(AGENT_ADMIN).await
}

/// The value of the metric line starting with `key` on the `/metrics` page at `admin`.
async fn metric(admin: &str, key: &str) -> Option<u64> {
    let addr: SocketAddr = admin.parse().ok()?;
    let text = raw_http(
        addr,
        b"GET /metrics HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().parse().ok()
}

async fn transports_of(admin: &str) -> Option<(u64, u64)> {
    let addr: SocketAddr = admin.parse().ok()?;
    let text = raw_http(
        addr,
        b"GET /metrics HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    let value = |transport: &str| -> Option<u64> {
        let key = format!(
            "meridian_agent_edge_connections_by_transport{{service=\"fb\",transport=\"{transport}\"}} "
        );
        let line = text.lines().find(|l| l.starts_with(&key))?;
        line[key.len()..].trim().parse().ok()
    };
    Some((value("quic")?, value("tcp")?))
}

async fn until_transports(want: (u64, u64), timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if transports().await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn get() -> Option<u16> {
    tokio::time::timeout(
        Duration::from_secs(10),
        http_status(EDGE_HTTP, HOST, "/fb/"),
    )
    .await
    .ok()
    .flatten()
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_udp_falls_back_to_tcp_and_returns_to_quic() {
    if let Some(why) = why_skip() {
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let net = DevNetwork::start();
    let ns = Netns::create();

    net.ctl(&["region", "create", "tunfb"]);
    net.ctl(&["service", "create", "fb"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/fb"),
        "fb",
        "--strip-prefix",
    ]);
    let token = net.ctl(&["token", "create", "fb"])["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // An extra edge whose tunnel listens on the veth (UDP and, for the fallback, TCP).
    let edge_log = net.path("tun-fb-edge.log");
    let _edge = Proc(
        Command::new(meridian_bin())
            .args(["edge", "--id", "tunfb-1", "--region", "tunfb"])
            .args(["--http-listen", &format!("{EDGE_HTTP}:8080")])
            .args(["--tunnel-listen", &format!("{HOST_IP}:{TUNNEL_PORT}")])
            .arg("--tls-cert")
            .arg(net.path("edge.pem"))
            .arg("--tls-key")
            .arg(net.path("edge.key"))
            .args(["--coordinator", "http://127.0.0.1:7700"])
            .args(["--admin-listen", EDGE_ADMIN])
            .arg("--state-dir")
            .arg(net.path("edge-tunfb"))
            .env("MERIDIAN_NODE_TOKEN", net.read("node.token"))
            .env("MERIDIAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&edge_log).unwrap())
            .spawn()
            .expect("start edge"),
    );
    // Origin and agent inside the namespace.
    let agent_log = net.path("tun-fb-agent.log");
    let _origin = ns.spawn(
        &["demo-app", "--listen", "127.0.0.1:7795", "--name", "fb"],
        &net.path("tun-fb-origin.log"),
    );
    let ca = net.ca().display().to_string();
    let _agent = ns.spawn(
        &[
            "agent",
            "--edge",
            &format!("{HOST_IP}:{TUNNEL_PORT}"),
            "--server-name",
            HOST,
            "--ca",
            &ca,
            "--service",
            "fb",
            "--to",
            "http://127.0.0.1:7795",
            "--token",
            &token,
            "--regions",
            "1",
            "--admin-listen",
            AGENT_ADMIN,
            "--quic-timeout",
            "1s",
            "--quic-reprobe",
            "1s",
        ],
        &agent_log,
    );
    let logs = || {
        format!(
            "--- agent\n{}\n--- edge\n{}",
            tail(&agent_log),
            tail(&edge_log)
        )
    };

    // UDP open: QUIC.
    assert!(
        until_transports((1, 0), Duration::from_secs(20)).await,
        "agent never registered over QUIC\n{}",
        logs()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while get().await != Some(200) {
        assert!(Instant::now() < deadline, "no 200 over QUIC\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // UDP dropped: the QUIC connection dies, the agent comes back over TCP.
    ns.block_udp();
    assert!(
        until_transports((0, 1), Duration::from_secs(20)).await,
        "agent did not fall back to TCP\n{}",
        logs()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while get().await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "no 200 over the TCP fallback\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..20 {
        assert_eq!(
            get().await,
            Some(200),
            "request {i} over the TCP fallback\n{}",
            logs()
        );
    }
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        log.contains("UDP is blocked") || log.contains("UDP may be blocked"),
        "the agent says why it left QUIC\n{}",
        logs()
    );
    // The edge shows where the agent really is, and counts it as a TCP agent.
    let edge_text = std::fs::read_to_string(&edge_log).unwrap_or_default();
    let connected: Vec<&str> = edge_text
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains("tcp"))
        .collect();
    assert!(
        !connected.is_empty()
            && connected
                .iter()
                .all(|l| l.contains(NS_IP) && !l.contains("100::")),
        "edge log names the agent's real address for the TCP fallback: {connected:?}"
    );
    assert_eq!(
        metric(
            EDGE_ADMIN,
            "meridian_edge_agent_connections{transport=\"tcp\"} "
        )
        .await,
        Some(1),
        "edge /metrics counts the TCP agent"
    );

    // An agent started while UDP is blocked: its sends fail with EPERM, so it goes to TCP at
    // once instead of waiting out its 10 s --quic-timeout.
    let late_log = net.path("tun-fb-late-agent.log");
    let started = Instant::now();
    let late = ns.spawn(
        &[
            "agent",
            "--edge",
            &format!("{HOST_IP}:{TUNNEL_PORT}"),
            "--server-name",
            HOST,
            "--ca",
            &ca,
            "--service",
            "fb",
            "--to",
            "http://127.0.0.1:7795",
            "--token",
            &token,
            "--regions",
            "1",
            "--admin-listen",
            LATE_AGENT_ADMIN,
            "--quic-timeout",
            "10s",
        ],
        &late_log,
    );
    let mut on_tcp = false;
    while started.elapsed() < Duration::from_secs(8) {
        if transports_of(LATE_AGENT_ADMIN).await == Some((0, 1)) {
            on_tcp = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    eprintln!("agent started with UDP blocked registered over TCP after {took:?}");
    assert!(
        on_tcp && took < Duration::from_secs(3),
        "fallback took {took:?} (process start included); the QUIC timeout is 10 s\n{}",
        tail(&late_log)
    );
    drop(late);

    // UDP back: the re-probe moves it to QUIC; requests during the switch all succeed.
    ns.unblock_udp();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served = 0;
    loop {
        assert_eq!(
            get().await,
            Some(200),
            "request {served} while moving back to QUIC\n{}",
            logs()
        );
        served += 1;
        if transports().await == Some((1, 0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not return to QUIC\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..10 {
        assert_eq!(get().await, Some(200), "request {i} back on QUIC");
    }
    drop(ns);
}

//! Cross-region forwarding under `meridian dev`: an edge with no agent of a service sends the
//! request to the nearest edge that has one, so losing a region's agents costs no request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_tests::{
    clients::https_get,
    dev::{DevNetwork, Proc, eventually, kill9},
    meridian_bin,
};

const AMS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const HOST: &str = "edge.meridian.test";

/// An agent of `xr` that dials only the edge at `edge`.
fn agent(net: &DevNetwork, token: &str, edge: &str, id: &str) -> Proc {
    Proc(
        Command::new(meridian_bin())
            .args(["agent", "--edge", edge, "--regions", "1", "--ca"])
            .arg(net.ca())
            .args(["--service", "xr", "--to", "http://127.0.0.1:7781"])
            .args(["--agent-id", id])
            .env("MERIDIAN_AGENT_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent"),
    )
}

/// GETs `/xr/` from the edge at `ip` until `stop`; counts answers by outcome.
async fn load(
    ca: std::path::PathBuf,
    ip: IpAddr,
    stop: Arc<AtomicBool>,
    ok_local: Arc<AtomicU64>,
    ok_peer: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        match https_get(&ca, ip, 8443, HOST, "/xr/", &[]).await {
            Ok(r) if r.status == 200 => {
                if r.header("meridian-upstream-edge").is_some() {
                    ok_peer.fetch_add(1, Ordering::Relaxed);
                } else {
                    ok_local.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(r) => {
                eprintln!("failed: {} {}", r.status, r.text());
                failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("failed: {e}");
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_without_agents_is_served_by_the_nearest_region_with_one() {
    let net = DevNetwork::start();
    net.ctl(&["service", "create", "xr"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/xr"),
        "xr",
        "--strip-prefix",
    ]);
    let token = net.ctl(&["token", "create", "xr"])["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let _sin_agent = agent(&net, &token, "127.0.0.13:7443", "xr-sin");

    // ams has no agent of xr: sin serves it, and the origin never sees the edges' credential.
    let r = eventually(Duration::from_secs(20), || async {
        let r = https_get(&net.ca(), AMS, 8443, HOST, "/xr/headers", &[])
            .await
            .ok()?;
        (r.status == 200).then_some(r)
    })
    .await
    .expect("ams serves xr through sin");
    assert_eq!(r.header("meridian-upstream-edge"), Some("sin-1"));
    assert_eq!(r.header("meridian-region"), Some("ams"));
    let headers = &r.json()["headers"];
    assert!(headers.get("meridian-hop").is_none(), "{headers}");
    assert!(
        headers["x-forwarded-for"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1"),
        "the client comes first: {headers}"
    );

    // A client posing as a peer is not believed: were the forged hop trusted, ams would refuse
    // to forward it (one hop at most) and answer 503.
    let r = https_get(
        &net.ca(),
        AMS,
        8443,
        HOST,
        "/xr/headers",
        &[("meridian-hop", "guess")],
    )
    .await
    .expect("https");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["headers"].get("meridian-hop").is_none());

    // iad gets its own agent and serves locally; then loses it under load: no request fails,
    // the rest are served by sin.
    let mut iad_agent = agent(&net, &token, "127.0.0.12:7443", "xr-iad");
    eventually(Duration::from_secs(20), || async {
        let r = https_get(&net.ca(), IAD, 8443, HOST, "/xr/", &[])
            .await
            .ok()?;
        (r.status == 200 && r.header("meridian-upstream-edge").is_none()).then_some(())
    })
    .await
    .expect("iad serves xr locally");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok_local, ok_peer, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                net.ca(),
                IAD,
                stop.clone(),
                ok_local.clone(),
                ok_peer.clone(),
                failed.clone(),
            ))
        })
        .collect();
    eventually(Duration::from_secs(20), || async {
        (ok_local.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await
    .expect("load is served locally");
    kill9(iad_agent.0.id() as i32);
    let _ = iad_agent.0.wait();
    let killed = Instant::now();
    // Past the edge's dead-agent detection (4 s), and a good number served by sin.
    let peer_before = ok_peer.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), || async {
        (killed.elapsed() > Duration::from_secs(6)
            && ok_peer.load(Ordering::Relaxed) >= peer_before + 20)
            .then_some(())
    })
    .await
    .expect("sin takes over iad's traffic");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    eprintln!(
        "local {} via sin {} failed {}",
        ok_local.load(Ordering::Relaxed),
        ok_peer.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
}

//! Origin health through the tunnel over `meridian dev`: an agent whose origin dies reports it,
//! its `/ready` turns 503, and every edge stops routing to it while a healthy replica exists;
//! when the origin comes back, so does its traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meridian_tests::dev::{Proc, demo_app};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meridian_tests::dev::{DevNetwork, eventually, start_agent};

const AMS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const SIN: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13));
const EDGES: [IpAddr; 3] = [AMS, IAD, SIN];
const HOST: &str = "edge.meridian.test";

/// Plain HTTP GET: status and body, `None` on a transport error.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Which app answered `/hc/` at `edge` (its `instance`), or the status when not 200.
async fn instance(edge: IpAddr) -> Result<String, u16> {
    let (status, body) = get(SocketAddr::new(edge, 8080), HOST, "/hc/")
        .await
        .ok_or(0u16)?;
    if status != 200 {
        return Err(status);
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| 1u16)?;
    Ok(v["instance"].as_str().unwrap_or_default().to_owned())
}

async fn admin(port: u16, path: &str) -> Option<(u16, String)> {
    get(SocketAddr::from(([127, 0, 0, 1], port)), "localhost", path).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_origin_is_reported_and_edges_route_around_it() {
    let net = DevNetwork::start();
    net.ctl(&["service", "create", "hc"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/hc"),
        "hc",
        "--strip-prefix",
    ]);
    let token = net.ctl(&["token", "create", "hc"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut app1 = Some(demo_app("127.0.0.1:7792", "hc-1"));
    let _app2 = demo_app("127.0.0.1:7793", "hc-2");
    let agent = |id: &str, origin: &str, admin_port: u16| {
        Proc(start_agent(
            &net,
            &token,
            "hc",
            &format!("http://{origin}"),
            &[
                "--agent-id",
                id,
                "--health-interval",
                "1",
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
            ],
        ))
    };
    let _a = agent("hc-a", "127.0.0.1:7792", 7901);
    let _b = agent("hc-b", "127.0.0.1:7793", 7902);

    // Both agents are ready (registered, origin healthy) and connected to every region.
    for port in [7901, 7902] {
        eventually(Duration::from_secs(20), || async {
            let (_, m) = admin(port, "/metrics").await?;
            m.contains("meridian_agent_edge_connections{service=\"hc\"} 3")
                .then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("agent with admin port {port} holds three edge connections"));
        // The first probe may have run before the app listened: wait for the health verdict.
        eventually(Duration::from_secs(10), || async {
            let (status, body) = admin(port, "/ready").await?;
            (status == 200 && body.trim() == "ready").then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("agent with admin port {port} is ready"));
    }
    // Both origins get traffic at every edge.
    for edge in EDGES {
        for want in ["hc-1", "hc-2"] {
            eventually(Duration::from_secs(10), || async {
                (instance(edge).await.ok()? == want).then_some(())
            })
            .await
            .unwrap_or_else(|| panic!("{edge} routes to {want}"));
        }
    }

    // hc-1's origin dies; its agent stays connected.
    let died = Instant::now();
    drop(app1.take());
    eventually(Duration::from_secs(10), || async {
        let (status, body) = admin(7901, "/ready").await?;
        (status == 503 && body.contains("origin unhealthy")).then_some(())
    })
    .await
    .expect("the agent of the dead origin is not ready");
    let (_, m) = admin(7901, "/metrics").await.unwrap();
    assert!(
        m.contains("meridian_agent_origin_healthy{service=\"hc\"} 0"),
        "{m}"
    );
    // Every edge stops routing to it: a run of requests all land on hc-2.
    eventually(Duration::from_secs(10), || async {
        for edge in EDGES {
            for _ in 0..10 {
                if instance(edge).await.ok()? != "hc-2" {
                    return None;
                }
            }
        }
        Some(())
    })
    .await
    .expect("edges route only to the healthy origin");
    eprintln!(
        "origin death routed around {:?} after it died",
        died.elapsed()
    );
    for edge in EDGES {
        for _ in 0..20 {
            assert_eq!(instance(edge).await.as_deref(), Ok("hc-2"), "{edge}");
        }
    }

    // The origin comes back: ready again, and traffic returns to it.
    let _app1 = demo_app("127.0.0.1:7792", "hc-1");
    eventually(Duration::from_secs(10), || async {
        (admin(7901, "/ready").await?.0 == 200).then_some(())
    })
    .await
    .expect("ready again once the origin is back");
    for edge in EDGES {
        eventually(Duration::from_secs(10), || async {
            (instance(edge).await.ok()? == "hc-1").then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{edge} routes to hc-1 again"));
    }
}

//! Tunnel security over `meridian dev`: a token only ever carries its own service's traffic, and
//! revoking it cuts its agents off within seconds while other services keep being served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meridian_tests::dev::{Proc, demo_app};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use meridian_tests::{
    clients::{self, https_get},
    dev::{DevNetwork, eventually, start_agent},
};

const AMS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const SIN: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13));
const EDGES: [IpAddr; 3] = [AMS, IAD, SIN];
const HOST: &str = "edge.meridian.test";
/// A second app, next to dev's demo app on 127.0.0.1:7781.
const OTHER_APP: &str = "127.0.0.1:7791";

/// `instance` of the app that answered `GET /<mount>/` via `edge`, or the HTTP status if not 200.
async fn instance(net: &DevNetwork, edge: IpAddr, mount: &str) -> Result<String, u16> {
    let r = https_get(&net.ca(), edge, 8443, HOST, &format!("/{mount}/"), &[])
        .await
        .map_err(|_| 0u16)?;
    if r.status != 200 {
        return Err(r.status);
    }
    Ok(r.json()["instance"].as_str().unwrap_or_default().to_owned())
}

/// Service `other` with its own app, mount, token and agent, next to dev's `demo`.
async fn add_other_service(net: &DevNetwork) -> (Proc, Proc, String) {
    let app = demo_app(OTHER_APP, "other-1");
    net.ctl(&["service", "create", "other"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/other"),
        "other",
        "--strip-prefix",
    ]);
    let created = net.ctl(&["token", "create", "other"]);
    let token = created["token"].as_str().expect("token secret").to_owned();
    let id = created["id"].as_str().expect("token id").to_owned();
    let agent = Proc(start_agent(
        net,
        &token,
        "other",
        &format!("http://{OTHER_APP}"),
        &["--agent-id", "other-agent-1"],
    ));
    for edge in EDGES {
        eventually(Duration::from_secs(20), || async {
            (instance(net, edge, "other").await.ok()? == "other-1").then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("edge {edge} serves /other through the new agent"));
    }
    (app, agent, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_only_ever_carries_its_own_services_traffic() {
    let net = DevNetwork::start();
    let (_app, _agent, _id) = add_other_service(&net).await;

    // Both services are served at every edge, each only by its own app: many requests, so the
    // balancer had every chance to pick a wrong connection if one were registered.
    for edge in EDGES {
        for _ in 0..10 {
            assert_eq!(instance(&net, edge, "demo").await.as_deref(), Ok("demo-1"));
            assert_eq!(
                instance(&net, edge, "other").await.as_deref(),
                Ok("other-1")
            );
        }
    }

    // The `demo` token cannot register for `other`, nor for both at once.
    let demo_token = net.read("demo-agent.token");
    for edge in EDGES {
        let tunnel = SocketAddr::new(edge, 7443);
        let answer = clients::tunnel_hello(&net.ca(), tunnel, &demo_token, "other")
            .await
            .expect("the edge answers");
        assert!(
            matches!(answer, tunnel_proto::Frame::Reject { .. }),
            "{edge}: {answer:?}"
        );
    }

    // An agent started with the demo token but claiming `other` never gets registered: `other`
    // keeps being served only by its own app.
    let _impostor = Proc(start_agent(
        &net,
        &demo_token,
        "other",
        "http://127.0.0.1:7781",
        &["--agent-id", "impostor"],
    ));
    // Its origin is dev's demo app: for a few seconds (several of its reconnect attempts), every
    // edge must keep answering `/other` from `other-1` and never list the impostor.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for edge in EDGES {
            assert_eq!(
                instance(&net, edge, "other").await.as_deref(),
                Ok("other-1")
            );
        }
        let agents = net.ctl(&["agents"]).to_string();
        assert!(
            !agents.contains("impostor"),
            "an agent with another service's token was registered: {agents}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_token_disconnects_its_agents_within_seconds() {
    let net = DevNetwork::start();
    let (_app, _agent, token_id) = add_other_service(&net).await;

    let started = Instant::now();
    net.ctl(&["token", "revoke", &token_id]);
    let mut cut_off = Vec::new();
    for edge in EDGES {
        let status = eventually(Duration::from_secs(10), || async {
            match instance(&net, edge, "other").await {
                Err(503) => Some(503),
                _ => None,
            }
        })
        .await;
        assert_eq!(
            status,
            Some(503),
            "edge {edge} still routes to the revoked agent"
        );
        cut_off.push(started.elapsed());
    }
    let worst = cut_off.iter().max().copied().unwrap_or_default();
    eprintln!("revoked token cut off at all three edges after {worst:?}");
    assert!(worst < Duration::from_secs(5), "revocation took {worst:?}");

    // It stays cut off (the agent keeps retrying and is rejected), and the other service
    // never noticed.
    for edge in EDGES {
        assert_eq!(instance(&net, edge, "other").await, Err(503));
        assert_eq!(instance(&net, edge, "demo").await.as_deref(), Ok("demo-1"));
    }
    let gone = eventually(Duration::from_secs(10), || async {
        let a = net.ctl(&["agents"]);
        (!a.to_string().contains(&token_id)).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the coordinator still lists connections with the revoked token: {}",
        net.ctl(&["agents"])
    );
}

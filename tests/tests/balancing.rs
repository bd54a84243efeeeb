//! Per-service balancing policies under `meridian dev`, with two agents in front of two demo
//! app instances that name themselves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Duration;

use meridian_tests::{
    clients::https_get,
    dev::{DevNetwork, Proc, demo_app, eventually},
    meridian_bin,
};

const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const HOST: &str = "edge.meridian.test";

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut c = Command::new(meridian_bin());
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Proc(c.spawn().expect("spawn"))
}

#[tokio::test(flavor = "multi_thread")]
async fn hashing_on_a_header_keeps_each_user_on_one_instance_and_spreads_users() {
    let net = DevNetwork::start();
    net.ctl(&["service", "create", "sticky", "--lb", "hash:header:x-user"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/sticky"),
        "sticky",
        "--strip-prefix",
    ]);
    let token = net.ctl(&["token", "create", "sticky"])["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let ca = net.ca().display().to_string();
    let mut running = Vec::new();
    for (name, port) in [("one", 7791), ("two", 7792)] {
        let listen = format!("127.0.0.1:{port}");
        running.push(demo_app(&listen, name));
        running.push(spawn(
            &[
                "agent",
                "--edge",
                "127.0.0.12:7443",
                "--regions",
                "1",
                "--ca",
                &ca,
                "--service",
                "sticky",
                "--to",
                &format!("http://{listen}"),
                "--agent-id",
                name,
            ],
            &[("MERIDIAN_AGENT_TOKEN", &token)],
        ));
    }
    let instance = |user: String| {
        let ca = net.ca();
        async move {
            let r = https_get(&ca, IAD, 8443, HOST, "/sticky/", &[("x-user", &user)])
                .await
                .ok()?;
            (r.status == 200).then(|| r.json()["instance"].as_str().unwrap().to_owned())
        }
    };
    let mapping = || async {
        let mut m: HashMap<u32, String> = HashMap::new();
        for u in 0..40 {
            m.insert(u, instance(format!("user-{u}")).await?);
        }
        Some(m)
    };
    // Both agents registered and their origins reported healthy: two passes over forty users
    // agree and use both instances (an agent whose first origin probe has not passed yet gets
    // no traffic, which would move its users).
    let first = eventually(Duration::from_secs(30), || async {
        let a = mapping().await?;
        let b = mapping().await?;
        let both: HashSet<_> = a.values().collect();
        (a == b && both.len() == 2).then_some(a)
    })
    .await
    .expect("forty users spread over both instances, stably");

    // Every user stays on one instance, request after request.
    for round in 0..3 {
        let again = mapping().await.expect("answers");
        for (u, want) in &first {
            assert_eq!(&again[u], want, "user-{u} moved in round {round}");
        }
    }
    let spread: HashSet<_> = first.values().collect();
    assert_eq!(spread.len(), 2, "forty users spread over both instances");
    drop(running);
}

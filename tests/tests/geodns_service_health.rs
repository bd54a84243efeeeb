//! Per-name service health end to end: a real coordinator fed by edge heartbeats and a real
//! `meridian geodns --geo-service api=api`. When the `api` service's only agent in ams
//! disconnects (the ams edge stays alive, holding `web`), `api.<zone>` sends ams's clients to iad
//! with the short degraded TTL while `edge.<zone>` keeps answering ams; when the agent is back,
//! `api` returns to ams after the rise window. An agent that stays connected while its origin
//! fails its health check counts as gone too, and an edge's own verdict (which covers services
//! served by direct origins, with no agent) decides for that edge when it sends one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator_api::{AgentConn, Client, EdgeHeartbeat, EdgeInfo, Region};
use hickory_proto::rr::RecordType;
use meridian_tests::clients::{answer_ips, dns_query, dns_udp};
use meridian_tests::dev::{Proc, coordinator, eventually, free_port};
use meridian_tests::meridian_bin;

const ADMIN: &str = "mrd_api_geodnssvc_geodnsservicehealthadmin";
const NODE: &str = "mrd_api_geodnssvcnode_geodnsservicehealthnode";
const WAIT: Duration = Duration::from_secs(20);

fn agent(service: &str, region: &str) -> AgentConn {
    AgentConn {
        agent_id: format!("{service}-{region}"),
        service: service.into(),
        token_id: "t1".into(),
        remote_addr: "127.0.0.1:1".into(),
        connected_at_ms: 0,
        origin_healthy: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_last_agent_leaving_a_region_moves_only_that_name() {
    let data = std::env::temp_dir().join(format!("mrd-geodns-svc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let api: SocketAddr = format!("127.0.5.4:{}", free_port("127.0.5.4", false))
        .parse()
        .unwrap();
    let dns: SocketAddr = format!("127.0.5.5:{}", free_port("127.0.5.5", true))
        .parse()
        .unwrap();
    let url = format!("http://{api}");
    let _coordinator = coordinator(api, &data, ADMIN, NODE);
    let admin = Client::new(url.clone(), ADMIN).unwrap();
    eventually(WAIT, || async { admin.list_regions().await.ok() })
        .await
        .expect("coordinator up");
    for (name, lat, lon) in [("ams", 52.37, 4.90), ("iad", 38.95, -77.45)] {
        admin
            .create_region(&Region {
                name: name.into(),
                latitude: Some(lat),
                longitude: Some(lon),
                admin_state: Default::default(),
            })
            .await
            .unwrap();
    }
    // The agents each edge reports; the test changes ams's.
    let ams_agents = Arc::new(Mutex::new(vec![agent("web", "ams"), agent("api", "ams")]));
    // What the ams edge says it can serve by its own checks (`None`: an older edge).
    let ams_serving: Arc<Mutex<Option<Vec<String>>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let (stop, ams_agents, ams_serving) =
            (stop.clone(), ams_agents.clone(), ams_serving.clone());
        let node = Client::new(url.clone(), NODE).unwrap();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ams = ams_agents.lock().unwrap().clone();
                let serving = ams_serving.lock().unwrap().clone();
                let iad = vec![agent("web", "iad"), agent("api", "iad")];
                for (region, ip, agents, serving) in [
                    ("ams", "127.0.5.21", ams, serving),
                    ("iad", "127.0.5.22", iad, None),
                ] {
                    let hb = EdgeHeartbeat {
                        info: EdgeInfo {
                            id: format!("{region}-1"),
                            region: region.into(),
                            public_ips: vec![ip.parse().unwrap()],
                            http_addr: None,
                            https_addr: None,
                            tunnel_addr: None,
                            anycast: None,
                            healthy_services: serving,
                        },
                        agents,
                    };
                    let _ = node.heartbeat(&hb).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let _geodns = Proc(
        Command::new(meridian_bin())
            .args([
                "geodns",
                "--listen",
                &dns.to_string(),
                "--coordinator",
                &url,
            ])
            .args([
                "--zone",
                "meridian.test",
                "--geo-name",
                "edge",
                "--geo-name",
                "api",
            ])
            .args(["--geo-service", "api=api"])
            .args(["--net", "192.0.2.0/24=ams", "--net", "198.51.100.0/24=iad"])
            .args(["--health-fall-ms", "300", "--health-rise-ms", "600"])
            .env("MERIDIAN_NODE_TOKEN", NODE)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start geodns"),
    );

    let ams_client = Some(("192.0.2.7".parse().unwrap(), 24));
    let api_q = dns_query("api.meridian.test.", RecordType::A, ams_client);
    let edge_q = dns_query("edge.meridian.test.", RecordType::A, ams_client);
    let ams: IpAddr = "127.0.5.21".parse().unwrap();
    let iad: IpAddr = "127.0.5.22".parse().unwrap();
    let answers = |want: IpAddr, q| async move {
        let r = dns_udp(dns, q).await.ok()?;
        (answer_ips(&r) == vec![want]).then_some(r)
    };
    eventually(WAIT, || answers(ams, &api_q))
        .await
        .expect("api never answered ams");

    // api's agent in ams stays connected but its origin fails the agent's health check (the
    // edge reports it in its heartbeat): ams cannot serve api, the same move.
    let set_origin = |healthy: bool| {
        for a in ams_agents.lock().unwrap().iter_mut() {
            if a.service == "api" {
                a.origin_healthy = healthy;
            }
        }
    };
    set_origin(false);
    eventually(WAIT, || answers(iad, &api_q))
        .await
        .expect("an agent whose origin fails still drew api to ams");
    set_origin(true);
    eventually(WAIT, || answers(ams, &api_q))
        .await
        .expect("api never came back once its origin recovered");

    // api's only agent in ams disconnects; the ams edge lives on with web's agent.
    ams_agents.lock().unwrap().retain(|a| a.service != "api");
    let r = eventually(WAIT, || answers(iad, &api_q))
        .await
        .expect("api never moved to iad");
    assert_eq!(
        r.answers[0].ttl, 5,
        "degraded TTL while ams is down for api"
    );
    let r = dns_udp(dns, &edge_q).await.unwrap();
    assert_eq!(
        answer_ips(&r),
        vec![ams],
        "edge (any service) still answers ams"
    );
    assert_eq!(r.answers[0].ttl, 30);

    // The agent is back: ams again, but not before the rise window.
    ams_agents.lock().unwrap().push(agent("api", "ams"));
    let back = Instant::now();
    let r = eventually(WAIT, || answers(ams, &api_q))
        .await
        .expect("api never came back to ams");
    assert!(
        back.elapsed() >= Duration::from_millis(500),
        "no rise window"
    );
    assert_eq!(r.answers[0].ttl, 30);

    // A service served by direct origins has no agent at all: the edge's own verdict keeps ams
    // up for api while its checks pass, past the fall window, and moves api away when they fail.
    *ams_serving.lock().unwrap() = Some(vec!["api".into(), "web".into()]);
    ams_agents.lock().unwrap().retain(|a| a.service != "api");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let r = dns_udp(dns, &api_q).await.unwrap();
        assert_eq!(
            answer_ips(&r),
            vec![ams],
            "api left ams while the edge served it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    *ams_serving.lock().unwrap() = Some(vec!["web".into()]);
    let r = eventually(WAIT, || answers(iad, &api_q))
        .await
        .expect("api stayed at ams after the edge stopped serving it");
    assert_eq!(r.answers[0].ttl, 5);

    stop.store(true, Ordering::Relaxed);
    let _ = beat.await;
    let _ = std::fs::remove_dir_all(&data);
}

//! Two coordinators on one real 3-member etcd share observed state: an edge heartbeating to
//! either one shows up at both, the GSLB view (region health) is computed by the leader only and
//! both serve the same one, a dead edge turns its region unhealthy at both, and losing the
//! leader never turns a healthy region down. The change log is compacted on its own there too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/etcd_cluster.rs"]
mod etcd_cluster;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use coordinator_api::{
    AgentConn, Client, CreateService, EdgeHeartbeat, EdgeInfo, Mount, Region, RegionHealth,
    Snapshot, WatchEvent,
};
use etcd_cluster::{EtcdCluster, have_etcd};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "mrd_api_observed_observedadminsecret";

struct Coordinator {
    addr: SocketAddr,
    client: Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), coordinator::Error>>,
    dir: PathBuf,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(cluster: &EtcdCluster, prefix: &str) -> Coordinator {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "mrd-observed-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = coordinator::Config::new(addr, dir.clone());
    cfg.admin_token = Some(ADMIN.into());
    cfg.store = coordinator::StoreKind::Etcd;
    cfg.etcd_endpoints = cluster.endpoints.clone();
    cfg.etcd_prefix = prefix.into();
    cfg.etcd_lease_ttl = 2;
    cfg.history_revisions = 2;
    cfg.history_minutes = 0;
    cfg.compact_every_ms = 100;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(coordinator::run(cfg, shutdown.clone()));
    let client = Client::new(format!("http://{addr}"), ADMIN).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.status().await.is_err() {
        assert!(Instant::now() < deadline, "coordinator on {addr} not ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Coordinator {
        addr,
        client,
        shutdown,
        task,
        dir,
    }
}

/// Heartbeats `id` (region `region`, one agent for `web`) to `c` every 300 ms until cancelled.
fn heartbeat(c: &Client, id: &str, region: &str) -> CancellationToken {
    let stop = CancellationToken::new();
    let hb = EdgeHeartbeat {
        info: EdgeInfo {
            id: id.into(),
            region: region.into(),
            public_ips: vec!["127.0.6.1".parse().unwrap()],
            http_addr: None,
            https_addr: None,
            tunnel_addr: None,
            anycast: None,
            healthy_services: None,
        },
        agents: vec![AgentConn {
            agent_id: format!("agent-{region}"),
            service: "web".into(),
            token_id: "t1".into(),
            remote_addr: "127.0.6.9:1".into(),
            connected_at_ms: 1,
            origin_healthy: true,
        }],
    };
    let (c, s) = (c.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let _ = c.heartbeat(&hb).await;
            tokio::select! {
                () = s.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    });
    stop
}

fn health<'a>(s: &'a Snapshot, region: &str) -> Option<&'a RegionHealth> {
    s.region_health.iter().find(|r| r.region == region)
}

/// Polls both coordinators until `pred` holds for both snapshots and their GSLB views agree.
async fn both_agree(a: &Client, b: &Client, what: &str, pred: impl Fn(&Snapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (sa, sb) = (a.snapshot().await.unwrap(), b.snapshot().await.unwrap());
        if pred(&sa) && pred(&sb) && sa.region_health == sb.region_health {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never agreed\nA: {:?}\nB: {:?}",
            sa.region_health,
            sb.region_health
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn leader_addr(cluster: &EtcdCluster, prefix: &str) -> String {
    let mut c = etcd_client::Client::connect(&cluster.endpoints, None)
        .await
        .unwrap();
    let r = c.get(format!("{prefix}/leader"), None).await.unwrap();
    let node = r.kvs().first().unwrap().value_str().unwrap().to_owned();
    node.split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_coordinators_share_observed_state_and_serve_one_gslb_view() {
    if !have_etcd("etcd_coordinators_share_observed_state_and_serve_one_gslb_view") {
        return;
    }
    let cluster = EtcdCluster::start("observed", 23740, 3);
    let a = start(&cluster, "/obs").await;
    let b = start(&cluster, "/obs").await;
    for name in ["ams", "iad"] {
        a.client
            .create_region(&Region {
                name: name.into(),
                latitude: None,
                longitude: None,
                admin_state: Default::default(),
            })
            .await
            .unwrap();
    }
    // Each edge talks to one coordinator only, as behind a load balancer.
    let ams = heartbeat(&a.client, "edge-ams", "ams");
    let _iad = heartbeat(&b.client, "edge-iad", "iad");
    both_agree(&a.client, &b.client, "both edges at both", |s| {
        s.edges.len() == 2
            && s.edges.iter().all(|e| e.alive)
            && ["ams", "iad"].iter().all(|r| {
                health(s, r)
                    .is_some_and(|h| h.healthy && h.edges_alive == 1 && h.services.len() == 1)
            })
    })
    .await;

    // The ams edge dies: its key expires with its lease, and both say ams is down.
    ams.cancel();
    both_agree(&a.client, &b.client, "ams down at both", |s| {
        health(s, "ams").is_some_and(|h| !h.healthy && h.edges_alive == 0)
            && health(s, "iad").is_some_and(|h| h.healthy)
    })
    .await;

    // The leader goes: the survivor keeps serving iad healthy throughout (the last view frozen,
    // then its own once it leads), never "everything down".
    let leader = leader_addr(&cluster, "/obs").await;
    let (mut gone, mut survivor) = if leader == a.addr.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    gone.shutdown.cancel();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let s = survivor.client.snapshot().await.unwrap();
        assert!(
            health(&s, "iad").is_some_and(|h| h.healthy),
            "iad must stay healthy while leadership moves: {:?}",
            s.region_health
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        leader_addr(&cluster, "/obs").await,
        survivor.addr.to_string()
    );
    (&mut gone.task).await.unwrap().unwrap();

    // Compaction on its own (keep 2 revisions): an old resume gets a snapshot, a recent one a
    // delta.
    let c = &survivor.client;
    c.create_service(&CreateService {
        name: "svc".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let early = c.snapshot().await.unwrap();
    for i in 0..6 {
        let m: Mount = serde_json::from_value(serde_json::json!({
            "host": format!("m{i}.test"), "path_prefix": "/", "service": "svc",
        }))
        .unwrap();
        c.add_mount(&m).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut w = c
            .watch_deltas(Some((early.revision, early.observed_version)))
            .await
            .unwrap();
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Snapshot(_) => break,
            other => assert!(
                Instant::now() < deadline,
                "history before {} was never compacted: {other:?}",
                early.revision
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recent = c.snapshot().await.unwrap();
    c.delete_mount("m0.test", "/").await.unwrap();
    let mut w = c
        .watch_deltas(Some((recent.revision, recent.observed_version)))
        .await
        .unwrap();
    assert!(matches!(
        w.next().await.unwrap().unwrap(),
        WatchEvent::Delta(_)
    ));
    survivor.shutdown.cancel();
    (&mut survivor.task).await.unwrap().unwrap();
}

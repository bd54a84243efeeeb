//! API tests against a real listener: auth, validation, token secrecy, watch, liveness, run().

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_api::{
    AgentConn, Client, ClientError, CreateService, CreateToken, EDGE_DEAD_AFTER_MS, EdgeHeartbeat,
    EdgeInfo, EdgeStatus, Mount, Region, Snapshot, WatchEvent,
};
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::testutil::TempDir;
use crate::{Config, Tuning, bootstrap, hub::Hub, serve_with};

const ADMIN: &str = "mrd_api_admin1_adminsecret";
const NODE: &str = "mrd_api_node1_nodesecret";
/// Short progress interval so the idle-stream test is quick.
const PROGRESS: Duration = Duration::from_millis(200);

struct Server {
    url: String,
    hub: Arc<Hub>,
    dir: TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::Error>>,
}

impl Server {
    async fn start() -> Self {
        Self::start_with(Tuning {
            progress_every: PROGRESS,
            ..Tuning::default()
        })
        .await
    }

    async fn start_with(tuning: Tuning) -> Self {
        let dir = TempDir::new("api");
        let cfg = Config {
            admin_token: Some(ADMIN.into()),
            node_token: Some(NODE.into()),
            ..Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
        };
        let store = bootstrap::open_store(&cfg, "test".into()).await.unwrap();
        assert_eq!(bootstrap::tokens(&store, &cfg).await.unwrap(), None);
        let hub = Hub::new(store).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(listener, hub.clone(), shutdown.clone(), tuning));
        Self {
            url,
            hub,
            dir,
            shutdown,
            task,
        }
    }

    fn admin(&self) -> Client {
        Client::new(&self.url, ADMIN).unwrap()
    }

    fn node(&self) -> Client {
        Client::new(&self.url, NODE).unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, Option<String>) {
    match r {
        Err(ClientError::Http(s, e)) => (s, e.field),
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

fn mount(host: &str, prefix: &str, service: &str) -> Mount {
    Mount {
        host: host.into(),
        path_prefix: prefix.into(),
        service: service.into(),
        strip_prefix: false,
        ..Default::default()
    }
}

async fn next_snapshot(
    events: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        loop {
            match events
                .next()
                .await
                .expect("watch stream ended")
                .expect("watch error")
            {
                WatchEvent::Snapshot(s) if pred(&s) => return s,
                _ => {}
            }
        }
    })
    .await
    .expect("timed out waiting for a matching snapshot")
}

#[tokio::test]
async fn auth_401_403_and_healthz() {
    let srv = Server::start().await;
    let http = reqwest::Client::new();

    let r = http
        .get(format!("{}/healthz", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");

    let r = http
        .get(format!("{}/v1/services", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Bearer"));

    let r = http
        .get(format!("{}/v1/snapshot", srv.url))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let bad = Client::new(&srv.url, "mrd_api_x_wrong").unwrap();
    assert_eq!(status(bad.list_services().await).0, 401);
    assert_eq!(status(bad.snapshot().await).0, 401);

    let node = srv.node();
    assert_eq!(status(node.list_services().await).0, 403);
    assert_eq!(
        status(
            node.create_service(&CreateService {
                name: "x".into(),
                lb_policy: Default::default()
            })
            .await
        )
        .0,
        403
    );
    assert_eq!(status(node.list_edges().await).0, 403);
    assert!(node.snapshot().await.is_ok());
    assert!(node.watch().await.is_ok());

    let admin = srv.admin();
    assert!(admin.list_services().await.unwrap().is_empty());
    assert!(admin.snapshot().await.is_ok());

    let r = http
        .get(format!("{}/v1/nope", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    srv.stop().await;
}

#[tokio::test]
async fn validation_errors_name_the_field() {
    let srv = Server::start().await;
    let c = srv.admin();
    let svc = |n: &str| CreateService {
        name: n.into(),
        lb_policy: Default::default(),
    };

    assert_eq!(
        status(c.create_service(&svc("Bad_Name")).await),
        (400, Some("name".into()))
    );
    assert_eq!(
        status(c.create_service(&svc("")).await),
        (400, Some("name".into()))
    );
    c.create_service(&svc("web")).await.unwrap();
    assert_eq!(
        status(c.create_service(&svc("web")).await),
        (409, Some("name".into()))
    );

    assert_eq!(
        status(c.add_mount(&mount("a.test", "/", "nope")).await),
        (422, Some("service".into()))
    );
    assert_eq!(
        status(c.add_mount(&mount("a_b.test", "/", "web")).await),
        (400, Some("host".into()))
    );
    assert_eq!(
        status(c.add_mount(&mount("a.test", "/x/../y", "web")).await),
        (400, Some("path_prefix".into()))
    );
    assert_eq!(
        status(c.add_mount(&mount("a.test", "x", "web")).await),
        (400, Some("path_prefix".into()))
    );
    assert_eq!(
        status(c.add_mount(&mount("a.test", "/x?y", "web")).await),
        (400, Some("path_prefix".into()))
    );

    // Normalised on the way in: lower-cased host without port, no trailing slash.
    let m = c
        .add_mount(&mount("A.Test:8443", "/api/", "web"))
        .await
        .unwrap();
    assert_eq!(
        (m.host.as_str(), m.path_prefix.as_str()),
        ("a.test", "/api")
    );
    // An identical mount would shadow the first: refused, naming the field.
    assert_eq!(
        status(c.add_mount(&mount("a.test", "/api", "web")).await),
        (409, Some("path_prefix".into()))
    );
    assert_eq!(c.list_mounts().await.unwrap(), vec![m.clone()]);

    // A referenced service cannot be deleted.
    assert_eq!(status(c.delete_service("web").await).0, 409);
    c.delete_mount("a.test", "/api/").await.unwrap();
    assert_eq!(status(c.delete_mount("a.test", "/api").await).0, 404);
    c.delete_service("web").await.unwrap();
    assert_eq!(status(c.delete_service("web").await).0, 404);

    assert_eq!(
        status(
            c.create_token(&CreateToken {
                service: "web".into()
            })
            .await
        ),
        (422, Some("service".into()))
    );

    let r = Region {
        name: "ams".into(),
        latitude: Some(95.0),
        longitude: None,
        admin_state: Default::default(),
    };
    assert_eq!(
        status(c.create_region(&r).await),
        (400, Some("latitude".into()))
    );
    let r = Region {
        name: "ams".into(),
        latitude: Some(52.4),
        longitude: Some(4.9),
        admin_state: Default::default(),
    };
    assert_eq!(c.create_region(&r).await.unwrap(), r);
    assert_eq!(status(c.create_region(&r).await).0, 409);
    assert_eq!(c.list_regions().await.unwrap(), vec![r]);

    // Malformed and oversized bodies get JSON errors too.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/services", srv.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: coordinator_api::ApiError = r.json().await.unwrap();
    assert!(!e.error.is_empty());
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(crate::api::MAX_BODY));
    let r = http
        .post(format!("{}/v1/services", srv.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    srv.stop().await;
}

#[tokio::test]
async fn token_secret_shown_once_and_only_hash_stored() {
    let srv = Server::start().await;
    let c = srv.admin();
    c.create_service(&CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let created = c
        .create_token(&CreateToken {
            service: "web".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        coordinator_api::token::parse_id(coordinator_api::token::AGENT, &created.token),
        Some(created.id.as_str())
    );
    let secret = created.token.rsplit('_').next().unwrap().to_owned();
    assert!(secret.len() >= 32);

    let listed = c.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, created.id);
    let raw = serde_json::to_string(&listed).unwrap();
    assert!(!raw.contains(&secret));

    let snap = c.snapshot().await.unwrap();
    assert_eq!(snap.agent_tokens.len(), 1);
    assert_eq!(
        snap.agent_tokens[0].sha256,
        coordinator_api::token::sha256_hex(&created.token)
    );
    assert!(!serde_json::to_string(&snap).unwrap().contains(&secret));

    // Neither the agent secret nor the bootstrap API tokens are anywhere in the database.
    let db = rusqlite::Connection::open(srv.dir.path().join(bootstrap::DB_FILE)).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut dump = String::new();
    for t in &tables {
        let mut st = db.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let cols = st.column_count();
        let mut rows = st.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..cols {
                if let Ok(Some(s)) = row.get::<_, Option<String>>(i) {
                    dump.push_str(&s);
                    dump.push('\n');
                }
            }
        }
    }
    assert!(dump.contains(&coordinator_api::token::sha256_hex(&created.token)));
    for s in [secret.as_str(), "adminsecret", "nodesecret"] {
        assert!(!dump.contains(s), "{s} found in the database");
    }

    c.revoke_token(&created.id).await.unwrap();
    assert!(c.list_tokens().await.unwrap().is_empty());
    assert_eq!(status(c.revoke_token(&created.id).await).0, 404);
    srv.stop().await;
}

#[tokio::test]
async fn watch_delivers_new_snapshot_after_mount_added() {
    let srv = Server::start().await;
    let c = srv.admin();
    c.create_service(&CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let mut events = srv.node().watch().await.unwrap();
    let first = next_snapshot(&mut events, |_| true).await;
    assert_eq!(first.services.len(), 1);
    assert!(first.mounts.is_empty());

    c.add_mount(&mount("a.test", "/", "web")).await.unwrap();
    let next = next_snapshot(&mut events, |s| !s.mounts.is_empty()).await;
    assert!(next.revision > first.revision);
    assert_eq!(next.mounts, vec![mount("a.test", "/", "web")]);
    assert!(next.validate().is_ok());
    srv.stop().await;
}

fn heartbeat(id: &str) -> EdgeHeartbeat {
    EdgeHeartbeat {
        info: EdgeInfo {
            id: id.into(),
            region: "ams".into(),
            public_ips: vec!["127.0.0.11".parse().unwrap()],
            http_addr: Some("127.0.0.11:8080".into()),
            https_addr: None,
            tunnel_addr: Some("127.0.0.11:4433".into()),
            anycast: None,
            healthy_services: None,
        },
        agents: vec![AgentConn {
            agent_id: "agent-1".into(),
            service: "web".into(),
            token_id: "t1".into(),
            remote_addr: "127.0.0.1:5555".into(),
            connected_at_ms: 1,
            origin_healthy: true,
        }],
    }
}

#[tokio::test]
async fn edge_liveness_flips_after_timeout() {
    let srv = Server::start().await;
    let node = srv.node();
    let admin = srv.admin();
    let mut events = node.watch().await.unwrap();
    next_snapshot(&mut events, |s| s.edges.is_empty()).await;

    node.heartbeat(&heartbeat("ams-1")).await.unwrap();
    let s = next_snapshot(&mut events, |s| !s.edges.is_empty()).await;
    assert!(s.edges[0].alive);
    let agents = admin.list_agents().await.unwrap();
    assert_eq!(
        (
            agents.len(),
            agents[0].edge_id.as_str(),
            agents[0].region.as_str()
        ),
        (1, "ams-1", "ams")
    );

    // Liveness is evaluated against an explicit `now`: no sleeping.
    srv.hub
        .tick(Instant::now() + Duration::from_millis(EDGE_DEAD_AFTER_MS + 100));
    let s = next_snapshot(&mut events, |s| s.edges.first().is_some_and(|e| !e.alive)).await;
    assert_eq!(s.edges[0].info.id, "ams-1");
    assert!(!admin.list_edges().await.unwrap()[0].alive);
    assert!(admin.list_agents().await.unwrap().is_empty());

    node.heartbeat(&heartbeat("ams-1")).await.unwrap();
    next_snapshot(&mut events, |s| s.edges.first().is_some_and(|e| e.alive)).await;

    // Bad heartbeats are refused with the field named.
    let mut bad = heartbeat("");
    bad.info.id = String::new();
    assert_eq!(
        status(node.heartbeat(&bad).await),
        (400, Some("info.id".into()))
    );
    srv.stop().await;
}

#[tokio::test]
async fn watch_sends_progress_when_idle() {
    let srv = Server::start().await;
    let mut events = srv.node().watch().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WatchEvent::Snapshot(first) = first else {
        panic!("first line must be a snapshot")
    };
    let second = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second,
        WatchEvent::Progress {
            revision: first.revision,
            observed_version: first.observed_version
        }
    );
    srv.stop().await;
}

#[tokio::test]
async fn run_generates_admin_token_and_shuts_down_gracefully() {
    let dir = TempDir::new("run");
    let data_dir = dir.path().join("data");
    // Find a free port; a race with another process is possible but unlikely in tests.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = Config {
        admin_token: None,
        node_token: None,
        ..Config::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            data_dir.clone(),
        )
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::run(cfg, shutdown.clone()));

    let token_file = data_dir.join(bootstrap::ADMIN_TOKEN_FILE);
    let token = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                return t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(coordinator_api::token::parse_id(coordinator_api::token::API, &token).is_some());

    let c = Client::new(format!("http://127.0.0.1:{port}"), &token).unwrap();
    let svc = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c
                .create_service(&CreateService {
                    name: "web".into(),
                    lb_policy: Default::default(),
                })
                .await
            {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(svc.name, "web");

    // An open watch stream must not hold up graceful shutdown.
    let mut events = c.watch().await.unwrap();
    assert!(matches!(
        events.next().await,
        Some(Ok(WatchEvent::Snapshot(_)))
    ));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Restart on the same data: the state is still there and no new token file is written.
    let shutdown = CancellationToken::new();
    let cfg = Config {
        admin_token: None,
        node_token: None,
        ..Config::new(format!("127.0.0.1:{port}").parse().unwrap(), data_dir)
    };
    let task = tokio::spawn(crate::run(cfg, shutdown.clone()));
    let services = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c.list_services().await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn admin_state_flows_to_watchers_and_is_audited() {
    let srv = Server::start().await;
    let c = srv.admin();
    c.create_region(&Region {
        name: "ams".into(),
        latitude: None,
        longitude: None,
        admin_state: Default::default(),
    })
    .await
    .unwrap();
    let mut events = srv.node().watch().await.unwrap();
    next_snapshot(&mut events, |s| s.regions.len() == 1).await;

    let r = c
        .set_region_admin_state("ams", coordinator_api::AdminState::Down)
        .await
        .unwrap();
    assert_eq!(r.admin_state, coordinator_api::AdminState::Down);
    let snap = next_snapshot(&mut events, |s| {
        s.regions[0].admin_state == coordinator_api::AdminState::Down
    })
    .await;
    assert!(!snap.region_health[0].healthy, "forced down");
    assert_eq!(
        c.list_regions().await.unwrap()[0].admin_state,
        coordinator_api::AdminState::Down
    );
    assert_eq!(
        status(
            c.set_region_admin_state("nope", coordinator_api::AdminState::Up)
                .await
        )
        .0,
        404
    );
    // Unknown state values are refused as JSON errors.
    let r = reqwest::Client::new()
        .put(format!("{}/v1/regions/ams/admin_state", srv.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"state": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // A node token may not change it.
    assert_eq!(
        status(
            srv.node()
                .set_region_admin_state("ams", coordinator_api::AdminState::Up)
                .await
        )
        .0,
        403
    );

    let audit = c.list_audit(0, 100).await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(
        (
            last.actor.as_str(),
            last.action.as_str(),
            last.target.as_str()
        ),
        ("token:admin1", "region.admin_state", "ams")
    );
    assert!(last.revision > 0 && last.at_ms > 0);
    srv.stop().await;
}

#[tokio::test]
async fn api_token_scopes_read_and_revoke() {
    let srv = Server::start().await;
    let c = srv.admin();
    let created = c
        .create_api_token(&coordinator_api::CreateApiToken {
            scope: coordinator_api::ApiScope::Read,
            description: "dashboard".into(),
        })
        .await
        .unwrap();
    let reader = Client::new(&srv.url, &created.token).unwrap();
    // Reads work, writes are forbidden, heartbeats too.
    reader.list_services().await.unwrap();
    reader.status().await.unwrap();
    reader.snapshot().await.unwrap();
    reader.list_audit(0, 10).await.unwrap();
    let svc = CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    };
    assert_eq!(status(reader.create_service(&svc).await).0, 403);
    assert_eq!(status(reader.heartbeat(&heartbeat("e1")).await).0, 403);
    // Node tokens cannot read the admin API.
    assert_eq!(status(srv.node().list_services().await).0, 403);

    let list = c.list_api_tokens().await.unwrap();
    assert!(
        list.iter()
            .any(|t| t.id == created.id && t.description == "dashboard")
    );
    assert!(
        serde_json::to_string(&list)
            .unwrap()
            .find(&created.token)
            .is_none()
    );
    c.revoke_api_token(&created.id).await.unwrap();
    assert_eq!(status(reader.list_services().await).0, 401);
    // The last admin token stays.
    assert_eq!(status(c.revoke_api_token("admin1").await).0, 409);
    let audit = c.list_audit(0, 100).await.unwrap();
    assert!(audit.iter().any(|a| a.action == "api_token.put"
        && a.target == created.id
        && a.actor == "token:admin1"));
    assert!(
        audit
            .iter()
            .any(|a| a.action == "api_token.delete" && a.target == created.id)
    );
    srv.stop().await;
}

#[tokio::test]
async fn openapi_and_dashboard_are_public_and_everything_else_is_not() {
    let srv = Server::start().await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/openapi.json", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert!(doc["paths"]["/v1/regions/{name}/admin_state"]["put"].is_object());
    let r = http.get(format!("{}/", srv.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("/v1/snapshot") && page.contains("#token="));
    // The page carries no data of its own.
    srv.admin()
        .create_service(&CreateService {
            name: "secret-svc".into(),
            lb_policy: Default::default(),
        })
        .await
        .unwrap();
    let page = http
        .get(format!("{}/", srv.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("secret-svc"));
    for path in ["/v1/status", "/v1/audit", "/v1/api-tokens"] {
        let r = http.get(format!("{}{path}", srv.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn status_and_region_health_reflect_heartbeats() {
    let srv = Server::start().await;
    let node = srv.node();
    node.heartbeat(&heartbeat("e1")).await.unwrap();
    let st = srv.admin().status().await.unwrap();
    assert_eq!(st.backend, "sqlite");
    assert_eq!(st.edges_alive, 1);
    let ams = st.regions.iter().find(|r| r.region == "ams").unwrap();
    assert!(ams.healthy && !ams.stale);
    assert_eq!(ams.edges_alive, 1);
    srv.stop().await;
}

#[tokio::test]
async fn restart_restores_observed_edges_instead_of_starting_blind() {
    let dir = TempDir::new("restart-observed");
    let cfg = Config {
        admin_token: Some(ADMIN.into()),
        node_token: Some(NODE.into()),
        ..Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
    };
    for round in 0..2 {
        let store = bootstrap::open_store(&cfg, "test".into()).await.unwrap();
        bootstrap::tokens(&store, &cfg).await.unwrap();
        // What round 0 last saved: normally alive, but a machine stalled for longer than
        // EDGE_DEAD_AFTER_MS before round 0 stopped may have saved it dead.
        let saved: Option<Vec<EdgeStatus>> = store
            .call(|s| s.load_observed())
            .await
            .unwrap()
            .map(|j| serde_json::from_str(&j).unwrap());
        let restored_at = Instant::now();
        let hub = Hub::new(store).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            hub.clone(),
            shutdown.clone(),
            Tuning {
                progress_every: PROGRESS,
                ..Tuning::default()
            },
        ));
        let node = Client::new(&url, NODE).unwrap();
        if round == 0 {
            node.heartbeat(&heartbeat("e1")).await.unwrap();
            // Wait until the saver wrote it.
            let store = hub.store().clone();
            let deadline = Instant::now() + Duration::from_secs(5);
            while store.call(|s| s.load_observed()).await.unwrap().is_none() {
                assert!(Instant::now() < deadline, "observed state never saved");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            // No heartbeat yet since the restart: the edge is still there, as alive as it was
            // saved, for a full grace period.
            let saved = saved.expect("round 0 saved the observed state");
            let snap = node.snapshot().await.unwrap();
            assert_eq!(snap.edges.len(), 1);
            assert_eq!(snap.edges[0].agents.len(), 1);
            if restored_at.elapsed() < Duration::from_millis(EDGE_DEAD_AFTER_MS) {
                assert_eq!(snap.edges[0].alive, saved[0].alive);
            }
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn watch_resumes_from_a_revision_and_records_acks() {
    let srv = Server::start().await;
    let c = srv.admin();
    c.create_service(&CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let node = srv.node();
    let have = node.snapshot().await.unwrap();
    // Up to date: the first line is a progress line, not the whole snapshot.
    let mut events = node
        .watch_from(Some((have.revision, have.observed_version)))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        WatchEvent::Progress {
            revision: have.revision,
            observed_version: have.observed_version
        }
    );
    // Behind: a snapshot.
    let mut behind = node.watch_from(Some((0, 0))).await.unwrap();
    let first = behind.next().await.unwrap().unwrap();
    assert!(matches!(first, WatchEvent::Snapshot(s) if s.revision == have.revision));
    // A later change still arrives on the resumed stream.
    c.add_mount(&mount("a.test", "/", "web")).await.unwrap();
    next_snapshot(&mut events, |s| s.mounts.len() == 1).await;

    node.ack(&coordinator_api::WatchAck {
        subscriber: "edge-1".into(),
        revision: 7,
        observed_version: 1,
        ok: false,
        error: Some("mount x: unknown service".into()),
    })
    .await
    .unwrap();
    let st = c.status().await.unwrap();
    assert_eq!(st.subscribers.len(), 1);
    let s = &st.subscribers[0];
    assert_eq!(
        (s.subscriber.as_str(), s.token_id.as_str(), s.ok, s.revision),
        ("edge-1", "node1", false, 7)
    );
    assert!(st.watchers >= 2);
    srv.stop().await;
}

/// The real subscriber acks what it applies.
#[tokio::test]
async fn subscriber_acks_applied_snapshots() {
    let srv = Server::start().await;
    let (mut rx, task) = coordinator_api::Subscriber::spawn(coordinator_api::SubscriberConfig {
        client: srv.node(),
        cache_path: None,
    });
    rx.wait_for(|s| s.is_some()).await.unwrap();
    let c = srv.admin();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = c.status().await.unwrap();
        if st.subscribers.iter().any(|s| s.ok) {
            break;
        }
        assert!(Instant::now() < deadline, "no ack recorded: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    srv.stop().await;
}

#[tokio::test]
async fn put_replaces_services_and_mounts_and_watchers_see_it() {
    let srv = Server::start().await;
    let c = srv.admin();
    let mut web = coordinator_api::Service {
        name: "web".into(),
        ..Default::default()
    };
    c.create_service_spec(&web).await.unwrap();
    c.create_service_spec(&coordinator_api::Service {
        name: "api".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.add_mount(&mount("a.test", "/", "web")).await.unwrap();
    let mut events = srv.node().watch().await.unwrap();
    next_snapshot(&mut events, |_| true).await;

    web.origins = vec![coordinator_api::Origin {
        url: "HTTP://Origin.Test:8080/".into(),
        weight: Some(4),
        ..Default::default()
    }];
    web.sticky = Some(coordinator_api::StickyCookie {
        name: "mrd_sticky".into(),
    });
    let stored = c.update_service(&web).await.unwrap();
    assert_eq!(
        stored.origins[0].url, "http://origin.test:8080",
        "normalised"
    );
    let snap = next_snapshot(&mut events, |s| {
        s.services.iter().any(|x| !x.origins.is_empty())
    })
    .await;
    assert_eq!(
        snap.services.iter().find(|s| s.name == "web"),
        Some(&stored)
    );

    let moved = Mount {
        strip_prefix: true,
        ..mount("a.test", "/", "api")
    };
    assert_eq!(c.update_mount(&moved).await.unwrap(), moved);
    let snap = next_snapshot(&mut events, |s| {
        s.mounts.first().map(|m| m.service.as_str()) == Some("api")
    })
    .await;
    assert_eq!(snap.mounts, vec![moved]);

    // 404 for what does not exist, 422 for an unknown service, 400 for bad input.
    let ghost = coordinator_api::Service {
        name: "ghost".into(),
        ..Default::default()
    };
    assert_eq!(status(c.update_service(&ghost).await).0, 404);
    assert_eq!(
        status(c.update_mount(&mount("b.test", "/", "web")).await).0,
        404
    );
    assert_eq!(
        status(c.update_mount(&mount("a.test", "/", "nope")).await),
        (422, Some("service".into()))
    );
    web.origins[0].url = "ftp://x".into();
    assert_eq!(
        status(c.update_service(&web).await),
        (400, Some("origins.url".into()))
    );
    srv.stop().await;
}

/// A split may only name services that exist, and a service a split still names cannot be
/// deleted (as one a mount routes to cannot): the edge never meets a dangling split.
#[tokio::test]
async fn splits_name_existing_services_and_keep_them_from_deletion() {
    let srv = Server::start().await;
    let c = srv.admin();
    for name in ["web", "canary"] {
        c.create_service_spec(&coordinator_api::Service {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let split = |service: &str, weight| coordinator_api::Split {
        service: service.into(),
        weight,
    };
    let with_splits = |splits| Mount {
        splits,
        ..mount("a.test", "/", "web")
    };
    assert_eq!(
        status(
            c.add_mount(&with_splits(vec![split("web", 95), split("ghost", 5)]))
                .await
        ),
        (409, Some("splits".into()))
    );
    assert!(c.list_mounts().await.unwrap().is_empty(), "nothing stored");
    c.add_mount(&with_splits(vec![split("web", 95), split("canary", 5)]))
        .await
        .unwrap();
    assert_eq!(
        status(
            c.update_mount(&with_splits(vec![split("web", 50), split("ghost", 50)]))
                .await
        ),
        (409, Some("splits".into()))
    );
    // canary is no mount's service, but a split sends it traffic.
    match c.delete_service("canary").await {
        Err(ClientError::Http(409, e)) => {
            assert!(e.error.contains("split target"), "{}", e.error)
        }
        other => panic!("expected 409, got {other:?}"),
    }
    c.update_mount(&with_splits(vec![])).await.unwrap();
    c.delete_service("canary").await.unwrap();
    srv.stop().await;
}

async fn next_event(
    events: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("timed out waiting for a watch line")
        .expect("watch stream ended")
        .expect("watch error")
}

/// A subscriber resuming from a revision still in the change log gets the changes as one delta
/// (not a snapshot), then a delta per change; applying them gives exactly the state a fresh
/// snapshot has. Behind the compaction horizon it gets a snapshot.
#[tokio::test]
async fn resumed_watch_gets_deltas_that_converge_to_the_snapshot() {
    let srv = Server::start().await;
    let c = srv.admin();
    for name in ["web", "old"] {
        c.create_service(&CreateService {
            name: name.into(),
            lb_policy: Default::default(),
        })
        .await
        .unwrap();
    }
    c.add_mount(&mount("a.test", "/", "web")).await.unwrap();
    c.add_mount(&mount("o.test", "/", "old")).await.unwrap();
    let node = srv.node();
    let have = node.snapshot().await.unwrap();

    // While the subscriber is away: a new service and a mount on it, the old one removed
    // (mount first), a region, and an edge heartbeat (observed state).
    c.create_service(&CreateService {
        name: "api".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    c.add_mount(&mount("b.test", "/v1", "api")).await.unwrap();
    c.delete_mount("o.test", "/").await.unwrap();
    c.delete_service("old").await.unwrap();
    c.create_region(&Region {
        name: "ams".into(),
        latitude: Some(52.4),
        longitude: Some(4.9),
        admin_state: Default::default(),
    })
    .await
    .unwrap();
    node.heartbeat(&EdgeHeartbeat {
        info: EdgeInfo {
            id: "ams-1".into(),
            region: "ams".into(),
            public_ips: vec![],
            http_addr: None,
            https_addr: None,
            tunnel_addr: None,
            anycast: None,
            healthy_services: None,
        },
        agents: vec![],
    })
    .await
    .unwrap();
    let fresh = node.snapshot().await.unwrap();
    assert!(fresh.revision > have.revision);

    let mut events = node
        .watch_deltas(Some((have.revision, have.observed_version)))
        .await
        .unwrap();
    let WatchEvent::Delta(d) = next_event(&mut events).await else {
        panic!("a resume within the change log must start with a delta");
    };
    assert_eq!(
        (d.from_revision, d.revision),
        (have.revision, fresh.revision)
    );
    let ops: Vec<String> = d
        .ops
        .iter()
        .map(|op| {
            serde_json::to_value(op).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ops,
        [
            "put_region",
            "put_service",
            "put_mount",
            "delete_mount",
            "delete_service"
        ]
    );
    let mut held = coordinator_api::delta::apply(&have, &d).unwrap();
    assert_eq!(held, fresh);

    // Live: one mount more is one small delta, not the snapshot.
    c.add_mount(&mount("c.test", "/", "web")).await.unwrap();
    let WatchEvent::Delta(d) = next_event(&mut events).await else {
        panic!("a change on a delta stream must arrive as a delta");
    };
    assert_eq!(d.ops.len(), 1);
    held = coordinator_api::delta::apply(&held, &d).unwrap();
    assert_eq!(held, node.snapshot().await.unwrap());

    // A stream that did not ask for deltas still gets snapshots.
    let mut plain = node
        .watch_from(Some((have.revision, have.observed_version)))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut plain).await,
        WatchEvent::Snapshot(_)
    ));

    // Behind the compaction horizon: a snapshot.
    let now = held.revision;
    srv.hub.store().call(move |s| s.compact(now)).await.unwrap();
    let mut behind = node
        .watch_deltas(Some((have.revision, have.observed_version)))
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut behind).await, WatchEvent::Snapshot(s) if s == held),
        "a compacted resume must get a snapshot"
    );
    srv.stop().await;
}

/// The real subscriber, cold-started from a cache that is a few changes old, catches up by
/// delta and ends up with exactly the coordinator's snapshot (and persists it).
#[tokio::test]
async fn subscriber_catches_up_from_its_cache_by_delta() {
    let srv = Server::start().await;
    let c = srv.admin();
    c.create_service(&CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let node = srv.node();
    let old = node.snapshot().await.unwrap();
    let cache = srv.dir.path().join("sub-cache.json");
    coordinator_api::subscriber::persist_cache(&cache, &old).unwrap();
    c.add_mount(&mount("a.test", "/", "web")).await.unwrap();
    let (mut rx, task) = coordinator_api::Subscriber::spawn(coordinator_api::SubscriberConfig {
        client: node.clone(),
        cache_path: Some(cache.clone()),
    });
    let fresh = node.snapshot().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.as_deref() == Some(&fresh)),
    )
    .await
    .unwrap()
    .unwrap();
    c.add_mount(&mount("b.test", "/", "web")).await.unwrap();
    let fresh = node.snapshot().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.as_deref() == Some(&fresh)),
    )
    .await
    .unwrap()
    .unwrap();
    task.abort();
    srv.stop().await;
}

/// The coordinator compacts its change log on its own: with "keep 3 revisions, no time", a
/// subscriber that fell further behind resumes with a snapshot, a recent one with a delta.
#[tokio::test]
async fn change_log_is_compacted_automatically() {
    let srv = Server::start_with(Tuning {
        progress_every: PROGRESS,
        retention: crate::compaction::Retention {
            revisions: 3,
            keep_for: Duration::ZERO,
        },
        compact_every: Duration::from_millis(20),
    })
    .await;
    let c = srv.admin();
    c.create_service(&CreateService {
        name: "web".into(),
        lb_policy: Default::default(),
    })
    .await
    .unwrap();
    let node = srv.node();
    let early = node.snapshot().await.unwrap();
    for i in 0..8 {
        c.add_mount(&mount(&format!("m{i}.test"), "/", "web"))
            .await
            .unwrap();
    }
    let latest = node.snapshot().await.unwrap().revision;
    // Wait for the compactor (no other signal: the store says when history is gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = srv
            .hub
            .store()
            .call(move |s| s.changes_since(latest - 5, 10))
            .await;
        if matches!(r, Err(crate::store::StoreError::Compacted { .. })) {
            break;
        }
        assert!(Instant::now() < deadline, "history was never compacted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last three revisions are still there.
    let kept = srv
        .hub
        .store()
        .call(move |s| s.changes_since(latest - 3, 10))
        .await
        .unwrap();
    assert_eq!(kept.len(), 3);
    let mut behind = node
        .watch_deltas(Some((early.revision, early.observed_version)))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut behind).await,
        WatchEvent::Snapshot(_)
    ));
    let recent = node.snapshot().await.unwrap();
    c.add_mount(&mount("late.test", "/", "web")).await.unwrap();
    let mut resumed = node
        .watch_deltas(Some((recent.revision, recent.observed_version)))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut resumed).await,
        WatchEvent::Delta(_)
    ));
    srv.stop().await;
}

//! One conformance suite for every [`Store`] backend: the same generic checks run on SQLite and
//! on a real 3-member etcd cluster (Debian's etcd-server; skipped with a printed reason when
//! `etcd` is not installed). etcd-only behaviour (several coordinators sharing one cluster,
//! leader election) is tested beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/etcd_cluster.rs"]
mod etcd_cluster;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use coordinator::store::{
    ApiTokenRow, Change, EtcdOptions, EtcdStore, Scope, SqliteStore, Store, StoreError, StoreEvent,
    StoreHandle,
};
use coordinator_api::{
    AdminState, AgentTokenRecord, Client, CreateService, DnsRecord, DnsRecordType, LbPolicy, Mount,
    Region, Revision, Service,
};
use etcd_cluster::{EtcdCluster, have_etcd};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

// ---- helpers ----

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!(
            "mrd-conformance-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn svc(name: &str) -> Service {
    Service {
        name: name.into(),
        lb_policy: LbPolicy::RoundRobin,
        ..Default::default()
    }
}

fn mount(host: &str, prefix: &str, service: &str) -> Mount {
    Mount {
        host: host.into(),
        path_prefix: prefix.into(),
        service: service.into(),
        strip_prefix: true,
        ..Default::default()
    }
}

fn token(id: &str, service: &str) -> AgentTokenRecord {
    AgentTokenRecord {
        id: id.into(),
        service: service.into(),
        sha256: format!("{id:0>64}"),
        created_at_ms: 42,
    }
}

fn region(name: &str) -> Region {
    Region {
        name: name.into(),
        latitude: Some(1.0),
        longitude: Some(2.0),
        admin_state: AdminState::Auto,
    }
}

fn sqlite(dir: &TempDir) -> StoreHandle {
    StoreHandle::new(Box::new(
        SqliteStore::open(&dir.0.join("coordinator.db")).unwrap(),
    ))
}

fn etcd_opts(cluster: &EtcdCluster, prefix: &str, node: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: cluster.endpoints.clone(),
        prefix: prefix.into(),
        lease_ttl: Duration::from_secs(2),
        node: node.into(),
    }
}

async fn etcd(cluster: &EtcdCluster, prefix: &str) -> StoreHandle {
    StoreHandle::new(Box::new(
        EtcdStore::connect(etcd_opts(cluster, prefix, "test"))
            .await
            .unwrap(),
    ))
}

/// Runs a synchronous check with the store, on the blocking pool like the coordinator does.
async fn with<R: Send + 'static>(
    h: &StoreHandle,
    f: impl FnOnce(&mut dyn Store) -> R + Send + 'static,
) -> R {
    h.call(move |s| Ok(f(s))).await.unwrap()
}

/// Next feed event, or a panic after `within`.
async fn next(feed: &mut mpsc::Receiver<StoreEvent>, within: Duration) -> StoreEvent {
    tokio::time::timeout(within, feed.recv())
        .await
        .expect("no change-feed event in time")
        .expect("change feed ended")
}

/// Changes from the feed until `until` is reached (no snapshot expected).
async fn changes_until(feed: &mut mpsc::Receiver<StoreEvent>, until: Revision) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    while out.last().map_or(0, |c| c.revision) < until {
        match next(feed, Duration::from_secs(10)).await {
            StoreEvent::Changes(c) => out.extend(c),
            StoreEvent::Snapshot(d) => panic!("unexpected snapshot at {}", d.revision),
        }
    }
    out
}

async fn until_true(rx: &mut watch::Receiver<bool>, within: Duration) {
    tokio::time::timeout(within, rx.wait_for(|v| *v))
        .await
        .expect("condition not reached in time")
        .unwrap();
}

// ---- the generic suite ----

/// Every write gets a strictly greater revision; failed writes (conflicts, unknown references,
/// objects in use) change nothing; `desired()` reads one consistent revision.
fn revisions_and_conflicts(s: &mut dyn Store) {
    let r0 = s.revision().unwrap();
    let r1 = s.create_region(&region("ams")).unwrap();
    let r2 = s.create_service(&svc("web")).unwrap();
    let r3 = s.add_mount(&mount("a.test", "/", "web")).unwrap();
    let r4 = s.create_agent_token(&token("t1", "web")).unwrap();
    let r5 = s.set_region_admin_state("ams", AdminState::Down).unwrap();
    let revs = [r0, r1, r2, r3, r4, r5];
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    assert_eq!(s.revision().unwrap(), r5);

    let d = s.desired().unwrap();
    assert_eq!(d.revision, r5);
    assert_eq!(
        d.regions,
        vec![Region {
            admin_state: AdminState::Down,
            ..region("ams")
        }]
    );
    assert_eq!(d.services, vec![svc("web")]);
    assert_eq!(d.mounts, vec![mount("a.test", "/", "web")]);
    assert_eq!(d.agent_tokens, vec![token("t1", "web")]);

    // Conflicts and bad references: errors, and the revision does not move.
    let dup = |r: Result<Revision, StoreError>| matches!(r, Err(StoreError::Duplicate { .. }));
    assert!(dup(s.create_region(&region("ams"))));
    assert!(dup(s.create_service(&svc("web"))));
    assert!(dup(s.add_mount(&mount("a.test", "/", "web"))));
    assert!(dup(s.create_agent_token(&token("t1", "web"))));
    assert!(matches!(
        s.add_mount(&mount("b.test", "/", "nope")),
        Err(StoreError::UnknownService(_))
    ));
    assert!(matches!(
        s.create_agent_token(&token("t2", "nope")),
        Err(StoreError::UnknownService(_))
    ));
    assert!(matches!(s.delete_service("web"), Err(StoreError::InUse(_))));
    assert!(matches!(
        s.delete_service("nope"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete_mount("x.test", "/"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.revoke_agent_token("nope"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.set_region_admin_state("nope", AdminState::Up),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.revision().unwrap(), r5);

    // Deletes are changes too, with greater revisions.
    let r6 = s.delete_mount("a.test", "/").unwrap();
    let r7 = s.revoke_agent_token("t1").unwrap();
    let r8 = s.delete_service("web").unwrap();
    assert!(r5 < r6 && r6 < r7 && r7 < r8);
    let d = s.desired().unwrap();
    assert!(d.services.is_empty() && d.mounts.is_empty() && d.agent_tokens.is_empty());
    assert_eq!(d.revision, r8);
    // Lists agree with the snapshot; mounts come back ordered by (host, prefix).
    s.create_service(&svc("api")).unwrap();
    for (h, p) in [
        ("b.test", "/x"),
        ("a.test-b", "/"),
        ("a.test", "/z"),
        ("a.test", "/a"),
    ] {
        s.add_mount(&mount(h, p, "api")).unwrap();
    }
    let m: Vec<(String, String)> = s
        .list_mounts()
        .unwrap()
        .into_iter()
        .map(|m| (m.host, m.path_prefix))
        .collect();
    let mut sorted = m.clone();
    sorted.sort();
    assert_eq!(m, sorted);
    assert_eq!(s.list_services().unwrap(), vec![svc("api")]);
    assert_eq!(s.list_regions().unwrap().len(), 1);
}

/// API tokens: hashed rows, scope updates, the last admin is kept, and the audit log names who
/// did what, in order, with desired changes carrying their revision.
fn api_tokens_and_audit(s: &mut dyn Store) {
    let row = |id: &str, sha: &str, scope| ApiTokenRow {
        id: id.into(),
        sha256: sha.into(),
        scope,
        description: String::new(),
        created_at_ms: 1,
    };
    let start = s.list_audit(0, 10_000).unwrap().last().map_or(0, |a| a.id);
    let rev = s.revision().unwrap();
    assert!(s.put_api_token(&row("a", "aa", Scope::Admin)).unwrap());
    assert!(!s.put_api_token(&row("a", "aa", Scope::Admin)).unwrap());
    assert!(s.put_api_token(&row("b", "bb", Scope::Node)).unwrap());
    assert!(matches!(
        s.put_api_token(&row("b", "b2", Scope::Read)),
        Err(StoreError::Duplicate { .. })
    ));
    // Same hash again with another scope: the scope follows.
    assert!(!s.put_api_token(&row("b", "bb", Scope::Read)).unwrap());
    assert_eq!(s.api_token("bb").unwrap(), Some((Scope::Read, "b".into())));
    assert_eq!(s.api_token("aa").unwrap(), Some((Scope::Admin, "a".into())));
    assert_eq!(s.api_token("cc").unwrap(), None);
    assert_eq!(s.count_api_tokens(Scope::Admin).unwrap(), 1);
    assert_eq!(s.list_api_tokens().unwrap().len(), 2);
    assert_eq!(
        s.revision().unwrap(),
        rev,
        "API tokens are not desired state"
    );
    assert!(matches!(s.revoke_api_token("a"), Err(StoreError::InUse(_))));
    assert!(matches!(
        s.revoke_api_token("zz"),
        Err(StoreError::NotFound { .. })
    ));
    s.set_actor("token:a");
    s.revoke_api_token("b").unwrap();
    let r = s.create_service(&svc("audited")).unwrap();
    s.set_actor("system");
    assert_eq!(s.api_token("bb").unwrap(), None);

    let audit = s.list_audit(start, 100).unwrap();
    let got: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|a| (a.actor.as_str(), a.action.as_str(), a.target.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("system", "api_token.put", "a"),
            ("system", "api_token.put", "b"),
            ("token:a", "api_token.delete", "b"),
            ("token:a", "service.put", "audited"),
        ]
    );
    assert!(audit.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(audit[3].revision, r);
    assert_eq!(audit[3].detail.as_ref().unwrap()["name"], "audited");
    // Paging by id.
    assert_eq!(s.list_audit(audit[1].id, 1).unwrap()[0].id, audit[2].id);

    assert_eq!(s.load_observed().unwrap(), None);
    s.save_observed("[1]").unwrap();
    s.save_observed("[2]").unwrap();
    assert_eq!(s.load_observed().unwrap().as_deref(), Some("[2]"));
}

/// The change feed from a revision delivers every later change, in order, once, with the
/// object after the change (or none for a delete); a feed from a mid-point resumes there.
async fn watch_delivers_every_change_in_order(h: &StoreHandle) {
    let start = with(h, |s| s.revision().unwrap()).await;
    let mut feed = h.watch(start);
    let writes = with(h, |s| {
        let mut w: Vec<(Revision, &str, String, bool)> = Vec::new();
        for i in 0..20 {
            let name = format!("w{i}");
            w.push((
                s.create_service(&svc(&name)).unwrap(),
                "service",
                name.clone(),
                true,
            ));
            let host = format!("{name}.test");
            w.push((
                s.add_mount(&mount(&host, "/", &name)).unwrap(),
                "mount",
                format!("{host}/"),
                true,
            ));
            if i % 3 == 0 {
                w.push((
                    s.delete_mount(&host, "/").unwrap(),
                    "mount",
                    format!("{host}/"),
                    false,
                ));
            }
        }
        w
    })
    .await;
    let last = writes.last().unwrap().0;
    let got = changes_until(&mut feed, last).await;
    let got_keys: Vec<(Revision, &str, &str, bool)> = got
        .iter()
        .map(|c| {
            (
                c.revision,
                c.object.as_str(),
                c.key.as_str(),
                c.value.is_some(),
            )
        })
        .collect();
    let want: Vec<(Revision, &str, &str, bool)> = writes
        .iter()
        .map(|(r, o, k, put)| (*r, *o, k.as_str(), *put))
        .collect();
    assert_eq!(got_keys, want);
    assert_eq!(got[1].value.as_ref().unwrap()["service"], "w0");

    // Resume from the middle: exactly the changes after that revision.
    let mid = writes[10].0;
    let mut resumed = h.watch(mid);
    let again = changes_until(&mut resumed, last).await;
    assert_eq!(again.as_slice(), &got[11..]);

    // Changes made after the feed caught up arrive too (the feed waits, then wakes).
    let more = with(h, |s| s.create_service(&svc("late")).unwrap()).await;
    let tail = changes_until(&mut feed, more).await;
    assert_eq!(tail.len(), 1);
    assert_eq!((tail[0].revision, tail[0].key.as_str()), (more, "late"));
}

/// Two stores (coordinators) on one backend race to create the same objects: each name is
/// created exactly once; the loser gets a conflict, never a silent overwrite.
async fn conflicting_creates(a: &StoreHandle, b: &StoreHandle) {
    let mut tasks = Vec::new();
    for (who, h) in [("a", a.clone()), ("b", b.clone())] {
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..15 {
                let name = format!("race{i}");
                let r = h
                    .call(move |s| {
                        Ok(s.create_service(&Service {
                            name,
                            lb_policy: if who == "a" {
                                LbPolicy::P2c
                            } else {
                                LbPolicy::RoundRobin
                            },
                            ..Default::default()
                        }))
                    })
                    .await
                    .unwrap();
                match r {
                    Ok(rev) => won.push((i, rev)),
                    Err(StoreError::Duplicate { .. }) => {}
                    Err(e) => panic!("{who}: unexpected error {e}"),
                }
            }
            won
        }));
    }
    let wa = tasks.remove(0).await.unwrap();
    let wb = tasks.remove(0).await.unwrap();
    assert_eq!(wa.len() + wb.len(), 15, "a won {wa:?}, b won {wb:?}");
    let mut revs: Vec<Revision> = wa.iter().chain(&wb).map(|(_, r)| *r).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 15, "every winning write has its own revision");
    // Both see the same winners.
    let da = with(a, |s| s.desired().unwrap()).await;
    let db = with(b, |s| s.desired().unwrap()).await;
    assert_eq!(da.services, db.services);
    for (i, _) in &wa {
        let s = da.services.iter().find(|s| s.name == format!("race{i}"));
        assert!(matches!(s.unwrap().lb_policy, LbPolicy::P2c));
    }
}

/// After compaction, a feed from a compacted revision starts with a snapshot of the current
/// state, then continues with changes; a feed from just before the compaction point still
/// gets plain changes.
async fn compaction_resnapshots(h: &StoreHandle) {
    let revs = with(h, |s| {
        (0..5)
            .map(|i| s.create_service(&svc(&format!("c{i}"))).unwrap())
            .collect::<Vec<_>>()
    })
    .await;
    let (r1, r4, r5) = (revs[0], revs[3], revs[4]);
    with(h, move |s| s.compact(r4).unwrap()).await;
    assert!(matches!(
        with(h, move |s| s.changes_since(r1, 100)).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut feed = h.watch(r1);
    match next(&mut feed, Duration::from_secs(10)).await {
        StoreEvent::Snapshot(d) => {
            assert_eq!(d.revision, r5);
            assert_eq!(d, with(h, |s| s.desired().unwrap()).await);
        }
        StoreEvent::Changes(c) => panic!("expected a snapshot, got {c:?}"),
    }
    let r6 = with(h, |s| s.create_service(&svc("after")).unwrap()).await;
    let c = changes_until(&mut feed, r6).await;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].key, "after");

    // Just before the compaction point: history is complete from there.
    let mut feed = h.watch(r4 - 1);
    let c = changes_until(&mut feed, r6).await;
    let got: Vec<Revision> = c.iter().map(|c| c.revision).collect();
    assert_eq!(got, [r4, r5, r6]);
}

/// `update_service` and `update_mount` replace the whole object (every field, including ones
/// with serde defaults), bump the revision, log a change, and refuse what create would refuse.
fn updates_replace_whole_objects(s: &mut dyn Store) {
    s.create_service(&svc("web")).unwrap();
    s.create_service(&svc("api")).unwrap();
    s.add_mount(&mount("a.test", "/", "web")).unwrap();
    let before = s.revision().unwrap();

    let web = Service {
        name: "web".into(),
        lb_policy: LbPolicy::WeightedRoundRobin,
        origins: vec![
            coordinator_api::Origin {
                url: "https://10.0.0.1:8443".into(),
                weight: Some(3),
                h2: true,
                ca: Some("/etc/meridian/origin-ca.pem".into()),
            },
            coordinator_api::Origin {
                url: "http://10.0.0.2:8080".into(),
                ..Default::default()
            },
        ],
        sticky: Some(coordinator_api::StickyCookie {
            name: "mrd_sticky".into(),
        }),
        health_check: Some(coordinator_api::HealthCheck {
            path: "/healthz".into(),
            ..Default::default()
        }),
        circuit_breaker: Some(Default::default()),
        retry_budget: Some(coordinator_api::RetryBudget {
            percent: 30,
            min_per_sec: 1,
        }),
        concurrency: Some(coordinator_api::ConcurrencyLimits {
            soft: Some(10),
            hard: Some(20),
        }),
        require_mtls: true,
        tcp_ports: vec![coordinator_api::TcpPort {
            port: 6379,
            proxy_protocol: true,
        }],
    };
    let r1 = s.update_service(&web).unwrap();
    assert!(r1 > before);
    assert_eq!(s.revision().unwrap(), r1);
    let services = s.list_services().unwrap();
    assert_eq!(services.iter().find(|x| x.name == "web"), Some(&web));
    assert_eq!(s.desired().unwrap().services, services);

    let moved = Mount {
        strip_prefix: false,
        ..mount("a.test", "/", "api")
    };
    let r2 = s.update_mount(&moved).unwrap();
    assert!(r2 > r1);
    assert_eq!(s.list_mounts().unwrap(), vec![moved.clone()]);

    let changes = s.changes_since(before, 10).unwrap();
    let objs: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| (c.object.as_str(), c.key.as_str()))
        .collect();
    assert_eq!(objs, [("service", "web"), ("mount", "a.test/")]);
    assert_eq!(
        changes[0].value.as_ref().unwrap(),
        &serde_json::to_value(&web).unwrap()
    );

    // Refused like create refuses, and nothing is written.
    assert!(matches!(
        s.update_service(&svc("nope")),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.update_mount(&mount("b.test", "/", "web")),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.update_mount(&mount("a.test", "/", "missing")),
        Err(StoreError::UnknownService(_))
    ));
    assert_eq!(s.revision().unwrap(), r2);
    assert_eq!(s.list_mounts().unwrap(), vec![moved]);
}

/// Splits name existing services only, and keep them from deletion, on either backend.
fn splits_name_existing_services(s: &mut dyn Store) {
    s.create_service(&svc("web")).unwrap();
    s.create_service(&svc("canary")).unwrap();
    let split = |service: &str| coordinator_api::Split {
        service: service.into(),
        weight: 1,
    };
    let mut m = mount("s.test", "/", "web");
    m.splits = vec![split("web"), split("ghost")];
    assert!(matches!(
        s.add_mount(&m),
        Err(StoreError::Conflict {
            field: "splits",
            ..
        })
    ));
    m.splits = vec![split("web"), split("canary")];
    s.add_mount(&m).unwrap();
    m.splits = vec![split("ghost")];
    assert!(matches!(
        s.update_mount(&m),
        Err(StoreError::Conflict {
            field: "splits",
            ..
        })
    ));
    assert!(matches!(
        s.delete_service("canary"),
        Err(StoreError::InUse(_))
    ));
    m.splits.clear();
    s.update_mount(&m).unwrap();
    s.delete_service("canary").unwrap();
}

fn dns(name: &str, t: DnsRecordType, values: &[&str]) -> DnsRecord {
    DnsRecord {
        name: name.into(),
        zone: "example.com".into(),
        rtype: t,
        ttl: 60,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

/// GeoDNS zone records: put creates or replaces an RRset, a CNAME stays alone at its name
/// (refused both ways, nothing written), delete by (name, type), all in the snapshot and the
/// change feed.
fn dns_records(s: &mut dyn Store) {
    let before = s.revision().unwrap();
    let www = dns(
        "www.example.com",
        DnsRecordType::Cname,
        &["edge.meridian.test"],
    );
    let txt = dns("example.com", DnsRecordType::Txt, &["v=spf1 -all"]);
    let mx = dns("example.com", DnsRecordType::Mx, &["10 mail.example.com"]);
    let r1 = s.put_dns_record(&www).unwrap();
    assert!(r1 > before);
    s.put_dns_record(&txt).unwrap();
    let r3 = s.put_dns_record(&mx).unwrap();
    assert_eq!(
        s.list_dns_records().unwrap(),
        vec![txt.clone(), mx.clone(), www.clone()],
        "sorted by name, then type"
    );
    assert_eq!(s.desired().unwrap().records.len(), 3);

    // A CNAME beside other data, and other data beside a CNAME: refused, nothing written.
    let conflict = |r: Result<Revision, StoreError>| {
        matches!(r, Err(StoreError::Conflict { field: "type", .. }))
    };
    assert!(conflict(s.put_dns_record(&dns(
        "example.com",
        DnsRecordType::Cname,
        &["x.example.net"]
    ))));
    assert!(conflict(s.put_dns_record(&dns(
        "www.example.com",
        DnsRecordType::Txt,
        &["hello"]
    ))));
    assert_eq!(s.revision().unwrap(), r3);

    // Replacing an RRset keeps one set per (name, type).
    let txt2 = dns("example.com", DnsRecordType::Txt, &["a", "b"]);
    let r4 = s.put_dns_record(&txt2).unwrap();
    let records = s.list_dns_records().unwrap();
    assert_eq!(records.len(), 3);
    assert!(records.contains(&txt2) && !records.contains(&txt));

    let r5 = s
        .delete_dns_record("www.example.com", DnsRecordType::Cname)
        .unwrap();
    assert!(r5 > r4);
    assert!(matches!(
        s.delete_dns_record("www.example.com", DnsRecordType::Cname),
        Err(StoreError::NotFound { .. })
    ));
    // From just before the first put: on etcd an empty prefix has revision 0, whose history
    // another suite's compaction may have dropped.
    let changes = s.changes_since(r1 - 1, 10).unwrap();
    let objs: Vec<(&str, &str, bool)> = changes
        .iter()
        .map(|c| (c.object.as_str(), c.key.as_str(), c.value.is_some()))
        .collect();
    assert_eq!(
        objs,
        [
            ("dns_record", "www.example.com/CNAME", true),
            ("dns_record", "example.com/TXT", true),
            ("dns_record", "example.com/MX", true),
            ("dns_record", "example.com/TXT", true),
            ("dns_record", "www.example.com/CNAME", false),
        ]
    );
    assert_eq!(
        changes[3].value.as_ref().unwrap(),
        &serde_json::to_value(&txt2).unwrap()
    );
}

// ---- SQLite ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_revisions_and_conflicts() {
    let dir = TempDir::new("sqlite-revs");
    with(&sqlite(&dir), revisions_and_conflicts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_api_tokens_and_audit() {
    let dir = TempDir::new("sqlite-tokens");
    with(&sqlite(&dir), api_tokens_and_audit).await;
}

/// `put_secret_if_absent` (the tunnel client CA): the first value written stays, whoever writes
/// next through `a` or `b` (two coordinators sharing the backend, or one restarting), and it is
/// not desired state: no revision moves.
async fn secrets_first_writer_wins(a: &StoreHandle, b: &StoreHandle) {
    let rev = with(a, |s| s.revision().unwrap()).await;
    let first = with(a, |s| s.put_secret_if_absent("ca", "first").unwrap()).await;
    assert_eq!(first, "first");
    let second = with(b, |s| s.put_secret_if_absent("ca", "second").unwrap()).await;
    assert_eq!(second, "first", "the first writer wins");
    let other = with(b, |s| s.put_secret_if_absent("other", "x").unwrap()).await;
    assert_eq!(other, "x");
    assert_eq!(with(b, |s| s.revision().unwrap()).await, rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_secrets_first_writer_wins() {
    let dir = TempDir::new("sqlite-secrets");
    let a = sqlite(&dir);
    secrets_first_writer_wins(&a, &a).await;
    drop(a);
    // And across a reopen (a restarted coordinator keeps its CA).
    let again = with(&sqlite(&dir), |s| {
        s.put_secret_if_absent("ca", "third").unwrap()
    })
    .await;
    assert_eq!(again, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_updates_replace_whole_objects() {
    let dir = TempDir::new("sqlite-updates");
    with(&sqlite(&dir), updates_replace_whole_objects).await;
    // And the whole object survives a reopen (the `spec` column).
    let svc = with(&sqlite(&dir), |s| s.list_services().unwrap()).await;
    let web = svc.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.origins.len(), 2);
    assert_eq!(web.origins[0].weight, Some(3));
    assert!(web.sticky.is_some() && web.health_check.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_splits_name_existing_services() {
    let dir = TempDir::new("sqlite-splits");
    with(&sqlite(&dir), splits_name_existing_services).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dns_records() {
    let dir = TempDir::new("sqlite-dns");
    with(&sqlite(&dir), dns_records).await;
    // Records survive a reopen.
    let n = with(&sqlite(&dir), |s| s.list_dns_records().unwrap().len()).await;
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_watch_delivers_every_change_in_order() {
    let dir = TempDir::new("sqlite-watch");
    watch_delivers_every_change_in_order(&sqlite(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conflicting_creates() {
    let dir = TempDir::new("sqlite-conflicts");
    // Two connections on one file: SQLite's own write lock decides.
    conflicting_creates(&sqlite(&dir), &sqlite(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compaction_resnapshots() {
    let dir = TempDir::new("sqlite-compaction");
    compaction_resnapshots(&sqlite(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_always_the_leader() {
    let dir = TempDir::new("sqlite-leader");
    let mut l = with(&sqlite(&dir), |s| s.leadership()).await;
    assert!(*l.borrow_and_update());
}

// ---- etcd (3 members) ----

/// The generic suite on etcd, each part under its own key prefix; compaction last, since it
/// compacts the whole cluster's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conformance() {
    if !have_etcd("etcd_conformance") {
        return;
    }
    let cluster = EtcdCluster::start("conformance", 23700, 3);
    with(&etcd(&cluster, "/c1").await, revisions_and_conflicts).await;
    with(&etcd(&cluster, "/c2").await, api_tokens_and_audit).await;
    watch_delivers_every_change_in_order(&etcd(&cluster, "/c3").await).await;
    conflicting_creates(&etcd(&cluster, "/c4").await, &etcd(&cluster, "/c4").await).await;
    with(&etcd(&cluster, "/c6").await, updates_replace_whole_objects).await;
    compaction_resnapshots(&etcd(&cluster, "/c5").await).await;
    with(&etcd(&cluster, "/c7").await, dns_records).await;
    with(&etcd(&cluster, "/c8").await, splits_name_existing_services).await;
    secrets_first_writer_wins(&etcd(&cluster, "/c9").await, &etcd(&cluster, "/c9").await).await;
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

const ADMIN: &str = "mrd_api_conformance_conformanceadminsecret";

struct Coordinator {
    client: Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), coordinator::Error>>,
    _dir: TempDir,
}

async fn start_coordinator(cluster: &EtcdCluster, prefix: &str) -> Coordinator {
    let dir = TempDir::new("coord");
    let addr = free_addr();
    let mut cfg = coordinator::Config::new(addr, dir.0.clone());
    cfg.admin_token = Some(ADMIN.into());
    cfg.store = coordinator::StoreKind::Etcd;
    cfg.etcd_endpoints = cluster.endpoints.clone();
    cfg.etcd_prefix = prefix.into();
    cfg.etcd_lease_ttl = 2;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(coordinator::run(cfg, shutdown.clone()));
    let client = Client::new(format!("http://{addr}"), ADMIN).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.status().await.is_err() {
        assert!(Instant::now() < deadline, "coordinator on {addr} not ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Coordinator {
        client,
        shutdown,
        task,
        _dir: dir,
    }
}

async fn eventually_has_service(c: &Client, name: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        if c.snapshot()
            .await
            .unwrap()
            .services
            .iter()
            .any(|s| s.name == name)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{name} never reached the other coordinator's snapshot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two coordinator processes' worth of state (in-process `coordinator::run`) on one etcd:
/// a write through either reaches the other's snapshot (and so its edges' watch streams), and
/// the same create through both at once succeeds once and conflicts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_two_coordinators_see_each_others_writes() {
    if !have_etcd("etcd_two_coordinators_see_each_others_writes") {
        return;
    }
    let cluster = EtcdCluster::start("two-coords", 23710, 3);
    let a = start_coordinator(&cluster, "/shared").await;
    let b = start_coordinator(&cluster, "/shared").await;
    assert_eq!(a.client.status().await.unwrap().backend, "etcd");

    let create = |name: &str| CreateService {
        name: name.into(),
        lb_policy: Default::default(),
    };
    a.client.create_service(&create("from-a")).await.unwrap();
    eventually_has_service(&b.client, "from-a").await;
    b.client.create_service(&create("from-b")).await.unwrap();
    eventually_has_service(&a.client, "from-b").await;
    let (sa, sb) = (
        a.client.snapshot().await.unwrap(),
        b.client.snapshot().await.unwrap(),
    );
    assert_eq!(sa.revision, sb.revision);
    assert_eq!(sa.services, sb.services);

    let both = create("both");
    let (ra, rb) = tokio::join!(
        a.client.create_service(&both),
        b.client.create_service(&both)
    );
    let statuses = [
        ra.as_ref().err().and_then(|e| e.status()),
        rb.as_ref().err().and_then(|e| e.status()),
    ];
    assert!(
        ra.is_ok() != rb.is_ok() && statuses.contains(&Some(409)),
        "exactly one create wins, the other conflicts: {ra:?} {rb:?}"
    );
    // A mount through one, on the service created through the other.
    a.client
        .add_mount(&mount("x.test", "/", "from-b"))
        .await
        .unwrap();
    let t0 = Instant::now();
    while b.client.snapshot().await.unwrap().mounts.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in [a, b] {
        c.shutdown.cancel();
        c.task.await.unwrap().unwrap();
    }
}

/// Leader election: of two stores on one prefix exactly one leads; revoking the leader's
/// lease (its session dying) hands leadership to the other within a few seconds, and the old
/// leader knows it lost. Dropping the leader (coordinator shutdown) hands over too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_election_fails_over() {
    if !have_etcd("etcd_leader_election_fails_over") {
        return;
    }
    let cluster = EtcdCluster::start("election", 23720, 3);
    let a = EtcdStore::connect(etcd_opts(&cluster, "/elect", "a"))
        .await
        .unwrap();
    let b = EtcdStore::connect(etcd_opts(&cluster, "/elect", "b"))
        .await
        .unwrap();
    let (mut la, mut lb) = (a.leadership(), b.leadership());
    let t0 = Instant::now();
    while !(*la.borrow() || *lb.borrow()) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "nobody became leader"
        );
        tokio::select! {
            _ = la.changed() => {}
            _ = lb.changed() => {}
        }
    }
    assert!(*la.borrow() != *lb.borrow(), "exactly one leader");
    let (leader, mut lead_rx, follower, mut follow_rx) = if *la.borrow() {
        (a, la, b, lb)
    } else {
        (b, lb, a, la)
    };

    // Kill the leader's session: revoke its lease from outside.
    let mut admin = etcd_client::Client::connect(&cluster.endpoints, None)
        .await
        .unwrap();
    admin.lease_revoke(leader.lease_id()).await.unwrap();
    let t0 = Instant::now();
    until_true(&mut follow_rx, Duration::from_secs(5)).await;
    let took = t0.elapsed();
    tokio::time::timeout(Duration::from_secs(5), lead_rx.wait_for(|v| !*v))
        .await
        .expect("the old leader never noticed it lost")
        .unwrap();
    eprintln!("failover after lease revocation took {took:?}");

    // The old leader re-campaigns and waits; dropping the new leader hands leadership back.
    drop(follower);
    until_true(&mut lead_rx, Duration::from_secs(5)).await;
    drop(leader);
}

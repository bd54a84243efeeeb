//! etcd backend: desired state shared by several coordinators.
//!
//! Key layout under a prefix `P` (default `/meridian`), one small JSON object per key:
//! - `P/desired/{region,service,mount,agent_token,dns_record}/<key>`: desired state (a DNS
//!   record's key is `name/TYPE`);
//! - `P/desired/rev`: a marker every desired write puts in the same transaction, so its
//!   `mod_revision` is the revision of the last desired change (deletes included), and every write
//!   is a compare-and-swap on it: writes serialise like SQLite's, and checks that span objects
//!   (a mount's service exists, a service has no mounts) hold at commit time;
//! - `P/api_token/{sha,id}/…` and `P/api_token/rev`: API credentials (not desired state);
//! - `P/audit/<ms>-<rand>`: audit entries, written in the change's transaction; id = mod revision;
//! - `P/observed/edges`: the last observed edge set (written by the leader only);
//! - `P/observed/edge/<id>` and `P/observed/gslb`: observed state shared live between
//!   coordinators, under leases (see [`super::shared`]);
//! - `P/leader`: the leadership key, attached to this coordinator's lease.
//!
//! The revision is etcd's own: a change's revision is the `mod_revision` of its transaction.
//! The change feed reads history with an etcd watch from `after + 1`; once etcd compacted that
//! history the feed answers [`StoreError::Compacted`] and subscribers re-snapshot.
//!
//! Trait methods are synchronous: they block on the runtime from the blocking pool
//! ([`super::StoreHandle::call`]), never from a runtime thread.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use coordinator_api::{
    AdminState, AgentTokenRecord, ApiTokenInfo, AuditEntry, DnsRecord, DnsRecordType, Mount,
    Region, Revision, Service,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ApiTokenRow, Change, Desired, Scope, Store, StoreError};

/// Every etcd call gives up after this long (etcd itself answers in milliseconds).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Compare-and-swap attempts before a write reports contention.
const MAX_TXN_RETRIES: usize = 64;
/// Pause before background tasks (revision follower, election) retry after an error.
const RETRY: Duration = Duration::from_millis(250);

/// How to reach etcd and where this deployment's keys live.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/meridian`: several deployments can share one cluster.
    pub prefix: String,
    /// Leadership lease TTL: how long singleton work stays unowned after a leader dies.
    pub lease_ttl: Duration,
    /// This coordinator's name in the leader key (for operators).
    pub node: String,
}

/// The etcd-backed [`Store`].
pub struct EtcdStore {
    rt: Handle,
    client: Client,
    keys: Keys,
    actor: String,
    revs: watch::Receiver<Revision>,
    leader: watch::Receiver<bool>,
    lease: Arc<AtomicI64>,
    /// Stops the follower and election tasks (and revokes the lease) when the store is dropped.
    stop: CancellationToken,
    /// Observed state shared with the other coordinators ([`super::shared`]).
    shared_keys: super::shared::SharedKeys,
    shared: watch::Receiver<Arc<super::SharedObserved>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.keys.root)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Key names under the prefix (see the module docs).
#[derive(Clone, Debug)]
struct Keys {
    root: String,
}

impl Keys {
    fn desired(&self) -> String {
        format!("{}/desired/", self.root)
    }
    fn marker(&self) -> String {
        format!("{}/desired/rev", self.root)
    }
    fn object(&self, object: &str, key: &str) -> String {
        format!("{}/desired/{object}/{key}", self.root)
    }
    fn token_sha(&self, sha: &str) -> String {
        format!("{}/api_token/sha/{sha}", self.root)
    }
    fn token_shas(&self) -> String {
        format!("{}/api_token/sha/", self.root)
    }
    fn token_id(&self, id: &str) -> String {
        format!("{}/api_token/id/{id}", self.root)
    }
    fn token_marker(&self) -> String {
        format!("{}/api_token/rev", self.root)
    }
    fn audit(&self) -> String {
        format!("{}/audit/", self.root)
    }
    fn new_audit(&self) -> String {
        format!(
            "{}/audit/{:016}-{}",
            self.root,
            crate::clock::unix_ms(),
            crate::bootstrap::random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 8)
        )
    }
    fn observed(&self) -> String {
        format!("{}/observed/edges", self.root)
    }
    fn secret(&self, name: &str) -> String {
        format!("{}/secret/{name}", self.root)
    }
    fn leader(&self) -> String {
        format!("{}/leader", self.root)
    }
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Backend(format!("etcd: bad JSON: {e}"))
}

fn to_rev(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

fn to_i64(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// An audit entry as stored; its id and revision come from the key's `mod_revision`.
#[derive(Debug, Serialize, Deserialize)]
struct AuditRecord {
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    /// Whether this entry records a desired-state change (which has a revision).
    desired: bool,
    detail: Option<Value>,
}

/// An API token as stored under its hash.
#[derive(Debug, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    scope: String,
    description: String,
    created_at_ms: u64,
}

/// One desired-state write: the object to put (or delete), and its audit entry.
struct Plan {
    object: &'static str,
    key: String,
    value: Option<Value>,
    action: &'static str,
}

impl Plan {
    fn put<T: Serialize>(
        object: &'static str,
        key: &str,
        value: &T,
        action: &'static str,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            object,
            key: key.to_owned(),
            value: Some(serde_json::to_value(value).map_err(json_err)?),
            action,
        })
    }

    fn delete(object: &'static str, key: &str, action: &'static str) -> Self {
        Self {
            object,
            key: key.to_owned(),
            value: None,
            action,
        }
    }
}

impl EtcdStore {
    /// Connects, checks etcd answers, and starts the revision follower and the election.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        let root = opts.prefix.trim_end_matches('/').to_owned();
        if !root.starts_with('/') || root.len() < 2 {
            return Err(StoreError::Backend(format!(
                "etcd prefix {:?} must start with '/' and name something",
                opts.prefix
            )));
        }
        if opts.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        let connect = Client::connect(
            &opts.endpoints,
            Some(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5)),
            ),
        );
        let client = tokio::time::timeout(OP_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Backend("etcd: connect timed out".into()))?
            .map_err(backend)?;
        let keys = Keys { root };
        // Fail fast (and clearly) when no endpoint answers.
        let mut probe = client.clone();
        let first = tokio::time::timeout(OP_TIMEOUT, probe.get(keys.marker(), None))
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "etcd: no answer from {} within {OP_TIMEOUT:?}",
                    opts.endpoints.join(",")
                ))
            })?
            .map_err(backend)?;
        let current = first
            .kvs()
            .first()
            .map_or(0, |kv| to_rev(kv.mod_revision()));

        let stop = CancellationToken::new();
        let (rev_tx, revs) = watch::channel(current);
        tokio::spawn(follow_revisions(
            client.clone(),
            keys.clone(),
            rev_tx,
            stop.clone(),
        ));
        let (leader_tx, leader) = watch::channel(false);
        let lease = Arc::new(AtomicI64::new(0));
        tokio::spawn(elect(
            client.clone(),
            keys.clone(),
            opts.node.clone(),
            opts.lease_ttl.max(Duration::from_secs(1)),
            leader_tx,
            lease.clone(),
            stop.clone(),
        ));
        let shared_keys = super::shared::SharedKeys::new(&keys.root);
        let (shared_tx, shared) = watch::channel(Arc::default());
        tokio::spawn(super::shared::follow(
            client.clone(),
            shared_keys.clone(),
            shared_tx,
            stop.clone(),
        ));
        Ok(Self {
            rt: Handle::current(),
            client,
            keys,
            actor: super::SYSTEM_ACTOR.to_owned(),
            revs,
            leader,
            lease,
            stop,
            shared_keys,
            shared,
        })
    }

    /// The lease the current leadership term holds (0 before the first grant). Revoking it
    /// from outside ends this coordinator's leadership, which is how tests kill a leader.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// Runs one etcd future to completion from the blocking pool, with [`OP_TIMEOUT`].
    fn run<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let fut = f(self.client.clone());
        self.rt.block_on(async {
            tokio::time::timeout(OP_TIMEOUT, fut)
                .await
                .map_err(|_| StoreError::Backend("etcd: request timed out".into()))?
        })
    }

    fn read_desired(&self) -> Result<Desired, StoreError> {
        let keys = self.keys.clone();
        self.run(|c| read_desired(c, keys))
    }

    /// Applies `plan` (re-derived from a fresh read each attempt) in a transaction guarded by the
    /// desired-state marker, so the checks `plan` made still hold when it commits.
    fn write(
        &mut self,
        mut plan: impl FnMut(&Desired) -> Result<Plan, StoreError>,
    ) -> Result<Revision, StoreError> {
        for _ in 0..MAX_TXN_RETRIES {
            let d = self.read_desired()?;
            let p = plan(&d)?;
            let key = self.keys.object(p.object, &p.key);
            let audit = AuditRecord {
                at_ms: crate::clock::unix_ms(),
                actor: self.actor.clone(),
                action: p.action.to_owned(),
                target: p.key.clone(),
                desired: true,
                detail: p.value.clone(),
            };
            let mut ops = vec![match &p.value {
                Some(v) => TxnOp::put(key, serde_json::to_vec(v).map_err(json_err)?, None),
                None => TxnOp::delete(key, None),
            }];
            ops.push(TxnOp::put(
                self.keys.marker(),
                format!("{}/{}", p.object, p.key),
                None,
            ));
            ops.push(TxnOp::put(
                self.keys.new_audit(),
                serde_json::to_vec(&audit).map_err(json_err)?,
                None,
            ));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    self.keys.marker(),
                    CompareOp::Equal,
                    to_i64(d.revision),
                )])
                .and_then(ops);
            let resp = self.run(|mut c| async move { c.txn(txn).await.map_err(backend) })?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, |h| to_rev(h.revision())));
            }
        }
        Err(StoreError::Backend(
            "etcd: too many concurrent writers; try again".into(),
        ))
    }

    fn token_records(&self) -> Result<(Vec<(TokenRecord, String)>, i64), StoreError> {
        let keys = self.keys.clone();
        self.run(|mut c| async move {
            let resp = c
                .get(keys.token_shas(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(backend)?;
            let rev = resp.header().map_or(0, |h| h.revision());
            let mut out = Vec::new();
            for kv in resp.kvs() {
                let sha = kv
                    .key_str()
                    .map_err(backend)?
                    .trim_start_matches(&keys.token_shas())
                    .to_owned();
                out.push((serde_json::from_slice(kv.value()).map_err(json_err)?, sha));
            }
            Ok((out, rev))
        })
    }

    fn put_audit_only(
        &self,
        action: &str,
        target: &str,
        detail: Option<Value>,
    ) -> Result<TxnOp, StoreError> {
        let rec = AuditRecord {
            at_ms: crate::clock::unix_ms(),
            actor: self.actor.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            desired: false,
            detail,
        };
        Ok(TxnOp::put(
            self.keys.new_audit(),
            serde_json::to_vec(&rec).map_err(json_err)?,
            None,
        ))
    }
}

async fn read_desired(mut c: Client, keys: Keys) -> Result<Desired, StoreError> {
    let resp = c
        .get(keys.desired(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(backend)?;
    let mut d = Desired::default();
    let base = keys.desired();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(backend)?;
        let rest = key.strip_prefix(&base).unwrap_or(key);
        let Some((object, _)) = rest.split_once('/') else {
            if rest == "rev" {
                d.revision = to_rev(kv.mod_revision());
            }
            continue;
        };
        let v = kv.value();
        match object {
            "region" => d.regions.push(serde_json::from_slice(v).map_err(json_err)?),
            "service" => d
                .services
                .push(serde_json::from_slice(v).map_err(json_err)?),
            "mount" => d.mounts.push(serde_json::from_slice(v).map_err(json_err)?),
            "agent_token" => d
                .agent_tokens
                .push(serde_json::from_slice(v).map_err(json_err)?),
            // A record a newer binary wrote (unknown type) is skipped.
            "dns_record" => {
                if let Ok(r) = serde_json::from_slice(v) {
                    d.records.push(r);
                }
            }
            // Written by a newer binary: ignored, like unknown columns.
            _ => {}
        }
    }
    d.regions.sort_by(|a, b| a.name.cmp(&b.name));
    d.services.sort_by(|a, b| a.name.cmp(&b.name));
    d.mounts
        .sort_by(|a, b| (&a.host, &a.path_prefix).cmp(&(&b.host, &b.path_prefix)));
    d.agent_tokens.sort_by(|a, b| a.id.cmp(&b.id));
    d.records
        .sort_by(|a, b| (&a.name, a.rtype).cmp(&(&b.name, b.rtype)));
    Ok(d)
}

/// History of desired changes after `after`, up to the marker's revision, from an etcd watch.
async fn changes_since(
    mut c: Client,
    keys: Keys,
    after: Revision,
    limit: usize,
) -> Result<Vec<Change>, StoreError> {
    let marker = c.get(keys.marker(), None).await.map_err(backend)?;
    let latest = marker
        .kvs()
        .first()
        .map_or(0, |kv| to_rev(kv.mod_revision()));
    if latest <= after || limit == 0 {
        return Ok(Vec::new());
    }
    let base = keys.desired();
    let mut stream = c
        .watch(
            base.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(to_i64(after.saturating_add(1))),
            ),
        )
        .await
        .map_err(backend)?;
    let mut out = Vec::new();
    while let Some(resp) = stream.message().await.map_err(backend)? {
        if resp.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: to_rev(resp.compact_revision()).saturating_sub(1),
            });
        }
        if resp.canceled() {
            return Err(StoreError::Backend(format!(
                "etcd: watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = kv.key_str().map_err(backend)?;
            let rest = key.strip_prefix(&base).unwrap_or(key);
            let Some((object, k)) = rest.split_once('/') else {
                continue; // the marker
            };
            let value = match ev.event_type() {
                EventType::Put => Some(serde_json::from_slice(kv.value()).map_err(json_err)?),
                EventType::Delete => None,
            };
            out.push(Change {
                revision: to_rev(kv.mod_revision()),
                object: object.to_owned(),
                key: k.to_owned(),
                value,
            });
        }
        let reached = out.last().is_some_and(|c| c.revision >= latest);
        if reached || out.len() >= limit {
            break;
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// Publishes the desired-state marker's revision whenever any coordinator commits a change.
async fn follow_revisions(
    c: Client,
    keys: Keys,
    tx: watch::Sender<Revision>,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = follow_once(c.clone(), &keys, &tx, &stop).await {
            warn!(error = %e, "etcd revision watch failed; retrying");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

fn publish(tx: &watch::Sender<Revision>, rev: Revision) {
    tx.send_if_modified(|cur| {
        let newer = rev > *cur;
        if newer {
            *cur = rev;
        }
        newer
    });
}

async fn follow_once(
    mut c: Client,
    keys: &Keys,
    tx: &watch::Sender<Revision>,
    stop: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let resp = c.get(keys.marker(), None).await?;
    publish(
        tx,
        resp.kvs().first().map_or(0, |kv| to_rev(kv.mod_revision())),
    );
    let from = resp.header().map_or(0, |h| h.revision()) + 1;
    let mut stream = c
        .watch(
            keys.marker(),
            Some(
                WatchOptions::new()
                    .with_start_revision(from)
                    .with_progress_notify(),
            ),
        )
        .await?;
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            m = stream.message() => m?,
        };
        // Stream ended or was cancelled (e.g. compaction): resynchronise with a fresh read.
        let Some(msg) = msg else { return Ok(()) };
        if msg.canceled() {
            return Ok(());
        }
        for ev in msg.events() {
            if let Some(kv) = ev.kv() {
                publish(tx, to_rev(kv.mod_revision()));
            }
        }
    }
}

/// Leadership: hold `P/leader` under our lease. Whoever creates it leads until the key goes
/// (lease revoked or expired); a leader that cannot renew for half a TTL steps down on its own,
/// before etcd can expire the lease and let another coordinator in.
async fn elect(
    c: Client,
    keys: Keys,
    node: String,
    ttl: Duration,
    tx: watch::Sender<bool>,
    lease: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = term(c.clone(), &keys, &node, ttl, &tx, &lease, &stop).await {
            warn!(error = %e, "etcd leadership term ended with an error");
        }
        if tx.send_replace(false) {
            info!("no longer the coordinator leader");
        }
        let id = lease.load(Ordering::Relaxed);
        if id != 0 {
            // Best effort: lets the next leader take over now rather than after the TTL.
            let mut c = c.clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(id)).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn term(
    mut c: Client,
    keys: &Keys,
    node: &str,
    ttl: Duration,
    tx: &watch::Sender<bool>,
    lease: &AtomicI64,
    stop: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(60).max(1);
    let id = c.lease_grant(ttl_s, None).await?.id();
    lease.store(id, Ordering::Relaxed);
    let (mut keeper, mut acks) = c.lease_keep_alive(id).await?;
    let mut renew = tokio::time::interval(ttl / 3);
    let mut last_ack = Instant::now();
    let key = keys.leader();
    loop {
        // Campaign: create the key under our lease unless someone holds it.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                node,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let resp = c.txn(txn).await?;
        let leading = resp.succeeded();
        if leading {
            tx.send_replace(true);
            info!(node, lease = id, "became the coordinator leader");
        }
        let from = resp.header().map_or(0, |h| h.revision()) + 1;
        let mut watch = c
            .watch(
                key.clone(),
                Some(WatchOptions::new().with_start_revision(from)),
            )
            .await?;
        // Wait for the key to go: lost leadership, or a chance to take it.
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = renew.tick() => keeper.keep_alive().await?,
                // Renewals go out every TTL/3; half a TTL without an answer means etcd may
                // expire the lease soon: stop acting as leader before it can pick another.
                () = tokio::time::sleep_until((last_ack + ttl / 2).into()) => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "no lease renewal for half a TTL".into(),
                    ));
                }
                m = acks.message() => match m? {
                    Some(r) if r.ttl() > 0 => last_ack = Instant::now(),
                    // TTL 0: the lease is gone (revoked or expired).
                    _ => return Ok(()),
                },
                m = watch.message() => {
                    let Some(m) = m? else { return Ok(()) };
                    if m.canceled() {
                        return Ok(());
                    }
                    let deleted = m
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete);
                    if deleted {
                        if leading {
                            return Ok(());
                        }
                        break;
                    }
                }
            }
        }
    }
}

fn parse_scope(s: &str) -> Result<Scope, StoreError> {
    Scope::parse(s).ok_or_else(|| StoreError::Backend(format!("etcd: unknown token scope {s:?}")))
}

impl Store for EtcdStore {
    fn revision(&self) -> Result<Revision, StoreError> {
        let keys = self.keys.clone();
        self.run(|mut c| async move {
            let r = c.get(keys.marker(), None).await.map_err(backend)?;
            Ok(r.kvs().first().map_or(0, |kv| to_rev(kv.mod_revision())))
        })
    }

    fn desired(&self) -> Result<Desired, StoreError> {
        self.read_desired()
    }

    fn create_region(&mut self, r: &Region) -> Result<Revision, StoreError> {
        self.write(|d| {
            if d.regions.iter().any(|x| x.name == r.name) {
                return Err(StoreError::Duplicate {
                    what: "region",
                    key: r.name.clone(),
                });
            }
            Plan::put("region", &r.name, r, "region.put")
        })
    }

    fn list_regions(&self) -> Result<Vec<Region>, StoreError> {
        Ok(self.read_desired()?.regions)
    }

    fn create_service(&mut self, s: &Service) -> Result<Revision, StoreError> {
        self.write(|d| {
            if d.services.iter().any(|x| x.name == s.name) {
                return Err(StoreError::Duplicate {
                    what: "service",
                    key: s.name.clone(),
                });
            }
            Plan::put("service", &s.name, s, "service.put")
        })
    }

    fn list_services(&self) -> Result<Vec<Service>, StoreError> {
        Ok(self.read_desired()?.services)
    }

    fn update_service(&mut self, s: &Service) -> Result<Revision, StoreError> {
        self.write(|d| {
            if !d.services.iter().any(|x| x.name == s.name) {
                return Err(StoreError::NotFound {
                    what: "service",
                    key: s.name.clone(),
                });
            }
            Plan::put("service", &s.name, s, "service.put")
        })
    }

    fn delete_service(&mut self, name: &str) -> Result<Revision, StoreError> {
        self.write(|d| {
            if !d.services.iter().any(|x| x.name == name) {
                return Err(StoreError::NotFound {
                    what: "service",
                    key: name.to_owned(),
                });
            }
            let mounts = d.mounts.iter().filter(|m| m.service == name).count();
            let tokens = d.agent_tokens.iter().filter(|t| t.service == name).count();
            if mounts > 0 || tokens > 0 {
                return Err(StoreError::InUse(format!(
                    "service {name:?} is still referenced by {mounts} mount(s) and {tokens} agent token(s)"
                )));
            }
            let users = crate::validate::split_users(&d.mounts, name);
            if !users.is_empty() {
                return Err(StoreError::InUse(crate::validate::in_use_by_splits(
                    name, &users,
                )));
            }
            Ok(Plan::delete("service", name, "service.delete"))
        })
    }

    fn add_mount(&mut self, m: &Mount) -> Result<Revision, StoreError> {
        self.write(|d| {
            if !d.services.iter().any(|s| s.name == m.service) {
                return Err(StoreError::UnknownService(m.service.clone()));
            }
            if let Some(missing) = crate::validate::missing_split_target(m, |t| {
                Ok::<_, StoreError>(d.services.iter().any(|s| s.name == t))
            })? {
                let (field, message) = crate::validate::unknown_split_target(&missing);
                return Err(StoreError::Conflict { field, message });
            }
            let key = format!("{}{}", m.host, m.path_prefix);
            if d.mounts
                .iter()
                .any(|x| x.host == m.host && x.path_prefix == m.path_prefix)
            {
                return Err(StoreError::Duplicate { what: "mount", key });
            }
            Plan::put("mount", &key, m, "mount.put")
        })
    }

    fn list_mounts(&self) -> Result<Vec<Mount>, StoreError> {
        Ok(self.read_desired()?.mounts)
    }

    fn update_mount(&mut self, m: &Mount) -> Result<Revision, StoreError> {
        self.write(|d| {
            let key = format!("{}{}", m.host, m.path_prefix);
            if !d
                .mounts
                .iter()
                .any(|x| x.host == m.host && x.path_prefix == m.path_prefix)
            {
                return Err(StoreError::NotFound { what: "mount", key });
            }
            if !d.services.iter().any(|s| s.name == m.service) {
                return Err(StoreError::UnknownService(m.service.clone()));
            }
            if let Some(missing) = crate::validate::missing_split_target(m, |t| {
                Ok::<_, StoreError>(d.services.iter().any(|s| s.name == t))
            })? {
                let (field, message) = crate::validate::unknown_split_target(&missing);
                return Err(StoreError::Conflict { field, message });
            }
            Plan::put("mount", &key, m, "mount.put")
        })
    }

    fn delete_mount(&mut self, host: &str, path_prefix: &str) -> Result<Revision, StoreError> {
        let key = format!("{host}{path_prefix}");
        self.write(|d| {
            if !d
                .mounts
                .iter()
                .any(|x| x.host == host && x.path_prefix == path_prefix)
            {
                return Err(StoreError::NotFound {
                    what: "mount",
                    key: key.clone(),
                });
            }
            Ok(Plan::delete("mount", &key, "mount.delete"))
        })
    }

    fn create_agent_token(&mut self, t: &AgentTokenRecord) -> Result<Revision, StoreError> {
        self.write(|d| {
            if !d.services.iter().any(|s| s.name == t.service) {
                return Err(StoreError::UnknownService(t.service.clone()));
            }
            if d.agent_tokens.iter().any(|x| x.id == t.id) {
                return Err(StoreError::Duplicate {
                    what: "token",
                    key: t.id.clone(),
                });
            }
            Plan::put("agent_token", &t.id, t, "agent_token.put")
        })
    }

    fn list_agent_tokens(&self) -> Result<Vec<AgentTokenRecord>, StoreError> {
        Ok(self.read_desired()?.agent_tokens)
    }

    fn revoke_agent_token(&mut self, id: &str) -> Result<Revision, StoreError> {
        self.write(|d| {
            if !d.agent_tokens.iter().any(|x| x.id == id) {
                return Err(StoreError::NotFound {
                    what: "token",
                    key: id.to_owned(),
                });
            }
            Ok(Plan::delete("agent_token", id, "agent_token.delete"))
        })
    }

    fn put_dns_record(&mut self, r: &DnsRecord) -> Result<Revision, StoreError> {
        self.write(|d| {
            super::check_dns_record(&d.records, r)?;
            Plan::put("dns_record", &r.key(), r, "dns_record.put")
        })
    }

    fn list_dns_records(&self) -> Result<Vec<DnsRecord>, StoreError> {
        Ok(self.read_desired()?.records)
    }

    fn delete_dns_record(
        &mut self,
        name: &str,
        rtype: DnsRecordType,
    ) -> Result<Revision, StoreError> {
        let key = format!("{name}/{}", rtype.as_str());
        self.write(|d| {
            if !d.records.iter().any(|r| r.name == name && r.rtype == rtype) {
                return Err(StoreError::NotFound {
                    what: "dns record",
                    key: key.clone(),
                });
            }
            Ok(Plan::delete("dns_record", &key, "dns_record.delete"))
        })
    }

    fn set_region_admin_state(
        &mut self,
        name: &str,
        state: AdminState,
    ) -> Result<Revision, StoreError> {
        self.write(|d| {
            let Some(r) = d.regions.iter().find(|r| r.name == name) else {
                return Err(StoreError::NotFound {
                    what: "region",
                    key: name.to_owned(),
                });
            };
            let r = Region {
                admin_state: state,
                ..r.clone()
            };
            Plan::put("region", name, &r, "region.admin_state")
        })
    }

    fn set_actor(&mut self, actor: &str) {
        actor.clone_into(&mut self.actor);
    }

    fn put_api_token(&mut self, row: &ApiTokenRow) -> Result<bool, StoreError> {
        let keys = self.keys.clone();
        let detail =
            serde_json::json!({ "scope": row.scope.as_str(), "description": row.description });
        for _ in 0..MAX_TXN_RETRIES {
            let sha_key = keys.token_sha(&row.sha256);
            let existing = self.run(|mut c| {
                let k = sha_key.clone();
                async move { c.get(k, None).await.map_err(backend) }
            })?;
            if let Some(kv) = existing.kvs().first() {
                // Known token: only its scope follows the flag.
                let mut rec: TokenRecord = serde_json::from_slice(kv.value()).map_err(json_err)?;
                if rec.scope == row.scope.as_str() {
                    return Ok(false);
                }
                row.scope.as_str().clone_into(&mut rec.scope);
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        sha_key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([
                        TxnOp::put(sha_key, serde_json::to_vec(&rec).map_err(json_err)?, None),
                        TxnOp::put(keys.token_marker(), "", None),
                    ]);
                let r = self.run(|mut c| async move { c.txn(txn).await.map_err(backend) })?;
                if r.succeeded() {
                    return Ok(false);
                }
                continue;
            }
            let rec = TokenRecord {
                id: row.id.clone(),
                scope: row.scope.as_str().to_owned(),
                description: row.description.clone(),
                created_at_ms: row.created_at_ms,
            };
            let id_key = keys.token_id(&row.id);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(sha_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(sha_key, serde_json::to_vec(&rec).map_err(json_err)?, None),
                    TxnOp::put(id_key.clone(), row.sha256.clone(), None),
                    TxnOp::put(keys.token_marker(), "", None),
                    self.put_audit_only("api_token.put", &row.id, Some(detail.clone()))?,
                ]);
            let r = self.run(|mut c| async move { c.txn(txn).await.map_err(backend) })?;
            if r.succeeded() {
                return Ok(true);
            }
            let id_taken = self.run(|mut c| async move {
                Ok(!c.get(id_key, None).await.map_err(backend)?.kvs().is_empty())
            })?;
            let sha_taken = self.api_token(&row.sha256)?.is_some();
            if id_taken && !sha_taken {
                return Err(StoreError::Duplicate {
                    what: "api token",
                    key: row.id.clone(),
                });
            }
        }
        Err(StoreError::Backend(
            "etcd: too many concurrent writers; try again".into(),
        ))
    }

    fn api_token(&self, sha256: &str) -> Result<Option<(Scope, String)>, StoreError> {
        let key = self.keys.token_sha(sha256);
        let resp = self.run(|mut c| async move { c.get(key, None).await.map_err(backend) })?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let rec: TokenRecord = serde_json::from_slice(kv.value()).map_err(json_err)?;
        Ok(Scope::parse(&rec.scope).map(|s| (s, rec.id)))
    }

    fn count_api_tokens(&self, scope: Scope) -> Result<u64, StoreError> {
        let (recs, _) = self.token_records()?;
        Ok(recs
            .iter()
            .filter(|(r, _)| r.scope == scope.as_str())
            .count() as u64)
    }

    fn list_api_tokens(&self) -> Result<Vec<ApiTokenInfo>, StoreError> {
        let (recs, _) = self.token_records()?;
        let mut out = Vec::new();
        for (r, _) in recs {
            let Some(scope) = Scope::parse(&r.scope) else {
                continue;
            };
            out.push(ApiTokenInfo {
                id: r.id,
                scope: scope.into(),
                description: r.description,
                created_at_ms: r.created_at_ms,
            });
        }
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    fn revoke_api_token(&mut self, id: &str) -> Result<(), StoreError> {
        let keys = self.keys.clone();
        for _ in 0..MAX_TXN_RETRIES {
            let marker = keys.token_marker();
            let seen = self.run(|mut c| async move {
                let r = c.get(marker, None).await.map_err(backend)?;
                Ok(r.kvs().first().map_or(0, |kv| kv.mod_revision()))
            })?;
            let (recs, _) = self.token_records()?;
            let Some((rec, sha)) = recs.iter().find(|(r, _)| r.id == id) else {
                return Err(StoreError::NotFound {
                    what: "api token",
                    key: id.to_owned(),
                });
            };
            if parse_scope(&rec.scope)? == Scope::Admin
                && recs.iter().filter(|(r, _)| r.scope == "admin").count() <= 1
            {
                return Err(StoreError::InUse(
                    "refusing to revoke the last admin token: nobody could manage the network"
                        .into(),
                ));
            }
            // Guarded by the token marker: a concurrent revoke cannot remove the other last admin.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    keys.token_marker(),
                    CompareOp::Equal,
                    seen,
                )])
                .and_then([
                    TxnOp::delete(keys.token_sha(sha), None),
                    TxnOp::delete(keys.token_id(id), None),
                    TxnOp::put(keys.token_marker(), "", None),
                    self.put_audit_only("api_token.delete", id, None)?,
                ]);
            let r = self.run(|mut c| async move { c.txn(txn).await.map_err(backend) })?;
            if r.succeeded() {
                return Ok(());
            }
        }
        Err(StoreError::Backend(
            "etcd: too many concurrent writers; try again".into(),
        ))
    }

    fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let prefix = self.keys.audit();
        let opts = GetOptions::new()
            .with_prefix()
            .with_min_mod_revision(to_i64(after.saturating_add(1)))
            .with_sort(SortTarget::Mod, SortOrder::Ascend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let resp =
            self.run(|mut c| async move { c.get(prefix, Some(opts)).await.map_err(backend) })?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let rec: AuditRecord = serde_json::from_slice(kv.value()).map_err(json_err)?;
            let id = to_rev(kv.mod_revision());
            out.push(AuditEntry {
                id,
                at_ms: rec.at_ms,
                actor: rec.actor,
                action: rec.action,
                target: rec.target,
                revision: if rec.desired { id } else { 0 },
                detail: rec.detail,
            });
        }
        out.truncate(limit);
        Ok(out)
    }

    fn save_observed(&mut self, json: &str) -> Result<(), StoreError> {
        let key = self.keys.observed();
        let json = json.to_owned();
        self.run(|mut c| async move {
            c.put(key, json, None).await.map_err(backend)?;
            Ok(())
        })
    }

    fn put_secret_if_absent(&mut self, name: &str, value: &str) -> Result<String, StoreError> {
        let key = self.keys.secret(name);
        let value = value.to_owned();
        self.run(|mut c| async move {
            // Put only if the key was never created; either way read back the winner.
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            c.txn(txn).await.map_err(backend)?;
            let r = c.get(key.clone(), None).await.map_err(backend)?;
            let kv = r
                .kvs()
                .first()
                .ok_or_else(|| StoreError::Backend(format!("{key} vanished after its put")))?;
            kv.value_str().map(str::to_owned).map_err(backend)
        })
    }

    fn load_observed(&self) -> Result<Option<String>, StoreError> {
        let key = self.keys.observed();
        self.run(|mut c| async move {
            let r = c.get(key, None).await.map_err(backend)?;
            r.kvs()
                .first()
                .map(|kv| kv.value_str().map(str::to_owned).map_err(backend))
                .transpose()
        })
    }

    fn changes_since(&self, after: Revision, limit: usize) -> Result<Vec<Change>, StoreError> {
        let keys = self.keys.clone();
        self.run(|c| changes_since(c, keys, after, limit))
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        // Never past the latest desired change, like the SQLite log keeps its last row.
        let upto = revision.min(self.revision()?);
        if upto == 0 {
            return Ok(());
        }
        let r = self.run(|mut c| async move {
            c.compact(to_i64(upto), None).await.map_err(backend)?;
            Ok(())
        });
        match r {
            // Compacting to an already-compacted revision is not a failure.
            Err(StoreError::Backend(e)) if e.contains("compacted") => Ok(()),
            other => other,
        }
    }

    fn revisions(&self) -> watch::Receiver<Revision> {
        self.revs.clone()
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn shared_observed(&self) -> Option<watch::Receiver<Arc<super::SharedObserved>>> {
        Some(self.shared.clone())
    }

    fn share_edges(
        &mut self,
        edges: Vec<coordinator_api::EdgeHeartbeat>,
    ) -> Result<(), StoreError> {
        let keys = self.shared_keys.clone();
        let view = self.shared.borrow().clone();
        self.run(|c| async move { super::shared::write_edges(c, &keys, edges, view).await })
    }

    fn publish_gslb(&mut self, view: &super::PublishedGslb) -> Result<(), StoreError> {
        let keys = self.shared_keys.clone();
        let lease = self.lease.load(Ordering::Relaxed);
        if !*self.leader.borrow() {
            return Err(StoreError::Backend("not the leader".into()));
        }
        self.run(|c| async move { super::shared::publish_gslb(c, &keys, view, lease).await })
    }
}

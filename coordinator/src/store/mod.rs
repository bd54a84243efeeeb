//! Desired state storage: one trait, so the SQLite default and the etcd backend are
//! interchangeable. Every desired-state change bumps one monotonically increasing revision
//! (SQLite: the change log's row id; etcd: the store's mod revision).
//!
//! Methods are synchronous (the backend does blocking IO); async code goes through
//! [`StoreHandle`], which runs them on the blocking pool and never holds the lock across `.await`.
//! [`StoreHandle::watch`] turns [`Store::changes_since`] and [`Store::revisions`] into one ordered
//! change feed per subscriber, re-snapshotting when the history it needs was compacted.

mod etcd;
pub mod shared;
mod sqlite;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use coordinator_api::{
    AdminState, AgentTokenRecord, ApiScope, ApiTokenInfo, AuditEntry, DnsRecord, DnsRecordType,
    Mount, Region, Revision, Service,
};
use tokio::sync::{mpsc, watch};

use coordinator_api::EdgeHeartbeat;
pub use etcd::{EtcdOptions, EtcdStore};
pub use shared::{PublishedGslb, SharedObserved};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {key:?} already exists")]
    Duplicate { what: &'static str, key: String },
    #[error("{what} {key:?} not found")]
    NotFound { what: &'static str, key: String },
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The object is still referenced (e.g. a service by mounts or tokens).
    #[error("{0}")]
    InUse(String),
    #[error("database schema version {found} is newer than this binary supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The history after `requested` is gone; read a fresh [`Store::desired`] snapshot instead.
    #[error("revision {requested} is compacted (history starts after {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("storage: {0}")]
    Backend(String),
    /// The write contradicts other stored data (e.g. a CNAME beside other records); `field`
    /// names the request field at fault.
    #[error("{message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

/// The audit log's name for changes no API token made (bootstrap, migrations).
pub const SYSTEM_ACTOR: &str = "system";

/// Who an API token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Every read of the admin API (dashboards, monitoring), no writes.
    Read,
    /// Edges and GeoDNS: watch, snapshot, heartbeat.
    Node,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Read => "read",
            Self::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "read" => Some(Self::Read),
            "node" => Some(Self::Node),
            _ => None,
        }
    }
}

impl From<Scope> for ApiScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Admin => Self::Admin,
            Scope::Read => Self::Read,
            Scope::Node => Self::Node,
        }
    }
}

impl From<ApiScope> for Scope {
    fn from(s: ApiScope) -> Self {
        match s {
            ApiScope::Admin => Self::Admin,
            ApiScope::Read => Self::Read,
            ApiScope::Node => Self::Node,
        }
    }
}

/// An API token as stored: its hash, never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiTokenRow {
    pub id: String,
    pub sha256: String,
    pub scope: Scope,
    pub description: String,
    pub created_at_ms: u64,
}

/// All desired state at one revision, read in one transaction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub revision: Revision,
    pub regions: Vec<Region>,
    pub services: Vec<Service>,
    pub mounts: Vec<Mount>,
    pub agent_tokens: Vec<AgentTokenRecord>,
    /// GeoDNS zone records, sorted by (name, type).
    pub records: Vec<DnsRecord>,
}

/// One committed desired-state change, as the change feed delivers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub revision: Revision,
    /// `region`, `service`, `mount` or `agent_token`.
    pub object: String,
    /// The object's key: a name, a token id, or `host` + `path_prefix` for mounts.
    pub key: String,
    /// The object after the change; `None` when it was deleted.
    pub value: Option<serde_json::Value>,
}

/// What a change-feed subscriber receives, in revision order.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreEvent {
    /// Everything at one revision: sent when the history the subscriber asked for was compacted.
    Snapshot(Desired),
    /// Changes after the previous event, oldest first, without gaps.
    Changes(Vec<Change>),
}

/// Most changes one [`Store::changes_since`] call returns (the feed calls again for more).
pub const CHANGES_PAGE: usize = 512;

/// Desired state plus API credentials. Writes return the new revision.
///
/// API tokens are credentials, not desired state: they bump no revision and are not in the
/// change log (nothing downstream needs them).
pub trait Store: Send {
    /// Revision of the latest committed change (0 for an empty store).
    fn revision(&self) -> Result<Revision, StoreError>;
    /// Everything at one consistent revision.
    fn desired(&self) -> Result<Desired, StoreError>;

    fn create_region(&mut self, r: &Region) -> Result<Revision, StoreError>;
    fn list_regions(&self) -> Result<Vec<Region>, StoreError>;

    fn create_service(&mut self, s: &Service) -> Result<Revision, StoreError>;
    fn list_services(&self) -> Result<Vec<Service>, StoreError>;
    /// Replaces the service named `s.name`; [`StoreError::NotFound`] when there is none.
    fn update_service(&mut self, s: &Service) -> Result<Revision, StoreError>;
    /// Fails with [`StoreError::InUse`] while mounts or agent tokens reference it.
    fn delete_service(&mut self, name: &str) -> Result<Revision, StoreError>;

    /// Fails with [`StoreError::UnknownService`] or [`StoreError::Duplicate`].
    fn add_mount(&mut self, m: &Mount) -> Result<Revision, StoreError>;
    fn list_mounts(&self) -> Result<Vec<Mount>, StoreError>;
    /// Replaces the mount at (`m.host`, `m.path_prefix`): [`StoreError::NotFound`] when there
    /// is none, [`StoreError::UnknownService`] when `m.service` does not exist.
    fn update_mount(&mut self, m: &Mount) -> Result<Revision, StoreError>;
    fn delete_mount(&mut self, host: &str, path_prefix: &str) -> Result<Revision, StoreError>;

    fn create_agent_token(&mut self, t: &AgentTokenRecord) -> Result<Revision, StoreError>;
    fn list_agent_tokens(&self) -> Result<Vec<AgentTokenRecord>, StoreError>;
    fn revoke_agent_token(&mut self, id: &str) -> Result<Revision, StoreError>;

    /// Creates or replaces the RRset `r.key()`. [`StoreError::Conflict`] when a CNAME would
    /// share its name with other data. `r` must be normalised ([`DnsRecord::normalized`]).
    fn put_dns_record(&mut self, r: &DnsRecord) -> Result<Revision, StoreError>;
    fn list_dns_records(&self) -> Result<Vec<DnsRecord>, StoreError>;
    fn delete_dns_record(
        &mut self,
        name: &str,
        rtype: DnsRecordType,
    ) -> Result<Revision, StoreError>;

    /// Sets an operator override on a region's health.
    fn set_region_admin_state(
        &mut self,
        name: &str,
        state: AdminState,
    ) -> Result<Revision, StoreError>;

    /// Names who the audit log records for the following writes (`token:<id>` or
    /// [`SYSTEM_ACTOR`]). [`StoreHandle::call_as`] sets and resets it around one call.
    fn set_actor(&mut self, actor: &str);

    /// Creates the API token (by hash) or sets its scope; returns whether it was new.
    fn put_api_token(&mut self, row: &ApiTokenRow) -> Result<bool, StoreError>;
    /// Scope and id of the token with this hash.
    fn api_token(&self, sha256: &str) -> Result<Option<(Scope, String)>, StoreError>;
    fn count_api_tokens(&self, scope: Scope) -> Result<u64, StoreError>;
    fn list_api_tokens(&self) -> Result<Vec<ApiTokenInfo>, StoreError>;
    /// Refuses ([`StoreError::InUse`]) to revoke the last admin token.
    fn revoke_api_token(&mut self, id: &str) -> Result<(), StoreError>;

    /// Audit entries with id greater than `after`, oldest first, at most `limit`.
    fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Last observed edge set (JSON), kept so a restarted coordinator does not start blind.
    fn save_observed(&mut self, json: &str) -> Result<(), StoreError>;
    fn load_observed(&self) -> Result<Option<String>, StoreError>;

    /// Committed changes with revision greater than `after`, oldest first, at most `limit`.
    /// [`StoreError::Compacted`] when that history is gone.
    fn changes_since(&self, after: Revision, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// Drops change history before `revision` (never the latest change).
    fn compact(&mut self, revision: Revision) -> Result<(), StoreError>;
    /// The latest committed revision, updated on every commit, including commits by other
    /// coordinators sharing the backend: the hub and change feeds wake up on it.
    fn revisions(&self) -> watch::Receiver<Revision>;
    /// Whether this coordinator currently holds leadership for singleton work. Always true for
    /// an embedded backend; an etcd lease for a shared one.
    fn leadership(&self) -> watch::Receiver<bool>;
    /// Short backend name for status pages (`sqlite`, `etcd`).
    fn backend(&self) -> &'static str;

    /// Observed state shared with the other coordinators of a shared backend (etcd); `None` for
    /// an embedded store, whose coordinator is the only one.
    fn shared_observed(&self) -> Option<watch::Receiver<Arc<SharedObserved>>> {
        None
    }
    /// Shares heartbeats this coordinator received (see [`shared`]); a no-op when embedded.
    fn share_edges(&mut self, _edges: Vec<EdgeHeartbeat>) -> Result<(), StoreError> {
        Ok(())
    }
    /// Publishes the leader's GSLB view to the other coordinators; a no-op when embedded.
    fn publish_gslb(&mut self, _view: &PublishedGslb) -> Result<(), StoreError> {
        Ok(())
    }

    /// Stores `value` under `name` unless something is stored there already, and returns what
    /// is stored: the first writer wins, also among coordinators sharing the store. For
    /// coordinator-held secrets (the tunnel client CA); not desired state, never in snapshots.
    fn put_secret_if_absent(&mut self, name: &str, value: &str) -> Result<String, StoreError>;
}

/// Shared access to a [`Store`] from async code.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Mutex<Box<dyn Store>>>,
    backend: &'static str,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHandle")
    }
}

impl StoreHandle {
    pub fn new(store: Box<dyn Store>) -> Self {
        Self {
            backend: store.backend(),
            inner: Arc::new(Mutex::new(store)),
        }
    }

    /// The backend's name ([`Store::backend`]).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Runs `f` on the blocking pool with exclusive access to the store.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` rolled its transaction back (rusqlite's Transaction drops
            // with rollback), so the store behind a poisoned lock is still consistent.
            let mut guard = inner.lock().unwrap_or_else(PoisonError::into_inner);
            f(guard.as_mut())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// Like [`Self::call`], with the audit log naming `actor` for the writes `f` makes.
    pub async fn call_as<R, F>(&self, actor: String, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
    {
        self.call(move |s| {
            s.set_actor(&actor);
            let r = f(s);
            s.set_actor(SYSTEM_ACTOR);
            r
        })
        .await
    }

    /// An ordered change feed from `after`: every change with a greater revision, in order and
    /// without gaps, or a [`StoreEvent::Snapshot`] first when that history was compacted (then
    /// changes after the snapshot). Errors are retried; the feed ends when the receiver is dropped.
    pub fn watch(&self, after: Revision) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(16);
        let store = self.clone();
        tokio::spawn(async move { store.feed(after, tx).await });
        rx
    }

    async fn feed(self, mut cursor: Revision, tx: mpsc::Sender<StoreEvent>) {
        let mut revs = match self.call(|s| Ok(s.revisions())).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "change feed could not start");
                return;
            }
        };
        loop {
            // Marked seen before reading, so a commit racing the read still wakes us below.
            let latest = *revs.borrow_and_update();
            let event = if latest <= cursor {
                None
            } else {
                match self
                    .call(move |s| s.changes_since(cursor, CHANGES_PAGE))
                    .await
                {
                    Ok(changes) => {
                        if let Some(last) = changes.last() {
                            cursor = last.revision;
                        }
                        (!changes.is_empty()).then_some(StoreEvent::Changes(changes))
                    }
                    Err(StoreError::Compacted { .. }) => match self.call(|s| s.desired()).await {
                        Ok(d) => {
                            cursor = d.revision;
                            Some(StoreEvent::Snapshot(d))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "change feed: snapshot failed; retrying");
                            tokio::time::sleep(FEED_RETRY).await;
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed: read failed; retrying");
                        tokio::time::sleep(FEED_RETRY).await;
                        continue;
                    }
                }
            };
            if let Some(ev) = event {
                if tx.send(ev).await.is_err() {
                    return;
                }
                // Immediately look for more: a page may not have reached `latest`.
                revs.mark_changed();
            }
            tokio::select! {
                () = tx.closed() => return,
                r = revs.changed() => if r.is_err() { return },
            }
        }
    }
}

/// Pause before a change feed retries a failed read.
const FEED_RETRY: Duration = Duration::from_millis(200);

/// Both backends' check before a DNS record write: a CNAME is alone at its name.
fn check_dns_record(existing: &[DnsRecord], r: &DnsRecord) -> Result<(), StoreError> {
    match r.conflict(existing) {
        Some(message) => Err(StoreError::Conflict {
            field: "type",
            message,
        }),
        None => Ok(()),
    }
}

//! SQLite store: WAL, `synchronous=FULL`, `user_version` migrations, and an append-only
//! `changes` log written in the same transaction as the change it records.

use std::path::Path;
use std::time::Duration;

use coordinator_api::{
    AdminState, AgentTokenRecord, ApiTokenInfo, AuditEntry, DnsRecord, DnsRecordType, LbPolicy,
    Mount, Region, Revision, Service,
};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;

use tokio::sync::watch;

use super::{ApiTokenRow, Change, Desired, Scope, Store, StoreError};

/// Schema migrations; entry `i` moves `user_version` from `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE regions (
    name       TEXT PRIMARY KEY,
    latitude   REAL,
    longitude  REAL
);
CREATE TABLE services (
    name       TEXT PRIMARY KEY,
    lb_policy  TEXT NOT NULL
);
CREATE TABLE mounts (
    host          TEXT NOT NULL,
    path_prefix   TEXT NOT NULL,
    service       TEXT NOT NULL REFERENCES services(name),
    strip_prefix  INTEGER NOT NULL,
    PRIMARY KEY (host, path_prefix)
);
CREATE TABLE agent_tokens (
    id          TEXT PRIMARY KEY,
    service     TEXT NOT NULL REFERENCES services(name),
    sha256      TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);
CREATE TABLE api_tokens (
    sha256      TEXT PRIMARY KEY,
    scope       TEXT NOT NULL CHECK (scope IN ('admin', 'node')),
    created_at  INTEGER NOT NULL
);
CREATE TABLE changes (
    rev   INTEGER PRIMARY KEY AUTOINCREMENT,
    at    INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    json  TEXT
);
",
    r"
ALTER TABLE regions ADD COLUMN admin_state TEXT NOT NULL DEFAULT 'auto';
CREATE TABLE api_tokens_v2 (
    sha256       TEXT PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    scope        TEXT NOT NULL CHECK (scope IN ('admin', 'read', 'node')),
    description  TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL
);
INSERT INTO api_tokens_v2 (sha256, id, scope, created_at)
    SELECT sha256, 'sha-' || substr(sha256, 1, 12), scope, created_at FROM api_tokens;
DROP TABLE api_tokens;
ALTER TABLE api_tokens_v2 RENAME TO api_tokens;
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    rev     INTEGER NOT NULL,
    detail  TEXT
);
CREATE TABLE observed (
    k     TEXT PRIMARY KEY,
    json  TEXT NOT NULL
);
",
    r"
CREATE TABLE meta (
    k  TEXT PRIMARY KEY,
    v  INTEGER NOT NULL
);
",
    // The whole object as JSON, so every later `#[serde(default)]` field of Service/Mount
    // persists without a new column. Rows from before keep NULL and read the old columns.
    r"
ALTER TABLE services ADD COLUMN spec TEXT;
ALTER TABLE mounts ADD COLUMN spec TEXT;
",
    // GeoDNS zone records: one row per RRset, the values as a JSON array.
    r"
CREATE TABLE dns_records (
    name    TEXT NOT NULL,
    rtype   TEXT NOT NULL,
    zone    TEXT NOT NULL,
    ttl     INTEGER NOT NULL,
    vals    TEXT NOT NULL,
    PRIMARY KEY (name, rtype)
);
",
];

#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// Who the audit log names for the writes in progress (see [`Store::set_actor`]).
    actor: String,
    /// Latest committed revision. One process owns the file, so in-process notification
    /// sees every commit.
    revs: watch::Sender<Revision>,
    /// Always true: an embedded store has no one to share singleton work with.
    leader: watch::Sender<bool>,
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "could not enable WAL (journal_mode={mode})"
            )));
        }
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut s = Self {
            conn,
            actor: super::SYSTEM_ACTOR.to_owned(),
            revs: watch::Sender::new(0),
            leader: watch::Sender::new(true),
        };
        s.migrate()?;
        s.revs.send_replace(read_revision(&s.conn)?);
        Ok(s)
    }

    /// Publishes a committed revision to [`Store::revisions`] watchers.
    fn committed(&self, rev: Revision) -> Revision {
        self.revs.send_if_modified(|cur| {
            let newer = rev > *cur;
            if newer {
                *cur = rev;
            }
            newer
        });
        rev
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(found).unwrap_or(0))
        {
            tx.execute_batch(sql)?;
            tx.pragma_update(
                None,
                "user_version",
                i64::try_from(i + 1).unwrap_or(i64::MAX),
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// A write transaction; takes the connection alone so `self.actor` stays readable beside it.
fn write_tx(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
    Ok(conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
}

fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Appends one change record and its audit entry in `tx` and returns the new revision.
fn log_change<T: Serialize>(
    tx: &Transaction<'_>,
    actor: &str,
    kind: &str,
    key: &str,
    value: Option<&T>,
) -> Result<Revision, StoreError> {
    let json = value
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    tx.execute(
        "INSERT INTO changes (at, kind, key, json) VALUES (?1, ?2, ?3, ?4)",
        params![to_i64(now_ms()), kind, key, json],
    )?;
    let rev = u64::try_from(tx.last_insert_rowid()).unwrap_or(0);
    audit(tx, actor, kind, key, rev, json.as_deref())?;
    Ok(rev)
}

/// Appends one audit entry in `tx` (same transaction as the change it records).
fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    action: &str,
    target: &str,
    rev: Revision,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, target, rev, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![to_i64(now_ms()), actor, action, target, to_i64(rev), detail],
    )?;
    Ok(())
}

fn admin_to_str(a: AdminState) -> &'static str {
    match a {
        AdminState::Auto => "auto",
        AdminState::Up => "up",
        AdminState::Down => "down",
    }
}

fn admin_from_str(s: &str) -> AdminState {
    match s {
        "up" => AdminState::Up,
        "down" => AdminState::Down,
        // Unknown values (a newer binary wrote them) fall back to following observation.
        _ => AdminState::Auto,
    }
}

fn exists(tx: &Connection, sql: &str, key: &dyn rusqlite::ToSql) -> Result<bool, StoreError> {
    Ok(tx.query_row(sql, [key], |_| Ok(())).optional()?.is_some())
}

fn service_exists(c: &Connection, name: &str) -> Result<bool, StoreError> {
    exists(c, "SELECT 1 FROM services WHERE name = ?1", &name)
}

/// The policy column: the policy's JSON (`"p2c"`, `{"hash":{"header":"x-user"}}`), which reads
/// the bare names older databases hold too.
fn lb_to_str(p: &LbPolicy) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "\"p2c\"".to_owned())
}

fn lb_from_str(s: &str) -> Result<LbPolicy, StoreError> {
    serde_json::from_str(s)
        .or_else(|_| serde_json::from_value(serde_json::Value::String(s.to_owned())))
        .map_err(|_| StoreError::Backend(format!("unknown lb_policy {s:?} in database")))
}

fn read_regions(c: &Connection) -> Result<Vec<Region>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT name, latitude, longitude, admin_state FROM regions ORDER BY name",
    )?;
    let rows = st.query_map([], |r| {
        Ok(Region {
            name: r.get(0)?,
            latitude: r.get(1)?,
            longitude: r.get(2)?,
            admin_state: admin_from_str(&r.get::<_, String>(3)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The `spec` column: the whole object's JSON.
fn spec_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

fn read_services(c: &Connection) -> Result<Vec<Service>, StoreError> {
    let mut st = c.prepare_cached("SELECT name, lb_policy, spec FROM services ORDER BY name")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    rows.map(|row| {
        let (name, lb, spec) = row?;
        match spec {
            Some(spec) => serde_json::from_str(&spec)
                .map_err(|e| StoreError::Backend(format!("service {name:?} in database: {e}"))),
            None => Ok(Service {
                name,
                lb_policy: lb_from_str(&lb)?,
                ..Default::default()
            }),
        }
    })
    .collect()
}

fn read_mounts(c: &Connection) -> Result<Vec<Mount>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT host, path_prefix, service, strip_prefix, spec FROM mounts ORDER BY host, path_prefix",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            Mount {
                host: r.get(0)?,
                path_prefix: r.get(1)?,
                service: r.get(2)?,
                strip_prefix: r.get(3)?,
                ..Default::default()
            },
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    rows.map(|row| {
        let (m, spec) = row?;
        match spec {
            Some(spec) => serde_json::from_str(&spec).map_err(|e| {
                StoreError::Backend(format!(
                    "mount {}{} in database: {e}",
                    m.host, m.path_prefix
                ))
            }),
            None => Ok(m),
        }
    })
    .collect()
}

fn read_agent_tokens(c: &Connection) -> Result<Vec<AgentTokenRecord>, StoreError> {
    let mut st =
        c.prepare_cached("SELECT id, service, sha256, created_at FROM agent_tokens ORDER BY id")?;
    let rows = st.query_map([], |r| {
        Ok(AgentTokenRecord {
            id: r.get(0)?,
            service: r.get(1)?,
            sha256: r.get(2)?,
            created_at_ms: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn read_dns_records(c: &Connection) -> Result<Vec<DnsRecord>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT name, rtype, zone, ttl, vals FROM dns_records ORDER BY name, rtype",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, rtype, zone, ttl, vals) = row?;
        // A type a newer binary wrote is skipped, like an unknown column.
        let Ok(rtype) = rtype.parse::<DnsRecordType>() else {
            continue;
        };
        out.push(DnsRecord {
            name,
            zone,
            rtype,
            ttl: u32::try_from(ttl).unwrap_or(0),
            values: serde_json::from_str(&vals)
                .map_err(|e| StoreError::Backend(format!("dns record values: {e}")))?,
        });
    }
    // Sorted by the type's order, not its text.
    out.sort_by(|a, b| (&a.name, a.rtype).cmp(&(&b.name, b.rtype)));
    Ok(out)
}

fn read_revision(c: &Connection) -> Result<Revision, StoreError> {
    let rev: i64 = c.query_row("SELECT COALESCE(MAX(rev), 0) FROM changes", [], |r| {
        r.get(0)
    })?;
    Ok(u64::try_from(rev).unwrap_or(0))
}

impl Store for SqliteStore {
    fn revision(&self) -> Result<Revision, StoreError> {
        read_revision(&self.conn)
    }

    fn desired(&self) -> Result<Desired, StoreError> {
        // One read transaction: every list and the revision come from the same commit.
        let tx = self.conn.unchecked_transaction()?;
        let d = Desired {
            revision: read_revision(&tx)?,
            regions: read_regions(&tx)?,
            services: read_services(&tx)?,
            mounts: read_mounts(&tx)?,
            agent_tokens: read_agent_tokens(&tx)?,
            records: read_dns_records(&tx)?,
        };
        tx.commit()?;
        Ok(d)
    }

    fn create_region(&mut self, r: &Region) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        if exists(&tx, "SELECT 1 FROM regions WHERE name = ?1", &r.name)? {
            return Err(StoreError::Duplicate {
                what: "region",
                key: r.name.clone(),
            });
        }
        tx.execute(
            "INSERT INTO regions (name, latitude, longitude, admin_state) VALUES (?1, ?2, ?3, ?4)",
            params![r.name, r.latitude, r.longitude, admin_to_str(r.admin_state)],
        )?;
        let rev = log_change(&tx, &self.actor, "region.put", &r.name, Some(r))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn list_regions(&self) -> Result<Vec<Region>, StoreError> {
        read_regions(&self.conn)
    }

    fn create_service(&mut self, s: &Service) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        if service_exists(&tx, &s.name)? {
            return Err(StoreError::Duplicate {
                what: "service",
                key: s.name.clone(),
            });
        }
        tx.execute(
            "INSERT INTO services (name, lb_policy, spec) VALUES (?1, ?2, ?3)",
            params![s.name, lb_to_str(&s.lb_policy), spec_json(s)?],
        )?;
        let rev = log_change(&tx, &self.actor, "service.put", &s.name, Some(s))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn list_services(&self) -> Result<Vec<Service>, StoreError> {
        read_services(&self.conn)
    }

    fn update_service(&mut self, s: &Service) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let n = tx.execute(
            "UPDATE services SET lb_policy = ?2, spec = ?3 WHERE name = ?1",
            params![s.name, lb_to_str(&s.lb_policy), spec_json(s)?],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "service",
                key: s.name.clone(),
            });
        }
        let rev = log_change(&tx, &self.actor, "service.put", &s.name, Some(s))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn delete_service(&mut self, name: &str) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        if !service_exists(&tx, name)? {
            return Err(StoreError::NotFound {
                what: "service",
                key: name.to_owned(),
            });
        }
        let mounts: i64 = tx.query_row(
            "SELECT COUNT(*) FROM mounts WHERE service = ?1",
            [name],
            |r| r.get(0),
        )?;
        let tokens: i64 = tx.query_row(
            "SELECT COUNT(*) FROM agent_tokens WHERE service = ?1",
            [name],
            |r| r.get(0),
        )?;
        if mounts > 0 || tokens > 0 {
            return Err(StoreError::InUse(format!(
                "service {name:?} is still referenced by {mounts} mount(s) and {tokens} agent token(s)"
            )));
        }
        let all = read_mounts(&tx)?;
        let users = crate::validate::split_users(&all, name);
        if !users.is_empty() {
            return Err(StoreError::InUse(crate::validate::in_use_by_splits(
                name, &users,
            )));
        }
        tx.execute("DELETE FROM services WHERE name = ?1", [name])?;
        let rev = log_change::<()>(&tx, &self.actor, "service.delete", name, None)?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn add_mount(&mut self, m: &Mount) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        if !service_exists(&tx, &m.service)? {
            return Err(StoreError::UnknownService(m.service.clone()));
        }
        if let Some(missing) = crate::validate::missing_split_target(m, |s| service_exists(&tx, s))?
        {
            let (field, message) = crate::validate::unknown_split_target(&missing);
            return Err(StoreError::Conflict { field, message });
        }
        let key = format!("{}{}", m.host, m.path_prefix);
        let dup = tx
            .query_row(
                "SELECT 1 FROM mounts WHERE host = ?1 AND path_prefix = ?2",
                params![m.host, m.path_prefix],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if dup {
            return Err(StoreError::Duplicate { what: "mount", key });
        }
        tx.execute(
            "INSERT INTO mounts (host, path_prefix, service, strip_prefix, spec) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![m.host, m.path_prefix, m.service, m.strip_prefix, spec_json(m)?],
        )?;
        let rev = log_change(&tx, &self.actor, "mount.put", &key, Some(m))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn list_mounts(&self) -> Result<Vec<Mount>, StoreError> {
        read_mounts(&self.conn)
    }

    fn update_mount(&mut self, m: &Mount) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let key = format!("{}{}", m.host, m.path_prefix);
        let exists = tx
            .query_row(
                "SELECT 1 FROM mounts WHERE host = ?1 AND path_prefix = ?2",
                params![m.host, m.path_prefix],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            return Err(StoreError::NotFound { what: "mount", key });
        }
        if !service_exists(&tx, &m.service)? {
            return Err(StoreError::UnknownService(m.service.clone()));
        }
        if let Some(missing) = crate::validate::missing_split_target(m, |s| service_exists(&tx, s))?
        {
            let (field, message) = crate::validate::unknown_split_target(&missing);
            return Err(StoreError::Conflict { field, message });
        }
        tx.execute(
            "UPDATE mounts SET service = ?3, strip_prefix = ?4, spec = ?5
             WHERE host = ?1 AND path_prefix = ?2",
            params![
                m.host,
                m.path_prefix,
                m.service,
                m.strip_prefix,
                spec_json(m)?
            ],
        )?;
        let rev = log_change(&tx, &self.actor, "mount.put", &key, Some(m))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn delete_mount(&mut self, host: &str, path_prefix: &str) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let key = format!("{host}{path_prefix}");
        let n = tx.execute(
            "DELETE FROM mounts WHERE host = ?1 AND path_prefix = ?2",
            params![host, path_prefix],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound { what: "mount", key });
        }
        let rev = log_change::<()>(&tx, &self.actor, "mount.delete", &key, None)?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn create_agent_token(&mut self, t: &AgentTokenRecord) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        if !service_exists(&tx, &t.service)? {
            return Err(StoreError::UnknownService(t.service.clone()));
        }
        if exists(&tx, "SELECT 1 FROM agent_tokens WHERE id = ?1", &t.id)? {
            return Err(StoreError::Duplicate {
                what: "token",
                key: t.id.clone(),
            });
        }
        tx.execute(
            "INSERT INTO agent_tokens (id, service, sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.id, t.service, t.sha256, to_i64(t.created_at_ms)],
        )?;
        let rev = log_change(&tx, &self.actor, "agent_token.put", &t.id, Some(t))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn list_agent_tokens(&self) -> Result<Vec<AgentTokenRecord>, StoreError> {
        read_agent_tokens(&self.conn)
    }

    fn revoke_agent_token(&mut self, id: &str) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let n = tx.execute("DELETE FROM agent_tokens WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "token",
                key: id.to_owned(),
            });
        }
        let rev = log_change::<()>(&tx, &self.actor, "agent_token.delete", id, None)?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn set_actor(&mut self, actor: &str) {
        actor.clone_into(&mut self.actor);
    }

    fn put_dns_record(&mut self, r: &DnsRecord) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        super::check_dns_record(&read_dns_records(&tx)?, r)?;
        let vals =
            serde_json::to_string(&r.values).map_err(|e| StoreError::Backend(e.to_string()))?;
        tx.execute(
            "INSERT INTO dns_records (name, rtype, zone, ttl, vals) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name, rtype) DO UPDATE SET zone = ?3, ttl = ?4, vals = ?5",
            params![r.name, r.rtype.as_str(), r.zone, i64::from(r.ttl), vals],
        )?;
        let rev = log_change(&tx, &self.actor, "dns_record.put", &r.key(), Some(r))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn list_dns_records(&self) -> Result<Vec<DnsRecord>, StoreError> {
        read_dns_records(&self.conn)
    }

    fn delete_dns_record(
        &mut self,
        name: &str,
        rtype: DnsRecordType,
    ) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let n = tx.execute(
            "DELETE FROM dns_records WHERE name = ?1 AND rtype = ?2",
            params![name, rtype.as_str()],
        )?;
        let key = format!("{name}/{}", rtype.as_str());
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "dns record",
                key,
            });
        }
        let rev = log_change::<()>(&tx, &self.actor, "dns_record.delete", &key, None)?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn set_region_admin_state(
        &mut self,
        name: &str,
        state: AdminState,
    ) -> Result<Revision, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let n = tx.execute(
            "UPDATE regions SET admin_state = ?2 WHERE name = ?1",
            params![name, admin_to_str(state)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "region",
                key: name.to_owned(),
            });
        }
        let region = read_regions(&tx)?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| StoreError::Backend("region vanished inside its transaction".into()))?;
        let rev = log_change(&tx, &self.actor, "region.admin_state", name, Some(&region))?;
        tx.commit()?;
        Ok(self.committed(rev))
    }

    fn put_api_token(&mut self, row: &ApiTokenRow) -> Result<bool, StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let existed = exists(
            &tx,
            "SELECT 1 FROM api_tokens WHERE sha256 = ?1",
            &row.sha256,
        )?;
        if !existed && exists(&tx, "SELECT 1 FROM api_tokens WHERE id = ?1", &row.id)? {
            return Err(StoreError::Duplicate {
                what: "api token",
                key: row.id.clone(),
            });
        }
        tx.execute(
            "INSERT INTO api_tokens (sha256, id, scope, description, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (sha256) DO UPDATE SET scope = excluded.scope",
            params![
                row.sha256,
                row.id,
                row.scope.as_str(),
                row.description,
                to_i64(row.created_at_ms)
            ],
        )?;
        if !existed {
            let detail =
                serde_json::json!({ "scope": row.scope.as_str(), "description": row.description });
            audit(
                &tx,
                &self.actor,
                "api_token.put",
                &row.id,
                0,
                Some(&detail.to_string()),
            )?;
        }
        tx.commit()?;
        Ok(!existed)
    }

    fn api_token(&self, sha256: &str) -> Result<Option<(Scope, String)>, StoreError> {
        let row: Option<(String, String)> = self
            .conn
            .prepare_cached("SELECT scope, id FROM api_tokens WHERE sha256 = ?1")?
            .query_row([sha256], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.and_then(|(scope, id)| Scope::parse(&scope).map(|s| (s, id))))
    }

    fn count_api_tokens(&self, scope: Scope) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM api_tokens WHERE scope = ?1",
            [scope.as_str()],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn list_api_tokens(&self) -> Result<Vec<ApiTokenInfo>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, scope, description, created_at FROM api_tokens ORDER BY created_at, id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, scope, description, at) = row?;
            let Some(scope) = Scope::parse(&scope) else {
                continue;
            };
            out.push(ApiTokenInfo {
                id,
                scope: scope.into(),
                description,
                created_at_ms: u64::try_from(at).unwrap_or(0),
            });
        }
        Ok(out)
    }

    fn revoke_api_token(&mut self, id: &str) -> Result<(), StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let scope: Option<String> = tx
            .query_row("SELECT scope FROM api_tokens WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(scope) = scope else {
            return Err(StoreError::NotFound {
                what: "api token",
                key: id.to_owned(),
            });
        };
        if scope == "admin" {
            let admins: i64 = tx.query_row(
                "SELECT COUNT(*) FROM api_tokens WHERE scope = 'admin'",
                [],
                |r| r.get(0),
            )?;
            if admins <= 1 {
                return Err(StoreError::InUse(
                    "refusing to revoke the last admin token: nobody could manage the network"
                        .into(),
                ));
            }
        }
        tx.execute("DELETE FROM api_tokens WHERE id = ?1", [id])?;
        audit(&tx, &self.actor, "api_token.delete", id, 0, None)?;
        tx.commit()?;
        Ok(())
    }

    fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, at, actor, action, target, rev, detail FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![to_i64(after), i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, actor, action, target, rev, detail) = row?;
            out.push(AuditEntry {
                id: u64::try_from(id).unwrap_or(0),
                at_ms: u64::try_from(at).unwrap_or(0),
                actor,
                action,
                target,
                revision: u64::try_from(rev).unwrap_or(0),
                detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
            });
        }
        Ok(out)
    }

    fn save_observed(&mut self, json: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO observed (k, json) VALUES ('edges', ?1)
             ON CONFLICT (k) DO UPDATE SET json = excluded.json",
            [json],
        )?;
        Ok(())
    }

    fn load_observed(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT json FROM observed WHERE k = 'edges'", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn put_secret_if_absent(&mut self, name: &str, value: &str) -> Result<String, StoreError> {
        // Created on first use rather than by a numbered migration: the table is independent
        // of the desired-state schema, and older binaries simply ignore it.
        let tx = self.conn.transaction()?;
        tx.execute(
            "CREATE TABLE IF NOT EXISTS secrets (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
            [],
        )?;
        tx.execute(
            "INSERT INTO secrets (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO NOTHING",
            params![name, value],
        )?;
        let stored: String =
            tx.query_row("SELECT v FROM secrets WHERE k = ?1", params![name], |r| {
                r.get(0)
            })?;
        tx.commit()?;
        Ok(stored)
    }

    fn changes_since(&self, after: Revision, limit: usize) -> Result<Vec<Change>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let compacted = read_compacted(&tx)?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        let mut st = tx.prepare_cached(
            "SELECT rev, kind, key, json FROM changes WHERE rev > ?1 ORDER BY rev LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![to_i64(after), i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (rev, kind, key, json) = row?;
            let object = kind.split_once('.').map_or(kind.as_str(), |(o, _)| o);
            let value = json
                .map(|j| serde_json::from_str(&j))
                .transpose()
                .map_err(|e| StoreError::Backend(format!("change {rev}: {e}")))?;
            out.push(Change {
                revision: u64::try_from(rev).unwrap_or(0),
                object: object.to_owned(),
                key,
                value,
            });
        }
        drop(st);
        tx.commit()?;
        Ok(out)
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        let tx = write_tx(&mut self.conn)?;
        // The latest change stays: the current revision is read from the log.
        let upto = revision.min(read_revision(&tx)?);
        if upto > read_compacted(&tx)? {
            tx.execute("DELETE FROM changes WHERE rev < ?1", [to_i64(upto)])?;
            // History after `upto - 1` is complete: a feed from there still gets every change.
            tx.execute(
                "INSERT INTO meta (k, v) VALUES ('compacted', ?1)
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                [to_i64(upto.saturating_sub(1))],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revisions(&self) -> watch::Receiver<Revision> {
        self.revs.subscribe()
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

/// Feeds may resume from any revision at or after this one.
fn read_compacted(c: &Connection) -> Result<Revision, StoreError> {
    let v: Option<i64> = c
        .query_row("SELECT v FROM meta WHERE k = 'compacted'", [], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

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

    #[test]
    fn round_trips_and_revision_is_monotonic() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        assert_eq!(s.revision().unwrap(), 0);
        let region = Region {
            name: "ams".into(),
            latitude: Some(52.4),
            longitude: Some(4.9),
            admin_state: Default::default(),
        };
        let r1 = s.create_region(&region).unwrap();
        let r2 = s.create_service(&svc("web")).unwrap();
        let r3 = s.add_mount(&mount("a.test", "/", "web")).unwrap();
        let r4 = s.create_agent_token(&token("t1", "web")).unwrap();
        assert!(r1 < r2 && r2 < r3 && r3 < r4, "{r1} {r2} {r3} {r4}");
        assert_eq!(s.revision().unwrap(), r4);

        let d = s.desired().unwrap();
        assert_eq!(d.revision, r4);
        assert_eq!(d.regions, vec![region]);
        assert_eq!(d.services, vec![svc("web")]);
        assert_eq!(d.mounts, vec![mount("a.test", "/", "web")]);
        assert_eq!(d.agent_tokens, vec![token("t1", "web")]);

        // Failed writes do not bump the revision.
        assert!(matches!(
            s.create_service(&svc("web")),
            Err(StoreError::Duplicate { .. })
        ));
        assert!(matches!(
            s.add_mount(&mount("a.test", "/", "web")),
            Err(StoreError::Duplicate { .. })
        ));
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
        assert_eq!(s.revision().unwrap(), r4);

        let r5 = s.delete_mount("a.test", "/").unwrap();
        let r6 = s.revoke_agent_token("t1").unwrap();
        let r7 = s.delete_service("web").unwrap();
        assert!(r4 < r5 && r5 < r6 && r6 < r7);
        let d = s.desired().unwrap();
        assert!(d.services.is_empty() && d.mounts.is_empty() && d.agent_tokens.is_empty());
        assert_eq!(d.revision, r7);
    }

    #[test]
    fn api_tokens() {
        let row = |id: &str, sha: &str, scope| ApiTokenRow {
            id: id.into(),
            sha256: sha.into(),
            scope,
            description: String::new(),
            created_at_ms: 1,
        };
        let mut s = SqliteStore::open_in_memory().unwrap();
        assert!(s.put_api_token(&row("a", "aa", Scope::Admin)).unwrap());
        assert!(!s.put_api_token(&row("a", "aa", Scope::Admin)).unwrap());
        assert!(s.put_api_token(&row("b", "bb", Scope::Node)).unwrap());
        assert!(matches!(
            s.put_api_token(&row("b", "b2", Scope::Read)),
            Err(StoreError::Duplicate { .. })
        ));
        assert_eq!(s.api_token("aa").unwrap(), Some((Scope::Admin, "a".into())));
        assert_eq!(s.api_token("bb").unwrap(), Some((Scope::Node, "b".into())));
        assert_eq!(s.api_token("cc").unwrap(), None);
        assert_eq!(s.count_api_tokens(Scope::Admin).unwrap(), 1);
        // API tokens are not desired state.
        assert_eq!(s.revision().unwrap(), 0);
        // The last admin token cannot be revoked; others can.
        assert!(matches!(s.revoke_api_token("a"), Err(StoreError::InUse(_))));
        s.set_actor("token:a");
        s.revoke_api_token("b").unwrap();
        assert_eq!(s.api_token("bb").unwrap(), None);
        let audit = s.list_audit(0, 100).unwrap();
        let actions: Vec<(&str, &str, &str)> = audit
            .iter()
            .map(|a| (a.actor.as_str(), a.action.as_str(), a.target.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                ("system", "api_token.put", "a"),
                ("system", "api_token.put", "b"),
                ("token:a", "api_token.delete", "b")
            ]
        );
    }

    #[test]
    fn admin_state_persists_and_is_audited() {
        let dir = TempDir::new("store-admin-state");
        let path = dir.path().join("coordinator.db");
        {
            let mut s = SqliteStore::open(&path).unwrap();
            s.create_region(&Region {
                name: "ams".into(),
                latitude: None,
                longitude: None,
                admin_state: AdminState::Auto,
            })
            .unwrap();
            s.set_actor("token:op");
            let r = s.set_region_admin_state("ams", AdminState::Down).unwrap();
            assert_eq!(s.revision().unwrap(), r);
            assert!(matches!(
                s.set_region_admin_state("nope", AdminState::Up),
                Err(StoreError::NotFound { .. })
            ));
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.desired().unwrap().regions[0].admin_state,
            AdminState::Down
        );
        let audit = s.list_audit(0, 10).unwrap();
        assert_eq!(audit.len(), 2);
        assert_eq!(audit[1].actor, "token:op");
        assert_eq!(audit[1].action, "region.admin_state");
        assert_eq!(audit[1].detail.as_ref().unwrap()["admin_state"], "down");
        assert_eq!(s.list_audit(audit[0].id, 10).unwrap().len(), 1);
    }

    #[test]
    fn migrates_a_version_1_database() {
        let dir = TempDir::new("store-migrate");
        let path = dir.path().join("coordinator.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch(
                "INSERT INTO regions VALUES ('ams', 1.0, 2.0);
                 INSERT INTO api_tokens VALUES ('abcdef0123456789', 'admin', 5);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.list_regions().unwrap()[0].admin_state, AdminState::Auto);
        assert_eq!(
            s.api_token("abcdef0123456789").unwrap(),
            Some((Scope::Admin, "sha-abcdef012345".into()))
        );
    }

    #[test]
    fn change_log_survives_reopen_and_matches_state() {
        let dir = TempDir::new("store-reopen");
        let path = dir.path().join("coordinator.db");
        let rev = {
            let mut s = SqliteStore::open(&path).unwrap();
            s.create_service(&svc("web")).unwrap();
            s.add_mount(&mount("a.test", "/api", "web")).unwrap();
            // A failing write must leave no change record behind.
            assert!(s.add_mount(&mount("a.test", "/x", "missing")).is_err());
            s.delete_mount("a.test", "/api").unwrap()
        };
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), rev);
        let log: Vec<(i64, String, String, Option<String>)> = s
            .conn
            .prepare("SELECT rev, kind, key, json FROM changes ORDER BY rev")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let kinds: Vec<&str> = log.iter().map(|l| l.1.as_str()).collect();
        assert_eq!(kinds, ["service.put", "mount.put", "mount.delete"]);
        assert_eq!(log[1].2, "a.test/api");
        let m: Mount = serde_json::from_str(log[1].3.as_deref().unwrap()).unwrap();
        assert_eq!(m, mount("a.test", "/api", "web"));
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn rows_from_before_the_spec_column_read_their_old_columns() {
        let dir = TempDir::new("store-spec");
        let path = dir.path().join("coordinator.db");
        {
            let c = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                c.execute_batch(m).unwrap();
            }
            c.execute_batch(
                r#"INSERT INTO services VALUES ('web', '{"hash":"client_ip"}');
                 INSERT INTO mounts VALUES ('a.test', '/x', 'web', 1);
                 PRAGMA user_version = 3;"#,
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&path).unwrap();
        let web = Service {
            name: "web".into(),
            lb_policy: LbPolicy::Hash(coordinator_api::HashOn::ClientIp),
            ..Default::default()
        };
        assert_eq!(s.list_services().unwrap(), vec![web.clone()]);
        assert_eq!(s.list_mounts().unwrap(), vec![mount("a.test", "/x", "web")]);
        // An update writes the whole object, new fields included.
        let web = Service {
            origins: vec![coordinator_api::Origin {
                url: "http://127.0.0.1:9".into(),
                weight: Some(2),
                ..Default::default()
            }],
            ..web
        };
        s.update_service(&web).unwrap();
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.list_services().unwrap(), vec![web]);
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = TempDir::new("store-newer");
        let path = dir.path().join("coordinator.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}

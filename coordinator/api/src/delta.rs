//! Deltas on the watch stream: what changed between two snapshots, so a change to one of N
//! services costs a line of its own size instead of a whole snapshot (the EndpointSlice lesson).
//!
//! Pure functions, tested without sockets: [`diff`] (coordinator, live stream), [`order`]
//! (make-before-break, as xDS orders CDS before RDS and removes clusters last), [`apply`]
//! (subscriber) and [`digest`], which lets a subscriber prove it converged on exactly the state
//! the coordinator holds instead of trusting that its base was the right one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::types::{
    AgentTokenRecord, EdgeStatus, Mount, Region, RegionHealth, Revision, Service, Snapshot,
};

/// One desired-state change inside a [`Delta`]. A put replaces the object with the same key
/// (or adds it); a delete of an object the subscriber does not hold is a no-op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DeltaOp {
    PutRegion { region: Region },
    PutService { service: Service },
    PutAgentToken { token: AgentTokenRecord },
    PutMount { mount: Mount },
    DeleteMount { host: String, path_prefix: String },
    DeleteAgentToken { id: String },
    DeleteService { name: String },
    DeleteRegion { name: String },
}

impl DeltaOp {
    /// Make-before-break rank: everything a mount or token refers to is put before it, and a
    /// service or region is removed only after whatever used it.
    fn rank(&self) -> u8 {
        match self {
            Self::PutRegion { .. } => 0,
            Self::PutService { .. } => 1,
            Self::PutAgentToken { .. } => 2,
            Self::PutMount { .. } => 3,
            Self::DeleteMount { .. } => 4,
            Self::DeleteAgentToken { .. } => 5,
            Self::DeleteService { .. } => 6,
            Self::DeleteRegion { .. } => 7,
        }
    }
}

/// The observed half of a snapshot, replaced whole: it is bounded by the number of edges, not by
/// the number of services, so diffing it per edge would save little and add a second protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObservedState {
    pub observed_version: u64,
    pub edges: Vec<EdgeStatus>,
    pub region_health: Vec<RegionHealth>,
}

/// The changes from the snapshot at `from_revision` (which the subscriber must hold) to the one
/// at `revision`, in make-before-break order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub from_revision: Revision,
    pub revision: Revision,
    #[serde(default)]
    pub ops: Vec<DeltaOp>,
    /// Replaces `edges`, `region_health` and `observed_version` when present; when absent the
    /// observed state did not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedState>,
    /// [`digest`] of the resulting snapshot; a subscriber whose result differs resyncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Why a delta could not be applied; the subscriber keeps its last good snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta from revision {expected} does not apply to revision {held}")]
    WrongBase { expected: Revision, held: Revision },
    #[error("{0}")]
    Integrity(String),
    #[error("invalid result: {0}")]
    Invalid(String),
    #[error("digest mismatch: the result differs from the coordinator's state")]
    Digest,
}

/// Sorts ops make-before-break (stable: ops of one kind keep their order).
pub fn order(ops: &mut [DeltaOp]) {
    ops.sort_by_key(DeltaOp::rank);
}

/// What turns `old` into `new`, ordered, with the observed half when it changed. Only the fields
/// this module knows are diffed: callers that must be exact check `apply(old, diff) == new`.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Delta {
    let mut ops = Vec::new();
    diff_keyed(
        &old.regions,
        &new.regions,
        |r| r.name.clone(),
        |r| DeltaOp::PutRegion { region: r.clone() },
        |name| DeltaOp::DeleteRegion { name },
        &mut ops,
    );
    diff_keyed(
        &old.services,
        &new.services,
        |s| s.name.clone(),
        |s| DeltaOp::PutService { service: s.clone() },
        |name| DeltaOp::DeleteService { name },
        &mut ops,
    );
    diff_keyed(
        &old.agent_tokens,
        &new.agent_tokens,
        |t| t.id.clone(),
        |t| DeltaOp::PutAgentToken { token: t.clone() },
        |id| DeltaOp::DeleteAgentToken { id },
        &mut ops,
    );
    diff_keyed(
        &old.mounts,
        &new.mounts,
        |m| (m.host.clone(), m.path_prefix.clone()),
        |m| DeltaOp::PutMount { mount: m.clone() },
        |(host, path_prefix)| DeltaOp::DeleteMount { host, path_prefix },
        &mut ops,
    );
    order(&mut ops);
    let observed = (old.observed_version != new.observed_version
        || old.edges != new.edges
        || old.region_health != new.region_health)
        .then(|| ObservedState {
            observed_version: new.observed_version,
            edges: new.edges.clone(),
            region_health: new.region_health.clone(),
        });
    Delta {
        from_revision: old.revision,
        revision: new.revision,
        ops,
        observed,
        digest: None,
    }
}

fn diff_keyed<T: PartialEq, K: Ord>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> K,
    put: impl Fn(&T) -> DeltaOp,
    delete: impl Fn(K) -> DeltaOp,
    ops: &mut Vec<DeltaOp>,
) {
    let before: BTreeMap<K, &T> = old.iter().map(|x| (key(x), x)).collect();
    let mut seen = BTreeSet::new();
    for x in new {
        let k = key(x);
        if before.get(&k) != Some(&x) {
            ops.push(put(x));
        }
        seen.insert(k);
    }
    for (k, _) in before {
        if !seen.contains(&k) {
            ops.push(delete(k));
        }
    }
}

/// Applies `d` to `base` op by op, refusing any op that would leave a dangling reference (so a
/// delta out of make-before-break order fails instead of producing a state that never existed),
/// then validates the result and checks the digest when the delta carries one.
pub fn apply(base: &Snapshot, d: &Delta) -> Result<Snapshot, DeltaError> {
    if base.revision != d.from_revision {
        return Err(DeltaError::WrongBase {
            expected: d.from_revision,
            held: base.revision,
        });
    }
    let mut s = base.clone();
    for op in &d.ops {
        apply_op(&mut s, op)?;
    }
    s.regions.sort_by(|a, b| a.name.cmp(&b.name));
    s.services.sort_by(|a, b| a.name.cmp(&b.name));
    s.mounts
        .sort_by(|a, b| (&a.host, &a.path_prefix).cmp(&(&b.host, &b.path_prefix)));
    s.agent_tokens.sort_by(|a, b| a.id.cmp(&b.id));
    s.revision = d.revision;
    if let Some(o) = &d.observed {
        s.observed_version = o.observed_version;
        s.edges = o.edges.clone();
        s.region_health = o.region_health.clone();
    }
    s.validate().map_err(DeltaError::Invalid)?;
    if let Some(want) = &d.digest
        && *want != digest(&s)
    {
        return Err(DeltaError::Digest);
    }
    Ok(s)
}

fn apply_op(s: &mut Snapshot, op: &DeltaOp) -> Result<(), DeltaError> {
    let has_service = |s: &Snapshot, name: &str| s.services.iter().any(|x| x.name == name);
    match op {
        DeltaOp::PutRegion { region } => upsert(&mut s.regions, region, |r| &r.name),
        DeltaOp::PutService { service } => upsert(&mut s.services, service, |x| &x.name),
        DeltaOp::PutAgentToken { token } => {
            if !has_service(s, &token.service) {
                return Err(DeltaError::Integrity(format!(
                    "token {} put before its service {:?}",
                    token.id, token.service
                )));
            }
            upsert(&mut s.agent_tokens, token, |t| &t.id);
        }
        DeltaOp::PutMount { mount } => {
            if !has_service(s, &mount.service) {
                return Err(DeltaError::Integrity(format!(
                    "mount {}{} put before its service {:?}",
                    mount.host, mount.path_prefix, mount.service
                )));
            }
            match s
                .mounts
                .iter_mut()
                .find(|m| m.host == mount.host && m.path_prefix == mount.path_prefix)
            {
                Some(m) => *m = mount.clone(),
                None => s.mounts.push(mount.clone()),
            }
        }
        DeltaOp::DeleteMount { host, path_prefix } => s
            .mounts
            .retain(|m| !(m.host == *host && m.path_prefix == *path_prefix)),
        DeltaOp::DeleteAgentToken { id } => s.agent_tokens.retain(|t| t.id != *id),
        DeltaOp::DeleteService { name } => {
            if let Some(m) = s.mounts.iter().find(|m| m.service == *name) {
                return Err(DeltaError::Integrity(format!(
                    "service {name:?} removed while mount {}{} still uses it",
                    m.host, m.path_prefix
                )));
            }
            if let Some(t) = s.agent_tokens.iter().find(|t| t.service == *name) {
                return Err(DeltaError::Integrity(format!(
                    "service {name:?} removed while token {} still uses it",
                    t.id
                )));
            }
            s.services.retain(|x| x.name != *name);
        }
        DeltaOp::DeleteRegion { name } => s.regions.retain(|r| r.name != *name),
    }
    Ok(())
}

fn upsert<T: Clone>(list: &mut Vec<T>, item: &T, key: impl Fn(&T) -> &String) {
    match list.iter_mut().find(|x| key(x) == key(item)) {
        Some(x) => *x = item.clone(),
        None => list.push(item.clone()),
    }
}

/// SHA-256 (hex) of the snapshot's desired half: every field but the observed ones, so fields
/// added to [`Snapshot`] later are covered without touching this function.
pub fn digest(s: &Snapshot) -> String {
    let desired = Snapshot {
        observed_version: 0,
        edges: Vec::new(),
        region_health: Vec::new(),
        ..s.clone()
    };
    // Serialising plain data structs cannot fail; an empty input still yields a digest that
    // will not match, which makes the subscriber resync rather than accept.
    let bytes = serde_json::to_vec(&desired).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AdminState, EdgeInfo};

    fn service(name: &str) -> Service {
        serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
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

    fn token(id: &str, service: &str) -> AgentTokenRecord {
        AgentTokenRecord {
            id: id.into(),
            service: service.into(),
            sha256: "00".into(),
            created_at_ms: 1,
        }
    }

    fn region(name: &str, admin_state: AdminState) -> Region {
        Region {
            name: name.into(),
            latitude: Some(1.5),
            longitude: None,
            admin_state,
        }
    }

    fn snap(rev: u64) -> Snapshot {
        Snapshot {
            revision: rev,
            observed_version: 3,
            regions: vec![region("ams", AdminState::Auto)],
            services: vec![service("api"), service("web")],
            mounts: vec![mount("a.test", "/", "web"), mount("b.test", "/x", "api")],
            agent_tokens: vec![token("t1", "web")],
            ..Default::default()
        }
    }

    #[test]
    fn order_is_make_before_break() {
        let mut ops = vec![
            DeltaOp::DeleteService { name: "old".into() },
            DeltaOp::PutMount {
                mount: mount("c.test", "/", "new"),
            },
            DeltaOp::DeleteMount {
                host: "d.test".into(),
                path_prefix: "/".into(),
            },
            DeltaOp::PutService {
                service: service("new"),
            },
            DeltaOp::DeleteRegion { name: "x".into() },
            DeltaOp::PutAgentToken {
                token: token("t9", "new"),
            },
            DeltaOp::DeleteAgentToken { id: "t8".into() },
            DeltaOp::PutRegion {
                region: region("y", AdminState::Up),
            },
        ];
        order(&mut ops);
        let kinds: Vec<u8> = ops.iter().map(DeltaOp::rank).collect();
        assert_eq!(kinds, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(matches!(ops[1], DeltaOp::PutService { .. }));
        assert!(matches!(ops[3], DeltaOp::PutMount { .. }));
        assert!(matches!(ops[4], DeltaOp::DeleteMount { .. }));
        assert!(matches!(ops[6], DeltaOp::DeleteService { .. }));
    }

    #[test]
    fn diff_then_apply_reproduces_the_new_snapshot() {
        let old = snap(5);
        let mut new = snap(9);
        // Move a.test from web to a new service, drop api (and b.test with it), retune ams,
        // add a region, revoke t1 and issue t2 for the new service; an edge appears.
        new.services = vec![service("shop"), service("web")];
        new.mounts = vec![mount("a.test", "/", "shop"), mount("c.test", "/", "web")];
        new.agent_tokens = vec![token("t2", "shop")];
        new.regions = vec![
            region("ams", AdminState::Down),
            region("sin", AdminState::Auto),
        ];
        new.observed_version = 4;
        new.edges = vec![EdgeStatus {
            info: EdgeInfo {
                id: "e1".into(),
                region: "ams".into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive: true,
            last_seen_ms: 7,
            agents: vec![],
        }];
        let mut d = diff(&old, &new);
        d.digest = Some(digest(&new));
        assert_eq!(apply(&old, &d), Ok(new.clone()));
        // The make-before-break order is what makes it apply: shop before a.test's move, the
        // mount removal before api's removal.
        let mut reversed = d.clone();
        reversed.ops.reverse();
        assert!(matches!(
            apply(&old, &reversed),
            Err(DeltaError::Integrity(_))
        ));
        // Nothing changed: no ops, no observed half.
        let same = diff(&new, &new);
        assert!(same.ops.is_empty() && same.observed.is_none());
    }

    #[test]
    fn apply_refuses_wrong_base_invalid_result_and_digest_mismatch() {
        let old = snap(5);
        let mut new = snap(6);
        new.mounts.push(mount("z.test", "/", "web"));
        let d = diff(&old, &new);
        assert_eq!(
            apply(&snap(4), &d),
            Err(DeltaError::WrongBase {
                expected: 5,
                held: 4
            })
        );
        let bad = Delta {
            ops: vec![DeltaOp::PutMount {
                mount: mount("y.test", "nope", "web"),
            }],
            ..d.clone()
        };
        assert!(matches!(apply(&old, &bad), Err(DeltaError::Invalid(_))));
        let dangling = Delta {
            ops: vec![DeltaOp::PutMount {
                mount: mount("y.test", "/", "ghost"),
            }],
            ..d.clone()
        };
        assert!(matches!(
            apply(&old, &dangling),
            Err(DeltaError::Integrity(_))
        ));
        let wrong_digest = Delta {
            digest: Some(digest(&old)),
            ..d.clone()
        };
        assert_eq!(apply(&old, &wrong_digest), Err(DeltaError::Digest));
        // Deleting what is not there is a no-op (a put and a delete collapsed on the way).
        let gone = Delta {
            ops: vec![DeltaOp::DeleteMount {
                host: "never.test".into(),
                path_prefix: "/".into(),
            }],
            ..d
        };
        assert_eq!(apply(&old, &gone).map(|s| s.mounts), Ok(old.mounts.clone()));
    }

    /// Bytes on the wire for one `mount add` with N services (each with one mount): the snapshot
    /// line a stream used to send versus the delta line. `cargo test -p coordinator-api
    /// bytes_per_change -- --nocapture` prints the table docs/benchmarks.md quotes.
    #[test]
    fn bytes_per_change() {
        for n in [10usize, 100, 1_000, 10_000] {
            let mut old = Snapshot {
                revision: 100,
                ..Default::default()
            };
            for i in 0..n {
                old.services.push(service(&format!("svc{i:05}")));
                old.mounts.push(mount(
                    &format!("app{i:05}.example.com"),
                    "/",
                    &format!("svc{i:05}"),
                ));
            }
            let mut new = old.clone();
            new.revision = 101;
            new.mounts
                .push(mount("new.example.com", "/api", "svc00000"));
            let snapshot_line =
                serde_json::to_vec(&crate::types::WatchEvent::Snapshot(new.clone())).unwrap();
            let mut d = diff(&old, &new);
            d.digest = Some(digest(&new));
            let delta_line = serde_json::to_vec(&crate::types::WatchEvent::Delta(d)).unwrap();
            println!(
                "bytes per change, {n} services: snapshot {} B, delta {} B",
                snapshot_line.len(),
                delta_line.len()
            );
            assert!(delta_line.len() < 400, "{}", delta_line.len());
            if n >= 100 {
                assert!(delta_line.len() * 20 < snapshot_line.len());
            }
        }
    }

    #[test]
    fn wire_format_round_trips() {
        let d = diff(&snap(1), &{
            let mut s = snap(2);
            s.mounts.remove(0);
            s
        });
        let line = serde_json::to_string(&crate::types::WatchEvent::Delta(d.clone())).unwrap();
        assert!(line.starts_with(r#"{"type":"delta""#), "{line}");
        assert!(line.contains(r#""op":"delete_mount""#), "{line}");
        let back: crate::types::WatchEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, crate::types::WatchEvent::Delta(d));
    }
}

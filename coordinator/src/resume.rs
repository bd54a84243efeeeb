//! Resuming a watch from the change log: the store's changes after the subscriber's revision,
//! collapsed to one op per object and put in make-before-break order. Pure, so it is tested
//! without a store.

use std::collections::BTreeMap;

use coordinator_api::delta::{self, DeltaOp};
use coordinator_api::{AgentTokenRecord, Mount, Region, Revision, Service};
use serde::de::DeserializeOwned;

use crate::store::Change;

/// Most change-log entries a resume reads; a subscriber further behind gets a snapshot, which is
/// then the smaller message anyway.
pub(crate) const RESUME_MAX_CHANGES: usize = 1_024;

/// The ops that take a subscriber from the state before `changes` to the state at `upto`, or
/// `None` when they cannot be expressed as a delta (an object kind deltas do not carry, an entry
/// that does not decode): the caller sends a snapshot instead. Changes after `upto` (committed
/// after the snapshot being resumed to was read) are ignored.
pub(crate) fn ops_from_changes(changes: &[Change], upto: Revision) -> Option<Vec<DeltaOp>> {
    // Last write wins per object; the map keeps one entry per (kind, key).
    let mut last: BTreeMap<(&str, &str), Option<&serde_json::Value>> = BTreeMap::new();
    for c in changes.iter().filter(|c| c.revision <= upto) {
        last.insert((c.object.as_str(), c.key.as_str()), c.value.as_ref());
    }
    let mut ops = Vec::with_capacity(last.len());
    for ((object, key), value) in last {
        let op = match (object, value) {
            ("region", Some(v)) => DeltaOp::PutRegion {
                region: decode::<Region>(v)?,
            },
            ("region", None) => DeltaOp::DeleteRegion { name: key.into() },
            ("service", Some(v)) => DeltaOp::PutService {
                service: decode::<Service>(v)?,
            },
            ("service", None) => DeltaOp::DeleteService { name: key.into() },
            ("agent_token", Some(v)) => DeltaOp::PutAgentToken {
                token: decode::<AgentTokenRecord>(v)?,
            },
            ("agent_token", None) => DeltaOp::DeleteAgentToken { id: key.into() },
            ("mount", Some(v)) => DeltaOp::PutMount {
                mount: decode::<Mount>(v)?,
            },
            ("mount", None) => {
                // The key is host + path prefix; a host holds no '/', a prefix starts with one.
                let at = key.find('/')?;
                DeltaOp::DeleteMount {
                    host: key[..at].into(),
                    path_prefix: key[at..].into(),
                }
            }
            _ => return None,
        };
        ops.push(op);
    }
    delta::order(&mut ops);
    Some(ops)
}

fn decode<T: DeserializeOwned>(v: &serde_json::Value) -> Option<T> {
    T::deserialize(v).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn change(revision: u64, object: &str, key: &str, value: Option<serde_json::Value>) -> Change {
        Change {
            revision,
            object: object.into(),
            key: key.into(),
            value,
        }
    }

    #[test]
    fn collapses_per_object_and_orders_make_before_break() {
        let mount = |svc: &str| json!({"host": "a.test", "path_prefix": "/x", "service": svc});
        let changes = [
            change(2, "service", "new", Some(json!({"name": "new"}))),
            change(3, "mount", "a.test/x", Some(mount("old"))),
            change(4, "mount", "a.test/x", Some(mount("new"))),
            change(5, "mount", "b.test/", None),
            change(6, "service", "old", None),
            change(
                7,
                "region",
                "ams",
                Some(json!({"name": "ams", "admin_state": "down"})),
            ),
            change(8, "mount", "c.test/", Some(mount("new"))),
        ];
        let ops = ops_from_changes(&changes, 7).unwrap();
        let names: Vec<String> = ops
            .iter()
            .map(|op| {
                serde_json::to_value(op).unwrap()["op"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "put_region",
                "put_service",
                "put_mount",
                "delete_mount",
                "delete_service"
            ]
        );
        // a.test/x: the last write (to `new`) only; b.test/ split back into host and prefix;
        // revision 8 is past `upto`.
        assert!(matches!(&ops[2], DeltaOp::PutMount { mount } if mount.service == "new"));
        assert!(matches!(&ops[3],
            DeltaOp::DeleteMount { host, path_prefix } if host == "b.test" && path_prefix == "/"));
    }

    #[test]
    fn unknown_kinds_and_undecodable_values_fall_back_to_a_snapshot() {
        let unknown = [change(2, "dns_record", "a.test/A", Some(json!({})))];
        assert_eq!(ops_from_changes(&unknown, 2), None);
        let garbage = [change(2, "service", "x", Some(json!(42)))];
        assert_eq!(ops_from_changes(&garbage, 2), None);
        let no_slash = [change(2, "mount", "nohost", None)];
        assert_eq!(ops_from_changes(&no_slash, 2), None);
        assert_eq!(ops_from_changes(&[], 9), Some(vec![]));
    }
}

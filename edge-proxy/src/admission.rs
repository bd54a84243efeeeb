//! Who may register as an agent, sans-IO: checks a `Hello` against the current snapshot.
//!
//! A token is bound to exactly one service, so an agent can never receive another service's
//! traffic; the edge stores only token hashes, as the coordinator does.

use coordinator_api::{Snapshot, token};
use tunnel_proto::{EdgeEndpoint, VERSION};

/// A registered agent's credentials, kept to re-check against later snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub(crate) token_id: String,
    pub(crate) token_sha256: String,
    pub(crate) service: String,
    /// Admitted with a verified client certificate naming the service (see `client_auth`).
    pub(crate) mtls: bool,
}

/// Validates a `Hello`. `Err` carries the reason sent back in `Reject`.
pub(crate) fn admit(
    snapshot: Option<&Snapshot>,
    version: u8,
    token: &str,
    services: &[String],
) -> Result<Admitted, String> {
    if version != VERSION {
        return Err(format!(
            "unsupported protocol version {version}; this edge speaks {VERSION}"
        ));
    }
    let Some(snapshot) = snapshot else {
        return Err("edge has no configuration yet".into());
    };
    let sha = token::sha256_hex(token);
    // Constant-time comparison per record, so timing reveals nothing about stored hashes.
    let record = snapshot
        .agent_tokens
        .iter()
        .find(|r| ct_eq(r.sha256.as_bytes(), sha.as_bytes()))
        .ok_or_else(|| "invalid agent token".to_owned())?;
    if services.is_empty() {
        return Err("hello lists no services".into());
    }
    if let Some(other) = services.iter().find(|s| **s != record.service) {
        return Err(format!(
            "token is for service {:?}, not {other:?}",
            record.service
        ));
    }
    Ok(Admitted {
        token_id: record.id.clone(),
        token_sha256: sha,
        service: record.service.clone(),
        mtls: false,
    })
}

/// Whether a later snapshot still authorises an admitted agent.
pub(crate) fn still_valid(snapshot: &Snapshot, admitted: &Admitted) -> bool {
    snapshot
        .agent_tokens
        .iter()
        .any(|r| r.sha256 == admitted.token_sha256 && r.service == admitted.service)
}

/// Alive edges of other regions that have a tunnel listener, for `Welcome`.
pub(crate) fn other_edges(snapshot: &Snapshot, my_id: &str, my_region: &str) -> Vec<EdgeEndpoint> {
    snapshot
        .edges
        .iter()
        .filter(|e| e.alive && e.info.region != my_region && e.info.id != my_id)
        .filter_map(|e| {
            Some(EdgeEndpoint {
                edge_id: e.info.id.clone(),
                region: e.info.region.clone(),
                addr: e.info.tunnel_addr.clone()?,
            })
        })
        .collect()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_api::{AgentTokenRecord, EdgeInfo, EdgeStatus, Service};

    fn snap() -> Snapshot {
        Snapshot {
            services: vec![
                Service {
                    name: "web".into(),
                    lb_policy: Default::default(),
                    ..Default::default()
                },
                Service {
                    name: "api".into(),
                    lb_policy: Default::default(),
                    ..Default::default()
                },
            ],
            agent_tokens: vec![AgentTokenRecord {
                id: "t1".into(),
                service: "web".into(),
                sha256: token::sha256_hex("mrd_agent_t1_secret"),
                created_at_ms: 0,
            }],
            edges: vec![
                edge("e-us", "us", true, Some("192.0.2.1:4443")),
                edge("e-eu2", "eu", true, Some("192.0.2.2:4443")),
                edge("e-ap", "ap", false, Some("192.0.2.3:4443")),
                edge("e-sa", "sa", true, None),
            ],
            ..Default::default()
        }
    }

    fn edge(id: &str, region: &str, alive: bool, tunnel: Option<&str>) -> EdgeStatus {
        EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: tunnel.map(Into::into),
                anycast: None,
                healthy_services: None,
            },
            alive,
            last_seen_ms: 0,
            agents: vec![],
        }
    }

    #[test]
    fn admits_good_token() {
        let s = snap();
        let a = admit(Some(&s), VERSION, "mrd_agent_t1_secret", &["web".into()]);
        assert_eq!(a.as_ref().map(|a| a.service.as_str()), Ok("web"));
        assert!(a.is_ok_and(|a| still_valid(&s, &a)));
    }

    #[test]
    fn rejects() {
        let s = snap();
        let web = vec!["web".to_owned()];
        assert_eq!(
            admit(None, VERSION, "x", &web),
            Err("edge has no configuration yet".into())
        );
        assert!(
            admit(Some(&s), VERSION + 1, "mrd_agent_t1_secret", &web)
                .is_err_and(|e| e.contains("version"))
        );
        assert_eq!(
            admit(Some(&s), VERSION, "mrd_agent_t1_wrong", &web),
            Err("invalid agent token".into())
        );
        let other = admit(
            Some(&s),
            VERSION,
            "mrd_agent_t1_secret",
            &["web".into(), "api".into()],
        );
        assert!(other.is_err_and(|e| e.contains("not \"api\"")));
        assert!(admit(Some(&s), VERSION, "mrd_agent_t1_secret", &[]).is_err());
    }

    #[test]
    fn revocation_detected() {
        let mut s = snap();
        let a = admit(Some(&s), VERSION, "mrd_agent_t1_secret", &["web".into()]);
        s.agent_tokens.clear();
        assert!(a.is_ok_and(|a| !still_valid(&s, &a)));
    }

    #[test]
    fn welcome_lists_alive_edges_of_other_regions() {
        let got = other_edges(&snap(), "e-eu1", "eu");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].edge_id, "e-us");
        assert_eq!(got[0].addr, "192.0.2.1:4443");
    }
}

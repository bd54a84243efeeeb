//! `meridian dns explain IP [NAME]`: how one client address is mapped and what it would be
//! answered, computed by the same code that serves queries.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use coordinator_api::Snapshot;
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RecordType};

use crate::config::Config;
use crate::health::HealthTracker;
use crate::respond::{Transport, respond};
use crate::zone::{Zone, ZoneConfig};
use crate::{Error, SNAPSHOT_CACHE_FILE};

/// Arguments of `meridian dns explain`; takes the GeoDNS role's flags so the policy (nets,
/// database, maps) is the one the server runs with.
#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// Client address (treated as an ECS subnet of full length).
    pub ip: IpAddr,
    /// Name to resolve, absolute or relative to --zone (default: the first --geo-name).
    pub name: Option<String>,
    /// Use the cached snapshot in --state-dir only; never contact the coordinator.
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub config: Config,
}

/// Where the snapshot came from, for the report.
async fn snapshot(args: &ExplainArgs) -> Result<(Snapshot, String), Error> {
    let cache = args
        .config
        .state_dir
        .as_ref()
        .map(|d| d.join(SNAPSHOT_CACHE_FILE));
    let cached = || -> Result<Option<(Snapshot, String)>, Error> {
        let Some(path) = &cache else { return Ok(None) };
        match coordinator_api::subscriber::load_cache(path) {
            Ok(Some(s)) => Ok(Some((s, format!("cached {}", path.display())))),
            Ok(None) => Ok(None),
            Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
        }
    };
    if !args.offline
        && let Some(url) = &args.config.coordinator
    {
        let client =
            coordinator_api::Client::new(url, args.config.node_token.clone().unwrap_or_default())?;
        match client.snapshot().await {
            Ok(s) => return Ok((s, format!("coordinator {url}"))),
            Err(e) => {
                if let Some((s, from)) = cached()? {
                    return Ok((s, format!("{from} (coordinator unreachable: {e})")));
                }
                return Err(e.into());
            }
        }
    }
    cached()?.ok_or_else(|| {
        Error::Config("no snapshot: pass --coordinator, or --state-dir with a cached one".into())
    })
}

/// The full explanation as text.
pub async fn explain(args: ExplainArgs) -> Result<String, Error> {
    let (snap, from) = snapshot(&args).await?;
    let config = args.config.clone();
    // Reading a real GeoIP database takes a while: keep it off the runtime's workers.
    let zone_config = tokio::task::spawn_blocking(move || ZoneConfig::from_config(&config))
        .await
        .map_err(|e| Error::Config(format!("policy build failed: {e}")))?
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(explain_with(
        Arc::new(zone_config),
        &snap,
        &from,
        args.ip,
        args.name.as_deref(),
    ))
}

/// [`explain`] over an already built zone and snapshot (unit-testable).
pub fn explain_with(
    zone_config: Arc<ZoneConfig>,
    snap: &Snapshot,
    from: &str,
    ip: IpAddr,
    name: Option<&str>,
) -> String {
    let mut health = HealthTracker::new(zone_config.hysteresis);
    health.observe(snap, Instant::now());
    let policies = zone_config.policies.clone();
    let zone = Zone::build(zone_config.clone(), &policies, snap, &health);
    let mut out = format!(
        "snapshot: revision {} from {from} (health as observed now; no hysteresis history), {} zone record sets\n",
        snap.revision,
        snap.records.len()
    );
    let qname = match name {
        Some(n) if n.ends_with('.') => Name::from_ascii(n),
        Some(n) => Name::parse(n, Some(&zone_config.origin)),
        None => Ok(zone_config
            .geo_names
            .first()
            .cloned()
            .unwrap_or_else(|| zone_config.origin.clone())),
    };
    let qname = match qname {
        Ok(n) => n,
        Err(e) => {
            out.push_str(&format!("name {name:?}: invalid: {e}\n"));
            return out;
        }
    };
    // The table of the name asked (a geo name tied to a service has its own health), else the
    // zone's: a customer name CNAME'd into the zone shows the walk of the geo table.
    let lname = qname.to_lowercase();
    let geo = zone_config.geo_names.iter().position(|n| *n == lname);
    if let Some(service) = geo
        .and_then(|i| zone_config.geo_services.get(i))
        .cloned()
        .flatten()
    {
        out.push_str(&format!(
            "service: {service} (a region without a live agent of it counts as down)\n"
        ));
    }
    if let Some(spec) = geo
        .and_then(|i| zone_config.geo_policies.get(i))
        .and_then(|&p| zone_config.name_specs.get(p.checked_sub(1)?))
    {
        out.push_str(&format!(
            "name policy: --policy-file name {:?}{}\n",
            spec.name,
            if spec.nets.is_some() {
                " (own nets)"
            } else {
                ""
            }
        ));
    }
    if let Some(table) = geo.and_then(|i| zone.geo_table(i)).or(zone.table.as_ref()) {
        out.push_str(&table.explain(ip));
    }
    let prefix = if ip.to_canonical().is_ipv4() { 32 } else { 128 };
    for qtype in [RecordType::A, RecordType::AAAA] {
        let mut q = Message::query();
        q.add_query(Query::query(qname.clone(), qtype));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        if let Ok(cs) = ClientSubnet::from_str(&format!("{}/{prefix}", ip.to_canonical())) {
            e.options_mut().insert(EdnsOption::Subnet(cs));
        }
        q.set_edns(e);
        let Ok(bytes) = q.to_vec() else { continue };
        let reply = respond(&zone, &bytes, ip, Transport::Tcp)
            .reply
            .and_then(|r| Message::from_vec(&r).ok());
        let Some(r) = reply else {
            out.push_str(&format!("{qname} {qtype}: no reply\n"));
            continue;
        };
        let scope = match r.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet)) {
            Some(EdnsOption::Subnet(cs)) => format!(" ecs-scope=/{}", cs.scope_prefix()),
            _ => String::new(),
        };
        let answers: Vec<String> = r
            .answers
            .iter()
            .map(|a| format!("{} {}", a.data, a.ttl))
            .collect();
        out.push_str(&format!(
            "{qname} {qtype}: {}{scope} [{}]\n",
            r.response_code,
            answers.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_api::{EdgeInfo, EdgeStatus, Region};

    #[test]
    fn explains_net_rule_and_answers() {
        let mut c = Config::with_defaults();
        c.nets = vec!["198.51.100.0/24=iad".parse().unwrap()];
        c.default_region = Some("ams".into());
        let zc = Arc::new(ZoneConfig::from_config(&c).unwrap());
        let snap = Snapshot {
            revision: 9,
            regions: vec![Region {
                name: "iad".into(),
                latitude: Some(38.95),
                longitude: Some(-77.45),
                admin_state: Default::default(),
            }],
            edges: vec![EdgeStatus {
                info: EdgeInfo {
                    id: "iad-1".into(),
                    region: "iad".into(),
                    public_ips: vec!["127.0.0.12".parse().unwrap()],
                    http_addr: None,
                    https_addr: None,
                    tunnel_addr: None,
                    anycast: None,
                    healthy_services: None,
                },
                alive: true,
                last_seen_ms: 0,
                agents: Vec::new(),
            }],
            ..Snapshot::default()
        };
        let out = explain_with(
            zc.clone(),
            &snap,
            "test",
            "198.51.100.7".parse().unwrap(),
            None,
        );
        assert!(out.contains("revision 9"), "{out}");
        assert!(out.contains("--net 198.51.100.0/24=iad"), "{out}");
        assert!(
            out.contains("edge.meridian.test. A: No Error ecs-scope=/24 [127.0.0.12 30]"),
            "{out}"
        );
        let out = explain_with(
            zc,
            &snap,
            "test",
            "192.0.2.1".parse().unwrap(),
            Some("nope"),
        );
        assert!(
            out.contains("nope.meridian.test. A: Non-Existent Domain"),
            "{out}"
        );
    }

    #[test]
    fn explains_records_and_service_names() {
        let mut c = Config::with_defaults();
        c.nets = vec!["198.51.100.0/24=iad,ams".parse().unwrap()];
        c.geo_names = vec!["edge".into(), "api".into()];
        c.geo_services = vec!["api=api".parse().unwrap()];
        let zc = Arc::new(ZoneConfig::from_config(&c).unwrap());
        let edge = |region: &str, ip: &str, agents: Vec<coordinator_api::AgentConn>| EdgeStatus {
            info: EdgeInfo {
                id: format!("{region}-1"),
                region: region.into(),
                public_ips: vec![ip.parse().unwrap()],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive: true,
            last_seen_ms: 0,
            agents,
        };
        let api_agent = coordinator_api::AgentConn {
            agent_id: "a".into(),
            service: "api".into(),
            token_id: "t".into(),
            remote_addr: String::new(),
            connected_at_ms: 0,
            origin_healthy: true,
        };
        let snap = Snapshot {
            revision: 9,
            edges: vec![
                edge("iad", "127.0.0.12", Vec::new()),
                edge("ams", "127.0.0.11", vec![api_agent]),
            ],
            records: vec![coordinator_api::DnsRecord {
                name: "www.customer.example".into(),
                zone: "customer.example".into(),
                rtype: coordinator_api::DnsRecordType::Cname,
                ttl: 0,
                values: vec!["edge.meridian.test".into()],
            }],
            ..Snapshot::default()
        };
        let ip = "198.51.100.7".parse().unwrap();
        let out = explain_with(zc.clone(), &snap, "test", ip, Some("api"));
        assert!(out.contains("service: api"), "{out}");
        assert!(out.contains("answer: ams"), "iad has no api agent: {out}");
        let out = explain_with(zc, &snap, "test", ip, Some("www.customer.example."));
        assert!(out.contains("answer: iad"), "{out}");
        assert!(
            out.contains("www.customer.example. A: No Error ecs-scope=/24 [edge.meridian.test. 30, 127.0.0.12 30]"),
            "CNAME then the target's geo answer: {out}"
        );
    }

    #[test]
    fn explains_a_names_own_policy_and_weights() {
        let dir = std::env::temp_dir().join(format!("geodns-explain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        std::fs::write(
            &file,
            "[name.api]\nnets = [\"192.0.2.0/24=iad\"]\nweights = { \"iad-1\" = 3 }\n",
        )
        .unwrap();
        let mut c = Config::with_defaults();
        c.nets = vec!["192.0.2.0/24=ams".parse().unwrap()];
        c.policy_file = Some(file);
        let zc = Arc::new(ZoneConfig::from_config(&c).unwrap());
        let edge =
            |id: &str, region: &str, ip: &str| crate::gslb::tests::edge(id, region, &[ip], true);
        let snap = Snapshot {
            revision: 3,
            edges: vec![
                edge("ams-1", "ams", "127.0.0.11"),
                edge("iad-1", "iad", "127.0.0.12"),
                edge("iad-2", "iad", "127.0.0.22"),
            ],
            ..Snapshot::default()
        };
        let ip = "192.0.2.9".parse().unwrap();
        let out = explain_with(zc.clone(), &snap, "test", ip, Some("api"));
        assert!(
            out.contains("name policy: --policy-file name \"api\" (own nets)"),
            "{out}"
        );
        assert!(out.contains("--net list iad"), "{out}");
        assert!(out.contains("weights: iad-1=3 (others 1)"), "{out}");
        assert!(
            out.contains("api.meridian.test. A: No Error ecs-scope=/24 [127.0.0.1"),
            "{out}"
        );
        // The flags' name keeps the flags' rule.
        let out = explain_with(zc, &snap, "test", ip, None);
        assert!(out.contains("--net list ams"), "{out}");
        assert!(!out.contains("name policy"), "{out}");
    }
}

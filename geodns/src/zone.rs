//! The zone we are authoritative for: its names, static records and the current answer table.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{Name, RData, Record};

use crate::config::Config;
use crate::geoip::GeoDb;
use crate::gslb::{AnswerTable, Policy};
use crate::health::Hysteresis;

/// SOA timers (seconds). Secondaries are not supported, so refresh/retry/expire only need to be
/// sane; `minimum` (negative-caching TTL) follows the answer TTL.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// What a configured zone consists of, independent of snapshots. Built once at startup.
#[derive(Debug)]
pub struct ZoneConfig {
    /// Lower-case, fully qualified.
    pub origin: Name,
    pub geo_names: Vec<Name>,
    pub ns_name: Name,
    pub hostmaster: Name,
    pub ns_ip: IpAddr,
    /// TTL of static records and of answers while nothing is down.
    pub ttl: u32,
    pub policy: Arc<Policy>,
    pub hysteresis: Hysteresis,
    /// The flags this was built from (to rebuild the policy when the database changes).
    pub source: Config,
}

/// Why the configuration cannot describe a zone.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ZoneConfigError(String);

impl ZoneConfig {
    pub fn from_config(config: &Config) -> Result<Self, ZoneConfigError> {
        let bad = |what: &str, value: &str, e: &dyn std::fmt::Display| {
            ZoneConfigError(format!("{what} {value:?}: {e}"))
        };
        let zone = config.zone.trim().trim_end_matches('.');
        if zone.is_empty() {
            return Err(ZoneConfigError("--zone must not be empty".into()));
        }
        let origin = Name::from_ascii(format!("{zone}."))
            .map_err(|e| bad("--zone", zone, &e))?
            .to_lowercase();
        let ns_name = Name::from_ascii("ns1")
            .and_then(|n| n.append_domain(&origin))
            .map_err(|e| bad("--zone", zone, &e))?;
        let hostmaster = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&origin))
            .map_err(|e| bad("--zone", zone, &e))?;
        let mut geo_names = Vec::new();
        for g in &config.geo_names {
            let name = Name::parse(g.trim(), Some(&origin))
                .map_err(|e| bad("--geo-name", g, &e))?
                .to_lowercase();
            if !origin.zone_of(&name) {
                return Err(ZoneConfigError(format!(
                    "--geo-name {g:?} is outside zone {origin}"
                )));
            }
            if name == ns_name || name == origin {
                return Err(ZoneConfigError(format!(
                    "--geo-name {g:?} clashes with {name}"
                )));
            }
            if !geo_names.contains(&name) {
                geo_names.push(name);
            }
        }
        if config.ttl == 0 {
            return Err(ZoneConfigError("--ttl must be at least 1".into()));
        }
        let ns_ip = match (config.ns_ip, config.listen.first()) {
            (Some(ip), _) => ip,
            (None, Some(addr)) => addr.ip(),
            (None, None) => {
                return Err(ZoneConfigError("at least one --listen is required".into()));
            }
        };
        let policy = Arc::new(build_policy(config)?);
        Ok(Self {
            origin,
            geo_names,
            ns_name,
            hostmaster,
            ns_ip,
            ttl: config.ttl,
            policy,
            hysteresis: Hysteresis {
                fall_after: std::time::Duration::from_millis(config.health_fall_ms),
                rise_after: std::time::Duration::from_millis(config.health_rise_ms),
                ..Hysteresis::default()
            },
            source: config.clone(),
        })
    }
}

/// Builds the client policy from the flags, reading `--geoip-db` if given (slow for real
/// databases: call it after binding, or off the async runtime).
pub fn build_policy(config: &Config) -> Result<Policy, ZoneConfigError> {
    let db = match &config.geoip_db {
        Some(path) => Some(
            GeoDb::open(path, config.field_paths()).map_err(|e| ZoneConfigError(e.to_string()))?,
        ),
        None => None,
    };
    Ok(Policy::build(
        &config.nets,
        &config.maps,
        config.nearest_limit_km,
        config.default_region.clone(),
        config.ttl,
        db,
    ))
}

/// One immutable view of the zone, rebuilt on each snapshot and swapped atomically.
#[derive(Debug)]
pub struct Zone {
    pub config: Arc<ZoneConfig>,
    /// `None` until the first snapshot arrives: we then answer SERVFAIL inside the zone so
    /// resolvers try another server rather than cache an empty answer.
    pub table: Option<AnswerTable>,
    pub soa: Record,
    pub ns: Record,
    pub glue: Record,
    /// Per region of `table` (same order): answers steered there, for metrics.
    pub region_counters: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

impl Zone {
    pub fn new(config: Arc<ZoneConfig>, table: Option<AnswerTable>) -> Self {
        let (ttl, serial) = match &table {
            Some(t) => (t.ttl(), t.revision()),
            None => (config.ttl, 0),
        };
        // SOA serials are 32-bit and compared with serial arithmetic, so wrapping is fine.
        let serial = (serial & u64::from(u32::MAX)) as u32;
        let soa = Record::from_rdata(
            config.origin.clone(),
            ttl,
            RData::SOA(SOA::new(
                config.ns_name.clone(),
                config.hostmaster.clone(),
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                ttl,
            )),
        );
        let ns = Record::from_rdata(
            config.origin.clone(),
            ttl,
            RData::NS(NS(config.ns_name.clone())),
        );
        let glue_data = match config.ns_ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        let glue = Record::from_rdata(config.ns_name.clone(), ttl, glue_data);
        Self {
            config,
            table,
            soa,
            ns,
            glue,
            region_counters: Vec::new(),
        }
    }
}

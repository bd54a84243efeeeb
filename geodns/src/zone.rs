//! The zone we are authoritative for: its names, static records and the current answer table.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use coordinator_api::{DnsRdata, DnsRecord, DnsRecordType, Snapshot};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, Restrict};

use crate::config::{Config, NameSpec, NetRule, PolicyFile};
use crate::geoip::GeoDb;
use crate::gslb::{AnswerTable, Classifier, Policy, Steering};
use crate::health::{HealthTracker, Hysteresis};

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
    /// The flags' policy first, then one per `--policy-file` name (see `geo_policies`).
    pub policies: Vec<Arc<Policy>>,
    /// Per entry of `geo_names`: its policy in `policies` (0: the flags').
    pub geo_policies: Vec<usize>,
    /// The `--policy-file` names, parsed (to rebuild the policies when the database changes).
    pub name_specs: Vec<NameSpec>,
    pub hysteresis: Hysteresis,
    /// Per entry of `geo_names`: the service it is tied to (`--geo-service`), if any.
    pub geo_services: Vec<Option<String>>,
    /// `--record-zone`: the other zones records may bring (empty: any).
    pub record_zones: Vec<Name>,
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
        let name_specs = match &config.policy_file {
            Some(path) => PolicyFile::load(path, config).map_err(ZoneConfigError)?,
            None => Vec::new(),
        };
        let mut geo_names = Vec::new();
        let spec_names = name_specs.iter().map(|s| &s.name);
        for g in config.geo_names.iter().chain(spec_names) {
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
        let mut geo_services = vec![None; geo_names.len()];
        let mut geo_policies = vec![0; geo_names.len()];
        for (k, spec) in name_specs.iter().enumerate() {
            let name = Name::parse(spec.name.trim(), Some(&origin))
                .map_err(|e| bad("--policy-file name", &spec.name, &e))?
                .to_lowercase();
            if let Some(i) = geo_names.iter().position(|n| *n == name) {
                geo_policies[i] = k + 1;
                geo_services[i].clone_from(&spec.service);
            }
        }
        for gs in &config.geo_services {
            let name = Name::parse(gs.name.trim(), Some(&origin))
                .map_err(|e| bad("--geo-service", &gs.name, &e))?
                .to_lowercase();
            let Some(i) = geo_names.iter().position(|n| *n == name) else {
                return Err(ZoneConfigError(format!(
                    "--geo-service {:?}: {name} is not a --geo-name",
                    gs.name
                )));
            };
            if let Some(slot) = geo_services.get_mut(i) {
                if slot.as_ref().is_some_and(|s| *s != gs.service) {
                    return Err(ZoneConfigError(format!(
                        "--geo-service {:?}: {name} has another service in --policy-file",
                        gs.name
                    )));
                }
                *slot = Some(gs.service.clone());
            }
        }
        let mut record_zones = Vec::new();
        for z in &config.record_zones {
            let z = z.trim().trim_end_matches('.');
            let name = Name::from_ascii(format!("{z}."))
                .map_err(|e| bad("--record-zone", z, &e))?
                .to_lowercase();
            record_zones.push(name);
        }
        let policies = build_policies(config, &name_specs)?
            .into_iter()
            .map(Arc::new)
            .collect();
        Ok(Self {
            origin,
            geo_names,
            ns_name,
            hostmaster,
            ns_ip,
            ttl: config.ttl,
            policies,
            geo_policies,
            name_specs,
            geo_services,
            record_zones,
            hysteresis: Hysteresis {
                fall_after: std::time::Duration::from_millis(config.health_fall_ms),
                rise_after: std::time::Duration::from_millis(config.health_rise_ms),
                ..Hysteresis::default()
            },
            source: config.clone(),
        })
    }
}

impl ZoneConfig {
    /// The flags' policy: names without their own, SOA TTLs, and `explain` by default.
    pub fn policy(&self) -> &Arc<Policy> {
        // Invariant: `from_config` always builds the flags' policy first.
        &self.policies[0]
    }
}

/// Builds the flags' policy and one per `--policy-file` name, reading `--geoip-db` once per
/// distinct `nets` list (slow for real databases: call it after binding, or off the async
/// runtime). Names that keep the flags' `nets` share its classifier.
pub fn build_policies(config: &Config, specs: &[NameSpec]) -> Result<Vec<Policy>, ZoneConfigError> {
    let classify = |nets: &[NetRule]| -> Result<Arc<Classifier>, ZoneConfigError> {
        let db = match &config.geoip_db {
            Some(path) => Some(
                GeoDb::open(path, config.field_paths())
                    .map_err(|e| ZoneConfigError(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Arc::new(Classifier::build(nets, db)))
    };
    let flags = classify(&config.nets)?;
    let mut classifiers: Vec<(&[NetRule], Arc<Classifier>)> = vec![(&config.nets, flags.clone())];
    let policy = |c: Arc<Classifier>, s: &Steering| {
        Policy::steer(c, s, config.ttl).with_degraded_ttl(config.degraded_ttl)
    };
    let mut out = vec![policy(flags, &config.steering())];
    for spec in specs {
        let nets = spec.nets.as_deref().unwrap_or(&config.nets);
        let c = match classifiers.iter().find(|(n, _)| *n == nets) {
            Some((_, c)) => c.clone(),
            None => {
                let c = classify(nets)?;
                classifiers.push((nets, c.clone()));
                c
            }
        };
        out.push(policy(c, &spec.steering));
    }
    Ok(out)
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
    /// Tables of geo names with their own policy or service (same regions as `table`), and per
    /// geo name the index of its table here (`None`: `table`).
    pub name_tables: Vec<AnswerTable>,
    pub geo_tables: Vec<Option<usize>>,
    /// The distinct classifiers behind the tables: what a client's answers depend on.
    pub classifiers: Vec<Arc<Classifier>>,
    /// Some table rotates weighted answers (see [`crate::gslb::ROTATION`]).
    pub weighted: bool,
    /// Next rotation slot for queries that do not bring their own (TCP, uncached UDP).
    rotation: std::sync::atomic::AtomicUsize,
    /// Records from the coordinator, and the extra zones they bring.
    pub data: ZoneData,
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
            soa,
            ns,
            glue,
            region_counters: Vec::new(),
            classifiers: table
                .iter()
                .map(|t| t.policy().classifier().clone())
                .collect(),
            weighted: table.as_ref().is_some_and(|t| t.policy().weighted()),
            table,
            name_tables: Vec::new(),
            geo_tables: Vec::new(),
            rotation: Default::default(),
            data: ZoneData::default(),
        }
    }

    /// The next rotation slot, for a query whose caller did not pick one.
    pub fn next_slot(&self) -> usize {
        if self.weighted {
            self.rotation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        } else {
            0
        }
    }

    /// The whole zone for `snap`: the flags' table, one table per distinct (policy, service)
    /// of the geo names, and the coordinator's records. `policies` are as
    /// [`ZoneConfig::policies`] (rebuilt when the database changes); `health` has been fed
    /// `snap`.
    pub fn build(
        config: Arc<ZoneConfig>,
        policies: &[Arc<Policy>],
        snap: &Snapshot,
        health: &HealthTracker,
    ) -> Self {
        let Some(flags) = policies.first() else {
            return Self::new(config, None);
        };
        let table = AnswerTable::build_with_health(flags.clone(), snap, health);
        let mut keys: Vec<(usize, &str)> = Vec::new();
        let geo_tables = (0..config.geo_names.len())
            .map(|i| {
                let p = config.geo_policies.get(i).copied().unwrap_or(0);
                let p = if p < policies.len() { p } else { 0 };
                let s = config.geo_services.get(i).and_then(|s| s.as_deref());
                if p == 0 && s.is_none() {
                    return None;
                }
                let key = (p, s.unwrap_or(""));
                Some(keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    keys.push(key);
                    keys.len() - 1
                }))
            })
            .collect();
        let name_tables: Vec<AnswerTable> = keys
            .iter()
            .filter_map(|&(p, s)| {
                let service = (!s.is_empty()).then_some(s);
                let policy = policies.get(p)?.clone();
                Some(AnswerTable::build_for_service(
                    policy, snap, health, service,
                ))
            })
            .collect();
        let mut zone = Self::new(config, Some(table));
        for t in &name_tables {
            let c = t.policy().classifier();
            if !zone.classifiers.iter().any(|x| Arc::ptr_eq(x, c)) {
                zone.classifiers.push(c.clone());
            }
            zone.weighted |= t.policy().weighted();
        }
        zone.name_tables = name_tables;
        zone.geo_tables = geo_tables;
        zone.data = ZoneData::build(&zone, &snap.records);
        zone
    }

    /// The answer table for geo name number `i`.
    pub fn geo_table(&self, i: usize) -> Option<&AnswerTable> {
        match self.geo_tables.get(i).copied().flatten() {
            Some(t) => self.name_tables.get(t),
            None => self.table.as_ref(),
        }
    }

    /// The zone `name` (lower-case) falls in: ours or one a record brought, the longest apex.
    pub fn zone_of(&self, name: &Name) -> Option<ZoneRef<'_>> {
        let extra = self
            .data
            .zones
            .iter()
            .filter(|z| z.apex.zone_of(name))
            .max_by_key(|z| z.apex.num_labels());
        let own = self.config.origin.zone_of(name);
        match extra {
            Some(z) if !own || z.apex.num_labels() > self.config.origin.num_labels() => {
                Some(ZoneRef {
                    apex: &z.apex,
                    soa: &z.soa,
                    ns: &z.ns,
                    own: false,
                })
            }
            _ if own => Some(ZoneRef {
                apex: &self.config.origin,
                soa: &self.soa,
                ns: &self.ns,
                own: true,
            }),
            _ => None,
        }
    }
}

/// One zone we answer for, as found by [`Zone::zone_of`].
#[derive(Clone, Copy, Debug)]
pub struct ZoneRef<'a> {
    pub apex: &'a Name,
    pub soa: &'a Record,
    pub ns: &'a Record,
    /// `--zone` itself (geo names, `ns1`), rather than a zone only records brought.
    pub own: bool,
}

/// A zone the coordinator's records brought: its synthesized SOA and NS (our own server).
#[derive(Debug)]
pub struct ExtraZone {
    pub apex: Name,
    pub soa: Record,
    pub ns: Record,
}

/// The record sets at one name.
#[derive(Debug, Default)]
pub struct NameData {
    /// Alone at its name when present (the coordinator refuses anything beside it).
    pub cname: Option<Record>,
    pub sets: Vec<(RecordType, Vec<Record>)>,
}

impl NameData {
    pub fn set(&self, t: RecordType) -> Option<&[Record]> {
        self.sets
            .iter()
            .find(|(rt, _)| *rt == t)
            .map(|(_, v)| v.as_slice())
    }
}

/// The coordinator's records, ready to copy into answers.
#[derive(Debug, Default)]
pub struct ZoneData {
    pub zones: Vec<ExtraZone>,
    /// By lower-case owner name.
    pub names: HashMap<Name, NameData>,
    /// Names that exist only because something lies beneath them (empty non-terminals): NODATA,
    /// not NXDOMAIN.
    pub ents: HashSet<Name>,
}

impl ZoneData {
    /// Converts `records`. A record that clashes with built-in data (`ns1`, a geo name's
    /// addresses or a CNAME at a geo name, SOA/NS at an apex) or whose value does not convert
    /// is skipped with a warning: the coordinator validates, this only guards.
    pub fn build(zone: &Zone, records: &[DnsRecord]) -> Self {
        let cfg = &zone.config;
        let mut data = Self::default();
        let ttl_of = |r: &DnsRecord| if r.ttl == 0 { cfg.ttl } else { r.ttl };
        for r in records {
            let (Ok(owner), Ok(apex)) = (
                Name::from_ascii(format!("{}.", r.name)).map(|n| n.to_lowercase()),
                Name::from_ascii(format!("{}.", r.zone)).map(|n| n.to_lowercase()),
            ) else {
                tracing::warn!(name = %r.name, zone = %r.zone, "skipping a record with a bad name");
                continue;
            };
            if !apex.zone_of(&owner) {
                continue;
            }
            let allowed = cfg.origin.zone_of(&apex)
                || cfg.record_zones.is_empty()
                || cfg.record_zones.contains(&apex);
            if !allowed {
                tracing::warn!(name = %r.name, zone = %r.zone, "record of a zone not in --record-zone; ignored");
                continue;
            }
            let geo = cfg.geo_names.contains(&owner);
            let builtin = owner == cfg.ns_name
                || (geo
                    && matches!(
                        r.rtype,
                        DnsRecordType::A | DnsRecordType::Aaaa | DnsRecordType::Cname
                    ))
                || (r.rtype == DnsRecordType::Cname && (owner == cfg.origin || owner == apex));
            if builtin {
                tracing::warn!(name = %r.name, rtype = r.rtype.as_str(), "record clashes with built-in data; skipped");
                continue;
            }
            if apex != cfg.origin
                && !cfg.origin.zone_of(&apex)
                && !data.zones.iter().any(|z| z.apex == apex)
            {
                data.zones.push(extra_zone(zone, apex.clone()));
            }
            let rdatas: Vec<RData> = r
                .values
                .iter()
                .filter_map(|v| {
                    let d = DnsRdata::parse(r.rtype, v)
                        .ok()
                        .and_then(|d| to_rdata(&d));
                    if d.is_none() {
                        tracing::warn!(name = %r.name, value = %v, "skipping a record value that does not convert");
                    }
                    d
                })
                .collect();
            if rdatas.is_empty() {
                continue;
            }
            let ttl = ttl_of(r);
            let entry = data.names.entry(owner.clone()).or_default();
            let recs: Vec<Record> = rdatas
                .into_iter()
                .map(|d| Record::from_rdata(owner.clone(), ttl, d))
                .collect();
            if r.rtype == DnsRecordType::Cname {
                if entry.sets.is_empty() {
                    entry.cname = recs.into_iter().next();
                }
            } else if entry.cname.is_none() {
                let t = recs.first().map_or(RecordType::NULL, Record::record_type);
                entry.sets.push((t, recs));
            }
            // Every ancestor strictly between the owner and the apex exists.
            let mut n = owner.base_name();
            while apex.zone_of(&n) && n != apex {
                data.ents.insert(n.clone());
                n = n.base_name();
            }
        }
        data
    }
}

fn extra_zone(zone: &Zone, apex: Name) -> ExtraZone {
    let mut soa = zone.soa.clone();
    soa.name = apex.clone();
    let mut ns = zone.ns.clone();
    ns.name = apex.clone();
    ExtraZone { apex, soa, ns }
}

/// Longest TXT character-string.
const TXT_CHUNK: usize = 255;

fn to_rdata(d: &DnsRdata) -> Option<RData> {
    let name = |n: &str| Name::from_ascii(format!("{n}.")).ok();
    Some(match d {
        DnsRdata::A(ip) => RData::A(A(*ip)),
        DnsRdata::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        DnsRdata::Cname(n) => RData::CNAME(CNAME(name(n)?)),
        DnsRdata::Mx {
            preference,
            exchange,
        } => RData::MX(MX::new(*preference, name(exchange)?)),
        DnsRdata::Txt(t) => {
            let chunks: Vec<&[u8]> = if t.is_empty() {
                vec![&[]]
            } else {
                t.as_bytes().chunks(TXT_CHUNK).collect()
            };
            RData::TXT(TXT::from_bytes(chunks))
        }
        DnsRdata::Caa { flags, tag, value } => {
            // Through the wire format: hickory validates the value the way a client would.
            let mut wire = vec![*flags, u8::try_from(tag.len()).ok()?];
            wire.extend_from_slice(tag.as_bytes());
            wire.extend_from_slice(value.as_bytes());
            let len = u16::try_from(wire.len()).ok()?;
            RData::read(
                &mut BinDecoder::new(&wire),
                RecordType::CAA,
                Restrict::new(len),
            )
            .ok()?
        }
    })
}

//! Command-line configuration of the GeoDNS role.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;

/// Flags of `meridian geodns`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address to serve DNS on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:5353")]
    pub listen: Vec<SocketAddr>,

    /// The zone this server is authoritative for.
    #[arg(long, default_value = "meridian.test")]
    pub zone: String,

    /// Name under the zone answered per client, e.g. `edge` for `edge.<zone>` (repeatable).
    #[arg(long = "geo-name", default_value = "edge")]
    pub geo_names: Vec<String>,

    /// Client prefix → ordered region preference, `CIDR=REGION[,REGION...]` (repeatable;
    /// longest prefix wins).
    #[arg(long = "net", value_name = "CIDR=REGION[,REGION...]")]
    pub nets: Vec<NetRule>,

    /// Region for clients no `--net` matches (then the regions nearest to it).
    #[arg(long)]
    pub default_region: Option<String>,

    /// TTL of answers, in seconds; while any region is down answers use min(ttl, 10).
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,

    /// Coordinator base URL, e.g. `http://127.0.0.1:7700`.
    #[arg(long, env = "MERIDIAN_COORDINATOR")]
    pub coordinator: Option<String>,

    /// Token this node presents to the coordinator.
    #[arg(long, env = "MERIDIAN_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,

    /// Directory for the last-known-good snapshot, so a restart can answer before the
    /// coordinator is reachable.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Address of `ns1.<zone>` (glue); defaults to the first listen IP.
    #[arg(long)]
    pub ns_ip: Option<IpAddr>,

    /// A region with no live edge is taken out of answers only after 2 consecutive
    /// observations spanning at least this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub health_fall_ms: u64,

    /// MaxMind-format database (GeoIP2/GeoLite2/DB-IP City or Country, or a flat schema with
    /// the `--geoip-*-field` paths) used for clients no `--net` matches. Re-read when its
    /// modification time changes.
    #[arg(long, value_name = "PATH")]
    pub geoip_db: Option<PathBuf>,

    /// How often to check `--geoip-db` for a new file, in seconds (0: never).
    #[arg(long, default_value_t = 10)]
    pub geoip_reload_secs: u64,

    /// Country or continent → ordered region list: `country:DE=ams,iad`, `continent:NA=iad`
    /// (repeatable). Country beats continent; clients with neither go by coordinates.
    #[arg(
        long = "map",
        value_name = "country:CC=REGION[,..]|continent:CC=REGION[,..]"
    )]
    pub maps: Vec<GeoMap>,

    /// With coordinates but no `--map`, only regions within this distance are chosen by
    /// nearness; a client farther from every region gets the default order.
    #[arg(long)]
    pub nearest_limit_km: Option<f64>,

    /// Dotted path of the ISO country code in each database record.
    #[arg(long, default_value = "country.iso_code")]
    pub geoip_country_field: String,

    /// Dotted path of the continent code.
    #[arg(long, default_value = "continent.code")]
    pub geoip_continent_field: String,

    /// Dotted path of the latitude.
    #[arg(long, default_value = "location.latitude")]
    pub geoip_latitude_field: String,

    /// Dotted path of the longitude.
    #[arg(long, default_value = "location.longitude")]
    pub geoip_longitude_field: String,

    /// Response rate limit per client prefix (/24, /56) over UDP, responses per second (0: off).
    #[arg(long, default_value_t = 0)]
    pub rrl_rate: u32,

    /// Over the rate limit, send every Nth response truncated (TC) instead of dropping it, so
    /// real clients retry over TCP (0: drop all).
    #[arg(long, default_value_t = 2)]
    pub rrl_slip: u32,

    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,

    /// Log one query in N (target `geodns::query_log`, written off the query path; 0: off).
    #[arg(long, default_value_t = 0)]
    pub query_log_sample: u32,

    /// A down region with live edges again is put back only after 3 consecutive observations
    /// spanning at least this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub health_rise_ms: u64,

    /// Ties a geo name to a service, `NAME=SERVICE` (repeatable): for that name a region also
    /// counts as down while none of its live edges holds an agent of the service.
    #[arg(long = "geo-service", value_name = "NAME=SERVICE")]
    pub geo_services: Vec<GeoService>,

    /// TTL of geo answers while the client's preferred region is down or every region of its
    /// list is (fail open), so it moves back soon after recovery; also caps the SOA/negative
    /// TTL while any region is down.
    #[arg(long, default_value_t = 5)]
    pub degraded_ttl: u32,

    /// Zones besides `--zone` that coordinator records may bring (repeatable); a record of any
    /// other zone is ignored. Without the flag every zone a record names is served.
    #[arg(long = "record-zone", value_name = "ZONE")]
    pub record_zones: Vec<String>,

    /// Weight of an edge within its region, `EDGE=WEIGHT` with the edge's id or address
    /// (repeatable; default 1, 0 = only when the region has no other live edge). Setting any
    /// weight makes answers weighted picks (see `--answers`).
    #[arg(long = "edge-weight", value_name = "EDGE=WEIGHT")]
    pub edge_weights: Vec<EdgeWeight>,

    /// Addresses per geo answer, picked by weight in a rotation. Default: every live edge of
    /// the chosen region, or 1 when `--edge-weight` is given.
    #[arg(long)]
    pub answers: Option<usize>,

    /// Per-name policies, a TOML file of `[name."NAME"]` tables with any of `nets`, `maps`,
    /// `nearest_limit_km`, `default_region`, `weights`, `answers` and `service`; a key given
    /// replaces the flag's value for that name, the others inherit the flags. Every name in
    /// the file is a geo name. Read at startup.
    #[arg(long, value_name = "PATH")]
    pub policy_file: Option<PathBuf>,
}

/// One `--edge-weight` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeWeight {
    /// An edge id or one of its addresses.
    pub edge: String,
    pub weight: u32,
}

impl FromStr for EdgeWeight {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid --edge-weight {s:?}: expected EDGE=WEIGHT, e.g. iad-1=3");
        let (edge, weight) = s.rsplit_once('=').ok_or_else(bad)?;
        let edge = edge.trim();
        if edge.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            edge: edge.to_owned(),
            weight: weight.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// The `--policy-file` format: one table per name.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub name: std::collections::BTreeMap<String, NamePolicy>,
}

/// One name's policy in a [`PolicyFile`]; `None` fields inherit the flags.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamePolicy {
    /// As `--geo-service`: a region without a healthy backend of it counts as down.
    pub service: Option<String>,
    /// As `--net`, e.g. `["198.51.100.0/24=ams,iad"]`.
    pub nets: Option<Vec<String>>,
    /// As `--map`, e.g. `["country:JP=sin,iad"]`.
    pub maps: Option<Vec<String>>,
    pub nearest_limit_km: Option<f64>,
    pub default_region: Option<String>,
    /// Edge id or address → weight within its region.
    pub weights: Option<std::collections::BTreeMap<String, u32>>,
    pub answers: Option<usize>,
}

/// A [`NamePolicy`] with its rules parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct NameSpec {
    pub name: String,
    pub service: Option<String>,
    pub nets: Option<Vec<NetRule>>,
    pub steering: crate::gslb::Steering,
}

impl PolicyFile {
    /// Reads and checks `path`; every error names the file and the name.
    pub fn load(path: &std::path::Path, flags: &Config) -> Result<Vec<NameSpec>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--policy-file {}: {e}", path.display()))?;
        let file: Self =
            toml::from_str(&text).map_err(|e| format!("--policy-file {}: {e}", path.display()))?;
        file.specs(flags)
            .map_err(|e| format!("--policy-file {}: {e}", path.display()))
    }

    /// Each name's policy: the flags' steering with the keys the file gives replaced.
    pub fn specs(&self, flags: &Config) -> Result<Vec<NameSpec>, String> {
        self.name
            .iter()
            .map(|(name, p)| {
                let ctx = |e: String| format!("name {name:?}: {e}");
                let nets = p
                    .nets
                    .as_ref()
                    .map(|v| v.iter().map(|n| n.parse::<NetRule>()).collect())
                    .transpose()
                    .map_err(|e: NetRuleError| ctx(e.to_string()))?;
                let mut steering = flags.steering();
                if let Some(maps) = &p.maps {
                    steering.maps = maps
                        .iter()
                        .map(|m| m.parse::<GeoMap>())
                        .collect::<Result<_, _>>()
                        .map_err(|e| ctx(e.to_string()))?;
                }
                if p.nearest_limit_km.is_some() {
                    steering.nearest_limit_km = p.nearest_limit_km;
                }
                if p.default_region.is_some() {
                    steering.default_region.clone_from(&p.default_region);
                }
                if let Some(w) = &p.weights {
                    steering.weights = w.iter().map(|(k, v)| (k.clone(), *v)).collect();
                }
                if let Some(n) = p.answers {
                    if n == 0 {
                        return Err(ctx("answers must be at least 1".into()));
                    }
                    steering.answers = Some(n);
                }
                Ok(NameSpec {
                    name: name.clone(),
                    service: p.service.clone(),
                    nets,
                    steering,
                })
            })
            .collect()
    }
}

/// One `--geo-service` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeoService {
    /// As given to `--geo-name` (relative or fully qualified).
    pub name: String,
    pub service: String,
}

impl FromStr for GeoService {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, service) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid --geo-service {s:?}: expected NAME=SERVICE"))?;
        let (name, service) = (name.trim(), service.trim());
        if name.is_empty() || service.is_empty() {
            return Err(format!(
                "invalid --geo-service {s:?}: name and service must not be empty"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            service: service.to_owned(),
        })
    }
}

impl Config {
    /// A config with the flag defaults and nothing else; handy in tests and embedders.
    pub fn with_defaults() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 5353))],
            zone: "meridian.test".to_owned(),
            geo_names: vec!["edge".to_owned()],
            nets: Vec::new(),
            default_region: None,
            ttl: 30,
            coordinator: None,
            node_token: None,
            state_dir: None,
            ns_ip: None,
            health_fall_ms: 2000,
            health_rise_ms: 10_000,
            geoip_db: None,
            geoip_reload_secs: 10,
            metrics_listen: None,
            query_log_sample: 0,
            rrl_rate: 0,
            rrl_slip: 2,
            maps: Vec::new(),
            nearest_limit_km: None,
            geoip_country_field: "country.iso_code".into(),
            geoip_continent_field: "continent.code".into(),
            geoip_latitude_field: "location.latitude".into(),
            geoip_longitude_field: "location.longitude".into(),
            geo_services: Vec::new(),
            degraded_ttl: 5,
            record_zones: Vec::new(),
            edge_weights: Vec::new(),
            answers: None,
            policy_file: None,
        }
    }

    /// The steering the flags give every name without its own policy.
    pub fn steering(&self) -> crate::gslb::Steering {
        crate::gslb::Steering {
            maps: self.maps.clone(),
            nearest_limit_km: self.nearest_limit_km,
            default_region: self.default_region.clone(),
            weights: self
                .edge_weights
                .iter()
                .map(|w| (w.edge.clone(), w.weight))
                .collect(),
            answers: self.answers,
        }
    }

    /// The database field paths from the flags.
    pub fn field_paths(&self) -> crate::geoip::FieldPaths {
        crate::geoip::FieldPaths {
            country: self.geoip_country_field.clone(),
            continent: self.geoip_continent_field.clone(),
            latitude: self.geoip_latitude_field.clone(),
            longitude: self.geoip_longitude_field.clone(),
        }
    }
}

/// One `--net` flag: a client prefix and the regions it prefers, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRule {
    /// Normalised (host bits cleared).
    pub net: IpNet,
    /// Non-empty, without duplicates.
    pub regions: Vec<String>,
}

/// Why a `--net` value was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid --net {value:?}: {reason} (expected CIDR=REGION[,REGION...])")]
pub struct NetRuleError {
    value: String,
    reason: &'static str,
}

impl FromStr for NetRule {
    type Err = NetRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| NetRuleError {
            value: s.to_owned(),
            reason,
        };
        let (cidr, regions) = s.split_once('=').ok_or_else(|| err("missing '='"))?;
        let net: IpNet = cidr.trim().parse().map_err(|_| err("bad CIDR"))?;
        let mut list: Vec<String> = Vec::new();
        for r in regions.split(',') {
            let r = r.trim();
            if r.is_empty() {
                return Err(err("empty region name"));
            }
            if !list.iter().any(|x| x == r) {
                list.push(r.to_owned());
            }
        }
        Ok(Self {
            net: net.trunc(),
            regions: list,
        })
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.net, self.regions.join(","))
    }
}

/// What a `--map` keys on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeoKey {
    Country,
    Continent,
}

/// One `--map` flag: a country or continent code and its regions, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeoMap {
    pub key: GeoKey,
    /// Upper case, two letters.
    pub code: String,
    /// Non-empty, without duplicates.
    pub regions: Vec<String>,
}

/// Why a `--map` value was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid --map {value:?}: {reason} (expected country:CC=REGION[,..] or continent:CC=REGION[,..])"
)]
pub struct GeoMapError {
    value: String,
    reason: &'static str,
}

impl FromStr for GeoMap {
    type Err = GeoMapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| GeoMapError {
            value: s.to_owned(),
            reason,
        };
        let (kind, rest) = s.split_once(':').ok_or_else(|| err("missing ':'"))?;
        let key = match kind.trim().to_ascii_lowercase().as_str() {
            "country" => GeoKey::Country,
            "continent" => GeoKey::Continent,
            _ => return Err(err("kind must be country or continent")),
        };
        let (code, regions) = rest.split_once('=').ok_or_else(|| err("missing '='"))?;
        let code = code.trim();
        if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(err("code must be two letters"));
        }
        let mut list: Vec<String> = Vec::new();
        for r in regions.split(',') {
            let r = r.trim();
            if r.is_empty() {
                return Err(err("empty region name"));
            }
            if !list.iter().any(|x| x == r) {
                list.push(r.to_owned());
            }
        }
        Ok(Self {
            key,
            code: code.to_ascii_uppercase(),
            regions: list,
        })
    }
}

impl fmt::Display for GeoMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.key {
            GeoKey::Country => "country",
            GeoKey::Continent => "continent",
        };
        write!(f, "{kind}:{}={}", self.code, self.regions.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn parses_net_rules() {
        let r: NetRule = "198.51.100.9/24=iad, ams".parse().unwrap();
        assert_eq!(r.net.to_string(), "198.51.100.0/24");
        assert_eq!(r.regions, vec!["iad", "ams"]);
        let r: NetRule = "2001:db8::/32=sin".parse().unwrap();
        assert_eq!(r.net.prefix_len(), 32);
        assert!("198.51.100.0/24".parse::<NetRule>().is_err());
        assert!("198.51.100.0/24=".parse::<NetRule>().is_err());
        assert!("nope=ams".parse::<NetRule>().is_err());
        assert!("10.0.0.0/8=a,,b".parse::<NetRule>().is_err());
    }

    #[test]
    fn parses_geo_maps() {
        let m: GeoMap = "country:de=ams, iad".parse().unwrap();
        assert_eq!((m.key, m.code.as_str()), (GeoKey::Country, "DE"));
        assert_eq!(m.regions, vec!["ams", "iad"]);
        assert_eq!(m.to_string(), "country:DE=ams,iad");
        let m: GeoMap = "continent:NA=iad".parse().unwrap();
        assert_eq!(m.key, GeoKey::Continent);
        assert!("planet:EA=ams".parse::<GeoMap>().is_err());
        assert!("country:DEU=ams".parse::<GeoMap>().is_err());
        assert!("country:DE=".parse::<GeoMap>().is_err());
        assert!("country=ams".parse::<GeoMap>().is_err());
    }

    #[test]
    fn flag_defaults_match_with_defaults() {
        let cli = Cli::parse_from(["geodns"]);
        let d = Config::with_defaults();
        assert_eq!(cli.config.listen, d.listen);
        assert_eq!(cli.config.zone, d.zone);
        assert_eq!(cli.config.geo_names, d.geo_names);
        assert_eq!(cli.config.ttl, d.ttl);
        assert_eq!(cli.config.field_paths(), d.field_paths());
        assert_eq!(cli.config.health_fall_ms, d.health_fall_ms);
        assert_eq!(cli.config.geoip_reload_secs, d.geoip_reload_secs);
        assert_eq!(cli.config.degraded_ttl, d.degraded_ttl);
        assert_eq!(cli.config.geo_services, d.geo_services);
        let cli = Cli::parse_from(["geodns", "--geo-service", "api = api-svc"]);
        assert_eq!(
            cli.config.geo_services,
            vec![GeoService {
                name: "api".into(),
                service: "api-svc".into()
            }]
        );
        assert!("api".parse::<GeoService>().is_err());
        let cli = Cli::parse_from([
            "geodns",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--net",
            "192.0.2.0/24=ams",
            "--net",
            "198.51.100.0/24=iad",
            "--default-region",
            "ams",
        ]);
        assert_eq!(cli.config.listen.len(), 2);
        assert_eq!(cli.config.nets.len(), 2);
        assert_eq!(cli.config.default_region.as_deref(), Some("ams"));
    }

    #[test]
    fn policy_file_overrides_per_name_and_inherits_the_rest() {
        let mut flags = Config::with_defaults();
        flags.default_region = Some("ams".into());
        flags.maps = vec!["country:DE=ams".parse().unwrap()];
        flags.nearest_limit_km = Some(500.0);
        let file: PolicyFile = toml::from_str(
            r#"
            [name.api]
            nets = ["198.51.100.0/24=sin,iad"]
            default_region = "iad"
            weights = { "iad-1" = 3, "127.0.0.22" = 0 }
            [name."www.meridian.test."]
            answers = 2
            service = "web"
            "#,
        )
        .unwrap();
        let specs = file.specs(&flags).unwrap();
        let api = &specs[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.nets.as_ref().unwrap()[0].regions, vec!["sin", "iad"]);
        assert_eq!(api.steering.default_region.as_deref(), Some("iad"));
        assert_eq!(api.steering.maps, flags.maps, "inherited");
        assert_eq!(api.steering.nearest_limit_km, Some(500.0), "inherited");
        assert_eq!(api.steering.weights.len(), 2);
        let www = &specs[1];
        assert_eq!(
            (www.steering.answers, www.service.as_deref()),
            (Some(2), Some("web"))
        );
        assert_eq!(www.nets, None);
        assert_eq!(www.steering.default_region.as_deref(), Some("ams"));
    }

    #[test]
    fn policy_file_errors_name_the_key_and_the_name() {
        let flags = Config::with_defaults();
        let err = toml::from_str::<PolicyFile>("[name.api]\nregion = \"ams\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `region`"), "{err}");
        let file: PolicyFile = toml::from_str("[name.api]\nnets = [\"nope=ams\"]\n").unwrap();
        let err = file.specs(&flags).unwrap_err();
        assert!(
            err.contains("name \"api\"") && err.contains("bad CIDR"),
            "{err}"
        );
        let file: PolicyFile = toml::from_str("[name.api]\nanswers = 0\n").unwrap();
        assert!(file.specs(&flags).unwrap_err().contains("at least 1"));
        assert!("iad-1=x".parse::<EdgeWeight>().is_err());
        assert_eq!(
            "iad-1 = 3".parse::<EdgeWeight>(),
            Ok(EdgeWeight {
                edge: "iad-1".into(),
                weight: 3
            })
        );
    }
}

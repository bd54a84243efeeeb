//! MaxMind-format (MMDB) database input: GeoIP2/GeoLite2/DB-IP City and Country schemas, and flat
//! schemas through configurable field paths.
//!
//! The database is walked once per load into [`crate::prefix::PrefixTree`] entries; queries never
//! touch it. It is kept in memory only so `explain` can show the raw fields behind a decision.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::IpNet;
use serde_json::Value;

/// Dotted paths of the fields we read from each record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPaths {
    pub country: String,
    pub continent: String,
    pub latitude: String,
    pub longitude: String,
}

impl Default for FieldPaths {
    /// The GeoIP2 / GeoLite2 / DB-IP schema.
    fn default() -> Self {
        Self {
            country: "country.iso_code".into(),
            continent: "continent.code".into(),
            latitude: "location.latitude".into(),
            longitude: "location.longitude".into(),
        }
    }
}

/// What a record says about where its network is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Location {
    /// ISO 3166-1 alpha-2, upper case.
    pub country: Option<String>,
    /// Two-letter continent code (AF AN AS EU NA OC SA), upper case.
    pub continent: Option<String>,
    /// (latitude, longitude) in degrees.
    pub coords: Option<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    #[error("cannot read GeoIP database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    #[error("GeoIP database {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
}

/// A loaded database.
#[derive(Debug)]
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
    fields: FieldPaths,
    pub path: PathBuf,
    /// Modification time when loaded, to notice replacements.
    pub mtime: Option<SystemTime>,
    /// Records that could not be decoded (skipped).
    pub bad_records: u64,
}

/// The modification time of `path`, if it can be read.
pub fn mtime_of(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl GeoDb {
    pub fn open(path: &Path, fields: FieldPaths) -> Result<Self, GeoIpError> {
        let mtime = mtime_of(path);
        let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoIpError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            reader,
            fields,
            path: path.to_owned(),
            mtime,
            bad_records: 0,
        })
    }

    /// Builds from bytes already in memory (tests).
    pub fn from_bytes(bytes: Vec<u8>, fields: FieldPaths) -> Result<Self, GeoIpError> {
        let reader = maxminddb::Reader::from_source(bytes).map_err(|source| GeoIpError::Open {
            path: PathBuf::from("<memory>"),
            source,
        })?;
        Ok(Self {
            reader,
            fields,
            path: PathBuf::from("<memory>"),
            mtime: None,
            bad_records: 0,
        })
    }

    pub fn database_type(&self) -> &str {
        &self.reader.metadata.database_type
    }

    /// Calls `f` with every network of the database and its location. IPv4 networks are given
    /// as IPv4 (not as their `::/96` alias). Undecodable records are skipped and counted.
    pub fn for_each(&mut self, mut f: impl FnMut(IpNet, Location)) -> Result<(), GeoIpError> {
        let walk_err = |source| GeoIpError::Walk {
            path: self.path.clone(),
            source,
        };
        let mut bad = 0u64;
        let mut roots = vec![ipnetwork::IpNetwork::V4(
            ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0)
                .map_err(|e| walk_err(maxminddb::MaxMindDbError::InvalidNetwork(e)))?,
        )];
        if self.reader.metadata.ip_version == 6 {
            roots.push(ipnetwork::IpNetwork::V6(
                ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::UNSPECIFIED, 0)
                    .map_err(|e| walk_err(maxminddb::MaxMindDbError::InvalidNetwork(e)))?,
            ));
        }
        for root in roots {
            let walking_v6 = root.is_ipv6();
            let iter = self
                .reader
                .within::<Value>(root)
                .map_err(|source| GeoIpError::Walk {
                    path: self.path.clone(),
                    source,
                })?;
            for item in iter {
                let Ok(item) = item else {
                    bad += 1;
                    continue;
                };
                let Ok(net) = IpNet::new(item.ip_net.network(), item.ip_net.prefix()) else {
                    bad += 1;
                    continue;
                };
                let v4_inside_v6 = match net {
                    IpNet::V4(_) => walking_v6,
                    IpNet::V6(n) => n.prefix_len() >= 96 && u128::from(n.network()) >> 32 == 0,
                };
                if v4_inside_v6 {
                    continue; // IPv4 space inside the IPv6 tree: walked as IPv4 already
                }
                f(net, extract(&item.info, &self.fields));
            }
        }
        self.bad_records = bad;
        Ok(())
    }

    /// The network holding `addr`, its raw record and what we read from it (for `explain`).
    pub fn lookup(&self, addr: IpAddr) -> Option<(IpNet, Value, Location)> {
        let (value, len) = self.reader.lookup_prefix::<Value>(addr).ok()?;
        let value = value?;
        let net = IpNet::new(addr, u8::try_from(len).ok()?).ok()?.trunc();
        let loc = extract(&value, &self.fields);
        Some((net, value, loc))
    }

    pub fn fields(&self) -> &FieldPaths {
        &self.fields
    }
}

fn path<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted
        .split('.')
        .filter(|s| !s.is_empty())
        .try_fold(v, |v, key| v.get(key))
}

fn code(v: Option<&Value>) -> Option<String> {
    let s = v?.as_str()?.trim();
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic())).then(|| s.to_ascii_uppercase())
}

fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a location out of `record` following `fields`. With the default schema the registered
/// country stands in for a missing country (anycast and satellite ranges).
pub fn extract(record: &Value, fields: &FieldPaths) -> Location {
    let mut country = code(path(record, &fields.country));
    if country.is_none() && fields.country == FieldPaths::default().country {
        country = code(path(record, "registered_country.iso_code"));
    }
    let continent = code(path(record, &fields.continent));
    let coords = match (
        number(path(record, &fields.latitude)),
        number(path(record, &fields.longitude)),
    ) {
        (Some(lat), Some(lon))
            if lat.is_finite()
                && lon.is_finite()
                && (-90.0..=90.0).contains(&lat)
                && (-180.0..=180.0).contains(&lon) =>
        {
            Some((lat, lon))
        }
        _ => None,
    };
    Location {
        country,
        continent,
        coords,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmdb_writer::{Value as W, write};

    #[test]
    fn reads_city_and_flat_schemas() {
        let bytes = write(
            "GeoIP2-City",
            &[
                (
                    "192.0.2.0/24".parse().unwrap(),
                    W::geoip2_city("EU", "NL", "Amsterdam", 52.37, 4.90),
                ),
                (
                    "2001:db8::/32".parse().unwrap(),
                    W::geoip2_city("AS", "SG", "Singapore", 1.35, 103.99),
                ),
            ],
        )
        .unwrap();
        let mut db = GeoDb::from_bytes(bytes, FieldPaths::default()).unwrap();
        let mut seen = Vec::new();
        db.for_each(|n, l| seen.push((n.to_string(), l))).unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].0, "192.0.2.0/24");
        assert_eq!(seen[0].1.country.as_deref(), Some("NL"));
        assert_eq!(seen[0].1.continent.as_deref(), Some("EU"));
        assert_eq!(seen[0].1.coords, Some((52.37, 4.90)));
        assert_eq!(seen[1].0, "2001:db8::/32");
        let (net, _, loc) = db.lookup("192.0.2.77".parse().unwrap()).unwrap();
        assert_eq!(net.to_string(), "192.0.2.0/24");
        assert_eq!(loc.country.as_deref(), Some("NL"));
        assert!(db.lookup("198.51.100.1".parse().unwrap()).is_none());

        let flat = write(
            "flat",
            &[(
                "198.51.100.0/24".parse().unwrap(),
                W::map([
                    ("country_code", W::str("us")),
                    ("latitude", W::F64(38.9)),
                    ("longitude", W::str("-77.4")),
                ]),
            )],
        )
        .unwrap();
        let fields = FieldPaths {
            country: "country_code".into(),
            continent: "continent_code".into(),
            latitude: "latitude".into(),
            longitude: "longitude".into(),
        };
        let mut db = GeoDb::from_bytes(flat, fields).unwrap();
        let mut seen = Vec::new();
        db.for_each(|n, l| seen.push((n, l))).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1.country.as_deref(), Some("US"));
        assert_eq!(seen[0].1.coords, Some((38.9, -77.4)));
        assert_eq!(seen[0].1.continent, None);
    }
}

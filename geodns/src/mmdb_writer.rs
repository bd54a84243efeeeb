//! A minimal MaxMind DB (MMDB v2) writer, for tests and benchmarks that need a database built
//! in code rather than downloaded. Writes IPv6 trees (IPv4 networks under `::/96`), 24-bit
//! records, metadata typed as libmaxminddb (gdnsd) requires, no data deduplication: fine for hundreds of networks, not for real databases.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// A value in the data section.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    F64(f64),
    U16(u16),
    U32(u32),
    U64(u64),
    Map(Vec<(String, Self)>),
    Array(Vec<Self>),
}

impl Value {
    /// A map from `(key, value)` pairs.
    pub fn map<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Self)>) -> Self {
        Self::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn str(s: &str) -> Self {
        Self::Str(s.to_owned())
    }

    /// A GeoIP2-City-shaped record: continent, country, city and location.
    pub fn geoip2_city(continent: &str, country: &str, city: &str, lat: f64, lon: f64) -> Self {
        let names = |n: &str| Self::map([("en", Self::str(n))]);
        Self::map([
            (
                "continent",
                Self::map([("code", Self::str(continent)), ("names", names(continent))]),
            ),
            (
                "country",
                Self::map([("iso_code", Self::str(country)), ("names", names(country))]),
            ),
            ("city", Self::map([("names", names(city))])),
            (
                "location",
                Self::map([
                    ("latitude", Self::F64(lat)),
                    ("longitude", Self::F64(lon)),
                    ("accuracy_radius", Self::U16(50)),
                ]),
            ),
        ])
    }
}

/// Why a database could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("overlapping networks at {0}")]
    Overlap(IpNet),
    #[error("database too large for 24-bit records")]
    TooLarge,
}

const NO_CHILD: u32 = u32::MAX;

/// Builds an MMDB file image from disjoint networks and their records.
pub fn write(database_type: &str, networks: &[(IpNet, Value)]) -> Result<Vec<u8>, WriteError> {
    // Data section first: each network's record, at a known offset.
    let mut data = Vec::new();
    let mut offsets = Vec::with_capacity(networks.len());
    for (_, v) in networks {
        offsets.push(u32::try_from(data.len()).map_err(|_| WriteError::TooLarge)?);
        encode(v, &mut data);
    }
    // Tree: node i has two children; NO_CHILD = empty, otherwise a node index, or data marked
    // by the high bit (resolved once node_count is known).
    const DATA: u32 = 1 << 31;
    let mut nodes: Vec<[u32; 2]> = vec![[NO_CHILD; 2]];
    for ((net, _), &offset) in networks.iter().zip(&offsets) {
        let (bits, len) = match net.trunc() {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), 96 + n.prefix_len()),
            IpNet::V6(n) => (u128::from(n.network()), n.prefix_len()),
        };
        if len == 0 {
            return Err(WriteError::Overlap(*net));
        }
        let mut node = 0usize;
        for depth in 0..len {
            let bit = ((bits >> (127 - u32::from(depth))) & 1) as usize;
            let last = depth + 1 == len;
            let child = nodes[node][bit];
            if last {
                if child != NO_CHILD {
                    return Err(WriteError::Overlap(*net));
                }
                nodes[node][bit] = DATA | offset;
            } else if child == NO_CHILD {
                let next = u32::try_from(nodes.len()).map_err(|_| WriteError::TooLarge)?;
                nodes.push([NO_CHILD; 2]);
                nodes[node][bit] = next;
                node = next as usize;
            } else if child & DATA != 0 {
                return Err(WriteError::Overlap(*net));
            } else {
                node = child as usize;
            }
        }
    }
    let node_count = u32::try_from(nodes.len()).map_err(|_| WriteError::TooLarge)?;
    let mut out = Vec::with_capacity(nodes.len() * 6 + 16 + data.len() + 256);
    for n in &nodes {
        for &rec in n {
            let v = if rec == NO_CHILD {
                node_count
            } else if rec & DATA != 0 {
                node_count + 16 + (rec & !DATA)
            } else {
                rec
            };
            if v >= 1 << 24 {
                return Err(WriteError::TooLarge);
            }
            out.extend_from_slice(&v.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    let meta = Value::map([
        ("node_count", Value::U32(node_count)),
        ("record_size", Value::U16(24)),
        ("ip_version", Value::U16(6)),
        ("database_type", Value::str(database_type)),
        ("languages", Value::Array(vec![Value::str("en")])),
        ("binary_format_major_version", Value::U16(2)),
        ("binary_format_minor_version", Value::U16(0)),
        ("build_epoch", Value::U64(1_700_000_000)),
        (
            "description",
            Value::map([("en", Value::str("Meridian test database"))]),
        ),
    ]);
    encode(&meta, &mut out);
    Ok(out)
}

fn control(type_id: u8, size: usize, out: &mut Vec<u8>) {
    let (size_bits, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65_536 {
        (30, ((size - 285) as u16).to_be_bytes().to_vec())
    } else {
        (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec())
    };
    if type_id <= 7 {
        out.push((type_id << 5) | size_bits);
    } else {
        out.push(size_bits);
        out.push(type_id - 7);
    }
    out.extend_from_slice(&extra);
}

/// Unsigned integers are stored in as few big-endian bytes as they need.
fn uint(type_id: u8, bytes: &[u8], out: &mut Vec<u8>) {
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(type_id, bytes.len() - skip, out);
    out.extend_from_slice(bytes.get(skip..).unwrap_or_default());
}

fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Str(s) => {
            control(2, s.len(), out);
            out.extend_from_slice(s.as_bytes());
        }
        Value::F64(f) => {
            control(3, 8, out);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::U16(n) => uint(5, &n.to_be_bytes(), out),
        Value::U32(n) => uint(6, &n.to_be_bytes(), out),
        Value::U64(n) => uint(9, &n.to_be_bytes(), out),
        Value::Map(pairs) => {
            // Keys sorted and unique, as real databases have them.
            let sorted: BTreeMap<&str, &Value> =
                pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
            control(7, sorted.len(), out);
            for (k, v) in sorted {
                encode(&Value::Str(k.to_owned()), out);
                encode(v, out);
            }
        }
        Value::Array(items) => {
            control(11, items.len(), out);
            for i in items {
                encode(i, out);
            }
        }
    }
}

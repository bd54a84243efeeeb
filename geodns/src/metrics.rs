//! Prometheus counters: dense atomic arrays indexed by small label ids, so counting a query is
//! a few relaxed increments with no lock, allocation or string work; text is rendered on scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::server::Stats;

/// Query types counted by name; the rest are `other`.
const QTYPES: [&str; 10] = [
    "A", "AAAA", "ANY", "SOA", "NS", "CNAME", "TXT", "MX", "CAA", "other",
];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

/// What one answered query is counted under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// Index into [`Metrics`]'s name list: the geo names, then apex, ns, other-in-zone, outside.
    pub name: usize,
    pub qtype: usize,
    pub rcode: usize,
    /// Index into the answer table's regions of the region answered with.
    pub region: Option<usize>,
}

pub fn qtype_label(i: usize) -> &'static str {
    QTYPES.get(i).copied().unwrap_or("other")
}

pub fn rcode_label(i: usize) -> &'static str {
    RCODES.get(i).copied().unwrap_or("other")
}

pub fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::ANY => 2,
        RecordType::SOA => 3,
        RecordType::NS => 4,
        RecordType::CNAME => 5,
        RecordType::TXT => 6,
        RecordType::MX => 7,
        RecordType::CAA => 8,
        _ => 9,
    }
}

pub fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        _ => 6,
    }
}

/// Name categories after the geo names.
pub const NAME_APEX: usize = 0;
pub const NAME_NS: usize = 1;
pub const NAME_OTHER: usize = 2;
pub const NAME_OUTSIDE: usize = 3;

#[derive(Debug)]
pub struct Metrics {
    names: Vec<String>,
    queries: Vec<AtomicU64>,
    /// Region name → answers steered there; counters are handed to answer tables at build time.
    regions: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl Metrics {
    pub fn new(geo_names: &[String]) -> Self {
        let mut names: Vec<String> = geo_names.to_vec();
        names.extend(["@apex", "@ns", "@other", "@outside"].map(str::to_owned));
        let n = names.len() * QTYPES.len() * RCODES.len();
        Self {
            names,
            queries: (0..n).map(|_| AtomicU64::new(0)).collect(),
            regions: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn name_label(&self, i: usize) -> &str {
        self.names.get(i).map_or("?", String::as_str)
    }

    /// Index of a non-geo category (`NAME_*`).
    pub fn category(&self, geo_names: usize, cat: usize) -> usize {
        geo_names + cat
    }

    pub fn count(&self, l: &Labels) {
        let i = (l.name * QTYPES.len() + l.qtype) * RCODES.len() + l.rcode;
        if let Some(c) = self.queries.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counter for answers steered to `region` (created on first use).
    pub fn region_counter(&self, region: &str) -> Arc<AtomicU64> {
        match self.regions.lock() {
            Ok(mut m) => m.entry(region.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, stats: &Stats) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP geodns_queries_total Answered queries by name, type and rcode.\n");
        out.push_str("# TYPE geodns_queries_total counter\n");
        for (ni, name) in self.names.iter().enumerate() {
            for (ti, qtype) in QTYPES.iter().enumerate() {
                for (ri, rcode) in RCODES.iter().enumerate() {
                    let i = (ni * QTYPES.len() + ti) * RCODES.len() + ri;
                    let v = self.queries.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "geodns_queries_total{{name=\"{name}\",type=\"{qtype}\",rcode=\"{rcode}\"}} {v}"
                        );
                    }
                }
            }
        }
        out.push_str("# HELP geodns_region_answers_total Geo answers by region chosen.\n");
        out.push_str("# TYPE geodns_region_answers_total counter\n");
        if let Ok(m) = self.regions.lock() {
            for (region, c) in m.iter() {
                let _ = writeln!(
                    out,
                    "geodns_region_answers_total{{region=\"{region}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        for (name, help, v) in [
            ("geodns_packets_total", "Packets handled.", &stats.queries),
            (
                "geodns_malformed_total",
                "Malformed packets (dropped or FORMERR).",
                &stats.malformed,
            ),
            (
                "geodns_truncated_total",
                "UDP answers sent with TC.",
                &stats.truncated,
            ),
            (
                "geodns_tcp_rejected_total",
                "TCP connections over the limit.",
                &stats.tcp_rejected,
            ),
            (
                "geodns_rrl_dropped_total",
                "UDP responses dropped by rate limiting.",
                &stats.rrl_dropped,
            ),
            (
                "geodns_rrl_slipped_total",
                "UDP responses truncated by rate limiting.",
                &stats.rrl_slipped,
            ),
            ("geodns_io_errors_total", "Socket errors.", &stats.io_errors),
            (
                "geodns_panics_total",
                "Bugs contained at the packet boundary.",
                &stats.panics,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::new(&["edge.meridian.test.".to_owned()]);
        let l = Labels {
            name: 0,
            qtype: qtype_index(RecordType::AAAA),
            rcode: rcode_index(ResponseCode::NoError),
            region: None,
        };
        m.count(&l);
        m.count(&l);
        m.count(&Labels {
            name: m.category(1, NAME_OUTSIDE),
            qtype: qtype_index(RecordType::A),
            rcode: rcode_index(ResponseCode::Refused),
            region: None,
        });
        // Record types zone records answer are counted by name.
        m.count(&Labels {
            name: m.category(1, NAME_OTHER),
            qtype: qtype_index(RecordType::CAA),
            rcode: rcode_index(ResponseCode::NoError),
            region: None,
        });
        for t in [
            RecordType::CNAME,
            RecordType::TXT,
            RecordType::MX,
            RecordType::CAA,
        ] {
            assert_eq!(qtype_label(qtype_index(t)), t.to_string());
        }
        assert_eq!(qtype_label(qtype_index(RecordType::PTR)), "other");
        m.region_counter("ams").fetch_add(3, Ordering::Relaxed);
        let text = m.render(&Stats::default());
        assert!(
            text.contains("geodns_queries_total{name=\"@other\",type=\"CAA\",rcode=\"NOERROR\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "geodns_queries_total{name=\"edge.meridian.test.\",type=\"AAAA\",rcode=\"NOERROR\"} 2"
        ));
        assert!(
            text.contains("geodns_queries_total{name=\"@outside\",type=\"A\",rcode=\"REFUSED\"} 1")
        );
        assert!(text.contains("geodns_region_answers_total{region=\"ams\"} 3"));
        assert!(text.contains("geodns_panics_total 0"));
    }
}

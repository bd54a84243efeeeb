//! The answer engine: client address → region → edge addresses. Pure and sans-IO.
//!
//! [`Policy`] is built once from the flags (prefix table, default region). Every snapshot
//! change builds a new immutable [`AnswerTable`] that has already walked each preference list
//! against the current liveness, so a query is a prefix lookup plus an index: no allocation,
//! no locks, and the drivers swap tables atomically.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use coordinator_api::Snapshot;
use ipnet::IpNet;

use crate::config::NetRule;
use crate::health::{HealthTracker, Verdict};

/// TTL ceiling while any region is down, so clients move back quickly once it recovers.
pub const DEGRADED_TTL: u32 = 10;

/// Client-to-region policy from the configuration; independent of any snapshot.
#[derive(Debug)]
pub struct Policy {
    prefixes: PrefixIndex,
    /// Preference list of each `--net` rule, indexed by the prefix index's values.
    rules: Vec<Vec<String>>,
    default_region: Option<String>,
    ttl: u32,
}

impl Policy {
    /// Later rules for the same prefix replace earlier ones.
    pub fn new(nets: &[NetRule], default_region: Option<String>, ttl: u32) -> Self {
        let mut prefixes = PrefixIndex::default();
        let mut rules = Vec::with_capacity(nets.len());
        for rule in nets {
            prefixes.insert(rule.net, rules.len());
            rules.push(rule.regions.clone());
        }
        Self {
            prefixes,
            rules,
            default_region,
            ttl,
        }
    }

    /// Which rule a client falls in and the ECS scope of that decision.
    pub fn classify(&self, client: IpAddr) -> (Option<usize>, u8) {
        self.prefixes.lookup(client)
    }
}

/// One region's addresses as of one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionAnswer {
    pub name: String,
    /// Steer clients here: the health verdict (hysteresis and admin override) says it serves.
    pub live: bool,
    pub verdict: Verdict,
    pub coords: Option<(f64, f64)>,
    alive_v4: Vec<Ipv4Addr>,
    alive_v6: Vec<Ipv6Addr>,
    all_v4: Vec<Ipv4Addr>,
    all_v6: Vec<Ipv6Addr>,
}

/// A region picked for a preference list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pick {
    region: usize,
    /// No region of the list was live: answer with every edge of the first one.
    fail_open: bool,
}

/// Immutable answers for one (policy, snapshot) pair.
#[derive(Debug)]
pub struct AnswerTable {
    policy: Arc<Policy>,
    /// Sorted by name.
    regions: Vec<RegionAnswer>,
    /// Per policy rule.
    rule_picks: Vec<Option<Pick>>,
    default_pick: Option<Pick>,
    /// Full ordered region list per rule and for the default, kept for `explain`.
    rule_orders: Vec<Vec<usize>>,
    default_order: Vec<usize>,
    ttl: u32,
    revision: u64,
}

/// What a client gets.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    pub region: &'a RegionAnswer,
    pub fail_open: bool,
    /// ECS scope prefix length: how much of the client address this answer depends on.
    pub scope: u8,
    pub ttl: u32,
}

impl Answer<'_> {
    /// Every edge when failing open, or when the region is kept serving (falling, admin up)
    /// although no edge is live right now.
    fn all(&self) -> bool {
        self.fail_open || (self.region.alive_v4.is_empty() && self.region.alive_v6.is_empty())
    }

    pub fn v4(&self) -> &[Ipv4Addr] {
        if self.all() {
            &self.region.all_v4
        } else {
            &self.region.alive_v4
        }
    }

    pub fn v6(&self) -> &[Ipv6Addr] {
        if self.all() {
            &self.region.all_v6
        } else {
            &self.region.alive_v6
        }
    }
}

impl AnswerTable {
    /// Builds with a fresh tracker: every region takes its observed state (no history).
    pub fn build(policy: Arc<Policy>, snapshot: &Snapshot) -> Self {
        let mut health = HealthTracker::default();
        health.observe(snapshot, std::time::Instant::now());
        Self::build_with_health(policy, snapshot, &health)
    }

    /// Builds the table for `snapshot`, steering by `health`'s verdicts (which the caller has
    /// fed with this snapshot).
    pub fn build_with_health(
        policy: Arc<Policy>,
        snapshot: &Snapshot,
        health: &HealthTracker,
    ) -> Self {
        let mut by_name: BTreeMap<&str, RegionAnswer> = BTreeMap::new();
        for r in &snapshot.regions {
            let coords = match (r.latitude, r.longitude) {
                (Some(lat), Some(lon)) if lat.is_finite() && lon.is_finite() => Some((lat, lon)),
                _ => None,
            };
            by_name
                .entry(r.name.as_str())
                .or_insert_with(|| RegionAnswer::empty(&r.name))
                .coords = coords;
        }
        // Edges may name a region the coordinator has no record of; it still exists for us.
        for e in &snapshot.edges {
            let region = by_name
                .entry(e.info.region.as_str())
                .or_insert_with(|| RegionAnswer::empty(&e.info.region));
            for ip in &e.info.public_ips {
                match ip.to_canonical() {
                    IpAddr::V4(v4) => {
                        region.all_v4.push(v4);
                        if e.alive {
                            region.alive_v4.push(v4);
                        }
                    }
                    IpAddr::V6(v6) => {
                        region.all_v6.push(v6);
                        if e.alive {
                            region.alive_v6.push(v6);
                        }
                    }
                }
            }
        }
        let mut regions: Vec<RegionAnswer> = by_name.into_values().collect();
        for r in &mut regions {
            r.verdict = health.verdict(&r.name);
            r.live = r.verdict.serves();
            for v in [&mut r.alive_v4, &mut r.all_v4] {
                v.sort_unstable();
                v.dedup();
            }
            for v in [&mut r.alive_v6, &mut r.all_v6] {
                v.sort_unstable();
                v.dedup();
            }
        }
        let index: HashMap<&str, usize> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();

        let rule_orders: Vec<Vec<usize>> = policy
            .rules
            .iter()
            .map(|list| order(&regions, &index, list))
            .collect();
        let default_list: Vec<String> = policy.default_region.iter().cloned().collect();
        let default_order = order(&regions, &index, &default_list);
        let rule_picks = rule_orders.iter().map(|o| pick(&regions, o)).collect();
        let default_pick = pick(&regions, &default_order);

        let degraded = regions.iter().any(|r| !r.live);
        let ttl = if degraded {
            policy.ttl.min(DEGRADED_TTL)
        } else {
            policy.ttl
        };
        Self {
            policy,
            regions,
            rule_picks,
            default_pick,
            rule_orders,
            default_order,
            ttl,
            revision: snapshot.revision,
        }
    }

    /// The answer for `client`; `None` only when the snapshot has no region at all.
    pub fn answer(&self, client: IpAddr) -> Option<Answer<'_>> {
        let (rule, scope) = self.policy.classify(client.to_canonical());
        let pick = match rule {
            Some(i) => self.rule_picks.get(i).copied().flatten(),
            None => self.default_pick,
        }?;
        let region = self.regions.get(pick.region)?;
        Some(Answer {
            region,
            fail_open: pick.fail_open,
            scope,
            ttl: self.ttl,
        })
    }

    /// TTL for every record served from this table (shortened while degraded).
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Desired-state revision of the snapshot this table was built from.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn regions(&self) -> &[RegionAnswer] {
        &self.regions
    }

    /// Human-readable account of how `client` is answered (for `geodns explain`-style tools).
    pub fn explain(&self, client: IpAddr) -> String {
        let client = client.to_canonical();
        let (rule, scope) = self.policy.classify(client);
        let (source, order) = match rule {
            Some(i) => (
                format!("net rule #{i} {:?}", self.policy.rules.get(i)),
                self.rule_orders
                    .get(i)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            ),
            None => (
                format!("default ({:?})", self.policy.default_region),
                self.default_order.as_slice(),
            ),
        };
        let walk: Vec<String> = order
            .iter()
            .filter_map(|&i| self.regions.get(i))
            .map(|r| format!("{}({:?})", r.name, r.verdict))
            .collect();
        match self.answer(client) {
            Some(a) => format!(
                "{client}: {source}, scope /{scope}, walk [{}] → {}{} v4={:?} v6={:?} ttl={}",
                walk.join(" "),
                a.region.name,
                if a.fail_open { " (fail open)" } else { "" },
                a.v4(),
                a.v6(),
                a.ttl
            ),
            None => format!("{client}: {source}, scope /{scope}: no regions known"),
        }
    }
}

impl RegionAnswer {
    fn empty(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            live: false,
            verdict: Verdict::Down,
            coords: None,
            alive_v4: Vec::new(),
            alive_v6: Vec::new(),
            all_v4: Vec::new(),
            all_v6: Vec::new(),
        }
    }
}

/// The full walk order for a preference list: the listed regions that exist, then every other
/// region by great-circle distance from the first listed region with coordinates (regions
/// without coordinates last, by name — `regions` is sorted by name and the sort is stable).
fn order(regions: &[RegionAnswer], index: &HashMap<&str, usize>, list: &[String]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(regions.len());
    for name in list {
        if let Some(&i) = index.get(name.as_str())
            && !out.contains(&i)
        {
            out.push(i);
        }
    }
    let anchor = out
        .iter()
        .find_map(|&i| regions.get(i).and_then(|r| r.coords));
    let mut rest: Vec<(usize, f64)> = (0..regions.len())
        .filter(|i| !out.contains(i))
        .map(|i| {
            let d = match (anchor, regions.get(i).and_then(|r| r.coords)) {
                (Some(a), Some(b)) => great_circle_km(a, b),
                (None, Some(_)) => 0.0,
                (_, None) => f64::INFINITY,
            };
            (i, d)
        })
        .collect();
    rest.sort_by(|a, b| a.1.total_cmp(&b.1));
    out.extend(rest.into_iter().map(|(i, _)| i));
    out
}

fn pick(regions: &[RegionAnswer], order: &[usize]) -> Option<Pick> {
    if let Some(&region) = order
        .iter()
        .find(|&&i| regions.get(i).is_some_and(|r| r.live))
    {
        return Some(Pick {
            region,
            fail_open: false,
        });
    }
    order.first().map(|&region| Pick {
        region,
        fail_open: true,
    })
}

/// Haversine distance in kilometres between two (latitude, longitude) points in degrees.
pub fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().clamp(0.0, 1.0).asin()
}

/// Longest-prefix match over both families, with exact-match maps per prefix length.
///
/// Addresses are stored left-aligned in a `u128` so one mask works for IPv4 and IPv6.
#[derive(Debug, Default)]
struct PrefixIndex {
    v4: Family,
    v6: Family,
}

#[derive(Debug, Default)]
struct Family {
    /// Longest prefix length first.
    by_len: Vec<(u8, HashMap<u128, usize>)>,
    /// Every prefix, for the ECS scope computation.
    all: Vec<(u128, u8)>,
}

impl PrefixIndex {
    fn insert(&mut self, net: IpNet, value: usize) {
        let (family, bits) = match net {
            IpNet::V4(n) => (&mut self.v4, u128::from(u32::from(n.network())) << 96),
            IpNet::V6(n) => (&mut self.v6, u128::from(n.network())),
        };
        let len = net.prefix_len();
        let key = bits & mask(len);
        match family.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, map)) => {
                map.insert(key, value);
            }
            None => {
                family.by_len.push((len, HashMap::from([(key, value)])));
                family.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
            }
        }
        if !family.all.contains(&(key, len)) {
            family.all.push((key, len));
        }
    }

    /// The matched rule and the ECS scope: the matched prefix length, lengthened just enough
    /// that the scope excludes every longer configured prefix (which would answer differently),
    /// so a resolver caching at that scope never serves this answer to those clients.
    fn lookup(&self, addr: IpAddr) -> (Option<usize>, u8) {
        let (family, bits, width) = match addr {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a)) << 96, 32u8),
            IpAddr::V6(a) => (&self.v6, u128::from(a), 128u8),
        };
        let mut matched: Option<(usize, u8)> = None;
        for (len, map) in &family.by_len {
            if let Some(&v) = map.get(&(bits & mask(*len))) {
                matched = Some((v, *len));
                break;
            }
        }
        let matched_len = matched.map_or(0, |m| m.1);
        let mut scope = matched_len;
        for &(prefix, len) in &family.all {
            if len <= matched_len {
                continue;
            }
            // The client is outside this longer prefix (else it would have matched), so the
            // common bits are fewer than `len`; one more bit separates them.
            let common = u8::try_from((bits ^ prefix).leading_zeros()).unwrap_or(u8::MAX);
            scope = scope.max(common.saturating_add(1).min(len));
        }
        (matched.map(|m| m.0), scope.min(width))
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_api::{EdgeInfo, EdgeStatus, Region};

    fn region(name: &str, lat: f64, lon: f64) -> Region {
        Region {
            name: name.into(),
            latitude: Some(lat),
            longitude: Some(lon),
            admin_state: Default::default(),
        }
    }

    fn edge(id: &str, region: &str, ips: &[&str], alive: bool) -> EdgeStatus {
        EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
            },
            alive,
            last_seen_ms: 0,
            agents: Vec::new(),
        }
    }

    /// The dev network: ams, iad, sin with one edge each.
    fn dev_snapshot(alive: [bool; 3]) -> Snapshot {
        Snapshot {
            revision: 7,
            regions: vec![
                region("ams", 52.37, 4.90),
                region("iad", 38.95, -77.45),
                region("sin", 1.35, 103.99),
            ],
            edges: vec![
                edge("ams-1", "ams", &["127.0.0.11", "2001:db8::11"], alive[0]),
                edge("iad-1", "iad", &["127.0.0.12"], alive[1]),
                edge("sin-1", "sin", &["127.0.0.13"], alive[2]),
            ],
            ..Snapshot::default()
        }
    }

    fn dev_policy(extra: &[&str]) -> Arc<Policy> {
        let mut nets: Vec<NetRule> = [
            "192.0.2.0/24=ams",
            "198.51.100.0/24=iad",
            "203.0.113.0/24=sin",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.parse().unwrap())
        .collect();
        nets.dedup();
        Arc::new(Policy::new(&nets, Some("ams".into()), 30))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn region_of(t: &AnswerTable, client: &str) -> String {
        t.answer(ip(client)).unwrap().region.name.clone()
    }

    #[test]
    fn net_match_and_default() {
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true; 3]));
        assert_eq!(region_of(&t, "192.0.2.200"), "ams");
        assert_eq!(region_of(&t, "198.51.100.7"), "iad");
        assert_eq!(region_of(&t, "203.0.113.1"), "sin");
        assert_eq!(region_of(&t, "127.0.0.1"), "ams");
        let a = t.answer(ip("198.51.100.7")).unwrap();
        assert_eq!(a.v4(), &[Ipv4Addr::new(127, 0, 0, 12)]);
        assert_eq!(a.scope, 24);
        assert_eq!(a.ttl, 30);
        assert!(!a.fail_open);
        assert_eq!(t.revision(), 7);
    }

    #[test]
    fn longest_prefix_wins_and_scope_excludes_nested_nets() {
        let t = AnswerTable::build(
            dev_policy(&["10.0.0.0/8=sin", "10.1.0.0/16=iad", "10.1.2.0/24=ams"]),
            &dev_snapshot([true; 3]),
        );
        assert_eq!(region_of(&t, "10.1.2.3"), "ams");
        assert_eq!(region_of(&t, "10.1.3.3"), "iad");
        assert_eq!(region_of(&t, "10.200.0.1"), "sin");
        assert_eq!(t.answer(ip("10.1.2.3")).unwrap().scope, 24);
        // 10.1.3.3 vs 10.1.2.0/24: 23 common bits, so /24 separates them.
        assert_eq!(t.answer(ip("10.1.3.3")).unwrap().scope, 24);
        // 10.200.0.1 vs 10.1.0.0/16: 8 common bits → /9 already excludes 10.1/16.
        assert_eq!(t.answer(ip("10.200.0.1")).unwrap().scope, 9);
        // 10.128.x and 10.1.x differ at bit 9 (the first bit after /8).
        assert_eq!(t.answer(ip("10.128.0.1")).unwrap().scope, 9);
    }

    #[test]
    fn default_scope_is_zero_without_rules_and_narrow_with_them() {
        let policy = Arc::new(Policy::new(&[], Some("iad".into()), 30));
        let t = AnswerTable::build(policy, &dev_snapshot([true; 3]));
        let a = t.answer(ip("127.0.0.1")).unwrap();
        assert_eq!((a.region.name.as_str(), a.scope), ("iad", 0));
        // With rules, an unmatched client's scope still keeps the rules' clients out.
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true; 3]));
        // 127 = 0111_1111, 192 = 1100_0000, 198/203 = 1100_xxxx: they differ at bit 1.
        assert_eq!(t.answer(ip("127.0.0.1")).unwrap().scope, 1);
        // 192.0.3.1 vs 192.0.2.0/24: 23 common bits.
        assert_eq!(t.answer(ip("192.0.3.1")).unwrap().scope, 24);
        // IPv6 clients are unaffected by IPv4 rules.
        assert_eq!(t.answer(ip("2001:db8::1")).unwrap().scope, 0);
    }

    #[test]
    fn nearest_ordering_when_first_choice_is_down() {
        // sin down: Singapore clients go to the nearer of ams (~10,500 km) and iad (~15,600 km).
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true, true, false]));
        assert_eq!(region_of(&t, "203.0.113.1"), "ams");
        // ams down: Amsterdam clients go to iad (~6,200 km) before sin.
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([false, true, true]));
        assert_eq!(region_of(&t, "192.0.2.1"), "iad");
        assert_eq!(
            region_of(&t, "127.0.0.1"),
            "iad",
            "default follows ams's order"
        );
        // iad down: Washington clients go to ams.
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true, false, true]));
        assert_eq!(region_of(&t, "198.51.100.7"), "ams");
    }

    #[test]
    fn explicit_preference_list_is_walked_in_order() {
        let t = AnswerTable::build(
            dev_policy(&["100.64.0.0/10=iad,sin"]),
            &dev_snapshot([true, false, true]),
        );
        // iad down, next listed is sin even though ams is nearer to iad.
        assert_eq!(region_of(&t, "100.64.1.1"), "sin");
        let t = AnswerTable::build(
            dev_policy(&["100.64.0.0/10=iad,sin"]),
            &dev_snapshot([true, false, false]),
        );
        assert_eq!(region_of(&t, "100.64.1.1"), "ams");
    }

    #[test]
    fn ttl_shortened_while_any_region_is_down() {
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true, true, false]));
        assert_eq!(t.ttl(), DEGRADED_TTL);
        assert_eq!(t.answer(ip("192.0.2.1")).unwrap().ttl, DEGRADED_TTL);
        let policy = Arc::new(Policy::new(&[], None, 5));
        let t = AnswerTable::build(policy, &dev_snapshot([true, true, false]));
        assert_eq!(t.ttl(), 5);
    }

    #[test]
    fn all_down_fails_open_with_every_edge_of_the_first_region() {
        let mut snap = dev_snapshot([false; 3]);
        snap.edges
            .push(edge("iad-2", "iad", &["127.0.0.22"], false));
        let t = AnswerTable::build(dev_policy(&[]), &snap);
        let a = t.answer(ip("198.51.100.7")).unwrap();
        assert_eq!(a.region.name, "iad");
        assert!(a.fail_open);
        assert_eq!(
            a.v4(),
            &[Ipv4Addr::new(127, 0, 0, 12), Ipv4Addr::new(127, 0, 0, 22)]
        );
    }

    #[test]
    fn dead_edges_are_not_served_from_a_live_region() {
        let mut snap = dev_snapshot([true; 3]);
        snap.edges
            .push(edge("iad-2", "iad", &["127.0.0.22"], false));
        let t = AnswerTable::build(dev_policy(&[]), &snap);
        assert_eq!(
            t.answer(ip("198.51.100.7")).unwrap().v4(),
            &[Ipv4Addr::new(127, 0, 0, 12)]
        );
    }

    #[test]
    fn ipv6_rules_and_answers() {
        let t = AnswerTable::build(
            dev_policy(&["2001:db8::/32=ams", "2001:db8:ff::/48=sin"]),
            &dev_snapshot([true; 3]),
        );
        let a = t.answer(ip("2001:db8::5")).unwrap();
        assert_eq!(a.region.name, "ams");
        assert_eq!(a.v6(), &["2001:db8::11".parse::<Ipv6Addr>().unwrap()]);
        // 2001:db8:0:: vs 2001:db8:ff:: share 40 bits.
        assert_eq!(a.scope, 41);
        let a = t.answer(ip("2001:db8:ff::1")).unwrap();
        assert_eq!((a.region.name.as_str(), a.scope), ("sin", 48));
        // v4-mapped clients (dual-stack sockets) use the IPv4 rules.
        assert_eq!(region_of(&t, "::ffff:198.51.100.7"), "iad");
    }

    #[test]
    fn regions_without_coordinates_go_last_and_unknown_regions_are_skipped() {
        let mut snap = dev_snapshot([false, false, true]);
        snap.regions.push(Region {
            name: "aaa".into(),
            latitude: None,
            longitude: None,
            admin_state: Default::default(),
        });
        snap.edges.push(edge("aaa-1", "aaa", &["127.0.0.14"], true));
        let t = AnswerTable::build(dev_policy(&["100.64.0.0/10=nowhere,ams"]), &snap);
        // nowhere does not exist; ams and iad are down; sin has coordinates so beats aaa.
        assert_eq!(region_of(&t, "100.64.0.1"), "sin");
        let order: Vec<&str> = t.rule_orders[3]
            .iter()
            .map(|&i| t.regions[i].name.as_str())
            .collect();
        assert_eq!(order, ["ams", "iad", "sin", "aaa"]);
    }

    #[test]
    fn edges_of_undeclared_regions_still_count() {
        let mut snap = dev_snapshot([false; 3]);
        snap.edges.push(edge("fra-1", "fra", &["127.0.0.15"], true));
        let t = AnswerTable::build(dev_policy(&[]), &snap);
        assert_eq!(region_of(&t, "192.0.2.1"), "fra");
    }

    #[test]
    fn empty_snapshot_has_no_answer_and_no_default_uses_all_regions() {
        let t = AnswerTable::build(dev_policy(&[]), &Snapshot::default());
        assert!(t.answer(ip("192.0.2.1")).is_none());
        let policy = Arc::new(Policy::new(&[], None, 30));
        let t = AnswerTable::build(policy, &dev_snapshot([false, true, true]));
        // No default, no coordinates anchor: by name, first live.
        assert_eq!(region_of(&t, "127.0.0.1"), "iad");
        assert!(t.explain(ip("127.0.0.1")).contains("iad"));
    }

    #[test]
    fn distances_are_plausible() {
        let ams = (52.37, 4.90);
        let iad = (38.95, -77.45);
        let sin = (1.35, 103.99);
        let d = great_circle_km(ams, iad);
        assert!((6000.0..6400.0).contains(&d), "{d}");
        assert!(great_circle_km(sin, ams) < great_circle_km(sin, iad));
        assert_eq!(great_circle_km(ams, ams), 0.0);
    }
}

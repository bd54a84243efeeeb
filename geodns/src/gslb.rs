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

use crate::config::{GeoKey, GeoMap, NetRule};
use crate::geoip::{GeoDb, Location};
use crate::health::{HealthTracker, Verdict};
use crate::prefix::PrefixTree;

/// Default TTL ceiling (`--degraded-ttl`) of answers that did not go to the client's preferred
/// region (it is down, or everything is and we fail open), so clients move back quickly once it
/// recovers. Also caps the SOA and negative TTL while any region is down.
pub const DEGRADED_TTL: u32 = 5;

/// Client classification: `--net` rules and the GeoIP database merged into one prefix tree.
/// Shared by every policy with the same rules, because the tree (large with a real database) is
/// what a policy costs.
#[derive(Debug)]
pub struct Classifier {
    tree: PrefixTree,
    /// What each tree value stands for: `--net` rule `i` is class `i`, database locations follow.
    classes: Vec<Class>,
    /// Preference list of each `--net` rule.
    rules: Vec<Vec<String>>,
    db: Option<GeoDb>,
}

/// How one name steers once a client is classified: country/continent maps, nearness, the
/// default region, and weights within a region.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Steering {
    pub maps: Vec<GeoMap>,
    pub nearest_limit_km: Option<f64>,
    pub default_region: Option<String>,
    /// Edge (id or address) → weight within its region (default 1; 0 takes it out of weighted
    /// answers while another live edge of the region has weight).
    pub weights: Vec<(String, u32)>,
    /// Addresses per answer, picked by weight; `None`: every live edge of the region (or one,
    /// when weights are set).
    pub answers: Option<usize>,
}

/// Slots of the weighted rotation: each slot is one precomputed answer per region, and a query
/// takes the next slot. Weights are honoured to within 1/ROTATION.
pub const ROTATION: usize = 64;

/// Client-to-region policy of one name: a [`Classifier`] and its [`Steering`]; independent of
/// any snapshot. Rebuilt (off the query path) when the database file changes.
#[derive(Debug)]
pub struct Policy {
    classifier: Arc<Classifier>,
    countries: HashMap<String, Vec<String>>,
    continents: HashMap<String, Vec<String>>,
    nearest_limit_km: Option<f64>,
    default_region: Option<String>,
    ttl: u32,
    /// See [`DEGRADED_TTL`].
    degraded_ttl: u32,
    weights: HashMap<String, u32>,
    /// Addresses per weighted answer; `None`: answers are not weighted.
    answers: Option<usize>,
}

/// What decided a client's location.
#[derive(Clone, Debug, PartialEq)]
pub enum Class {
    /// `--net` rule by index.
    Net(usize),
    /// A database record.
    Geo(Location),
}

/// How a client was classified: the class and the prefix behind it.
#[derive(Clone, Copy, Debug)]
pub struct Classified<'a> {
    pub class: Option<&'a Class>,
    pub class_index: Option<usize>,
    /// Length of the matched prefix (0: nothing matched).
    pub prefix_len: u8,
    /// ECS scope of any answer derived from this classification.
    pub scope: u8,
}

impl Classifier {
    /// Merges the `--net` rules (which win) and the database's networks into one prefix tree.
    pub fn build(nets: &[NetRule], mut db: Option<GeoDb>) -> Self {
        let mut tree = PrefixTree::default();
        let mut classes: Vec<Class> = (0..nets.len()).map(Class::Net).collect();
        if let Some(db) = db.as_mut() {
            type Key = (Option<String>, Option<String>, Option<(u64, u64)>);
            let mut seen: HashMap<Key, u32> = HashMap::new();
            let result = db.for_each(|net, loc| {
                let key = (
                    loc.country.clone(),
                    loc.continent.clone(),
                    loc.coords.map(|(a, b)| (a.to_bits(), b.to_bits())),
                );
                let id = *seen.entry(key).or_insert_with(|| {
                    classes.push(Class::Geo(loc));
                    u32::try_from(classes.len() - 1).unwrap_or(u32::MAX)
                });
                tree.insert(net, id, false);
            });
            if let Err(e) = result {
                tracing::warn!(error = %e, "GeoIP database only partly read");
            }
        }
        // Shorter rules first, each dropping finer database entries beneath it; finer rules
        // inserted later survive. A stable sort keeps "later flag wins" for equal prefixes.
        let mut order: Vec<usize> = (0..nets.len()).collect();
        order.sort_by_key(|&i| nets.get(i).map_or(0, |r| r.net.prefix_len()));
        for i in order {
            if let (Some(rule), Ok(id)) = (nets.get(i), u32::try_from(i)) {
                tree.insert(rule.net, id, true);
            }
        }
        Self {
            tree,
            classes,
            rules: nets.iter().map(|r| r.regions.clone()).collect(),
            db,
        }
    }

    /// Which class a client falls in and the ECS scope of that decision.
    pub fn classify(&self, client: IpAddr) -> Classified<'_> {
        let m = self.tree.lookup(client);
        let class_index = m.value.map(|v| v as usize);
        Classified {
            class: class_index.and_then(|i| self.classes.get(i)),
            class_index,
            prefix_len: m.prefix_len,
            scope: m.scope,
        }
    }

    /// The class `client` falls in (`u64::MAX`: none) and the ECS scope of that decision: two
    /// clients with equal values get equal answers from every table over this classifier, which
    /// is what the answer cache (`fastpath`) keys on.
    pub fn client_class(&self, client: IpAddr) -> (u64, u8) {
        let c = self.classify(client.to_canonical());
        (c.class_index.map_or(u64::MAX, |i| i as u64), c.scope)
    }

    /// Distinct client classes (rules plus database locations) and tree size, for logs.
    pub fn size(&self) -> (usize, usize) {
        (self.classes.len(), self.tree.node_count())
    }
}

impl Policy {
    /// A policy from `--net` rules only. Later rules for the same prefix replace earlier ones.
    pub fn new(nets: &[NetRule], default_region: Option<String>, ttl: u32) -> Self {
        Self::build(nets, &[], None, default_region, ttl, None)
    }

    /// A policy over its own classifier of `nets` and `db`.
    pub fn build(
        nets: &[NetRule],
        maps: &[GeoMap],
        nearest_limit_km: Option<f64>,
        default_region: Option<String>,
        ttl: u32,
        db: Option<GeoDb>,
    ) -> Self {
        let steering = Steering {
            maps: maps.to_vec(),
            nearest_limit_km,
            default_region,
            ..Steering::default()
        };
        Self::steer(Arc::new(Classifier::build(nets, db)), &steering, ttl)
    }

    /// A policy steering clients of `classifier` by `steering`.
    pub fn steer(classifier: Arc<Classifier>, steering: &Steering, ttl: u32) -> Self {
        let mut countries = HashMap::new();
        let mut continents = HashMap::new();
        for m in &steering.maps {
            let target = match m.key {
                GeoKey::Country => &mut countries,
                GeoKey::Continent => &mut continents,
            };
            target.insert(m.code.clone(), m.regions.clone());
        }
        let weighted = !steering.weights.is_empty() || steering.answers.is_some();
        Self {
            classifier,
            countries,
            continents,
            nearest_limit_km: steering
                .nearest_limit_km
                .filter(|k| k.is_finite() && *k > 0.0),
            default_region: steering.default_region.clone(),
            ttl,
            degraded_ttl: DEGRADED_TTL,
            weights: steering.weights.iter().cloned().collect(),
            answers: weighted.then(|| steering.answers.unwrap_or(1).max(1)),
        }
    }

    /// Sets the TTL of degraded answers (see [`DEGRADED_TTL`]); at least 1 s.
    #[must_use]
    pub fn with_degraded_ttl(mut self, ttl: u32) -> Self {
        self.degraded_ttl = ttl.max(1);
        self
    }

    /// Which class a client falls in and the ECS scope of that decision.
    pub fn classify(&self, client: IpAddr) -> Classified<'_> {
        self.classifier.classify(client)
    }

    pub fn classifier(&self) -> &Arc<Classifier> {
        &self.classifier
    }

    /// Whether answers rotate over weighted picks ([`ROTATION`] slots) rather than list every
    /// live edge.
    pub fn weighted(&self) -> bool {
        self.answers.is_some()
    }

    /// The database, if one is loaded.
    pub fn db(&self) -> Option<&GeoDb> {
        self.classifier.db.as_ref()
    }

    /// Distinct client classes (rules plus database locations) and tree size, for logs.
    pub fn size(&self) -> (usize, usize) {
        self.classifier.size()
    }

    /// The weight of an edge: by id, else by any of its addresses, else 1.
    fn weight_of(&self, id: &str, ips: &[IpAddr]) -> u32 {
        self.weights
            .get(id)
            .or_else(|| ips.iter().find_map(|ip| self.weights.get(&ip.to_string())))
            .copied()
            .unwrap_or(1)
    }
}

/// One region's addresses as of one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionAnswer {
    pub name: String,
    /// Steer clients here: the health verdict (hysteresis and admin override) says it serves.
    pub live: bool,
    pub verdict: Verdict,
    /// Position in the table's region list (a metrics label index).
    pub index: usize,
    pub coords: Option<(f64, f64)>,
    alive_v4: Vec<Ipv4Addr>,
    alive_v6: Vec<Ipv6Addr>,
    all_v4: Vec<Ipv4Addr>,
    all_v6: Vec<Ipv6Addr>,
    /// Weighted policies: per rotation slot, the live addresses to give (empty otherwise).
    weighted_v4: Vec<Vec<Ipv4Addr>>,
    weighted_v6: Vec<Vec<Ipv6Addr>>,
    /// See [`Self::rotates`].
    rotates: bool,
}

/// A region picked for a preference list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pick {
    region: usize,
    /// No region of the list was live: answer with every edge of the first one.
    fail_open: bool,
    /// Not the client's first choice (it is down) or failing open: answer with the short TTL.
    degraded: bool,
}

/// Immutable answers for one (policy, snapshot) pair.
#[derive(Debug)]
pub struct AnswerTable {
    policy: Arc<Policy>,
    /// Sorted by name.
    regions: Vec<RegionAnswer>,
    /// Per policy class (rules, then database locations), precomputed for this snapshot.
    class_picks: Vec<Option<Pick>>,
    default_pick: Option<Pick>,
    /// Full ordered region list for unmatched clients, kept for `explain` and as fallback.
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
    /// Rotation slot of a weighted answer.
    variant: usize,
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
            slot(&self.region.weighted_v4, self.variant).unwrap_or(&self.region.alive_v4)
        }
    }

    pub fn v6(&self) -> &[Ipv6Addr] {
        if self.all() {
            &self.region.all_v6
        } else {
            slot(&self.region.weighted_v6, self.variant).unwrap_or(&self.region.alive_v6)
        }
    }
}

/// Rotation slot `variant` of a weighted region, if it is weighted and has one.
fn slot<T>(slots: &[Vec<T>], variant: usize) -> Option<&[T]> {
    let s = slots.get(variant % slots.len().max(1))?;
    (!s.is_empty()).then_some(s.as_slice())
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
        Self::build_for_service(policy, snapshot, health, None)
    }

    /// Like [`Self::build_with_health`] for a name tied to `service`: a region also counts as
    /// down while none of its live edges holds an agent of that service (with hysteresis).
    pub fn build_for_service(
        policy: Arc<Policy>,
        snapshot: &Snapshot,
        health: &HealthTracker,
        service: Option<&str>,
    ) -> Self {
        let mut by_name: BTreeMap<&str, RegionAnswer> = BTreeMap::new();
        // Weighted policies: each region's live edges with their weights.
        let mut weighted: HashMap<&str, Vec<WeightedEdge<'_>>> = HashMap::new();
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
            if policy.weighted() && e.alive {
                weighted
                    .entry(e.info.region.as_str())
                    .or_default()
                    .push(WeightedEdge {
                        weight: policy.weight_of(&e.info.id, &e.info.public_ips),
                        ips: &e.info.public_ips,
                    });
            }
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
        for (i, r) in regions.iter_mut().enumerate() {
            r.index = i;
            r.verdict = health.verdict_for(&r.name, service);
            r.live = r.verdict.serves();
            for v in [&mut r.alive_v4, &mut r.all_v4] {
                v.sort_unstable();
                v.dedup();
            }
            for v in [&mut r.alive_v6, &mut r.all_v6] {
                v.sort_unstable();
                v.dedup();
            }
            if let (Some(edges), Some(k)) = (weighted.get(r.name.as_str()), policy.answers) {
                r.weighted_v4 = rotation(edges, k, |ip| match ip.to_canonical() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                });
                r.weighted_v6 = rotation(edges, k, |ip| match ip.to_canonical() {
                    IpAddr::V6(v6) => Some(v6),
                    IpAddr::V4(_) => None,
                });
                r.rotates = r.weighted_v4.windows(2).any(|w| w[0] != w[1])
                    || r.weighted_v6.windows(2).any(|w| w[0] != w[1]);
            }
        }
        let index: HashMap<&str, usize> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();

        let default_list: Vec<String> = policy.default_region.iter().cloned().collect();
        let default_order = order(&regions, &index, &default_list, None);
        let default_pick = pick(&regions, &default_order);
        let class_picks = policy
            .classifier
            .classes
            .iter()
            .map(|c| {
                pick(
                    &regions,
                    &class_order(&policy, &regions, &index, &default_order, c).1,
                )
            })
            .collect();

        let degraded = regions.iter().any(|r| !r.live);
        let ttl = if degraded {
            policy.ttl.min(policy.degraded_ttl)
        } else {
            policy.ttl
        };
        Self {
            policy,
            regions,
            class_picks,
            default_pick,
            default_order,
            ttl,
            revision: snapshot.revision,
        }
    }

    /// See [`Classifier::client_class`].
    pub fn client_class(&self, client: IpAddr) -> (u64, u8) {
        self.policy.classifier.client_class(client)
    }

    /// The policy this table answers by.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The answer for `client`; `None` only when the snapshot has no region at all.
    pub fn answer(&self, client: IpAddr) -> Option<Answer<'_>> {
        self.answer_in_slot(client, 0)
    }

    /// The answer for `client` in rotation slot `variant` (see [`ROTATION`]; only weighted
    /// policies have more than one).
    pub fn answer_in_slot(&self, client: IpAddr, variant: usize) -> Option<Answer<'_>> {
        let c = self.policy.classify(client.to_canonical());
        let scope = c.scope;
        let pick = match c.class_index {
            Some(i) => self.class_picks.get(i).copied().flatten(),
            None => self.default_pick,
        }?;
        let region = self.regions.get(pick.region)?;
        let ttl = if pick.degraded {
            self.policy.ttl.min(self.policy.degraded_ttl)
        } else {
            self.policy.ttl
        };
        Some(Answer {
            region,
            fail_open: pick.fail_open,
            scope,
            ttl,
            variant,
        })
    }

    /// TTL of the SOA and negative answers: shortened while any region of this table is down.
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

    /// Human-readable account of how `client` is answered: which prefix and database fields
    /// decided, the region walk with health verdicts, and the answer (for `meridian dns explain`).
    pub fn explain(&self, client: IpAddr) -> String {
        use std::fmt::Write as _;
        let client = client.to_canonical();
        let c = self.policy.classify(client);
        let mut out = String::new();
        let _ = writeln!(out, "client: {client}");
        let matched = IpNet::new(client, c.prefix_len).map(|n| n.trunc());
        match (c.class, matched) {
            (Some(Class::Net(i)), Ok(net)) => {
                let _ = writeln!(
                    out,
                    "decided by: --net {net}={} (rule #{i})",
                    self.policy
                        .classifier
                        .rules
                        .get(*i)
                        .map(|r| r.join(","))
                        .unwrap_or_default()
                );
            }
            (Some(Class::Geo(loc)), Ok(net)) => {
                let _ = writeln!(out, "decided by: GeoIP network {net}");
                let _ = writeln!(
                    out,
                    "location: country={} continent={} coords={}",
                    loc.country.as_deref().unwrap_or("-"),
                    loc.continent.as_deref().unwrap_or("-"),
                    loc.coords
                        .map_or("-".to_owned(), |(a, b)| format!("{a},{b}"))
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "decided by: nothing matched; default region {}",
                    self.policy
                        .default_region
                        .as_deref()
                        .unwrap_or("(none: all regions)")
                );
            }
        }
        if let Some(db) = self.policy.db() {
            let f = db.fields();
            match db.lookup(client) {
                Some((net, record, _)) => {
                    let get = |p: &str| {
                        p.split('.')
                            .try_fold(&record, |v, k| v.get(k))
                            .map_or("-".to_owned(), |v| v.to_string())
                    };
                    let _ = writeln!(
                        out,
                        "database {} ({}): {net}: {}={} {}={} {}={} {}={}",
                        db.path.display(),
                        db.database_type(),
                        f.country,
                        get(&f.country),
                        f.continent,
                        get(&f.continent),
                        f.latitude,
                        get(&f.latitude),
                        f.longitude,
                        get(&f.longitude),
                    );
                }
                None => {
                    let _ = writeln!(out, "database {}: no record", db.path.display());
                }
            }
        }
        let (reason, order) = match c.class {
            Some(class) => class_order(
                &self.policy,
                &self.regions,
                &self.index(),
                &self.default_order,
                class,
            ),
            None => ("default order".to_owned(), self.default_order.clone()),
        };
        let walk: Vec<String> = order
            .iter()
            .filter_map(|&i| self.regions.get(i))
            .map(|r| format!("{}({:?})", r.name, r.verdict))
            .collect();
        let _ = writeln!(out, "policy: {reason}");
        let _ = writeln!(out, "walk: {}", walk.join(" "));
        let _ = writeln!(out, "ecs scope: /{}", c.scope);
        if let Some(k) = self.policy.answers {
            let mut w: Vec<String> = self
                .policy
                .weights
                .iter()
                .map(|(e, w)| format!("{e}={w}"))
                .collect();
            w.sort();
            let _ = writeln!(
                out,
                "weighted: {k} address(es) per answer, rotating over {ROTATION} slots; weights: {} (others 1)",
                if w.is_empty() {
                    "-".to_owned()
                } else {
                    w.join(" ")
                }
            );
        }
        match self.answer(client) {
            Some(a) => {
                let _ = writeln!(
                    out,
                    "answer: {}{} A={:?} AAAA={:?} ttl={}",
                    a.region.name,
                    if a.fail_open { " (fail open)" } else { "" },
                    a.v4(),
                    a.v6(),
                    a.ttl
                );
            }
            None => {
                let _ = writeln!(out, "answer: none (no regions known)");
            }
        }
        out
    }

    fn index(&self) -> HashMap<&str, usize> {
        self.regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect()
    }
}

/// The walk order for one class and why: `--net` and `--map` lists first (then the rest by
/// distance from the first listed region), database coordinates by distance within the limit,
/// anything else the default order.
fn class_order(
    policy: &Policy,
    regions: &[RegionAnswer],
    index: &HashMap<&str, usize>,
    default_order: &[usize],
    class: &Class,
) -> (String, Vec<usize>) {
    match class {
        Class::Net(i) => {
            let list = policy
                .classifier
                .rules
                .get(*i)
                .map(Vec::as_slice)
                .unwrap_or_default();
            (
                format!("--net list {}", list.join(",")),
                order(regions, index, list, None),
            )
        }
        Class::Geo(loc) => {
            if let Some((code, list)) = loc
                .country
                .as_ref()
                .and_then(|c| policy.countries.get(c).map(|l| (c, l)))
            {
                return (
                    format!("--map country:{code}={}", list.join(",")),
                    order(regions, index, list, None),
                );
            }
            if let Some((code, list)) = loc
                .continent
                .as_ref()
                .and_then(|c| policy.continents.get(c).map(|l| (c, l)))
            {
                return (
                    format!("--map continent:{code}={}", list.join(",")),
                    order(regions, index, list, None),
                );
            }
            if let Some(at) = loc.coords {
                let mut near: Vec<(usize, f64)> = regions
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.coords.map(|c| (i, great_circle_km(at, c))))
                    .filter(|(_, d)| policy.nearest_limit_km.is_none_or(|l| *d <= l))
                    .collect();
                if !near.is_empty() {
                    near.sort_by(|a, b| a.1.total_cmp(&b.1));
                    let mut out: Vec<usize> = near.iter().map(|n| n.0).collect();
                    let rest: Vec<usize> = default_order
                        .iter()
                        .filter(|i| !out.contains(i))
                        .copied()
                        .collect();
                    out.extend(rest);
                    return (format!("nearest to {},{}", at.0, at.1), out);
                }
                return (
                    format!(
                        "no region within {} km of {},{}: default order",
                        policy.nearest_limit_km.unwrap_or(f64::INFINITY),
                        at.0,
                        at.1
                    ),
                    default_order.to_vec(),
                );
            }
            (
                "no usable location: default order".to_owned(),
                default_order.to_vec(),
            )
        }
    }
}

impl RegionAnswer {
    /// Whether answers steered here differ by rotation slot (a weighted policy and more than
    /// one live edge to pick from).
    pub fn rotates(&self) -> bool {
        self.rotates
    }

    fn empty(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            live: false,
            verdict: Verdict::Down,
            index: 0,
            coords: None,
            alive_v4: Vec::new(),
            alive_v6: Vec::new(),
            all_v4: Vec::new(),
            all_v6: Vec::new(),
            weighted_v4: Vec::new(),
            weighted_v6: Vec::new(),
            rotates: false,
        }
    }
}

/// A live edge of a weighted region.
struct WeightedEdge<'a> {
    weight: u32,
    ips: &'a [IpAddr],
}

/// The [`ROTATION`] answers of one region for one address family: slot `i` holds the addresses
/// of `k` distinct edges, starting with the `i`-th pick of a smooth weighted round robin, so
/// over the slots each edge comes first in proportion to its weight. Edges of weight 0 only
/// serve when every edge has weight 0. Empty when no edge has an address of the family.
fn rotation<T: Copy>(
    edges: &[WeightedEdge<'_>],
    k: usize,
    family: impl Fn(&IpAddr) -> Option<T>,
) -> Vec<Vec<T>> {
    let mut cands: Vec<(u64, Vec<T>)> = edges
        .iter()
        .map(|e| {
            (
                u64::from(e.weight),
                e.ips.iter().filter_map(&family).collect(),
            )
        })
        .filter(|(_, ips): &(u64, Vec<T>)| !ips.is_empty())
        .collect();
    if cands.is_empty() {
        return Vec::new();
    }
    if cands.iter().all(|(w, _)| *w == 0) {
        cands.iter_mut().for_each(|c| c.0 = 1);
    }
    cands.retain(|(w, _)| *w > 0);
    // Smooth weighted round robin (as nginx): even spread, exact proportions per full cycle.
    let total: i128 = cands.iter().map(|(w, _)| i128::from(*w)).sum();
    let mut current = vec![0i128; cands.len()];
    let mut seq = Vec::with_capacity(ROTATION);
    for _ in 0..ROTATION {
        let mut best = 0;
        for (i, (w, _)) in cands.iter().enumerate() {
            current[i] += i128::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best);
    }
    let k = k.min(cands.len());
    (0..ROTATION)
        .map(|start| {
            let mut chosen: Vec<usize> = Vec::with_capacity(k);
            for &i in seq.iter().cycle().skip(start).take(ROTATION) {
                if chosen.len() == k {
                    break;
                }
                if !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
            // Rarely-picked edges may not appear in one cycle: fill by weight.
            let mut rest: Vec<usize> = (0..cands.len()).filter(|i| !chosen.contains(i)).collect();
            rest.sort_by_key(|&i| std::cmp::Reverse(cands[i].0));
            chosen.extend(rest.into_iter().take(k - chosen.len()));
            chosen
                .iter()
                .flat_map(|&i| cands[i].1.iter().copied())
                .collect()
        })
        .collect()
}

/// The full walk order for a preference list: the listed regions that exist, then every other
/// region by great-circle distance from the first listed region with coordinates (regions
/// without coordinates last, by name — `regions` is sorted by name and the sort is stable).
fn order(
    regions: &[RegionAnswer],
    index: &HashMap<&str, usize>,
    list: &[String],
    anchor: Option<(f64, f64)>,
) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(regions.len());
    for name in list {
        if let Some(&i) = index.get(name.as_str())
            && !out.contains(&i)
        {
            out.push(i);
        }
    }
    let anchor = anchor.or_else(|| {
        out.iter()
            .find_map(|&i| regions.get(i).and_then(|r| r.coords))
    });
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
            degraded: order.first() != Some(&region),
        });
    }
    order.first().map(|&region| Pick {
        region,
        fail_open: true,
        degraded: true,
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

#[cfg(test)]
pub(crate) mod tests {
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

    /// A snapshot edge (also used by the other modules' tests).
    pub(crate) fn edge(id: &str, region: &str, ips: &[&str], alive: bool) -> EdgeStatus {
        EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
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
    fn ttl_shortened_for_clients_whose_first_choice_is_down() {
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true, true, false]));
        // SOA and negative answers: short while anything is down.
        assert_eq!(t.ttl(), DEGRADED_TTL);
        // Amsterdam's clients get their first choice: full TTL.
        assert_eq!(t.answer(ip("192.0.2.1")).unwrap().ttl, 30);
        // Singapore's clients are sent elsewhere: short TTL, so they return soon after recovery.
        let a = t.answer(ip("203.0.113.1")).unwrap();
        assert_eq!((a.region.name.as_str(), a.ttl), ("ams", DEGRADED_TTL));
        // Configurable, and never above --ttl.
        let policy =
            Arc::new(Policy::new(&dev_nets(), Some("ams".into()), 30).with_degraded_ttl(2));
        let t = AnswerTable::build(policy, &dev_snapshot([true, true, false]));
        assert_eq!(t.answer(ip("203.0.113.1")).unwrap().ttl, 2);
        let policy = Arc::new(Policy::new(&dev_nets(), None, 3).with_degraded_ttl(10));
        let t = AnswerTable::build(policy, &dev_snapshot([true, true, false]));
        assert_eq!((t.ttl(), t.answer(ip("203.0.113.1")).unwrap().ttl), (3, 3));
        // Fail open is degraded too.
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([false; 3]));
        let a = t.answer(ip("192.0.2.1")).unwrap();
        assert!(a.fail_open);
        assert_eq!(a.ttl, DEGRADED_TTL);
        // Nothing down: full TTL everywhere.
        let t = AnswerTable::build(dev_policy(&[]), &dev_snapshot([true; 3]));
        assert_eq!(
            (t.ttl(), t.answer(ip("203.0.113.1")).unwrap().ttl),
            (30, 30)
        );
    }

    fn dev_nets() -> Vec<NetRule> {
        [
            "192.0.2.0/24=ams",
            "198.51.100.0/24=iad",
            "203.0.113.0/24=sin",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
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
        assert!(
            t.explain(ip("100.64.0.1"))
                .contains("walk: ams(Down) iad(Down) sin(Up) aaa(Up)"),
            "{}",
            t.explain(ip("100.64.0.1"))
        );
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

    #[test]
    fn explain_names_the_prefix_and_database_fields() {
        use crate::geoip::{FieldPaths, GeoDb};
        use crate::mmdb_writer::{Value, write};
        let bytes = write(
            "GeoIP2-City",
            &[(
                "192.0.2.0/25".parse().unwrap(),
                Value::geoip2_city("EU", "DE", "Frankfurt", 50.11, 8.68),
            )],
        )
        .unwrap();
        let db = GeoDb::from_bytes(bytes, FieldPaths::default()).unwrap();
        let maps = ["country:DE=iad,ams".parse().unwrap()];
        let policy = Arc::new(Policy::build(
            &[],
            &maps,
            None,
            Some("ams".into()),
            30,
            Some(db),
        ));
        let t = AnswerTable::build(policy, &dev_snapshot([true; 3]));
        let e = t.explain(ip("192.0.2.9"));
        assert!(e.contains("decided by: GeoIP network 192.0.2.0/25"), "{e}");
        assert!(e.contains("country.iso_code=\"DE\""), "{e}");
        assert!(e.contains("policy: --map country:DE=iad,ams"), "{e}");
        assert!(e.contains("ecs scope: /25"), "{e}");
        assert!(e.contains("answer: iad"), "{e}");
        let e = t.explain(ip("198.51.100.1"));
        assert!(e.contains("nothing matched"), "{e}");
        assert!(e.contains("no record"), "{e}");
    }

    /// iad with three edges, the third IPv6-only.
    fn weighted_snapshot() -> Snapshot {
        let mut s = dev_snapshot([true; 3]);
        s.edges.push(edge("iad-2", "iad", &["127.0.0.22"], true));
        s.edges.push(edge("iad-6", "iad", &["2001:db8::26"], true));
        s
    }

    fn weighted(weights: &[(&str, u32)], answers: Option<usize>) -> Arc<Policy> {
        let nets: Vec<NetRule> = vec!["198.51.100.0/24=iad".parse().unwrap()];
        let steering = Steering {
            default_region: Some("ams".into()),
            weights: weights.iter().map(|(e, w)| ((*e).into(), *w)).collect(),
            answers,
            ..Steering::default()
        };
        Arc::new(Policy::steer(
            Arc::new(Classifier::build(&nets, None)),
            &steering,
            30,
        ))
    }

    /// How often each address comes first over one full rotation.
    fn firsts(t: &AnswerTable, client: &str) -> BTreeMap<Ipv4Addr, usize> {
        let mut out = BTreeMap::new();
        for slot in 0..ROTATION {
            let a = t.answer_in_slot(ip(client), slot).unwrap();
            *out.entry(a.v4()[0]).or_default() += 1;
        }
        out
    }

    #[test]
    fn weights_within_a_region_split_answers_in_proportion() {
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 12), Ipv4Addr::new(127, 0, 0, 22));
        // By edge id and by address; one address per answer by default once weights are set.
        let t = AnswerTable::build(
            weighted(&[("iad-1", 3), ("127.0.0.22", 1)], None),
            &weighted_snapshot(),
        );
        assert_eq!(
            firsts(&t, "198.51.100.1"),
            BTreeMap::from([(a, 48), (b, 16)])
        );
        let one = t.answer_in_slot(ip("198.51.100.1"), 5).unwrap();
        assert_eq!(one.v4().len(), 1);
        // AAAA rotates over the edges that have IPv6 only.
        assert_eq!(one.v6(), &["2001:db8::26".parse::<Ipv6Addr>().unwrap()]);
        // Unweighted regions and policies are untouched.
        assert_eq!(t.answer(ip("192.0.2.1")).unwrap().region.name, "ams");
        let plain = AnswerTable::build(dev_policy(&[]), &weighted_snapshot());
        assert_eq!(plain.answer(ip("198.51.100.1")).unwrap().v4(), &[a, b]);
    }

    #[test]
    fn answers_limit_rotates_evenly_and_weight_zero_drains() {
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 12), Ipv4Addr::new(127, 0, 0, 22));
        let t = AnswerTable::build(weighted(&[], Some(1)), &weighted_snapshot());
        assert_eq!(
            firsts(&t, "198.51.100.1"),
            BTreeMap::from([(a, 32), (b, 32)])
        );
        // Two per answer: both, in rotating order.
        let t = AnswerTable::build(weighted(&[], Some(2)), &weighted_snapshot());
        let mut orders: Vec<Vec<Ipv4Addr>> = (0..2)
            .map(|s| {
                t.answer_in_slot(ip("198.51.100.1"), s)
                    .unwrap()
                    .v4()
                    .to_vec()
            })
            .collect();
        orders.sort();
        assert_eq!(orders, vec![vec![a, b], vec![b, a]]);
        // Weight 0 drains an edge while another live one has weight ...
        let t = AnswerTable::build(weighted(&[("iad-2", 0)], Some(2)), &weighted_snapshot());
        assert_eq!(firsts(&t, "198.51.100.1"), BTreeMap::from([(a, 64)]));
        assert_eq!(t.answer_in_slot(ip("198.51.100.1"), 3).unwrap().v4(), &[a]);
        // ... and serves when it is the only one left.
        let mut snap = weighted_snapshot();
        snap.edges.retain(|e| e.info.id != "iad-1");
        let t = AnswerTable::build(weighted(&[("iad-2", 0)], None), &snap);
        assert_eq!(firsts(&t, "198.51.100.1"), BTreeMap::from([(b, 64)]));
    }

    #[test]
    fn weighted_answers_skip_dead_edges_and_fail_open_lists_all() {
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 12), Ipv4Addr::new(127, 0, 0, 22));
        let mut snap = weighted_snapshot();
        snap.edges
            .iter_mut()
            .filter(|e| e.info.id == "iad-1")
            .for_each(|e| e.alive = false);
        let t = AnswerTable::build(weighted(&[("iad-1", 3)], None), &snap);
        assert_eq!(firsts(&t, "198.51.100.1"), BTreeMap::from([(b, 64)]));
        snap.edges.iter_mut().for_each(|e| e.alive = false);
        let t = AnswerTable::build(weighted(&[("iad-1", 3)], None), &snap);
        let a_all = t.answer_in_slot(ip("198.51.100.1"), 9).unwrap();
        assert!(a_all.fail_open);
        assert!(
            a_all.v4().contains(&a) && a_all.v4().contains(&b),
            "{a_all:?}"
        );
    }
}

//! Region health with rise/fall hysteresis, sans-IO.
//!
//! One lost heartbeat must not move a continent's traffic, and one good one must not move it
//! back onto a flapping region. Each region is observed (live = at least one live edge) on every
//! snapshot and on a periodic tick; the verdict flips only after a run of agreeing observations
//! that is both long enough in count and in time:
//!
//! - **down** after at least [`Hysteresis::fall_count`] consecutive "no live edge" observations
//!   spanning at least [`Hysteresis::fall_after`];
//! - **up** after at least [`Hysteresis::rise_count`] consecutive "live" observations spanning at
//!   least [`Hysteresis::rise_after`].
//!
//! A region seen for the first time takes its observed state at once, and a region that has never
//! had a live edge comes up on its first one: there is no flapping history to protect against,
//! and holding a freshly started region down for the rise window only misroutes its clients.
//! The operator's [`AdminState`] overrides the verdict without resetting the observation run, so
//! clearing the override returns to the observed state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coordinator_api::{AdminState, Snapshot};

/// Thresholds of the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    pub fall_count: u32,
    pub fall_after: Duration,
    pub rise_count: u32,
    pub rise_after: Duration,
}

impl Default for Hysteresis {
    /// Down after 2 bad observations ≥ 2 s apart; up after 3 good ones over ≥ 10 s.
    fn default() -> Self {
        Self {
            fall_count: 2,
            fall_after: Duration::from_secs(2),
            rise_count: 3,
            rise_after: Duration::from_secs(10),
        }
    }
}

impl Hysteresis {
    /// How often the driver should re-observe the current snapshot so that a verdict can flip
    /// without a new snapshot arriving.
    pub fn tick(&self) -> Duration {
        (self.fall_after.min(self.rise_after) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

#[derive(Clone, Copy, Debug)]
struct RegionState {
    /// The observed verdict (before any admin override).
    up: bool,
    /// Current run of observations disagreeing with `up`: count and first instant.
    run: u32,
    run_since: Option<Instant>,
    /// Whether the region has ever been observed live.
    ever_live: bool,
    admin: AdminState,
}

/// Per-region verdicts as of the last observation.
#[derive(Debug, Default)]
pub struct HealthTracker {
    cfg: Hysteresis,
    regions: BTreeMap<String, RegionState>,
    /// Service → region → whether a live edge there holds an agent of the service, with the
    /// same hysteresis: names tied to a service skip regions that cannot serve it.
    services: BTreeMap<String, BTreeMap<String, RegionState>>,
}

/// Why a region has the verdict it has (for `explain` and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Up,
    Down,
    /// Observed dead but still within the fall window.
    Falling,
    /// Observed live but still within the rise window.
    Rising,
    AdminUp,
    AdminDown,
}

impl Verdict {
    /// Whether answers should steer clients to the region.
    pub fn serves(self) -> bool {
        matches!(self, Self::Up | Self::Falling | Self::AdminUp)
    }
}

impl HealthTracker {
    pub fn new(cfg: Hysteresis) -> Self {
        Self {
            cfg,
            regions: BTreeMap::new(),
            services: BTreeMap::new(),
        }
    }

    /// Feeds one observation of `snapshot` at `now`. Returns whether any verdict changed, so the
    /// driver only rebuilds answer tables when needed.
    pub fn observe(&mut self, snapshot: &Snapshot, now: Instant) -> bool {
        let mut observed: BTreeMap<&str, (bool, AdminState)> = BTreeMap::new();
        for r in &snapshot.regions {
            observed
                .entry(&r.name)
                .or_insert((false, AdminState::Auto))
                .1 = r.admin_state;
        }
        for e in &snapshot.edges {
            observed
                .entry(&e.info.region)
                .or_insert((false, AdminState::Auto))
                .0 |= e.alive;
        }
        // Every service the snapshot names or an agent serves, in every region.
        let mut per_service: BTreeMap<&str, BTreeMap<&str, bool>> = BTreeMap::new();
        for s in &snapshot.services {
            per_service.entry(&s.name).or_default();
        }
        for e in &snapshot.edges {
            for a in &e.agents {
                per_service.entry(&a.service).or_default();
            }
        }
        for regions in per_service.values_mut() {
            for name in observed.keys() {
                regions.insert(name, false);
            }
        }
        for e in snapshot.edges.iter().filter(|e| e.alive) {
            // The edge's own verdict when it sends one (it also covers direct origins and its
            // checks of agents); else its agents whose origin passes.
            let serving: Vec<&str> = match &e.info.healthy_services {
                Some(names) => names.iter().map(String::as_str).collect(),
                None => e
                    .agents
                    .iter()
                    .filter(|a| a.origin_healthy)
                    .map(|a| a.service.as_str())
                    .collect(),
            };
            for service in serving {
                if let Some(live) = per_service
                    .get_mut(service)
                    .and_then(|m| m.get_mut(e.info.region.as_str()))
                {
                    *live = true;
                }
            }
        }
        let before = self.all_verdicts();
        self.services
            .retain(|name, _| per_service.contains_key(name.as_str()));
        for (service, regions) in per_service {
            let states = self.services.entry(service.to_owned()).or_default();
            states.retain(|name, _| regions.contains_key(name.as_str()));
            for (region, live) in regions {
                match states.get_mut(region) {
                    None => {
                        states.insert(
                            region.to_owned(),
                            RegionState {
                                up: live,
                                run: 0,
                                run_since: None,
                                ever_live: live,
                                admin: AdminState::Auto,
                            },
                        );
                    }
                    Some(st) => st.step(live, now, &self.cfg),
                }
            }
        }
        self.regions
            .retain(|name, _| observed.contains_key(name.as_str()));
        for (name, (live, admin)) in observed {
            match self.regions.get_mut(name) {
                None => {
                    self.regions.insert(
                        name.to_owned(),
                        RegionState {
                            up: live,
                            run: 0,
                            run_since: None,
                            ever_live: live,
                            admin,
                        },
                    );
                }
                Some(s) => {
                    s.admin = admin;
                    s.step(live, now, &self.cfg);
                }
            }
        }
        before != self.all_verdicts()
    }

    /// Region and per-service verdicts, to tell whether an observation changed anything.
    fn all_verdicts(&self) -> Vec<(String, Option<String>, Verdict)> {
        let regions = self.verdicts().map(|(n, v)| (n.to_owned(), None, v));
        let services = self.services.iter().flat_map(|(s, m)| {
            m.iter()
                .map(move |(r, st)| (r.clone(), Some(s.clone()), st.verdict()))
        });
        regions.chain(services).collect()
    }

    /// The verdict for `region` for a name tied to `service` (`None`: any service). The region's
    /// own verdict wins when it is an operator override or does not serve; otherwise the
    /// service's observation there decides. A service never seen is treated as up (fail open).
    pub fn verdict_for(&self, region: &str, service: Option<&str>) -> Verdict {
        let own = self.verdict(region);
        let Some(service) = service else {
            return own;
        };
        if matches!(own, Verdict::AdminUp | Verdict::AdminDown) || !own.serves() {
            return own;
        }
        self.services
            .get(service)
            .and_then(|m| m.get(region))
            .map_or(own, RegionState::verdict)
    }

    /// The verdict for `region`; regions never observed are treated as up (fail open).
    pub fn verdict(&self, region: &str) -> Verdict {
        self.regions
            .get(region)
            .map_or(Verdict::Up, |s| s.verdict())
    }

    pub fn verdicts(&self) -> impl Iterator<Item = (&str, Verdict)> {
        self.regions.iter().map(|(n, s)| (n.as_str(), s.verdict()))
    }
}

impl RegionState {
    fn step(&mut self, live: bool, now: Instant, cfg: &Hysteresis) {
        if live && !self.ever_live {
            self.ever_live = true;
            self.up = true;
        }
        if live == self.up {
            self.run = 0;
            self.run_since = None;
            return;
        }
        self.run = self.run.saturating_add(1);
        let since = *self.run_since.get_or_insert(now);
        let (count, after) = if self.up {
            (cfg.fall_count, cfg.fall_after)
        } else {
            (cfg.rise_count, cfg.rise_after)
        };
        if self.run >= count.max(1) && now.saturating_duration_since(since) >= after {
            self.up = live;
            self.run = 0;
            self.run_since = None;
        }
    }

    fn verdict(&self) -> Verdict {
        match (self.admin, self.up, self.run > 0) {
            (AdminState::Up, _, _) => Verdict::AdminUp,
            (AdminState::Down, _, _) => Verdict::AdminDown,
            (AdminState::Auto, true, false) => Verdict::Up,
            (AdminState::Auto, true, true) => Verdict::Falling,
            (AdminState::Auto, false, false) => Verdict::Down,
            (AdminState::Auto, false, true) => Verdict::Rising,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_api::{EdgeInfo, EdgeStatus, Region};

    fn snap(ams_alive: bool, ams_admin: AdminState) -> Snapshot {
        let edge = |region: &str, alive| EdgeStatus {
            info: EdgeInfo {
                id: format!("{region}-1"),
                region: region.into(),
                public_ips: vec![],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive,
            last_seen_ms: 0,
            agents: Vec::new(),
        };
        Snapshot {
            regions: vec![
                Region {
                    name: "ams".into(),
                    latitude: None,
                    longitude: None,
                    admin_state: ams_admin,
                },
                Region {
                    name: "iad".into(),
                    latitude: None,
                    longitude: None,
                    admin_state: AdminState::Auto,
                },
            ],
            edges: vec![edge("ams", ams_alive), edge("iad", true)],
            ..Snapshot::default()
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_observation_is_taken_as_is() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let now = Instant::now();
        assert!(t.observe(&snap(false, AdminState::Auto), now));
        assert_eq!(t.verdict("ams"), Verdict::Down);
        assert_eq!(t.verdict("iad"), Verdict::Up);
        assert_eq!(t.verdict("never-seen"), Verdict::Up);
    }

    #[test]
    fn falls_only_after_count_and_time() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        t.observe(&snap(true, AdminState::Auto), t0);
        // One bad observation: falling, still serving.
        assert!(t.observe(&snap(false, AdminState::Auto), t0 + S));
        assert_eq!(t.verdict("ams"), Verdict::Falling);
        assert!(t.verdict("ams").serves());
        // Second bad one too soon: still falling.
        t.observe(&snap(false, AdminState::Auto), t0 + S + S / 2);
        assert_eq!(t.verdict("ams"), Verdict::Falling);
        // Two seconds after the first bad observation: down.
        assert!(t.observe(&snap(false, AdminState::Auto), t0 + 3 * S));
        assert_eq!(t.verdict("ams"), Verdict::Down);
        assert!(!t.verdict("ams").serves());
    }

    #[test]
    fn a_single_good_observation_resets_the_fall() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        t.observe(&snap(true, AdminState::Auto), t0);
        t.observe(&snap(false, AdminState::Auto), t0 + S);
        t.observe(&snap(true, AdminState::Auto), t0 + 2 * S);
        t.observe(&snap(false, AdminState::Auto), t0 + 3 * S);
        t.observe(&snap(false, AdminState::Auto), t0 + 4 * S);
        assert_eq!(t.verdict("ams"), Verdict::Falling, "run restarted at 3 s");
        t.observe(&snap(false, AdminState::Auto), t0 + 5 * S);
        assert_eq!(t.verdict("ams"), Verdict::Down);
    }

    #[test]
    fn a_region_that_never_had_a_live_edge_comes_up_on_its_first() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        t.observe(&snap(false, AdminState::Auto), t0);
        assert_eq!(t.verdict("ams"), Verdict::Down);
        assert!(t.observe(&snap(true, AdminState::Auto), t0 + S));
        assert_eq!(t.verdict("ams"), Verdict::Up);
    }

    /// Starts `ams` live at `t0` and observes it dead until it is down (by `t0 + 3 s`).
    fn tracker_with_ams_down(t0: Instant) -> HealthTracker {
        let mut t = HealthTracker::new(Hysteresis::default());
        t.observe(&snap(true, AdminState::Auto), t0 - 3 * S);
        t.observe(&snap(false, AdminState::Auto), t0 - 2 * S);
        t.observe(&snap(false, AdminState::Auto), t0);
        assert_eq!(t.verdict("ams"), Verdict::Down);
        t
    }

    #[test]
    fn rises_only_after_count_and_time() {
        let t0 = Instant::now() + 10 * S;
        let mut t = tracker_with_ams_down(t0);
        t.observe(&snap(true, AdminState::Auto), t0 + S);
        assert_eq!(t.verdict("ams"), Verdict::Rising);
        assert!(!t.verdict("ams").serves());
        // Long enough but only two observations.
        t.observe(&snap(true, AdminState::Auto), t0 + 20 * S);
        assert_eq!(t.verdict("ams"), Verdict::Rising);
        t.observe(&snap(true, AdminState::Auto), t0 + 21 * S);
        assert_eq!(t.verdict("ams"), Verdict::Up);
        // A flap during the rise restarts it.
        let mut t = tracker_with_ams_down(t0);
        t.observe(&snap(true, AdminState::Auto), t0 + S);
        t.observe(&snap(true, AdminState::Auto), t0 + 2 * S);
        t.observe(&snap(false, AdminState::Auto), t0 + 3 * S);
        t.observe(&snap(true, AdminState::Auto), t0 + 12 * S);
        assert_eq!(t.verdict("ams"), Verdict::Rising);
    }

    #[test]
    fn admin_overrides_and_clearing_returns_to_observation() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        t.observe(&snap(true, AdminState::Down), t0);
        assert_eq!(t.verdict("ams"), Verdict::AdminDown);
        assert!(!t.verdict("ams").serves());
        assert!(t.observe(&snap(true, AdminState::Auto), t0 + S));
        assert_eq!(t.verdict("ams"), Verdict::Up);
        t.observe(&snap(false, AdminState::Up), t0 + 2 * S);
        t.observe(&snap(false, AdminState::Up), t0 + 10 * S);
        assert_eq!(t.verdict("ams"), Verdict::AdminUp);
        assert!(t.verdict("ams").serves());
        t.observe(&snap(false, AdminState::Auto), t0 + 11 * S);
        assert_eq!(t.verdict("ams"), Verdict::Down, "observed down meanwhile");
    }

    /// `ams` and `iad` both live; `web`'s agents at `ams` as given, `api`'s at both.
    fn snap_with_agents(ams_web: bool) -> Snapshot {
        let mut s = snap(true, AdminState::Auto);
        let agent = |service: &str| coordinator_api::AgentConn {
            agent_id: format!("{service}-agent"),
            service: service.into(),
            token_id: "t".into(),
            remote_addr: String::new(),
            connected_at_ms: 0,
            origin_healthy: true,
        };
        s.edges[0].agents = if ams_web {
            vec![agent("web"), agent("api")]
        } else {
            vec![agent("api")]
        };
        s.edges[1].agents = vec![agent("web"), agent("api")];
        s
    }

    #[test]
    fn per_service_verdicts_with_hysteresis() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        t.observe(&snap_with_agents(true), t0);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Up);
        // web's only agent at ams leaves: falling, then down after the fall window.
        assert!(t.observe(&snap_with_agents(false), t0 + S));
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Falling);
        t.observe(&snap_with_agents(false), t0 + 3 * S);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Down);
        // The region itself and other services there are unaffected.
        assert_eq!(t.verdict("ams"), Verdict::Up);
        assert_eq!(t.verdict_for("ams", None), Verdict::Up);
        assert_eq!(t.verdict_for("ams", Some("api")), Verdict::Up);
        assert_eq!(t.verdict_for("iad", Some("web")), Verdict::Up);
        // Unknown services follow the region.
        assert_eq!(t.verdict_for("ams", Some("other")), Verdict::Up);
        // Back: rising until the rise window passed.
        t.observe(&snap_with_agents(true), t0 + 4 * S);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Rising);
        t.observe(&snap_with_agents(true), t0 + 10 * S);
        t.observe(&snap_with_agents(true), t0 + 15 * S);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Up);
        // An operator override of the region wins over the service's observation.
        let mut s = snap_with_agents(false);
        s.regions[0].admin_state = AdminState::Up;
        t.observe(&s, t0 + 16 * S);
        t.observe(&s, t0 + 20 * S);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::AdminUp);
        // A dead edge's agents do not count.
        let mut t = HealthTracker::new(Hysteresis::default());
        let mut s = snap_with_agents(true);
        s.edges[0].alive = false;
        t.observe(&s, t0);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Down);
        // Nor does a connected agent whose origin fails its health check.
        let mut t = HealthTracker::new(Hysteresis::default());
        let mut s = snap_with_agents(true);
        for a in s.edges[0].agents.iter_mut().filter(|a| a.service == "web") {
            a.origin_healthy = false;
        }
        t.observe(&s, t0);
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Down);
        assert_eq!(t.verdict_for("ams", Some("api")), Verdict::Up);
    }

    #[test]
    fn an_edges_own_verdict_wins_over_its_agents_and_covers_direct_origins() {
        let t0 = Instant::now();
        let served = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect());
        // `origin` has no agent anywhere (direct origins): up where an edge says it serves it.
        let mut s = snap_with_agents(true);
        s.services.push(coordinator_api::Service {
            name: "origin".into(),
            ..Default::default()
        });
        s.edges[0].info.healthy_services = served(&["api", "origin"]);
        s.edges[1].info.healthy_services = served(&["api", "web"]);
        let mut t = HealthTracker::new(Hysteresis::default());
        t.observe(&s, t0);
        assert_eq!(t.verdict_for("ams", Some("origin")), Verdict::Up);
        assert_eq!(t.verdict_for("iad", Some("origin")), Verdict::Down);
        // ams holds a healthy `web` agent, but the edge's own checks of it fail: not served.
        assert_eq!(t.verdict_for("ams", Some("web")), Verdict::Down);
        assert_eq!(t.verdict_for("iad", Some("web")), Verdict::Up);
        // A draining edge (empty list) serves nothing, agents or not.
        s.edges[1].info.healthy_services = served(&[]);
        let mut t = HealthTracker::new(Hysteresis::default());
        t.observe(&s, t0);
        assert_eq!(t.verdict_for("iad", Some("api")), Verdict::Down);
    }

    #[test]
    fn unchanged_observations_report_no_change() {
        let mut t = HealthTracker::new(Hysteresis::default());
        let t0 = Instant::now();
        assert!(t.observe(&snap(true, AdminState::Auto), t0));
        assert!(!t.observe(&snap(true, AdminState::Auto), t0 + S));
    }
}

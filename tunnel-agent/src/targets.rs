//! Which edges each connection slot dials, sans-IO.
//!
//! The agent starts with one *slot* rotating over the `--edge` seeds. Each `Welcome` teaches us
//! the edge's region and the edges of other regions; we then add slots, one per not-yet-covered
//! region, until `--regions` distinct regions are targeted. A slot bound to a region rotates over
//! that region's known addresses; if it keeps failing it unbinds and tries any region nobody
//! covers (then the seeds), so a dead region is replaced by a live one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use tunnel_proto::EdgeEndpoint;

pub(crate) type SlotId = usize;

/// Bounds on what edges can teach us: a misbehaving edge cannot grow our state without limit.
const MAX_REGIONS: usize = 64;
const MAX_ADDRS_PER_REGION: usize = 32;

#[derive(Debug, Default)]
struct Slot {
    region: Option<String>,
    cursor: usize,
    failures: u32,
}

#[derive(Debug)]
pub(crate) struct Targets {
    want: usize,
    max_slots: usize,
    seeds: Vec<SocketAddr>,
    known: BTreeMap<String, Vec<SocketAddr>>,
    slots: Vec<Slot>,
}

impl Targets {
    /// Starts with slot 0 rotating over `seeds`.
    pub(crate) fn new(seeds: Vec<SocketAddr>, want_regions: usize) -> Self {
        let want = want_regions.max(1);
        Self {
            want,
            // Duplicate-region slots can appear when a seed slot lands in a covered region.
            max_slots: want * 2,
            seeds,
            known: BTreeMap::new(),
            slots: vec![Slot::default()],
        }
    }

    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn slot_region(&self, slot: SlotId) -> Option<&str> {
        self.slots.get(slot)?.region.as_deref()
    }

    /// The address `slot` should dial next (rotating), or `None` if nothing is known at all.
    pub(crate) fn next_addr(&mut self, slot: SlotId) -> Option<SocketAddr> {
        let candidates = self.candidates(slot);
        let s = self.slots.get_mut(slot)?;
        if candidates.is_empty() {
            return None;
        }
        let addr = candidates[s.cursor % candidates.len()];
        s.cursor = s.cursor.wrapping_add(1);
        Some(addr)
    }

    fn candidates(&self, slot: SlotId) -> Vec<SocketAddr> {
        let Some(s) = self.slots.get(slot) else {
            return Vec::new();
        };
        if let Some(addrs) = s.region.as_ref().and_then(|r| self.known.get(r))
            && !addrs.is_empty()
        {
            return addrs.clone();
        }
        // Unbound: regions no other slot targets, then the seeds.
        let taken = self.bound_regions(Some(slot));
        let mut out: Vec<SocketAddr> = self
            .known
            .iter()
            .filter(|(r, _)| !taken.contains(r.as_str()))
            .flat_map(|(_, a)| a.iter().copied())
            .collect();
        // Seeds known to sit in a region another slot covers would only duplicate that slot.
        for seed in &self.seeds {
            let covered = self
                .known
                .iter()
                .any(|(r, addrs)| taken.contains(r.as_str()) && addrs.contains(seed));
            if !covered && !out.contains(seed) {
                out.push(*seed);
            }
        }
        out
    }

    /// Seeds whose region no `Welcome` has told us yet.
    fn unexplored_seeds(&self) -> usize {
        self.seeds
            .iter()
            .filter(|seed| !self.known.values().any(|addrs| addrs.contains(seed)))
            .count()
    }

    fn bound_regions(&self, except: Option<SlotId>) -> BTreeSet<&str> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .filter_map(|(_, s)| s.region.as_deref())
            .collect()
    }

    fn learn(&mut self, region: &str, addr: SocketAddr) {
        if !self.known.contains_key(region) && self.known.len() >= MAX_REGIONS {
            return;
        }
        let addrs = self.known.entry(region.to_owned()).or_default();
        if !addrs.contains(&addr) && addrs.len() < MAX_ADDRS_PER_REGION {
            addrs.push(addr);
        }
    }

    /// `slot` registered with the edge at `addr` in `region`, which listed `others`. Returns the
    /// new slots the driver must start (each already bound to a region). Unparsable addresses
    /// in `others` are skipped and counted in the second value.
    pub(crate) fn on_welcome(
        &mut self,
        slot: SlotId,
        addr: SocketAddr,
        region: &str,
        others: &[EdgeEndpoint],
    ) -> (Vec<SlotId>, usize) {
        self.learn(region, addr);
        let mut bad = 0;
        for e in others {
            match e.addr.parse::<SocketAddr>() {
                Ok(a) => self.learn(&e.region, a),
                Err(_) => bad += 1,
            }
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.failures = 0;
            if s.region.as_deref() != Some(region) {
                s.region = Some(region.to_owned());
                s.cursor = 0;
            }
        }
        let mut covered: BTreeSet<String> = self
            .bound_regions(None)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let uncovered: Vec<String> = self
            .known
            .keys()
            .filter(|r| !covered.contains(*r))
            .cloned()
            .collect();
        let mut new = Vec::new();
        for region in uncovered {
            if covered.len() >= self.want || self.slots.len() >= self.max_slots {
                break;
            }
            covered.insert(region.clone());
            self.slots.push(Slot {
                region: Some(region),
                cursor: 0,
                failures: 0,
            });
            new.push(self.slots.len() - 1);
        }
        // An edge that has not yet heard of its peers welcomes us with an empty list; the seeds
        // we have not explored may be exactly the regions we lack, so each gets a slot of its own
        // (staggered cursors, so they do not all dial the same seed) while we are short.
        let unbound = self.slots.iter().filter(|s| s.region.is_none()).count();
        let unexplored = self.unexplored_seeds();
        let mut stagger = unbound;
        while covered.len() + stagger < self.want
            && stagger < unexplored
            && self.slots.len() < self.max_slots
        {
            self.slots.push(Slot {
                region: None,
                cursor: stagger,
                failures: 0,
            });
            new.push(self.slots.len() - 1);
            stagger += 1;
        }
        (new, bad)
    }

    /// A dial, handshake or registration of `slot` failed. After trying every address of its
    /// region twice (at least 3 attempts) the slot gives the region up.
    pub(crate) fn on_failure(&mut self, slot: SlotId) {
        let region_len = {
            let Some(s) = self.slots.get(slot) else {
                return;
            };
            s.region
                .as_ref()
                .and_then(|r| self.known.get(r))
                .map_or(0, Vec::len)
        };
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.failures = s.failures.saturating_add(1);
        let limit = u32::try_from(region_len.saturating_mul(2).max(3)).unwrap_or(u32::MAX);
        if s.region.is_some() && s.failures >= limit {
            s.region = None;
            s.failures = 0;
            s.cursor = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ep(region: &str, addr: &str) -> EdgeEndpoint {
        EdgeEndpoint {
            edge_id: format!("e-{addr}"),
            region: region.into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn an_empty_welcome_sends_other_slots_to_the_unexplored_seeds() {
        let seeds = vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")];
        let mut t = Targets::new(seeds, 3);
        assert_eq!(t.next_addr(0), Some(a("10.0.0.1:1")));
        // The first edge knows no peers yet.
        let (new, _) = t.on_welcome(0, a("10.0.0.1:1"), "ams", &[]);
        assert_eq!(new, vec![1, 2]);
        let dialled = [t.next_addr(1).unwrap(), t.next_addr(2).unwrap()];
        assert_eq!(
            dialled,
            [a("10.0.0.2:1"), a("10.0.0.3:1")],
            "one seed each, not ams again"
        );
        // Once those welcome us, nothing more is added: three regions are covered.
        assert!(t.on_welcome(1, a("10.0.0.2:1"), "iad", &[]).0.is_empty());
        assert!(t.on_welcome(2, a("10.0.0.3:1"), "sin", &[]).0.is_empty());
        assert_eq!(t.slot_count(), 3);
    }

    #[test]
    fn seed_slot_rotates_over_seeds() {
        let mut t = Targets::new(vec![a("10.0.0.1:1"), a("10.0.0.2:1")], 2);
        assert_eq!(t.next_addr(0), Some(a("10.0.0.1:1")));
        assert_eq!(t.next_addr(0), Some(a("10.0.0.2:1")));
        assert_eq!(t.next_addr(0), Some(a("10.0.0.1:1")));
        assert_eq!(t.next_addr(7), None);
    }

    #[test]
    fn welcome_adds_slots_for_other_regions_up_to_want() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 2);
        let others = [
            ep("eu", "10.0.0.9:1"),
            ep("us", "10.0.1.1:1"),
            ep("us", "10.0.1.2:1"),
            ep("ap", "10.0.2.1:1"),
        ];
        let (new, bad) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &others);
        assert_eq!(bad, 0);
        assert_eq!(new, vec![1]);
        assert_eq!(t.slot_region(0), Some("eu"));
        // BTreeMap order: "ap" < "us"; any uncovered region is fine, but it is deterministic.
        assert_eq!(t.slot_region(1), Some("ap"));
        assert_eq!(t.slot_count(), 2);
        // Slot 0 now rotates over eu addresses only.
        assert_eq!(t.next_addr(0), Some(a("10.0.0.1:1")));
        assert_eq!(t.next_addr(0), Some(a("10.0.0.9:1")));
        assert_eq!(t.next_addr(1), Some(a("10.0.2.1:1")));
        // A second welcome on the new slot adds nothing.
        let (new, _) = t.on_welcome(1, a("10.0.2.1:1"), "ap", &others);
        assert!(new.is_empty());
    }

    #[test]
    fn fewer_regions_than_wanted() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 3);
        let (new, _) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &[ep("us", "10.0.1.1:1")]);
        assert_eq!(new, vec![1]);
        let (new, _) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &[ep("us", "10.0.1.1:1")]);
        assert!(new.is_empty());
        assert_eq!(t.slot_count(), 2);
    }

    #[test]
    fn bad_addresses_are_counted_and_skipped() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 2);
        let (new, bad) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &[ep("us", "not an addr")]);
        assert_eq!(bad, 1);
        assert!(new.is_empty());
    }

    #[test]
    fn failing_slot_gives_up_its_region_and_tries_uncovered_ones() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 2);
        let others = [ep("us", "10.0.1.1:1"), ep("ap", "10.0.2.1:1")];
        let (new, _) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &others);
        assert_eq!(new, vec![1]); // ap
        // eu has one address: limit is max(2*1, 3) = 3 failures.
        t.on_failure(0);
        t.on_failure(0);
        assert_eq!(t.slot_region(0), Some("eu"));
        t.on_failure(0);
        assert_eq!(t.slot_region(0), None);
        // Unbound slot 0 now tries eu and us (not ap: slot 1 has it), then the seed.
        let tried: Vec<_> = (0..3).map(|_| t.next_addr(0).unwrap()).collect();
        assert_eq!(
            tried,
            vec![a("10.0.0.1:1"), a("10.0.1.1:1"), a("10.0.0.1:1")]
        );
        // It lands in us: two regions covered again, no new slot.
        let (new, _) = t.on_welcome(0, a("10.0.1.1:1"), "us", &others);
        assert!(new.is_empty());
        assert_eq!(t.slot_region(0), Some("us"));
    }

    #[test]
    fn duplicate_region_spawns_slot_for_missing_one_but_is_bounded() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 2);
        let others = [ep("us", "10.0.1.1:1")];
        let (new, _) = t.on_welcome(0, a("10.0.0.1:1"), "eu", &others);
        assert_eq!(new, vec![1]);
        // Slot 1 fails out of us and lands in eu too.
        for _ in 0..3 {
            t.on_failure(1);
        }
        let (new, _) = t.on_welcome(1, a("10.0.0.1:1"), "eu", &others);
        assert_eq!(new, vec![2]);
        assert_eq!(t.slot_region(2), Some("us"));
        assert!(t.slot_count() <= 4);
    }

    #[test]
    fn learned_state_is_bounded() {
        let mut t = Targets::new(vec![a("10.0.0.1:1")], 2);
        let others: Vec<_> = (0..1000)
            .map(|i| {
                ep(
                    &format!("r{}", i % 100),
                    &format!("10.1.{}.{}:1", i / 250, i % 250),
                )
            })
            .collect();
        t.on_welcome(0, a("10.0.0.1:1"), "eu", &others);
        assert!(t.known.len() <= MAX_REGIONS);
        assert!(t.known.values().all(|v| v.len() <= MAX_ADDRS_PER_REGION));
    }
}

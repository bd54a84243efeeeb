//! One binary prefix tree per address family holding every client-location input (the `--net`
//! rules and the GeoIP database), so one walk gives both the decision and its ECS scope.

use std::net::IpAddr;

use ipnet::IpNet;

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    child: [u32; 2],
    value: u32,
}

impl Node {
    const EMPTY: Self = Self {
        child: [NONE; 2],
        value: NONE,
    };
}

/// Longest-prefix match with the ECS scope of the answer.
#[derive(Clone, Debug)]
pub struct PrefixTree {
    v4: Vec<Node>,
    v6: Vec<Node>,
}

/// Where a lookup landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub value: Option<u32>,
    /// Length of the prefix that held `value` (0 when nothing matched).
    pub prefix_len: u8,
    /// ECS scope: every address sharing this many leading bits gets the same `value`.
    pub scope: u8,
}

impl Default for PrefixTree {
    fn default() -> Self {
        Self {
            v4: vec![Node::EMPTY],
            v6: vec![Node::EMPTY],
        }
    }
}

fn bits_of(addr: IpAddr) -> (u128, u8, bool) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32, true),
        IpAddr::V6(a) => (u128::from(a), 128, false),
    }
}

fn bit(bits: u128, depth: u8) -> usize {
    ((bits >> (127 - u32::from(depth))) & 1) as usize
}

impl PrefixTree {
    pub fn node_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn family(&mut self, v4: bool) -> &mut Vec<Node> {
        if v4 { &mut self.v4 } else { &mut self.v6 }
    }

    /// Sets `value` on `net`. With `shadow`, everything more specific than `net` is dropped, so
    /// `net` wins over finer entries inserted before it (how `--net` beats the database).
    pub fn insert(&mut self, net: IpNet, value: u32, shadow: bool) {
        let (bits, _, v4) = bits_of(net.network());
        let len = net.prefix_len();
        let nodes = self.family(v4);
        let mut at = 0usize;
        for depth in 0..len {
            let b = bit(bits, depth);
            let next = nodes.get(at).map_or(NONE, |n| n.child[b]);
            at = if next == NONE {
                let idx = nodes.len();
                let Ok(idx32) = u32::try_from(idx) else {
                    return; // more than 4G nodes cannot be built in memory anyway
                };
                nodes.push(Node::EMPTY);
                if let Some(n) = nodes.get_mut(at) {
                    n.child[b] = idx32;
                }
                idx
            } else {
                next as usize
            };
        }
        if let Some(n) = nodes.get_mut(at) {
            n.value = value;
            if shadow {
                // Orphaned nodes stay in the arena; rules are few, so the waste is small.
                n.child = [NONE; 2];
            }
        }
    }

    pub fn lookup(&self, addr: IpAddr) -> Match {
        let (bits, width, v4) = bits_of(addr);
        let nodes = if v4 { &self.v4 } else { &self.v6 };
        let mut m = Match {
            value: None,
            prefix_len: 0,
            scope: 0,
        };
        let mut at = 0usize;
        let mut depth = 0u8;
        while let Some(node) = nodes.get(at) {
            if node.value != NONE {
                m.value = Some(node.value);
                m.prefix_len = depth;
            }
            let has_children = node.child != [NONE; 2];
            if depth >= width {
                m.scope = depth;
                break;
            }
            let next = node.child[bit(bits, depth)];
            if next == NONE {
                // Addresses sharing one more bit follow the same (missing) branch; if this node
                // has no children at all, sharing `depth` bits is already enough.
                m.scope = if has_children { depth + 1 } else { depth };
                break;
            }
            at = next as usize;
            depth += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_match_and_scope() {
        let mut t = PrefixTree::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 1, false);
        t.insert("10.1.0.0/16".parse().unwrap(), 2, false);
        t.insert("10.1.2.0/24".parse().unwrap(), 3, false);
        let m = t.lookup(ip("10.1.2.3"));
        assert_eq!((m.value, m.prefix_len, m.scope), (Some(3), 24, 24));
        let m = t.lookup(ip("10.1.3.3"));
        assert_eq!((m.value, m.prefix_len, m.scope), (Some(2), 16, 24));
        let m = t.lookup(ip("10.200.0.1"));
        assert_eq!((m.value, m.scope), (Some(1), 9));
        let m = t.lookup(ip("11.0.0.1"));
        assert_eq!((m.value, m.scope), (None, 8));
        assert_eq!(t.lookup(ip("2001:db8::1")).scope, 0);
    }

    #[test]
    fn shadowing_insert_beats_finer_entries() {
        let mut t = PrefixTree::default();
        t.insert("192.0.2.128/25".parse().unwrap(), 1, false);
        t.insert("192.0.2.0/24".parse().unwrap(), 2, true);
        let m = t.lookup(ip("192.0.2.200"));
        assert_eq!((m.value, m.prefix_len, m.scope), (Some(2), 24, 24));
        t.insert("0.0.0.0/0".parse().unwrap(), 9, false);
        assert_eq!(t.lookup(ip("8.8.8.8")).value, Some(9));
        let mut t = PrefixTree::default();
        t.insert("::/0".parse().unwrap(), 5, false);
        let m = t.lookup(ip("2001:db8::1"));
        assert_eq!((m.value, m.scope), (Some(5), 0));
    }
}

//! A per-worker cache of encoded answers, keyed by everything an answer depends on.
//!
//! Why: parsing each query into a hickory `Message` and encoding the reply record by record
//! costs more than the rest of a query's path together. Within one [`Zone`] (one snapshot, one
//! health verdict, one policy) an answer is a pure function of the question, the query's flags
//! and EDNS shape, and the *class* the client falls in (its ECS scope included), so the first
//! query of each kind goes through [`respond`](crate::respond::respond) and the bytes are kept; later ones copy them and
//! patch what is per-query: the ID, the question's letter case (0x20 randomisation) and the
//! echoed ECS address. Anything the wire parser here does not fully understand takes the normal
//! path, so the cache can only ever return what `respond` would have.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::metrics::Labels;
use crate::respond::{
    MAX_QUERY_LEN, Outcome, Transport, UDP_MAX_EDNS, UDP_MAX_PLAIN, respond_in_slot,
};
use crate::zone::Zone;

/// Entries per worker; when full the cache starts over (a flood of distinct names costs the
/// normal path, never memory).
pub const MAX_ENTRIES: usize = 4096;
/// Classifiers a key can hold (one class and scope each); zones with more names of distinct
/// `nets` than this take the normal path.
const MAX_KEYED_CLASSIFIERS: usize = 8;
/// Longest key without the rotation slot: a 255-byte name, the 16-byte tail, then class and
/// scope per classifier.
const MAX_KEY: usize = 255 + 16 + 9 * MAX_KEYED_CLASSIFIERS;

const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const OPT_ECS: u16 = 8;
const OPT_COOKIE: u16 = 10;
/// Header bits a query may carry that we key on: RD, AD, CD. Anything else (QR, opcode, AA,
/// TC, Z, rcode) sends the query down the normal path.
const FLAGS_KEYED: u16 = 0x0100 | 0x0020 | 0x0010;

/// What the cache did with one packet.
#[derive(Debug, Default)]
pub struct Answered {
    /// A reply was appended to the output buffer.
    pub replied: bool,
    pub malformed: bool,
    pub truncated: bool,
    pub labels: Option<Labels>,
}

/// One cached reply: bytes as `respond` produced them and where the per-query parts go. An
/// entry with `rotated` set holds no reply: that key's answers depend on the rotation slot, and
/// live under the key with the slot appended.
#[derive(Debug)]
struct Entry {
    rotated: bool,
    reply: Box<[u8]>,
    /// Offset of the echoed ECS address bytes at the end of `reply`, if any.
    ecs_addr_at: Option<usize>,
    truncated: bool,
    labels: Option<Labels>,
}

/// The parts of a query the cache needs, found without allocating.
#[derive(Debug)]
struct Question<'a> {
    id: [u8; 2],
    /// The question name as sent (wire format, original case).
    qname: &'a [u8],
    /// Flags (masked), type, class and EDNS shape; the name's lower-case form is prepended.
    key_tail: [u8; 16],
    /// ECS address bytes as sent and the client address they stand for.
    ecs: Option<(&'a [u8], IpAddr)>,
}

/// The answer cache of one UDP worker: no sharing, no locks.
#[derive(Debug, Default)]
pub struct AnswerCache {
    /// The zone the entries were built from; held so its address cannot be reused by a new one.
    zone: Option<Arc<Zone>>,
    /// foldhash, seeded per cache: SipHash was 1.3 % of a query's CPU, and the cache's size cap
    /// bounds what crafted colliding keys could cost.
    entries: HashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>,
    hits: u64,
    /// This worker's weighted-answer rotation (no shared counter on the hot path).
    rotation: usize,
}

impl AnswerCache {
    /// Answers `packet` from `src`, appending the reply (if any) to `out`.
    pub fn answer(
        &mut self,
        zone: &Arc<Zone>,
        packet: &[u8],
        src: IpAddr,
        out: &mut Vec<u8>,
    ) -> Answered {
        if !self.zone.as_ref().is_some_and(|z| Arc::ptr_eq(z, zone)) {
            self.entries.clear();
            self.zone = Some(zone.clone());
        }
        let slot = if zone.weighted {
            self.rotation = (self.rotation + 1) % crate::gslb::ROTATION;
            self.rotation
        } else {
            0
        };
        let Some(q) = parse(packet) else {
            return slow(zone, packet, src, slot, out).0;
        };
        let client = q.ecs.map_or(src, |(_, addr)| addr).to_canonical();
        let mut buf = [0u8; MAX_KEY + 1];
        let Some(len) = build_key(&mut buf, &q, zone, client) else {
            return slow(zone, packet, src, slot, out).0;
        };
        let mut key = buf.get(..len).unwrap_or_default();
        if self.entries.get(key).is_some_and(|e| e.rotated) {
            // Invariant: slots are below ROTATION (64); the buffer has a byte to spare.
            buf[len] = slot as u8;
            key = buf.get(..=len).unwrap_or_default();
        }
        if let Some(e) = self.entries.get(key) {
            self.hits += 1;
            let start = out.len();
            out.extend_from_slice(&e.reply);
            patch(&mut out[start..], &q, e.ecs_addr_at);
            return Answered {
                replied: true,
                malformed: false,
                truncated: e.truncated,
                labels: e.labels,
            };
        }
        let start = out.len();
        let (answered, rotated) = slow(zone, packet, src, slot, out);
        if answered.replied && !answered.malformed {
            let reply = &out[start..];
            if let Some(ecs_addr_at) = cacheable(reply, &q) {
                if self.entries.len() + 1 >= MAX_ENTRIES {
                    self.entries.clear();
                }
                if rotated && key.len() == len {
                    self.entries.insert(
                        key.into(),
                        Entry {
                            rotated: true,
                            reply: Box::default(),
                            ecs_addr_at: None,
                            truncated: false,
                            labels: None,
                        },
                    );
                    buf[len] = slot as u8;
                    key = buf.get(..=len).unwrap_or_default();
                }
                self.entries.insert(
                    key.into(),
                    Entry {
                        rotated: false,
                        reply: reply.into(),
                        ecs_addr_at,
                        truncated: answered.truncated,
                        labels: answered.labels,
                    },
                );
            }
        }
        answered
    }

    /// Queries answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }
}

/// The normal path; also says whether the answer depended on the rotation slot.
fn slow(
    zone: &Zone,
    packet: &[u8],
    src: IpAddr,
    slot: usize,
    out: &mut Vec<u8>,
) -> (Answered, bool) {
    let Outcome {
        reply,
        malformed,
        truncated,
        labels,
        rotated,
    } = respond_in_slot(zone, packet, src, Transport::Udp, Some(slot));
    let replied = reply.as_ref().is_some_and(|r| {
        out.extend_from_slice(r);
        true
    });
    let answered = Answered {
        replied,
        malformed,
        truncated,
        labels,
    };
    (answered, rotated)
}

/// Copies the per-query parts into a cached reply: the ID, the question's case, the ECS address.
fn patch(reply: &mut [u8], q: &Question<'_>, ecs_addr_at: Option<usize>) {
    if let Some(id) = reply.get_mut(..2) {
        id.copy_from_slice(&q.id);
    }
    if let Some(name) = reply.get_mut(12..12 + q.qname.len()) {
        name.copy_from_slice(q.qname);
    }
    if let (Some(at), Some((addr, _))) = (ecs_addr_at, q.ecs)
        && let Some(dst) = reply.get_mut(at..at + addr.len())
    {
        dst.copy_from_slice(addr);
    }
}

/// Whether `reply` (just built by `respond` for `q`) can serve later queries with the same
/// key, and where its ECS address is. The question must sit at offset 12 as sent, and an ECS
/// echo must be the message's last bytes carrying the query's address; otherwise not cached.
fn cacheable(reply: &[u8], q: &Question<'_>) -> Option<Option<usize>> {
    if reply.get(4..6) != Some(&[0, 1]) || reply.get(12..12 + q.qname.len()) != Some(q.qname) {
        return None;
    }
    let Some((addr, _)) = q.ecs else {
        return Some(None);
    };
    let at = reply.len().checked_sub(addr.len())?;
    // OPTION-CODE, OPTION-LENGTH, FAMILY, SOURCE, SCOPE precede the address.
    let head = reply.get(at.checked_sub(8)?..at)?;
    let len = u16::try_from(addr.len() + 4).ok()?;
    let ok = head[..2] == OPT_ECS.to_be_bytes()
        && head[2..4] == len.to_be_bytes()
        && reply.get(at..) == Some(addr);
    ok.then_some(Some(at))
}

/// Writes the cache key and returns its length: lower-case name, then `key_tail`, then the
/// client's class and ECS scope under each of the zone's classifiers (a name's answer, or a
/// CNAME chain's, depends on one of them). Rotated answers append the slot.
fn build_key(
    buf: &mut [u8; MAX_KEY + 1],
    q: &Question<'_>,
    zone: &Zone,
    client: IpAddr,
) -> Option<usize> {
    if zone.classifiers.len() > MAX_KEYED_CLASSIFIERS {
        return None;
    }
    let n = q.qname.len();
    let name = buf.get_mut(..n)?;
    name.copy_from_slice(q.qname);
    name.make_ascii_lowercase();
    let mut at = n;
    let tail = &q.key_tail[..];
    buf.get_mut(at..at + tail.len())?.copy_from_slice(tail);
    at += tail.len();
    for c in &zone.classifiers {
        let (class, scope) = c.client_class(client);
        for part in [&class.to_be_bytes()[..], &[scope]] {
            buf.get_mut(at..at + part.len())?.copy_from_slice(part);
            at += part.len();
        }
    }
    (at <= MAX_KEY).then_some(at)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses a plain query: one question, no answer/authority, at most an OPT record whose
/// options are ECS and COOKIE only, nothing after. `None` for anything else.
fn parse(p: &[u8]) -> Option<Question<'_>> {
    if p.len() > MAX_QUERY_LEN {
        return None;
    }
    let flags = u16_at(p, 2)?;
    if flags & !FLAGS_KEYED != 0 || u16_at(p, 4)? != 1 || u16_at(p, 6)? != 0 || u16_at(p, 8)? != 0 {
        return None;
    }
    let arcount = u16_at(p, 10)?;
    // The name: uncompressed labels, at most 255 bytes with the root.
    let mut at = 12;
    loop {
        let len = usize::from(*p.get(at)?);
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let qname = p.get(12..at)?;
    if qname.len() > 255 {
        return None;
    }
    let qtype = u16_at(p, at)?;
    if u16_at(p, at + 2)? != CLASS_IN || qtype == TYPE_OPT {
        return None;
    }
    at += 4;
    let mut key_tail = [0u8; 16];
    key_tail[..2].copy_from_slice(&(flags & FLAGS_KEYED).to_be_bytes());
    key_tail[2..4].copy_from_slice(&qtype.to_be_bytes());
    let mut ecs = None;
    match arcount {
        0 => {
            key_tail[4..6].copy_from_slice(&(UDP_MAX_PLAIN as u16).to_be_bytes());
        }
        1 => {
            // OPT: root owner, type, class = payload size, TTL = ext-rcode/version/flags, rdata.
            if *p.get(at)? != 0 || u16_at(p, at + 1)? != TYPE_OPT {
                return None;
            }
            let payload = u16_at(p, at + 3)?.clamp(UDP_MAX_PLAIN as u16, UDP_MAX_EDNS);
            let ttl = p.get(at + 5..at + 9)?;
            let rdlen = usize::from(u16_at(p, at + 9)?);
            at += 11;
            let rdata = p.get(at..at + rdlen)?;
            if at + rdlen != p.len() {
                return None;
            }
            key_tail[4..6].copy_from_slice(&payload.to_be_bytes());
            key_tail[6] = 1;
            key_tail[7..11].copy_from_slice(ttl);
            let mut o = 0;
            while o < rdata.len() {
                let code = u16_at(rdata, o)?;
                let olen = usize::from(u16_at(rdata, o + 2)?);
                let data = rdata.get(o + 4..o + 4 + olen)?;
                match code {
                    OPT_ECS if key_tail[14] == 0 => {
                        let (family, source, addr) = parse_ecs(data)?;
                        key_tail[11..13].copy_from_slice(&family.to_be_bytes());
                        key_tail[13] = source;
                        key_tail[14] = 1;
                        ecs = addr;
                    }
                    // A cookie never changes our answer (we send none back), only its presence is keyed.
                    OPT_COOKIE if key_tail[15] == 0 => key_tail[15] = 1,
                    _ => return None,
                }
                o += 4 + olen;
            }
        }
        _ => return None,
    }
    if arcount == 0 && at != p.len() {
        return None;
    }
    Some(Question {
        id: [p[0], p[1]],
        qname,
        key_tail,
        ecs,
    })
}

/// An ECS option's family, source prefix length and address (bytes as sent, and the client
/// address they stand for). Only the canonical form is accepted: exactly the prefix's bytes
/// and no bits set past it. A SOURCE of 0 means "use the resolver's address".
type Ecs<'a> = (u16, u8, Option<(&'a [u8], IpAddr)>);

fn parse_ecs(data: &[u8]) -> Option<Ecs<'_>> {
    let family = u16_at(data, 0)?;
    let source = *data.get(2)?;
    let scope = *data.get(3)?;
    let addr = data.get(4..)?;
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return None,
    };
    if source > max || scope != 0 || addr.len() != usize::from(source).div_ceil(8) {
        return None;
    }
    if source % 8 != 0 {
        let last = *addr.last()?;
        if last & (0xff >> (source % 8)) != 0 {
            return None;
        }
    }
    if source == 0 {
        return Some((family, 0, None));
    }
    let ip = if family == 1 {
        let mut b = [0u8; 4];
        b.get_mut(..addr.len())?.copy_from_slice(addr);
        IpAddr::V4(Ipv4Addr::from(b))
    } else {
        let mut b = [0u8; 16];
        b.get_mut(..addr.len())?.copy_from_slice(addr);
        IpAddr::V6(Ipv6Addr::from(b))
    };
    Some((family, source, Some((addr, ip))))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use crate::respond::respond;
    use coordinator_api::{Region, Snapshot};
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;
    use crate::config::Config;
    use crate::zone::ZoneConfig;

    fn zone() -> Arc<Zone> {
        zone_with(Config::with_defaults(), &[])
    }

    /// The dev-like zone from `c` (nets and default region set here), with `extra` edges
    /// (id, region, ip), built the way the server builds it.
    fn zone_with(mut c: Config, extra: &[(&str, &str, &str)]) -> Arc<Zone> {
        c.nets = [
            "192.0.2.0/24=ams",
            "198.51.100.0/24=iad",
            "2001:db8::/32=sin",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        c.default_region = Some("ams".into());
        let cfg = Arc::new(ZoneConfig::from_config(&c).unwrap());
        let edge =
            |id: &str, region: &str, ip: &str| crate::gslb::tests::edge(id, region, &[ip], true);
        let region = |name: &str| Region {
            name: name.into(),
            latitude: None,
            longitude: None,
            admin_state: Default::default(),
        };
        let snap = Snapshot {
            revision: 7,
            regions: vec![region("ams"), region("iad"), region("sin")],
            edges: [
                ("ams-1", "ams", "127.0.0.11"),
                ("iad-1", "iad", "127.0.0.12"),
                ("sin-1", "sin", "2001:db8::13"),
            ]
            .iter()
            .chain(extra)
            .map(|(id, region, ip)| edge(id, region, ip))
            .collect(),
            ..Snapshot::default()
        };
        let mut health = crate::health::HealthTracker::default();
        health.observe(&snap, std::time::Instant::now());
        let policies = cfg.policies.clone();
        Arc::new(Zone::build(cfg, &policies, &snap, &health))
    }

    fn query(id: u16, name: &str, qtype: RecordType, edns: Option<(u16, Option<&str>)>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = id.is_multiple_of(2);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some((payload, ecs)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            if let Some(ecs) = ecs {
                e.options_mut()
                    .insert(EdnsOption::Subnet(ClientSubnet::from_str(ecs).unwrap()));
            }
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// What the normal path answers.
    fn reference(zone: &Zone, packet: &[u8], src: IpAddr) -> Option<Vec<u8>> {
        respond(zone, packet, src, Transport::Udp).reply
    }

    fn cached(
        cache: &mut AnswerCache,
        zone: &Arc<Zone>,
        packet: &[u8],
        src: IpAddr,
    ) -> Option<Vec<u8>> {
        let mut out = vec![0xAA; 3]; // replies are appended after whatever is there
        let a = cache.answer(zone, packet, src, &mut out);
        assert_eq!(a.replied, out.len() > 3);
        a.replied.then(|| out.split_off(3))
    }

    /// Same answer as the normal path: byte for byte when the name's case matches the query
    /// that filled the entry, and the same message (with the question's case kept) otherwise.
    fn assert_same(got: &[u8], want: &[u8]) {
        if got == want {
            return;
        }
        let (g, w) = (
            Message::from_vec(got).unwrap(),
            Message::from_vec(want).unwrap(),
        );
        assert_eq!(g.metadata, w.metadata);
        assert_eq!(g.queries.len(), 1);
        assert_eq!(
            g.queries[0].name().to_string(),
            w.queries[0].name().to_string()
        );
        assert_eq!(g.answers, w.answers);
        assert_eq!(g.authorities, w.authorities);
        assert_eq!(g.additionals, w.additionals);
        assert_eq!(g.edns, w.edns);
    }

    #[test]
    fn cached_answers_equal_the_normal_path_for_every_kind_of_query() {
        let zone = zone();
        let mut cache = AnswerCache::default();
        let names = [
            "edge.meridian.test.",
            "EdGe.MeRiDiAn.TeSt.",
            "meridian.test.",
            "ns1.meridian.test.",
            "nope.meridian.test.",
            "example.org.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SOA,
            RecordType::NS,
            RecordType::TXT,
            RecordType::ANY,
        ];
        let edns = [
            None,
            Some((1232, None)),
            Some((4096, None)),
            Some((512, Some("198.51.100.7/24"))),
            Some((1232, Some("198.51.100.0/24"))),
            Some((1232, Some("198.51.101.0/24"))),
            Some((1232, Some("192.0.2.0/25"))),
            Some((1232, Some("203.0.113.0/24"))),
            Some((1232, Some("10.0.0.0/0"))),
            Some((1232, Some("2001:db8:1::/48"))),
            Some((1232, Some("2001:db9::/56"))),
        ];
        let srcs: [IpAddr; 3] = [
            "127.0.0.1".parse().unwrap(),
            "198.51.100.9".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ];
        let mut asked = 0;
        for round in 0..2u16 {
            for (i, name) in names.iter().enumerate() {
                for qtype in types {
                    for e in edns {
                        for src in srcs {
                            let id = round * 1000 + u16::try_from(i).unwrap() + 17;
                            let q = query(id, name, qtype, e);
                            let want = reference(&zone, &q, src);
                            let got = cached(&mut cache, &zone, &q, src);
                            match (&got, &want) {
                                (Some(g), Some(w)) => assert_same(g, w),
                                _ => assert_eq!(got, want, "{name} {qtype} {e:?} {src}"),
                            }
                            asked += 1;
                        }
                    }
                }
            }
        }
        // The second round (and most of the first) came from the cache.
        assert!(cache.hits() > asked / 2, "{} hits of {asked}", cache.hits());
    }

    #[test]
    fn per_name_policies_and_weighted_rotation_cache_like_the_normal_path() {
        let dir = std::env::temp_dir().join(format!("geodns-fastpath-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        // `api` has its own nets (its own classifier); `www` rotates one weighted address.
        std::fs::write(
            &file,
            r#"
            [name.api]
            nets = ["192.0.2.0/25=iad", "198.51.100.0/24=sin"]
            default_region = "sin"
            [name.www]
            weights = { "iad-1" = 3, "iad-2" = 1 }
            "#,
        )
        .unwrap();
        let mut c = Config::with_defaults();
        c.policy_file = Some(file);
        let zone = zone_with(c, &[("iad-2", "iad", "127.0.0.22")]);
        assert_eq!(zone.classifiers.len(), 2);
        assert!(zone.weighted);
        let mut cache = AnswerCache::default();
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        let ask = |cache: &mut AnswerCache, name: &str, qtype, ecs, id| {
            let q = query(id, name, qtype, Some((1232, ecs)));
            let slot = (cache.rotation + 1) % crate::gslb::ROTATION;
            let want = respond_in_slot(&zone, &q, src, Transport::Udp, Some(slot));
            let got = cached(cache, &zone, &q, src);
            match (&got, &want.reply) {
                (Some(g), Some(w)) => assert_same(g, w),
                _ => assert_eq!(got, want.reply, "{name} {qtype} {ecs:?}"),
            }
            got.map(|g| Message::from_vec(&g).unwrap())
        };
        for _ in 0..3 {
            for name in [
                "edge.meridian.test.",
                "API.meridian.test.",
                "www.meridian.test.",
            ] {
                for ecs in [
                    None,
                    Some("192.0.2.0/24"),
                    Some("192.0.2.0/26"),
                    Some("198.51.100.0/24"),
                ] {
                    for qtype in [RecordType::A, RecordType::AAAA] {
                        ask(&mut cache, name, qtype, ecs, 7);
                    }
                }
            }
        }
        // Unweighted names hit the cache even though the zone rotates.
        assert!(cache.hits() >= 40, "{} hits", cache.hits());
        // A full rotation of weighted answers: exactly 3:1, cached per slot.
        let mut first = std::collections::BTreeMap::<String, usize>::new();
        for round in 0..2 {
            for i in 0..crate::gslb::ROTATION {
                let m = ask(
                    &mut cache,
                    "www.meridian.test.",
                    RecordType::A,
                    Some("198.51.100.0/24"),
                    9,
                )
                .unwrap();
                assert_eq!(m.answers.len(), 1);
                if round == 1 {
                    *first.entry(m.answers[0].data.to_string()).or_default() += 1;
                }
                let _ = i;
            }
        }
        assert_eq!(
            first,
            std::collections::BTreeMap::from([
                ("127.0.0.12".into(), 48),
                ("127.0.0.22".into(), 16)
            ])
        );
    }

    #[test]
    fn ecs_echo_carries_each_clients_own_address_and_scope() {
        let zone = zone();
        let mut cache = AnswerCache::default();
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        for ecs in [
            "198.51.100.0/24",
            "198.51.100.0/24",
            "198.51.100.128/25",
            "192.0.2.0/24",
        ] {
            let q = query(
                1,
                "edge.meridian.test.",
                RecordType::A,
                Some((1232, Some(ecs))),
            );
            let got = Message::from_vec(&cached(&mut cache, &zone, &q, src).unwrap()).unwrap();
            let Some(EdnsOption::Subnet(cs)) = got
                .edns
                .as_ref()
                .unwrap()
                .option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)
            else {
                panic!("no ECS echoed for {ecs}");
            };
            let want = ClientSubnet::from_str(ecs).unwrap();
            assert_eq!(
                (cs.addr(), cs.source_prefix()),
                (want.addr(), want.source_prefix())
            );
            // Both regions' rules are /24s: the scope is the rule's prefix, not the client's.
            assert_eq!(cs.scope_prefix(), 24);
        }
        assert!(cache.hits() >= 1);
    }

    #[test]
    fn a_new_zone_starts_a_new_cache() {
        let (z1, z2) = (zone(), zone());
        let mut cache = AnswerCache::default();
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        let q = query(5, "edge.meridian.test.", RecordType::A, None);
        cached(&mut cache, &z1, &q, src);
        cached(&mut cache, &z1, &q, src);
        assert_eq!(cache.hits(), 1);
        cached(&mut cache, &z2, &q, src);
        assert_eq!(cache.hits(), 1, "an answer from the old zone was reused");
    }

    #[test]
    fn odd_packets_take_the_normal_path_and_are_never_cached() {
        let zone = zone();
        let mut cache = AnswerCache::default();
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        let good = query(
            9,
            "edge.meridian.test.",
            RecordType::A,
            Some((1232, Some("198.51.100.0/24"))),
        );
        let mut odd = Vec::new();
        // Truncations of a good query, a response, trailing garbage, a compression pointer,
        // a non-canonical ECS (bits past the prefix), and an unknown EDNS option.
        for n in 0..good.len() {
            odd.push(good[..n].to_vec());
        }
        let mut response = good.clone();
        response[2] |= 0x80;
        odd.push(response);
        let mut trailing = query(9, "edge.meridian.test.", RecordType::A, None);
        trailing.push(0);
        odd.push(trailing);
        let mut pointer = query(9, "edge.meridian.test.", RecordType::A, None);
        pointer.splice(12..13, [0xC0, 0x0C]);
        odd.push(pointer);
        let mut sloppy = query(
            9,
            "edge.meridian.test.",
            RecordType::A,
            Some((1232, Some("192.0.2.0/25"))),
        );
        let last = sloppy.len() - 1;
        sloppy[last] |= 0x01; // 192.0.2.1/25: bits set past the prefix
        odd.push(sloppy);
        let mut unknown = good.clone();
        let opt_code = unknown.len() - 4 - 7;
        unknown[opt_code + 1] = 0x0F;
        odd.push(unknown);
        for (i, p) in odd.iter().enumerate() {
            for _ in 0..2 {
                let got = cached(&mut cache, &zone, p, src);
                assert_eq!(got, reference(&zone, p, src));
            }
            assert_eq!(
                cache.hits(),
                0,
                "odd packet {i} of {} was cached: {p:02x?}",
                odd.len()
            );
        }
        assert_eq!(cache.hits(), 0);
        assert!(cache.entries.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let zone = zone();
        let mut cache = AnswerCache::default();
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        for i in 0..MAX_ENTRIES + 10 {
            let q = query(1, &format!("n{i}.meridian.test."), RecordType::A, None);
            cached(&mut cache, &zone, &q, src);
            assert!(cache.entries.len() <= MAX_ENTRIES);
        }
    }
}

//! One DNS query in, at most one DNS response out: the whole protocol, sans-IO.
//!
//! The drivers in `server` only move bytes; everything a client can influence is decided here,
//! so it is unit-tested with plain byte slices.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use ipnet::IpNet;

use crate::metrics::{
    Labels, NAME_APEX, NAME_NS, NAME_OTHER, NAME_OUTSIDE, qtype_index, rcode_index,
};
use crate::zone::Zone;

/// Largest query we read, on either transport. Real queries are far smaller; anything bigger
/// is not a question we can answer.
pub const MAX_QUERY_LEN: usize = 1232;
/// UDP response limit for clients without EDNS (RFC 1035).
pub const UDP_MAX_PLAIN: usize = 512;
/// UDP response limit we advertise and honour with EDNS (DNS flag day 2020: no fragmentation).
pub const UDP_MAX_EDNS: u16 = 1232;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The result of handling one packet.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes to send back, if any.
    pub reply: Option<Vec<u8>>,
    /// The packet was not a well-formed DNS query (counted by the drivers).
    pub malformed: bool,
    /// The reply did not fit and was sent with TC set.
    pub truncated: bool,
    /// What to count the query under, when it was parsed and answered.
    pub labels: Option<Labels>,
    /// The answer came from a weighted rotation: it depends on the slot, not only the client.
    pub rotated: bool,
}

impl Outcome {
    fn dropped() -> Self {
        Self {
            reply: None,
            malformed: true,
            truncated: false,
            labels: None,
            rotated: false,
        }
    }
}

/// Answers `packet`, received from `src` over `transport`, from `zone`. Never panics on input.
pub fn respond(zone: &Zone, packet: &[u8], src: IpAddr, transport: Transport) -> Outcome {
    respond_in_slot(zone, packet, src, transport, None)
}

/// [`respond`] with weighted answers taken from rotation slot `slot` (the answer cache picks
/// the slot it keys on); `None` takes the zone's next one.
pub fn respond_in_slot(
    zone: &Zone,
    packet: &[u8],
    src: IpAddr,
    transport: Transport,
    slot: Option<usize>,
) -> Outcome {
    if packet.len() > MAX_QUERY_LEN {
        return Outcome::dropped();
    }
    let Ok(header) = Header::read(&mut BinDecoder::new(packet)) else {
        return Outcome::dropped();
    };
    if header.message_type != MessageType::Query {
        // Never answer responses: that is how reflection loops start.
        return Outcome::dropped();
    }
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            let mut msg = Message::error_msg(header.id, header.op_code, ResponseCode::FormErr);
            msg.metadata.recursion_desired = header.recursion_desired;
            return Outcome {
                reply: encode_plain(&msg),
                malformed: true,
                truncated: false,
                labels: None,
                rotated: false,
            };
        }
    };
    if transport == Transport::Udp && request.edns.is_none() && packet.len() > UDP_MAX_PLAIN {
        // A plain-DNS UDP query cannot exceed 512 bytes.
        let r = error_response(&request, ResponseCode::FormErr);
        return Outcome {
            reply: encode_plain(&r),
            malformed: true,
            truncated: false,
            labels: None,
            rotated: false,
        };
    }
    let max_len = match (transport, &request.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => UDP_MAX_PLAIN,
        (Transport::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, UDP_MAX_EDNS)),
    };
    let mut malformed = false;
    let geo_names = zone.config.geo_names.len();
    let mut labels = Labels {
        name: geo_names + NAME_OUTSIDE,
        qtype: request
            .queries
            .first()
            .map_or(qtype_index(RecordType::Unknown(0)), |q| {
                qtype_index(q.query_type())
            }),
        rcode: 0,
        region: None,
    };
    let slot = slot.unwrap_or_else(|| zone.next_slot());
    let mut rotated = false;
    let response = match build_response(zone, &request, src, slot, &mut labels, &mut rotated) {
        Ok(r) => r,
        Err(rcode) => {
            malformed = rcode == ResponseCode::FormErr;
            error_response(&request, rcode)
        }
    };
    labels.rcode = rcode_index(response.response_code);
    let (reply, truncated) = encode_limited(&response, max_len);
    Outcome {
        reply,
        malformed,
        truncated,
        labels: Some(labels),
        rotated,
    }
}

/// A reply with only the header and question and TC set, so the client retries over TCP: what
/// rate limiting "slips" instead of a full answer. `None` for anything that is not a query.
pub fn truncated_reply(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() > MAX_QUERY_LEN {
        return None;
    }
    let request = Message::from_vec(packet).ok()?;
    if request.message_type != MessageType::Query {
        return None;
    }
    let mut r = response_for(&request);
    r.metadata.truncation = true;
    if request.edns.is_some() {
        r.set_edns(response_edns(None));
    }
    encode_plain(&r)
}

/// The response skeleton: same id, opcode, RD and CD; RA never set (we never recurse).
fn response_for(request: &Message) -> Message {
    let mut r = Message::new(request.id, MessageType::Response, request.op_code);
    r.metadata.recursion_desired = request.recursion_desired;
    r.metadata.checking_disabled = request.checking_disabled;
    r.add_queries(request.queries.iter().cloned());
    r
}

fn error_response(request: &Message, rcode: ResponseCode) -> Message {
    let mut r = response_for(request);
    r.metadata.response_code = rcode;
    if request.edns.is_some() {
        r.set_edns(response_edns(None));
    }
    r
}

fn response_edns(ecs: Option<ClientSubnet>) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(UDP_MAX_EDNS);
    e.set_version(0);
    if let Some(cs) = ecs {
        e.options_mut().insert(EdnsOption::Subnet(cs));
    }
    e
}

/// Where the client is, and the ECS option to echo (with scope still to be filled in).
struct Client {
    addr: IpAddr,
    ecs: Option<ClientSubnet>,
}

fn client_of(request: &Message, src: IpAddr) -> Client {
    let ecs = request
        .edns
        .as_ref()
        .and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(cs)) => Some(*cs),
            _ => None,
        });
    let addr = match ecs {
        // SOURCE PREFIX-LENGTH 0 means "do not use client information": use the resolver's.
        Some(cs) if cs.source_prefix() > 0 => IpNet::new(cs.addr(), cs.source_prefix())
            .map(|n| n.trunc().addr())
            .unwrap_or(src),
        _ => src,
    };
    Client {
        addr: addr.to_canonical(),
        ecs,
    }
}

fn build_response(
    zone: &Zone,
    request: &Message,
    src: IpAddr,
    slot: usize,
    labels: &mut Labels,
    rotated: &mut bool,
) -> Result<Message, ResponseCode> {
    if request.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    let [query] = request.queries.as_slice() else {
        return Err(ResponseCode::FormErr);
    };
    if let Some(e) = &request.edns
        && e.version() > 0
    {
        return Err(ResponseCode::BADVERS);
    }
    let qname = query.name();
    let cfg = &zone.config;
    if query.query_class() != DNSClass::IN {
        return Err(ResponseCode::Refused);
    }
    let lname = qname.to_lowercase();
    let Some(mut in_zone) = zone.zone_of(&lname) else {
        return Err(ResponseCode::Refused);
    };
    let geo_names = cfg.geo_names.len();
    labels.name = if lname == cfg.origin {
        geo_names + NAME_APEX
    } else if lname == cfg.ns_name {
        geo_names + NAME_NS
    } else {
        cfg.geo_names
            .iter()
            .position(|n| *n == lname)
            .unwrap_or(geo_names + NAME_OTHER)
    };
    if zone.table.is_none() {
        return Err(ResponseCode::ServFail);
    }

    let client = client_of(request, src);
    let mut scope = 0u8;
    let mut r = response_for(request);
    r.metadata.authoritative = true;
    let qtype = query.query_type();

    // Follow CNAMEs through the zones we serve (RFC 1034 §4.3.2): a customer name CNAME'd
    // into the edge zone gets the chain plus the geo answer of its end. A target outside our
    // zones ends the chain; the resolver follows it.
    let mut owner = qname.clone();
    let mut lowner = lname;
    for hop in 0..=MAX_CNAME_CHAIN {
        match lookup(
            zone,
            in_zone,
            &owner,
            &lowner,
            qtype,
            (client.addr, slot),
            &mut r,
        ) {
            Step::Done { region, geo_scope } => {
                if let Some(region) = region {
                    labels.region = Some(region);
                    *rotated = cfg
                        .geo_names
                        .iter()
                        .position(|n| *n == lowner)
                        .and_then(|i| zone.geo_table(i)?.regions().get(region))
                        .is_some_and(crate::gslb::RegionAnswer::rotates);
                }
                scope = scope.max(geo_scope);
                break;
            }
            Step::Chase(target) => {
                let Some(z) = zone.zone_of(&target) else {
                    break;
                };
                if hop == MAX_CNAME_CHAIN {
                    // A loop or an absurd chain: what we have so far, like BIND.
                    break;
                }
                in_zone = z;
                owner = target.clone();
                lowner = target;
            }
        }
    }

    if request.edns.is_some() {
        let echo = client.ecs.map(|cs| {
            ClientSubnet::new(
                cs.addr(),
                cs.source_prefix(),
                if cs.source_prefix() == 0 { 0 } else { scope },
            )
        });
        r.set_edns(response_edns(echo));
    }
    Ok(r)
}

/// Longest CNAME chain we follow inside our zones.
const MAX_CNAME_CHAIN: usize = 8;

/// What looking up one name did.
enum Step {
    /// The answer (or negative answer) for this name is in the message.
    Done {
        /// Region a geo answer steered to (metrics).
        region: Option<usize>,
        /// ECS scope of a geo answer (0 when the answer does not depend on the client).
        geo_scope: u8,
    },
    /// This name is a CNAME to that (lower-case) name; its record is in the message.
    Chase(Name),
}

/// Answers `qtype` at `owner` (as asked; `lowner` lower-case) from zone `z`, adding records to
/// `r`: data, a CNAME to chase, NODATA or NXDOMAIN (rcode set, SOA in authority).
fn lookup(
    zone: &Zone,
    z: crate::zone::ZoneRef<'_>,
    owner: &Name,
    lowner: &Name,
    qtype: RecordType,
    client: (IpAddr, usize),
    r: &mut Message,
) -> Step {
    let cfg = &zone.config;
    let done = Step::Done {
        region: None,
        geo_scope: 0,
    };
    let nodata = |r: &mut Message| {
        r.add_authority(z.soa.clone());
        Step::Done {
            region: None,
            geo_scope: 0,
        }
    };
    let named = |rec: &Record| {
        let mut rec = rec.clone();
        rec.name = owner.clone();
        rec
    };
    let records = zone.data.names.get(lowner);
    // Records (TXT, MX, CAA, ...) at this name for `qtype`, if any.
    let add_set = |r: &mut Message, t: RecordType| -> bool {
        let Some(set) = records.and_then(|d| d.set(t)) else {
            return false;
        };
        for rec in set {
            r.add_answer(named(rec));
        }
        true
    };

    if lowner == z.apex {
        match qtype {
            RecordType::SOA => {
                r.add_answer(named(z.soa));
            }
            RecordType::NS => {
                r.add_answer(named(z.ns));
                r.add_additional(zone.glue.clone());
            }
            // RFC 8482: one RRset is a complete answer to ANY; no amplification.
            RecordType::ANY => {
                r.add_answer(named(z.soa));
            }
            t => {
                if !add_set(r, t) {
                    return nodata(r);
                }
            }
        }
        return done;
    }
    if z.own && *lowner == cfg.ns_name {
        if qtype == zone.glue.record_type() || qtype == RecordType::ANY {
            r.add_answer(named(&zone.glue));
            return done;
        }
        return nodata(r);
    }
    if z.own
        && let Some(i) = cfg.geo_names.iter().position(|n| n == lowner)
    {
        if matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY) {
            let mut scope = 0;
            let region = zone
                .geo_table(i)
                .and_then(|t| add_geo_answers(r, t, owner, qtype, client, &mut scope));
            if r.answers.is_empty() || !r.answers.iter().any(|a| a.name == *owner) {
                r.add_authority(z.soa.clone());
            }
            return Step::Done {
                region,
                geo_scope: scope,
            };
        }
        if !add_set(r, qtype) {
            return nodata(r);
        }
        return done;
    }
    if let Some(d) = records {
        if let Some(cname) = &d.cname {
            r.add_answer(named(cname));
            if qtype == RecordType::CNAME || qtype == RecordType::ANY {
                return done;
            }
            return match &cname.data {
                RData::CNAME(target) => Step::Chase(target.0.to_lowercase()),
                _ => done,
            };
        }
        let found = if qtype == RecordType::ANY {
            d.sets.first().is_some_and(|(t, _)| add_set(r, *t))
        } else {
            add_set(r, qtype)
        };
        if !found {
            return nodata(r);
        }
        return done;
    }
    let exists_below = zone.data.ents.contains(lowner)
        || (z.own
            && cfg
                .geo_names
                .iter()
                .chain([&cfg.ns_name])
                .any(|n| lowner.zone_of(n)));
    if exists_below {
        // An empty non-terminal (e.g. `b` of `a.b.<zone>`): exists, holds no data.
        return nodata(r);
    }
    r.metadata.response_code = ResponseCode::NXDomain;
    r.add_authority(z.soa.clone());
    done
}

fn add_geo_answers(
    r: &mut Message,
    table: &crate::gslb::AnswerTable,
    owner: &Name,
    qtype: RecordType,
    (client, slot): (IpAddr, usize),
    scope: &mut u8,
) -> Option<usize> {
    let answer = table.answer_in_slot(client, slot)?;
    *scope = answer.scope;
    // RFC 8482: ANY gets one RRset (A, or AAAA for an IPv6-only region).
    let wants_v4 = qtype == RecordType::A || (qtype == RecordType::ANY && !answer.v4().is_empty());
    let wants_v6 =
        qtype == RecordType::AAAA || (qtype == RecordType::ANY && answer.v4().is_empty());
    let ttl = answer.ttl;
    if wants_v4 {
        for ip in answer.v4() {
            r.add_answer(Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip))));
        }
    }
    if wants_v6 {
        for ip in answer.v6() {
            r.add_answer(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::AAAA(AAAA(*ip)),
            ));
        }
    }
    Some(answer.region.index)
}

/// Encodes `msg`; if it exceeds `max_len`, sends the header and question with TC set instead,
/// so the client retries over TCP.
fn encode_limited(msg: &Message, max_len: usize) -> (Option<Vec<u8>>, bool) {
    match msg.to_vec() {
        Ok(bytes) if bytes.len() <= max_len => (Some(bytes), false),
        Ok(_) => (encode_plain(&msg.truncate()), true),
        Err(_) => {
            let mut fail = Message::error_msg(msg.id, msg.op_code, ResponseCode::ServFail);
            fail.add_queries(msg.queries.iter().cloned());
            (encode_plain(&fail), false)
        }
    }
}

fn encode_plain(msg: &Message) -> Option<Vec<u8>> {
    msg.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;
    use std::sync::Arc;

    use coordinator_api::{EdgeInfo, EdgeStatus, Region, Snapshot};
    use hickory_proto::op::Query;

    use super::*;
    use crate::config::Config;
    use crate::gslb::AnswerTable;
    use crate::zone::ZoneConfig;

    pub(crate) fn dev_config() -> Config {
        let mut c = Config::with_defaults();
        c.nets = [
            "192.0.2.0/24=ams",
            "198.51.100.0/24=iad",
            "203.0.113.0/24=sin",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        c.default_region = Some("ams".into());
        c
    }

    fn dev_snapshot() -> Snapshot {
        let region = |name: &str, lat, lon| Region {
            name: name.into(),
            latitude: Some(lat),
            longitude: Some(lon),
            admin_state: Default::default(),
        };
        let edge = |region: &str, ip: &str| EdgeStatus {
            info: EdgeInfo {
                id: format!("{region}-1"),
                region: region.into(),
                public_ips: vec![ip.parse().unwrap()],
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive: true,
            last_seen_ms: 0,
            agents: Vec::new(),
        };
        Snapshot {
            revision: 42,
            regions: vec![
                region("ams", 52.37, 4.90),
                region("iad", 38.95, -77.45),
                region("sin", 1.35, 103.99),
            ],
            edges: vec![
                edge("ams", "127.0.0.11"),
                edge("iad", "127.0.0.12"),
                edge("sin", "127.0.0.13"),
            ],
            ..Snapshot::default()
        }
    }

    fn zone_with(snapshot: Option<&Snapshot>) -> Zone {
        let cfg = Arc::new(ZoneConfig::from_config(&dev_config()).unwrap());
        let table = snapshot.map(|s| AnswerTable::build(cfg.policy().clone(), s));
        Zone::new(cfg, table)
    }

    fn query(name: &str, qtype: RecordType, ecs: Option<&str>) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(ecs) = ecs {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            e.options_mut()
                .insert(EdnsOption::Subnet(ClientSubnet::from_str(ecs).unwrap()));
            m.set_edns(e);
        }
        m
    }

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn ask(zone: &Zone, q: &Message) -> Message {
        let out = respond(zone, &q.to_vec().unwrap(), SRC, Transport::Udp);
        Message::from_vec(&out.reply.expect("a reply")).unwrap()
    }

    fn a_records(m: &Message) -> Vec<IpAddr> {
        m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
    }

    fn ecs_of(m: &Message) -> Option<ClientSubnet> {
        match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
            EdnsOption::Subnet(cs) => Some(*cs),
            _ => None,
        }
    }

    #[test]
    fn geo_answer_uses_ecs_and_echoes_scope() {
        let zone = zone_with(Some(&dev_snapshot()));
        let q = query(
            "edge.meridian.test.",
            RecordType::A,
            Some("198.51.100.7/24"),
        );
        let r = ask(&zone, &q);
        assert_eq!(r.id, q.id);
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert!(r.authoritative);
        assert!(!r.recursion_available);
        assert!(r.recursion_desired, "RD is copied, not acted on");
        assert_eq!(a_records(&r), vec![IpAddr::from([127, 0, 0, 12])]);
        assert_eq!(r.answers[0].ttl, 30);
        let cs = ecs_of(&r).expect("ECS echoed");
        assert_eq!((cs.source_prefix(), cs.scope_prefix()), (24, 24));
        assert_eq!(cs.addr(), IpAddr::from([198, 51, 100, 0]));
    }

    #[test]
    fn source_address_without_ecs_and_case_preserved() {
        let zone = zone_with(Some(&dev_snapshot()));
        let r = ask(&zone, &query("EDGE.Meridian.Test.", RecordType::A, None));
        assert_eq!(a_records(&r), vec![IpAddr::from([127, 0, 0, 11])]);
        // Owner names keep the question's case (0x20-randomising resolvers compare it).
        assert_eq!(r.answers[0].name.to_ascii(), "EDGE.Meridian.Test.");
        assert!(r.edns.is_none());
        let out = respond(
            &zone,
            &query("edge.meridian.test.", RecordType::A, None)
                .to_vec()
                .unwrap(),
            IpAddr::from([203, 0, 113, 9]),
            Transport::Tcp,
        );
        let r = Message::from_vec(&out.reply.unwrap()).unwrap();
        assert_eq!(a_records(&r), vec![IpAddr::from([127, 0, 0, 13])]);
    }

    #[test]
    fn ecs_source_zero_answers_by_source_with_scope_zero() {
        let zone = zone_with(Some(&dev_snapshot()));
        let r = ask(
            &zone,
            &query("edge.meridian.test.", RecordType::A, Some("0.0.0.0/0")),
        );
        assert_eq!(a_records(&r), vec![IpAddr::from([127, 0, 0, 11])]);
        assert_eq!(ecs_of(&r).unwrap().scope_prefix(), 0);
    }

    #[test]
    fn static_records() {
        let zone = zone_with(Some(&dev_snapshot()));
        let r = ask(&zone, &query("meridian.test.", RecordType::SOA, None));
        assert!(r.authoritative);
        let RData::SOA(soa) = &r.answers[0].data else {
            panic!("{r:?}")
        };
        assert_eq!(soa.serial, 42);
        assert_eq!(soa.mname.to_ascii(), "ns1.meridian.test.");
        assert_eq!(soa.rname.to_ascii(), "hostmaster.meridian.test.");
        let r = ask(&zone, &query("meridian.test.", RecordType::NS, None));
        assert_eq!(r.answers.len(), 1);
        let glue: Vec<IpAddr> = r
            .additionals
            .iter()
            .filter_map(|r| r.data.ip_addr())
            .collect();
        assert_eq!(glue, vec![SRC]);
        let r = ask(&zone, &query("ns1.meridian.test.", RecordType::A, None));
        assert_eq!(a_records(&r), vec![SRC]);
        let r = ask(&zone, &query("ns1.meridian.test.", RecordType::AAAA, None));
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn nodata_nxdomain_refused() {
        let zone = zone_with(Some(&dev_snapshot()));
        let r = ask(&zone, &query("edge.meridian.test.", RecordType::MX, None));
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
        // The only edge has no IPv6 address: AAAA is NODATA.
        let r = ask(&zone, &query("edge.meridian.test.", RecordType::AAAA, None));
        assert!(r.answers.is_empty() && r.authorities.len() == 1);

        let r = ask(&zone, &query("nope.meridian.test.", RecordType::A, None));
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert!(r.authoritative);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);

        let r = ask(
            &zone,
            &query("example.com.", RecordType::A, Some("198.51.100.7/24")),
        );
        assert_eq!(r.response_code, ResponseCode::Refused);
        assert!(!r.authoritative && r.answers.is_empty());
        assert!(r.edns.is_some(), "OPT answered with OPT");
        let r = ask(&zone, &query("test.", RecordType::SOA, None));
        assert_eq!(r.response_code, ResponseCode::Refused);
    }

    #[test]
    fn servfail_until_first_snapshot() {
        let zone = zone_with(None);
        let r = ask(&zone, &query("edge.meridian.test.", RecordType::A, None));
        assert_eq!(r.response_code, ResponseCode::ServFail);
        let r = ask(&zone, &query("example.com.", RecordType::A, None));
        assert_eq!(r.response_code, ResponseCode::Refused);
    }

    #[test]
    fn ipv6_answers() {
        let mut snap = dev_snapshot();
        snap.edges[0]
            .info
            .public_ips
            .push("2001:db8::11".parse().unwrap());
        let zone = zone_with(Some(&snap));
        let r = ask(
            &zone,
            &query(
                "edge.meridian.test.",
                RecordType::AAAA,
                Some("2001:db8::/56"),
            ),
        );
        assert_eq!(
            a_records(&r),
            vec![IpAddr::V6("2001:db8::11".parse::<Ipv6Addr>().unwrap())]
        );
        // No IPv6 rules: the answer does not depend on the client.
        assert_eq!(ecs_of(&r).unwrap().scope_prefix(), 0);
        // RFC 8482: ANY gets one RRset, not A and AAAA.
        let r = ask(&zone, &query("edge.meridian.test.", RecordType::ANY, None));
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].record_type(), RecordType::A);
        let r = ask(&zone, &query("meridian.test.", RecordType::ANY, None));
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn truncated_reply_keeps_question_and_sets_tc() {
        let q = query("edge.meridian.test.", RecordType::A, Some("192.0.2.1/24"));
        let r = Message::from_vec(&truncated_reply(&q.to_vec().unwrap()).unwrap()).unwrap();
        assert!(r.truncation);
        assert_eq!(r.id, q.id);
        assert_eq!(r.queries, q.queries);
        assert!(r.answers.is_empty());
        assert!(truncated_reply(&[1, 2, 3]).is_none());
        let mut resp = q.clone();
        resp.metadata.message_type = MessageType::Response;
        assert!(truncated_reply(&resp.to_vec().unwrap()).is_none());
    }

    /// Bytes as `dig edge.meridian.test A +subnet=198.51.100.7/24` sends them: RD and AD set,
    /// EDNS with ECS and a client cookie (which we ignore, per RFC 7873 §5.2).
    #[test]
    fn dig_style_packet() {
        let zone = zone_with(Some(&dev_snapshot()));
        let mut p = vec![0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in ["edge", "meridian", "test"] {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        p.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 23]);
        p.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, 0, 198, 51, 100]);
        p.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let out = respond(&zone, &p, SRC, Transport::Udp);
        assert!(!out.malformed);
        let r = Message::from_vec(&out.reply.unwrap()).unwrap();
        assert_eq!(r.id, 0x1234);
        assert!(
            r.authoritative && r.recursion_desired && !r.recursion_available && !r.authentic_data
        );
        assert_eq!(a_records(&r), vec![IpAddr::from([127, 0, 0, 12])]);
        let cs = ecs_of(&r).unwrap();
        assert_eq!(
            (cs.addr(), cs.source_prefix(), cs.scope_prefix()),
            (IpAddr::from([198, 51, 100, 0]), 24, 24)
        );
        assert!(r.edns.as_ref().unwrap().option(EdnsCode::Cookie).is_none());
    }

    #[test]
    fn malformed_input_never_panics() {
        let zone = zone_with(Some(&dev_snapshot()));
        let good = query(
            "edge.meridian.test.",
            RecordType::A,
            Some("198.51.100.7/24"),
        )
        .to_vec()
        .unwrap();
        // Every prefix of a good query, and every single-byte corruption of it.
        for n in 0..good.len() {
            let _ = respond(&zone, &good[..n], SRC, Transport::Udp);
            for b in [0x00, 0xff, 0x3f, 0xc0] {
                let mut bad = good.clone();
                bad[n] = b;
                let _ = respond(&zone, &bad, SRC, Transport::Udp);
            }
        }
        // Too short for a header: dropped.
        let out = respond(&zone, &[1, 2, 3], SRC, Transport::Udp);
        assert!(out.malformed && out.reply.is_none());
        // A header followed by garbage: FORMERR with the same id.
        let mut bad = good[..12].to_vec();
        bad.extend_from_slice(&[0xc0, 0xff, 0xff]);
        let out = respond(&zone, &bad, SRC, Transport::Udp);
        assert!(out.malformed);
        let r = Message::from_vec(&out.reply.unwrap()).unwrap();
        assert_eq!(r.response_code, ResponseCode::FormErr);
        assert_eq!(r.id, u16::from_be_bytes([good[0], good[1]]));
        // Responses are never answered.
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert!(respond(&zone, &resp, SRC, Transport::Udp).reply.is_none());
        // Oversized queries are dropped.
        assert!(
            respond(&zone, &vec![0u8; MAX_QUERY_LEN + 1], SRC, Transport::Udp)
                .reply
                .is_none()
        );
    }

    #[test]
    fn opcode_count_and_edns_version_errors() {
        let zone = zone_with(Some(&dev_snapshot()));
        let mut q = query("edge.meridian.test.", RecordType::A, None);
        q.metadata.op_code = OpCode::Status;
        assert_eq!(ask(&zone, &q).response_code, ResponseCode::NotImp);
        let mut q = query("edge.meridian.test.", RecordType::A, None);
        q.add_query(Query::query(
            Name::from_str("meridian.test.").unwrap(),
            RecordType::SOA,
        ));
        assert_eq!(ask(&zone, &q).response_code, ResponseCode::FormErr);
        let mut q = query(
            "edge.meridian.test.",
            RecordType::A,
            Some("198.51.100.7/24"),
        );
        if let Some(e) = q.edns.as_mut() {
            e.set_version(1);
        }
        // BADVERS and BADSIG share code 16; hickory decodes it as BADSIG.
        let rc = ask(&zone, &q).response_code;
        assert!(
            matches!(rc, ResponseCode::BADVERS | ResponseCode::BADSIG),
            "{rc:?}"
        );
        let mut q = query("edge.meridian.test.", RecordType::A, None);
        q.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(ask(&zone, &q).response_code, ResponseCode::Refused);
    }

    #[test]
    fn large_answers_truncate_over_udp_only() {
        let mut snap = dev_snapshot();
        snap.edges[1].info.public_ips = (0..60u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let zone = zone_with(Some(&snap));
        let q = query("edge.meridian.test.", RecordType::A, None);
        let bytes = q.to_vec().unwrap();
        let src = IpAddr::from([198, 51, 100, 1]);
        let udp = respond(&zone, &bytes, src, Transport::Udp);
        assert!(udp.truncated);
        let r = Message::from_vec(udp.reply.as_ref().unwrap()).unwrap();
        assert!(r.truncation && r.answers.is_empty() && r.queries.len() == 1);
        assert!(udp.reply.unwrap().len() <= UDP_MAX_PLAIN);
        // With EDNS 1232 the 60 records (~16 B each) fit.
        let mut q = q.clone();
        q.set_edns(Edns::new());
        q.edns.as_mut().unwrap().set_max_payload(4096);
        let out = respond(&zone, &q.to_vec().unwrap(), src, Transport::Udp);
        assert!(!out.truncated);
        let reply = out.reply.unwrap();
        assert!(reply.len() <= usize::from(UDP_MAX_EDNS));
        assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 60);
        let tcp = respond(&zone, &bytes, src, Transport::Tcp);
        assert!(!tcp.truncated);
        assert_eq!(
            Message::from_vec(&tcp.reply.unwrap())
                .unwrap()
                .answers
                .len(),
            60
        );
    }
}

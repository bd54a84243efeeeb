// The body of the `answer` fuzz target, shared by the libFuzzer harness (fuzz_targets/answer.rs,
// nightly + cargo-fuzz) and the stable corpus replay (tests/fuzz_corpus.rs), so both check the
// same properties. Included with `include!`.

/// A zone that reaches most of the answer path: `--net` rules over IPv4 and IPv6, a name with its
/// own policy and weights (a second classifier, rotating answers), a name tied to a service, and
/// coordinator records (CNAME chains within and across zones, MX, TXT, CAA, an extra zone).
/// Fixed inputs: a failure to build it is a bug in this harness, so it may panic.
#[allow(clippy::expect_used)]
fn fuzz_zone() -> std::sync::Arc<geodns::zone::Zone> {
    static ZONE: std::sync::OnceLock<std::sync::Arc<geodns::zone::Zone>> =
        std::sync::OnceLock::new();
    ZONE.get_or_init(|| {
        use coordinator_api::{DnsRecord, DnsRecordType, EdgeInfo, EdgeStatus, Region, Snapshot};
        let dir = std::env::temp_dir().join(format!("geodns-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            "[name.api]\nnets = [\"192.0.2.0/25=iad\", \"2001:db8::/33=sin\"]\n\
             weights = { \"iad-1\" = 3, \"iad-2\" = 1 }\n[name.www]\nanswers = 2\n",
        )
        .expect("policy file");
        let mut c = geodns::Config::with_defaults();
        c.nets = [
            "192.0.2.0/24=ams",
            "198.51.100.0/24=iad",
            "2001:db8::/32=sin",
        ]
        .iter()
        .map(|s| s.parse().expect("net"))
        .collect();
        c.default_region = Some("ams".into());
        c.geo_names = vec!["edge".into(), "svc".into()];
        c.geo_services = vec!["svc=web".parse().expect("geo service")];
        c.policy_file = Some(policy);
        let zc = std::sync::Arc::new(geodns::zone::ZoneConfig::from_config(&c).expect("config"));
        let edge = |id: &str, region: &str, ips: &[&str]| EdgeStatus {
            info: EdgeInfo {
                id: id.into(),
                region: region.into(),
                public_ips: ips.iter().map(|s| s.parse().expect("ip")).collect(),
                http_addr: None,
                https_addr: None,
                tunnel_addr: None,
                anycast: None,
                healthy_services: None,
            },
            alive: id != "sin-2",
            last_seen_ms: 0,
            agents: Vec::new(),
        };
        let rec = |name: &str, zone: &str, t, values: &[&str]| {
            DnsRecord {
                name: name.into(),
                zone: zone.into(),
                rtype: t,
                ttl: 0,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }
            .normalized()
            .expect("record")
        };
        let snap = Snapshot {
            revision: 1,
            regions: ["ams", "iad", "sin"]
                .iter()
                .map(|n| Region {
                    name: (*n).into(),
                    latitude: Some(10.0),
                    longitude: Some(20.0),
                    admin_state: Default::default(),
                })
                .collect(),
            edges: vec![
                edge("ams-1", "ams", &["127.0.0.11", "2001:db8::11"]),
                edge("iad-1", "iad", &["127.0.0.12"]),
                edge("iad-2", "iad", &["127.0.0.22", "2001:db8::22"]),
                edge("sin-1", "sin", &["127.0.0.13"]),
                edge("sin-2", "sin", &["127.0.0.23"]),
            ],
            records: vec![
                rec(
                    "app.example.com",
                    "example.com",
                    DnsRecordType::Cname,
                    &["api.meridian.test"],
                ),
                rec(
                    "loop.example.com",
                    "example.com",
                    DnsRecordType::Cname,
                    &["loop2.example.com"],
                ),
                rec(
                    "loop2.example.com",
                    "example.com",
                    DnsRecordType::Cname,
                    &["loop.example.com"],
                ),
                rec(
                    "example.com",
                    "example.com",
                    DnsRecordType::Mx,
                    &["10 mail.example.com"],
                ),
                rec(
                    "example.com",
                    "example.com",
                    DnsRecordType::Txt,
                    &["v=spf1 -all"],
                ),
                rec(
                    "example.com",
                    "example.com",
                    DnsRecordType::Caa,
                    &["0 issue \"letsencrypt.org\""],
                ),
                rec(
                    "mail.example.com",
                    "example.com",
                    DnsRecordType::A,
                    &["192.0.2.25"],
                ),
                rec(
                    "txt.meridian.test",
                    "meridian.test",
                    DnsRecordType::Txt,
                    &["hello"],
                ),
            ],
            ..Snapshot::default()
        };
        let mut health = geodns::health::HealthTracker::default();
        health.observe(&snap, std::time::Instant::now());
        let policies = zc.policies.clone();
        std::sync::Arc::new(geodns::zone::Zone::build(zc, &policies, &snap, &health))
    })
    .clone()
}

/// Any panic here is a bug: answering must never panic over UDP or TCP, whatever the bytes and
/// the source address; and the UDP answer cache must return exactly what the normal path does,
/// for the packet itself and for the same packet under another ID (what the cache patches).
#[allow(clippy::expect_used)]
pub fn check_answer(data: &[u8]) {
    use geodns::fastpath::AnswerCache;
    use geodns::respond::{Transport, respond, respond_in_slot};
    let zone = fuzz_zone();
    // The first two bytes pick the source address family and value, the rest is the packet.
    let (src, packet): (std::net::IpAddr, &[u8]) = match data {
        [0, a, rest @ ..] => (std::net::Ipv4Addr::new(192, 0, 2, *a).into(), rest),
        [1, a, rest @ ..] => (
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(*a)).into(),
            rest,
        ),
        [_, a, rest @ ..] => (std::net::Ipv4Addr::new(198, 51, 100, *a).into(), rest),
        _ => ("127.0.0.1".parse().expect("ip"), data),
    };
    let _ = respond(&zone, packet, src, Transport::Tcp);
    let mut cache = AnswerCache::default();
    for (round, id) in [(0u8, None), (1, None), (2, Some([0x5a, 0xa5]))] {
        let mut p = packet.to_vec();
        if let (Some(id), Some(head)) = (id, p.get_mut(..2)) {
            head.copy_from_slice(&id);
        }
        let mut out = Vec::new();
        let got = cache.answer(&zone, &p, src, &mut out);
        // The normal path with the slot the cache used (a new cache's rotation starts at 1).
        let want = respond_in_slot(&zone, &p, src, Transport::Udp, Some(usize::from(round) + 1));
        assert_eq!(
            got.replied.then_some(&out),
            want.reply.as_ref(),
            "round {round}"
        );
    }
}

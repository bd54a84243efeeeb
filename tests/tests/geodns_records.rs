//! GeoDNS zone records end to end: `meridian ctl dns record add|list|rm` against a real
//! `meridian coordinator`, a real `meridian geodns` following its watch stream, and DNS packets
//! over UDP and TCP. A customer name CNAME'd into the edge zone answers with the CNAME plus the
//! edge of the client's region; the coordinator refuses a CNAME at the apex and beside other
//! data, naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coordinator_api::{
    Client, ClientError, DnsRecord, DnsRecordType, EdgeHeartbeat, EdgeInfo, Region,
};
use hickory_proto::rr::{RData, RecordType};
use meridian_tests::clients::{answer_ips, dns_query, dns_tcp, dns_udp, echoed_subnet, rcode};
use meridian_tests::dev::{Proc, coordinator, eventually, free_port};
use meridian_tests::meridian_bin;

const ADMIN: &str = "mrd_api_geodnsrec_geodnsrecordsadminsecret";
const NODE: &str = "mrd_api_geodnsnode_geodnsrecordsnodesecret";
const WAIT: Duration = Duration::from_secs(20);

/// A free TCP port on `ip`, and for GeoDNS one free for UDP too.
fn ctl(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(meridian_bin())
        .args(["ctl", "--coordinator", url, "--token", ADMIN])
        .args(args)
        .env("MERIDIAN_LOG", "warn")
        .output()
        .expect("run meridian ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn records_from_ctl_are_served_with_cname_chasing_into_the_edge_zone() {
    let data = std::env::temp_dir().join(format!("mrd-geodns-records-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let api: SocketAddr = format!("127.0.5.2:{}", free_port("127.0.5.2", false))
        .parse()
        .unwrap();
    let dns: SocketAddr = format!("127.0.5.3:{}", free_port("127.0.5.3", true))
        .parse()
        .unwrap();
    let url = format!("http://{api}");
    let _coordinator = coordinator(api, &data, ADMIN, NODE);
    let admin = Client::new(url.clone(), ADMIN).unwrap();
    eventually(WAIT, || async { admin.list_regions().await.ok() })
        .await
        .expect("coordinator up");
    for (name, lat, lon) in [("ams", 52.37, 4.90), ("iad", 38.95, -77.45)] {
        admin
            .create_region(&Region {
                name: name.into(),
                latitude: Some(lat),
                longitude: Some(lon),
                admin_state: Default::default(),
            })
            .await
            .unwrap();
    }
    // Two edges that keep heartbeating, as real ones do.
    let node = Client::new(url.clone(), NODE).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (region, ip) in [("ams", "127.0.5.11"), ("iad", "127.0.5.12")] {
                    let hb = EdgeHeartbeat {
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
                        agents: Vec::new(),
                    };
                    let _ = node.heartbeat(&hb).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let _geodns = Proc(
        Command::new(meridian_bin())
            .args([
                "geodns",
                "--listen",
                &dns.to_string(),
                "--coordinator",
                &url,
            ])
            .args(["--zone", "meridian.test", "--geo-name", "edge"])
            .args(["--net", "192.0.2.0/24=ams", "--net", "198.51.100.0/24=iad"])
            .args(["--default-region", "ams"])
            .env("MERIDIAN_NODE_TOKEN", NODE)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start geodns"),
    );

    // The customer's records, through the CLI.
    let (ok, out) = ctl(
        &url,
        &[
            "dns",
            "record",
            "add",
            "www.customer.example",
            "CNAME",
            "edge.meridian.test.",
            "--zone",
            "customer.example",
        ],
    );
    assert!(ok, "{out}");
    // The zone is inferred from the existing record; two values make one RRset.
    let (ok, out) = ctl(
        &url,
        &[
            "dns",
            "record",
            "add",
            "customer.example",
            "TXT",
            "v=spf1 -all",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = ctl(
        &url,
        &["dns", "record", "add", "customer.example", "TXT", "hello"],
    );
    assert!(ok, "{out}");
    // Refused with the field at fault: a CNAME at the apex, and a CNAME beside other data.
    let (ok, out) = ctl(
        &url,
        &[
            "dns",
            "record",
            "add",
            "customer.example",
            "CNAME",
            "x.example.net",
        ],
    );
    assert!(!ok && out.contains("apex"), "{out}");
    let (ok, out) = ctl(
        &url,
        &["dns", "record", "add", "www.customer.example", "TXT", "x"],
    );
    assert!(!ok && out.contains("CNAME"), "{out}");
    let (ok, out) = ctl(
        &url,
        &[
            "dns",
            "record",
            "add",
            "m.customer.example",
            "MX",
            "mail.customer.example",
        ],
    );
    assert!(!ok && out.contains("PREFERENCE"), "{out}");
    // The API names the field at fault, with 400 for bad input and 409 for a conflict.
    let bad = |name: &str, zone: &str, rtype: DnsRecordType, value: &str| DnsRecord {
        name: name.into(),
        zone: zone.into(),
        rtype,
        ttl: 0,
        values: vec![value.into()],
    };
    for (r, status, field) in [
        (
            bad(
                "customer.example",
                "customer.example",
                DnsRecordType::Cname,
                "x.example.net",
            ),
            400,
            "type",
        ),
        (
            bad(
                "www.other.example",
                "customer.example",
                DnsRecordType::Txt,
                "x",
            ),
            400,
            "name",
        ),
        (
            bad(
                "a.customer.example",
                "customer.example",
                DnsRecordType::A,
                "2001:db8::1",
            ),
            400,
            "values",
        ),
        (
            bad(
                "www.customer.example",
                "customer.example",
                DnsRecordType::Txt,
                "x",
            ),
            409,
            "type",
        ),
    ] {
        match admin.put_dns_record(&r).await {
            Err(ClientError::Http(s, e)) => {
                assert_eq!(
                    (s, e.field.as_deref()),
                    (status, Some(field)),
                    "{r:?}: {e:?}"
                );
            }
            other => panic!("{r:?} accepted or failed oddly: {other:?}"),
        }
    }
    let (ok, out) = ctl(&url, &["--json", "dns", "record", "list"]);
    assert!(ok, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // GeoDNS follows: the CNAME plus the edge of the client's region, with the ECS scope.
    let q = dns_query(
        "www.customer.example.",
        RecordType::A,
        Some(("198.51.100.7".parse().unwrap(), 24)),
    );
    let r = eventually(WAIT, || async {
        let r = dns_udp(dns, &q).await.ok()?;
        (answer_ips(&r) == vec!["127.0.5.12".parse::<IpAddr>().unwrap()]).then_some(r)
    })
    .await
    .expect("GeoDNS never served the customer CNAME");
    assert!(
        r.answers
            .iter()
            .any(|a| matches!(&a.data, RData::CNAME(c) if c.0.to_ascii() == "edge.meridian.test."))
    );
    assert_eq!(echoed_subnet(&r).map(|s| s.scope_prefix()), Some(24));
    let r = dns_tcp(
        dns,
        &dns_query(
            "www.customer.example.",
            RecordType::A,
            Some(("192.0.2.9".parse().unwrap(), 24)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        answer_ips(&r),
        vec!["127.0.5.11".parse::<IpAddr>().unwrap()]
    );
    let r = dns_udp(dns, &dns_query("customer.example.", RecordType::TXT, None))
        .await
        .unwrap();
    assert_eq!(r.answers.len(), 2);
    // The apex with only TXT asked for A: NODATA with the customer zone's SOA.
    let r = dns_udp(dns, &dns_query("customer.example.", RecordType::A, None))
        .await
        .unwrap();
    assert_eq!(rcode(&r), hickory_proto::op::ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities[0].name.to_ascii(), "customer.example.");

    // Removing the CNAME: the name is gone from GeoDNS too.
    let (ok, out) = ctl(
        &url,
        &["dns", "record", "rm", "www.customer.example", "CNAME"],
    );
    assert!(ok, "{out}");
    let q = dns_query("www.customer.example.", RecordType::A, None);
    eventually(WAIT, || async {
        let r = dns_udp(dns, &q).await.ok()?;
        (rcode(&r) == hickory_proto::op::ResponseCode::NXDomain).then_some(())
    })
    .await
    .expect("removed record still served");
    // One value of an RRset.
    let (ok, out) = ctl(
        &url,
        &["dns", "record", "rm", "customer.example", "TXT", "hello"],
    );
    assert!(ok, "{out}");
    eventually(WAIT, || async {
        let r = dns_udp(dns, &dns_query("customer.example.", RecordType::TXT, None))
            .await
            .ok()?;
        (r.answers.len() == 1).then_some(())
    })
    .await
    .expect("TXT value never removed");

    stop.store(true, Ordering::Relaxed);
    let _ = beat.await;
    let _ = std::fs::remove_dir_all(&data);
}

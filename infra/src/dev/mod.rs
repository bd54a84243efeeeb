//! `meridian dev`: a coordinator, three regions of edges, GeoDNS and a demo app behind a tunnel
//! agent, all on this machine, as one process tree that stops on Ctrl-C.

mod ca;
mod supervisor;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use coordinator_api::{Client, CreateService, CreateToken, Mount, Region};

pub(crate) use ca::write_private;
use supervisor::Supervisor;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Config {
    /// Where the dev network keeps its database, certificates, tokens and caches.
    #[arg(long, default_value = ".meridian-dev")]
    data_dir: PathBuf,
    /// How long to wait for every part to come up.
    #[arg(long, default_value = "60")]
    ready_timeout_secs: u64,
}

/// The fixed shape of the dev network; tests and the README rely on these addresses.
pub(crate) const COORDINATOR: &str = "127.0.0.1:7700";
pub(crate) const ZONE: &str = "meridian.test";
pub(crate) const GEODNS: &str = "127.0.0.1:5353";
pub(crate) const DEMO_APP: &str = "127.0.0.1:7781";
pub(crate) const REGIONS: [DevRegion; 3] = [
    DevRegion {
        name: "ams",
        ip: Ipv4Addr::new(127, 0, 0, 11),
        lat: 52.37,
        lon: 4.90,
        net: "192.0.2.0/24",
    },
    DevRegion {
        name: "iad",
        ip: Ipv4Addr::new(127, 0, 0, 12),
        lat: 38.95,
        lon: -77.45,
        net: "198.51.100.0/24",
    },
    DevRegion {
        name: "sin",
        ip: Ipv4Addr::new(127, 0, 0, 13),
        lat: 1.35,
        lon: 103.99,
        net: "203.0.113.0/24",
    },
];
const HTTPS_PORT: u16 = 8443;
const HTTP_PORT: u16 = 8080;
const TUNNEL_PORT: u16 = 7443;

pub(crate) struct DevRegion {
    name: &'static str,
    ip: Ipv4Addr,
    lat: f64,
    lon: f64,
    net: &'static str,
}

pub(crate) async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let data = cfg.data_dir.canonicalize()?;
    let mut sup = Supervisor::new(data.join("pids"))?;
    let result = tokio::select! {
        r = start(&data, &mut sup, Duration::from_secs(cfg.ready_timeout_secs)) => r,
        _ = crate::wait_for_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = result {
        sup.shutdown(Duration::from_secs(5)).await;
        return Err(e);
    }
    tokio::select! {
        _ = crate::wait_for_signal() => eprintln!("[dev] stopping"),
        (name, status) = sup.any_exited() => {
            eprintln!("[dev] {name} exited ({}); the rest keeps running, Ctrl-C stops all", describe(status));
            crate::wait_for_signal().await;
            eprintln!("[dev] stopping");
        }
    }
    sup.shutdown(Duration::from_secs(10)).await;
    println!("meridian dev: stopped");
    Ok(())
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

async fn start(data: &Path, sup: &mut Supervisor, ready_timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + ready_timeout;
    let mut ips: Vec<IpAddr> = REGIONS.iter().map(|r| IpAddr::V4(r.ip)).collect();
    ips.extend([
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ]);
    let edge_name = format!("edge.{ZONE}");
    let wildcard = format!("*.{ZONE}");
    let pki = ca::ensure(
        data,
        &[edge_name.as_str(), wildcard.as_str(), "localhost"],
        &ips,
    )?;
    let admin_token = load_or_create_token(&data.join("admin.token"))?;
    let node_token = load_or_create_token(&data.join("node.token"))?;
    let coordinator_url = format!("http://{COORDINATOR}");

    let coord_dir = data.join("coordinator");
    sup.spawn(
        "coordinator",
        &args(&[
            "coordinator",
            "--listen",
            COORDINATOR,
            "--data-dir",
            &path(&coord_dir),
        ]),
        &[
            ("MERIDIAN_ADMIN_TOKEN", &admin_token),
            ("MERIDIAN_NODE_TOKEN", &node_token),
        ],
    )?;
    let client = Client::new(coordinator_url.clone(), admin_token.clone())?;
    wait_until(deadline, "the coordinator to answer", || async {
        client.list_regions().await.is_ok()
    })
    .await?;

    for r in &REGIONS {
        let region = Region {
            name: r.name.into(),
            latitude: Some(r.lat),
            longitude: Some(r.lon),
            admin_state: Default::default(),
        };
        ignore_conflict(client.create_region(&region).await)?;
    }
    ignore_conflict(
        client
            .create_service(&CreateService {
                name: "demo".into(),
                lb_policy: Default::default(),
            })
            .await,
    )?;
    let mount = Mount {
        host: edge_name.clone(),
        path_prefix: "/demo".into(),
        service: "demo".into(),
        strip_prefix: true,
        ..Default::default()
    };
    ignore_conflict(client.add_mount(&mount).await)?;
    let agent_token = demo_agent_token(&client, &data.join("demo-agent.token")).await?;

    let node_env = [("MERIDIAN_NODE_TOKEN", node_token.as_str())];
    for r in &REGIONS {
        let ip = r.ip.to_string();
        sup.spawn(
            &format!("edge-{}", r.name),
            &args(&[
                "edge",
                "--id",
                &format!("{}-1", r.name),
                "--region",
                r.name,
                "--http-listen",
                &format!("{ip}:{HTTP_PORT}"),
                "--https-listen",
                &format!("{ip}:{HTTPS_PORT}"),
                "--tunnel-listen",
                &format!("{ip}:{TUNNEL_PORT}"),
                "--tls-cert",
                &path(&pki.edge_cert),
                "--tls-key",
                &path(&pki.edge_key),
                "--peer-ca",
                &path(&pki.ca_cert),
                "--coordinator",
                &coordinator_url,
                "--state-dir",
                &path(&data.join(format!("edge-{}", r.name))),
            ]),
            &node_env,
        )?;
    }

    let mut geo = args(&[
        "geodns",
        "--listen",
        GEODNS,
        "--zone",
        ZONE,
        "--geo-name",
        "edge",
        "--default-region",
        "ams",
        "--coordinator",
        &coordinator_url,
        "--state-dir",
        &path(&data.join("geodns")),
    ]);
    for r in &REGIONS {
        geo.extend(["--net".to_owned(), format!("{}={}", r.net, r.name)]);
    }
    sup.spawn("geodns", &geo, &node_env)?;

    sup.spawn(
        "demo-app",
        &args(&["demo-app", "--listen", DEMO_APP, "--name", "demo-1"]),
        &[],
    )?;
    let edges: Vec<String> = REGIONS
        .iter()
        .map(|r| format!("{}:{TUNNEL_PORT}", r.ip))
        .collect();
    sup.spawn(
        "agent",
        &args(&[
            "agent",
            "--edge",
            &edges.join(","),
            "--ca",
            &path(&pki.ca_cert),
            "--service",
            "demo",
            "--to",
            &format!("http://{DEMO_APP}"),
            "--regions",
            &REGIONS.len().to_string(),
            "--agent-id",
            "demo-agent-1",
        ]),
        &[("MERIDIAN_AGENT_TOKEN", agent_token.as_str())],
    )?;

    wait_until(
        deadline,
        "the demo agent to register with every edge",
        || async {
            match client.list_agents().await {
                Ok(agents) => {
                    let regions: std::collections::HashSet<_> = agents
                        .iter()
                        .filter(|a| a.conn.service == "demo")
                        .map(|a| a.region.clone())
                        .collect();
                    regions.len() == REGIONS.len()
                }
                Err(_) => false,
            }
        },
    )
    .await?;
    wait_until(
        deadline,
        "GeoDNS to send each region's clients to its edge",
        || async {
            for r in &REGIONS {
                let client: IpAddr = match r.net.split('/').next().and_then(|a| a.parse().ok()) {
                    Some(ip) => ip,
                    None => return false,
                };
                if geodns_answer(&edge_name, client).await != Some(vec![IpAddr::V4(r.ip)]) {
                    return false;
                }
            }
            true
        },
    )
    .await?;

    print_banner(data, &pki.ca_cert, &admin_token);
    Ok(())
}

fn print_banner(data: &Path, ca: &Path, admin_token: &str) {
    let ca = ca.display();
    println!("meridian dev: ready");
    println!();
    println!("  coordinator  http://{COORDINATOR}   (dashboard and API)");
    println!("  dashboard    http://{COORDINATOR}/#token={admin_token}");
    println!("  admin token  {admin_token}");
    for r in &REGIONS {
        println!(
            "  edge {}     https://{ip}:{HTTPS_PORT}  http://{ip}:{HTTP_PORT}  tunnel {ip}:{TUNNEL_PORT}/udp",
            r.name,
            ip = r.ip
        );
    }
    println!("  geodns       {GEODNS} (udp+tcp), zone {ZONE}");
    println!(
        "  demo app     http://{DEMO_APP} behind a tunnel agent, mounted at https://edge.{ZONE}:{HTTPS_PORT}/demo/"
    );
    println!("  dev CA       {ca}");
    println!("  data dir     {}", data.display());
    println!();
    println!("Try:");
    println!(
        "  curl --cacert {ca} --resolve edge.{ZONE}:{HTTPS_PORT}:127.0.0.12 https://edge.{ZONE}:{HTTPS_PORT}/demo/headers"
    );
    println!("  dig @127.0.0.1 -p 5353 edge.{ZONE} A +subnet=198.51.100.7/24");
    println!("  export MERIDIAN_ADMIN_TOKEN={admin_token}");
    println!("  meridian ctl mounts");
    println!("  meridian ctl agents");
    println!();
    println!("Ctrl-C stops everything.");
}

/// The demo agent's token, reused across restarts while the coordinator still knows it.
async fn demo_agent_token(client: &Client, file: &Path) -> anyhow::Result<String> {
    if let Ok(token) = std::fs::read_to_string(file) {
        let token = token.trim().to_owned();
        let known = client.list_tokens().await?;
        if let Some(id) = coordinator_api::token::parse_id(coordinator_api::token::AGENT, &token)
            && known.iter().any(|t| t.id == id)
        {
            return Ok(token);
        }
    }
    let created = client
        .create_token(&CreateToken {
            service: "demo".into(),
        })
        .await?;
    write_private(file, &created.token)?;
    Ok(created.token)
}

fn load_or_create_token(file: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(file)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let token = coordinator_api::token::format(
        coordinator_api::token::API,
        &random_hex(6),
        &random_hex(24),
    );
    write_private(file, &token)?;
    Ok(token)
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn ignore_conflict<T>(r: Result<T, coordinator_api::ClientError>) -> anyhow::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(409) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The A records GeoDNS gives `name` for a client in `client`'s /24 (EDNS Client Subnet), or
/// `None` when it does not answer within 500 ms.
async fn geodns_answer(name: &str, client: IpAddr) -> Option<Vec<IpAddr>> {
    use hickory_proto::{
        op::{Edns, Message, Query},
        rr::{
            Name, RData, RecordType,
            rdata::opt::{ClientSubnet, EdnsOption},
        },
    };
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let mut edns = Edns::new();
    edns.options_mut()
        .insert(EdnsOption::Subnet(ClientSubnet::new(client, 24, 0)));
    q.set_edns(edns);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.send_to(&q.to_vec().ok()?, GEODNS).await.ok()?;
    let mut buf = [0u8; 1232];
    let (n, _) = tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let answer = Message::from_vec(&buf[..n]).ok()?;
    Some(
        answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect(),
    )
}

/// Polls `check` every 50 ms: the readiness signals are the coordinator's view and real queries.
async fn wait_until<F, Fut>(deadline: Instant, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; see the log lines above");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

//! Tunnel high availability over `meridian dev`: losing an edge costs the other regions nothing
//! and a restarted edge gets its agents back quickly; a rolling restart of two agent replicas
//! under load fails no request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meridian_tests::{clients::http_status, dev::Proc};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meridian_tests::dev::{DevNetwork, eventually, is_alive, kill9, start_agent};
use nix::{sys::signal::Signal, unistd::Pid};

const AMS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
const IAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12));
const SIN: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13));
const EDGES: [IpAddr; 3] = [AMS, IAD, SIN];
const HOST: &str = "edge.meridian.test";

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// `clients` keep-alive HTTP/1.1 clients looping `GET path` against `edges` until `stop`; every
/// non-200 answer or transport error is a failure (and printed).
fn load(
    edges: &[IpAddr],
    path: &'static str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for i in 0..clients {
        let edge = edges[i % edges.len()];
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = None;
            while !stop.load(Ordering::Relaxed) {
                if sender.is_none() {
                    let Ok(tcp) = tokio::net::TcpStream::connect(SocketAddr::new(edge, 8080)).await
                    else {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{edge}: connect failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .expect("handshake");
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                let s = sender.as_mut().expect("connected above");
                let req = hyper::Request::get(path)
                    .header("host", HOST)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match s.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.into_body().collect().await;
                        if status == 200 && body.is_ok() {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            let text = body.map(|b| b.to_bytes()).unwrap_or_default();
                            eprintln!("{edge}: {status} {}", String::from_utf8_lossy(&text));
                            sender = None;
                        }
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{edge}: {e}");
                        sender = None;
                    }
                }
            }
        }));
    }
    (tally, tasks)
}

/// How many edges list a connection of `agent_id` (edges report their agents to the coordinator
/// at once on every connect and disconnect).
fn edges_holding(net: &DevNetwork, agent_id: &str) -> usize {
    let agents = net.ctl(&["agents"]);
    let needle = format!("\"{agent_id}\"");
    agents
        .as_array()
        .map(|a| a.iter().filter(|x| x.to_string().contains(&needle)).count())
        .unwrap_or(0)
}

async fn registered_everywhere(net: &DevNetwork, agent_id: &str) {
    eventually(Duration::from_secs(20), || async {
        (edges_holding(net, agent_id) >= EDGES.len()).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{agent_id} registered with all three edges"));
}

/// The command line and environment of a running process, to start it again after a kill -9.
fn snapshot_process(pid: i32) -> (Vec<String>, Vec<(String, String)>) {
    let split = |raw: Vec<u8>| -> Vec<String> {
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap());
    let env = split(std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    (argv, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_an_edge_costs_other_regions_nothing_and_its_restart_is_rejoined() {
    let net = DevNetwork::start();
    registered_everywhere(&net, "demo-agent-1").await;

    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(&[AMS, SIN], "/demo/", 8, stop.clone());
    eventually(Duration::from_secs(10), || async {
        (tally.ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .await
    .expect("load flows");

    let iad = net.pid("edge-iad");
    let (argv, env) = snapshot_process(iad);
    kill9(iad);
    eventually(Duration::from_secs(5), || async {
        (!is_alive(iad)).then_some(())
    })
    .await
    .expect("edge-iad is dead");
    // Requests keep flowing through the other regions' connections while iad is gone.
    let before = tally.ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), || async {
        (tally.ok.load(Ordering::Relaxed) > before + 200).then_some(())
    })
    .await
    .expect("requests keep succeeding via ams and sin");
    assert_eq!(
        http_status(IAD, HOST, "/demo/").await,
        None,
        "iad is really down"
    );

    // Restart iad exactly as dev started it, and time how long after it listens the agent is
    // back on it.
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _edge = Proc(cmd.spawn().expect("restart edge-iad"));
    let listening = std::sync::Mutex::new(None::<Instant>);
    let back = eventually(Duration::from_secs(30), || async {
        let status = http_status(IAD, HOST, "/demo/").await?;
        listening.lock().unwrap().get_or_insert_with(Instant::now);
        (status == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the agent reconnected to the restarted edge"
    );
    let reconnect = listening
        .lock()
        .unwrap()
        .map(|t| t.elapsed())
        .unwrap_or_default();
    eprintln!("agent back on the restarted edge {reconnect:?} after it started listening");
    // Dead-edge detection (3 s of missing heartbeat acks) plus at most 500 ms of backoff.
    assert!(
        reconnect < Duration::from_secs(5),
        "reconnect took {reconnect:?}"
    );

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("through ams and sin during the kill: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "requests via the other regions failed");
}

fn sigterm(child: &mut Child) {
    let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(
                status.success(),
                "agent exits cleanly after SIGTERM: {status}"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("agent did not drain and exit within 20 s of SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_restart_of_two_agent_replicas_under_load_fails_no_request() {
    let net = DevNetwork::start();
    net.ctl(&["service", "create", "roll"]);
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/roll"),
        "roll",
        "--strip-prefix",
    ]);
    let token = net.ctl(&["token", "create", "roll"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let replica = |id: &str| {
        start_agent(
            &net,
            &token,
            "roll",
            "http://127.0.0.1:7781",
            &["--agent-id", id],
        )
    };
    let mut a = Proc(replica("roll-a"));
    let mut b = Proc(replica("roll-b"));
    registered_everywhere(&net, "roll-a").await;
    registered_everywhere(&net, "roll-b").await;

    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(&EDGES, "/roll/", 12, stop.clone());
    let progress = |n: u64| {
        let tally = tally.clone();
        async move {
            let before = tally.ok.load(Ordering::Relaxed);
            eventually(Duration::from_secs(10), || async {
                (tally.ok.load(Ordering::Relaxed) >= before + n).then_some(())
            })
            .await
            .expect("load keeps flowing");
        }
    };
    progress(100).await;

    for round in 0..2 {
        for (name, proc) in [("roll-a", &mut a), ("roll-b", &mut b)] {
            sigterm(&mut proc.0);
            progress(100).await; // served by the other replica alone
            *proc = Proc(replica(name));
            registered_everywhere(&net, name).await;
            progress(100).await;
            eprintln!(
                "round {round}: restarted {name}; {} ok, {} failed so far",
                tally.ok.load(Ordering::Relaxed),
                tally.failed.load(Ordering::Relaxed)
            );
        }
    }

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("rolling restart under load: {ok} ok, {failed} failed");
    assert!(ok > 1000, "only {ok} requests made it");
    assert_eq!(failed, 0, "a rolling restart failed requests");
}

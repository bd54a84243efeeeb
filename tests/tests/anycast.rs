//! Anycast end to end (issue 7) in the namespace lab (`infra/lab/lab`): three edges announce
//! 198.18.0.10/32 through their own BIRD to a router BIRD that installs one ECMP route.
//!
//! Proves: connections from the client spread over the edges; a drained edge (SIGTERM) leaves
//! the router's route within 1 s while its in-flight request completes; `kill -9` of an edge, a
//! dropped link to an edge, and a frozen edge BIRD (BFD) are each routed around within 1 s; edges
//! whose backends are all unhealthy withdraw, and come back with them.
//!
//! Needs root, bird2, iproute2, util-linux (setpriv), openssl, curl and coreutils (stdbuf);
//! skips with the reason otherwise. Owns the `mer-*` namespaces while it runs (a lab left up
//! by `lab up` is taken down first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::{have_tool, meridian_bin};

const VIP: &str = "198.18.0.10";
const HOST: &str = "edge.meridian.lab";
const LAB_DIR: &str = "/tmp/meridian-lab";
/// What the issue allows for a route to leave the router.
const WITHDRAW_LIMIT: Duration = Duration::from_secs(1);
/// An edge restarted by the test: BIRD start, BGP session, rise checks.
const REJOIN_LIMIT: Duration = Duration::from_secs(20);

fn lab_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/lab/lab")
}

fn lab(args: &[&str]) -> std::process::Output {
    let out = Command::new(lab_script())
        .args(args)
        .env("MERIDIAN_BIN", meridian_bin())
        .env("MERIDIAN_LAB_DIR", LAB_DIR)
        .stdin(Stdio::null())
        .output()
        .expect("run infra/lab/lab");
    assert!(
        out.status.success(),
        "lab {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Takes the lab down however the test ends.
struct Lab;

impl Lab {
    fn up() -> Self {
        let _ = Command::new(lab_script())
            .arg("down")
            .env("MERIDIAN_LAB_DIR", LAB_DIR)
            .output();
        let guard = Self;
        lab(&["up"]);
        guard
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- router: {:?}", route_edges());
            for log in ["e1", "e2", "e3", "agent", "rt-bird"] {
                let text = std::fs::read_to_string(format!("{LAB_DIR}/logs/{log}.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!(
                    "--- {log}.log (last lines, newest first)\n{}",
                    tail.join("\n")
                );
            }
        }
        let _ = Command::new(lab_script())
            .arg("down")
            .env("MERIDIAN_LAB_DIR", LAB_DIR)
            .output();
    }
}

fn why_skip() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root for network namespaces".into());
    }
    for (tool, pkg) in [
        ("bird", "bird2"),
        ("birdc", "bird2"),
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
        ("openssl", "openssl"),
        ("curl", "curl"),
        ("stdbuf", "coreutils"),
    ] {
        if !have_tool(tool) {
            return Some(format!("`{tool}` not found (apt-get install {pkg})"));
        }
    }
    // Root in a container without CAP_SYS_ADMIN cannot make namespaces: an environment limit.
    let probe = Command::new("ip")
        .args(["netns", "add", "mer-probe"])
        .output()
        .ok()?;
    let _ = Command::new("ip")
        .args(["netns", "del", "mer-probe"])
        .output();
    if !probe.status.success() {
        return Some(format!(
            "cannot create network namespaces: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    None
}

/// Edge numbers (1..=3) the router currently forwards the VIP to (dead next hops excluded).
fn route_edges() -> Vec<u8> {
    let out = Command::new("ip")
        .args(["-n", "mer-rt", "-4", "route", "show", &format!("{VIP}/32")])
        .output()
        .expect("ip route");
    let mut edges: Vec<u8> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("dead") && !l.contains("linkdown"))
        .filter_map(|l| {
            let rest = l.split("via 10.77.").nth(1)?;
            let (n, tail) = rest.split_once('.')?;
            tail.starts_with("2 ").then(|| n.parse().ok()).flatten()
        })
        .collect();
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// Polls the router's route until `pred` holds; the time it took, or `None` after `limit`.
fn wait_route(limit: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if pred(&route_edges()) {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_all_three(what: &str) {
    let took = wait_route(REJOIN_LIMIT, |e| e == [1, 2, 3]);
    assert!(
        took.is_some(),
        "{what}: the router did not get all three edges back within {REJOIN_LIMIT:?}: {:?}",
        route_edges()
    );
}

fn edge_number(id: &str) -> u8 {
    match id {
        "ams-1" => 1,
        "iad-1" => 2,
        "sin-1" => 3,
        other => panic!("unexpected Meridian-Edge {other:?}"),
    }
}

fn curl_args(paths: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "netns",
        "exec",
        "mer-cl",
        "stdbuf",
        "-oL",
        "curl",
        "-s",
        "-m",
        "10",
        "--resolve",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push(format!("{HOST}:80:{VIP}"));
    a.push("-w".into());
    a.push("%{http_code} %header{meridian-edge}\\n".into());
    for p in paths {
        a.push("-o".into());
        a.push("/dev/null".into());
        a.push(format!("http://{HOST}/demo{p}"));
    }
    a
}

/// One request on a new connection from the client namespace: (status, edge number or 0).
fn get() -> (u16, u8) {
    let out = Command::new("ip")
        .args(curl_args(&["/"]))
        .output()
        .expect("curl");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    parse_line(&line)
}

fn parse_line(line: &str) -> (u16, u8) {
    let mut it = line.split_whitespace();
    let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let edge = it.next().map(edge_number).unwrap_or(0);
    (status, edge)
}

/// `n` requests, each on its own connection; panics on any failure, returns per-edge counts.
fn spread(n: usize, what: &str) -> [usize; 4] {
    let mut counts = [0usize; 4];
    for _ in 0..n {
        let (status, edge) = get();
        assert_eq!(status, 200, "{what}: a request failed (edge {edge})");
        counts[edge as usize] += 1;
    }
    counts
}

/// Running (an exited process nobody reaped — PID 1 in some containers never does — is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        !matches!(state, Some(Some('Z' | 'X')) | None)
    })
}

fn pid_of(name: &str) -> i32 {
    std::fs::read_to_string(format!("{LAB_DIR}/pids/{name}"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
}

/// The BIRD an edge runs as its child, found among the namespace's processes.
fn edge_bird_pid(n: u8) -> Option<i32> {
    let out = Command::new("ip")
        .args(["netns", "pids", &format!("mer-e{n}")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|&p| {
            alive(p)
                && std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "bird")
        })
}

fn edge_metrics(n: u8) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("mer-e{n}"),
            "curl",
            "-s",
            "-m",
            "2",
            "http://127.0.0.1:9100/metrics",
        ])
        .output()
        .expect("curl metrics");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_withdrawn_within(n: u8, what: &str) -> Duration {
    let took = wait_route(Duration::from_secs(5), |e| !e.contains(&n));
    let took = took.unwrap_or_else(|| panic!("{what}: edge {n} never left the route"));
    eprintln!("{what}: edge {n} left the router's route after {took:?}");
    assert!(
        took <= WITHDRAW_LIMIT,
        "{what}: edge {n} took {took:?} to leave the route (limit {WITHDRAW_LIMIT:?})"
    );
    took
}

fn assert_routed_around(n: u8, what: &str) {
    let counts = spread(12, what);
    assert_eq!(counts[n as usize], 0, "{what}: edge {n} still got traffic");
}

#[test]
fn anycast_lab() {
    if let Some(reason) = why_skip() {
        eprintln!("skipping anycast_lab: {reason}");
        return;
    }
    let started = Instant::now();
    let _lab = Lab::up();
    assert_eq!(
        route_edges(),
        [1, 2, 3],
        "lab up returns once all three announce"
    );
    let m = edge_metrics(1);
    assert!(
        m.contains("meridian_edge_anycast_announced{vip=\"198.18.0.10/32\"} 1"),
        "announce state on /metrics:\n{m}"
    );

    // The coordinator shows each edge's announce state (`meridian ctl edges`, the dashboard),
    // one heartbeat (1 s) behind the edge.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = lab(&["ctl", "edges", "--json"]);
        let edges: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ctl edges --json");
        let announced = edges
            .as_array()
            .expect("edge list")
            .iter()
            .filter(|e| e["info"]["anycast"]["announced"] == true)
            .count();
        if announced == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ctl edges shows every edge announced: {edges}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1. Many connections spread over the edges (L4 hashing on the router).
    let counts = spread(30, "spread");
    eprintln!("spread over edges 1/2/3: {:?}", &counts[1..]);
    assert!(
        counts[1..].iter().filter(|&&c| c > 0).count() >= 2,
        "30 connections should reach at least two edges: {counts:?}"
    );

    // 2. Drain: SIGTERM withdraws first; new flows go elsewhere; the in-flight request finishes.
    let mut inflight: Child = Command::new("ip")
        .args(curl_args(&["/", "/delay/2500"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(inflight.stdout.take().unwrap()));
    let first = lines.next().expect("first response").expect("read");
    let (status, drained) = parse_line(&first);
    assert_eq!(status, 200, "first request on the keep-alive connection");
    // The second request goes out on the same connection right after the first answer; give it
    // a moment to be in flight (it lasts 2.5 s) before the edge starts draining.
    std::thread::sleep(Duration::from_millis(300));
    signal(
        pid_of(&format!("e{drained}")),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert_withdrawn_within(drained, "drain (SIGTERM)");
    assert_routed_around(drained, "drain (SIGTERM)");
    let second = lines.next().expect("second response").expect("read");
    assert_eq!(
        parse_line(&second),
        (200, drained),
        "the in-flight request on the draining edge completes there"
    );
    let _ = inflight.wait();
    let pid = pid_of(&format!("e{drained}"));
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the drained edge did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab(&["edge", &drained.to_string(), "start"]);
    wait_all_three("restart after drain");

    // 3. kill -9 of an edge: its child BIRD dies with it and the session closes.
    let killed = drained % 3 + 1;
    meridian_tests::dev::kill9(pid_of(&format!("e{killed}")));
    assert_withdrawn_within(killed, "kill -9");
    assert_routed_around(killed, "kill -9");
    assert_eq!(
        edge_bird_pid(killed),
        None,
        "the killed edge's BIRD must not outlive it"
    );
    lab(&["edge", &killed.to_string(), "start"]);
    wait_all_three("restart after kill -9");

    // 4. A dropped link: the edge's BIRD cannot withdraw; the router notices on its own.
    let cut = killed % 3 + 1;
    let link = format!("rt-e{cut}");
    let ip_rt = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(["-n", "mer-rt", "link", "set", &link])
            .args(args)
            .status()
            .expect("ip link")
            .success();
        assert!(ok, "ip link set {link} {args:?}");
    };
    ip_rt(&["down"]);
    assert_withdrawn_within(cut, "link down");
    assert_routed_around(cut, "link down");
    ip_rt(&["up"]);
    wait_all_three("link back up");

    // 5. A silent failure (BIRD frozen: no withdraw, no session close): BFD must notice.
    let frozen = cut % 3 + 1;
    let bird = edge_bird_pid(frozen).expect("edge BIRD pid");
    signal(bird, nix::sys::signal::Signal::SIGSTOP);
    let took = wait_route(Duration::from_secs(5), |e| !e.contains(&frozen));
    signal(bird, nix::sys::signal::Signal::SIGCONT);
    let took = took.expect("a frozen edge BIRD never left the route");
    eprintln!("silent failure (BFD): edge {frozen} left the route after {took:?}");
    assert!(took <= WITHDRAW_LIMIT, "BFD took {took:?}");
    wait_all_three("BIRD resumed");

    // 6. Backends all unhealthy (the origin behind the only agent is down): every edge withdraws.
    lab(&["origin", "stop"]);
    let took = wait_route(Duration::from_secs(10), |e| e.is_empty());
    assert!(
        took.is_some(),
        "edges with no healthy backend must withdraw: {:?}",
        route_edges()
    );
    eprintln!("origin down: all edges withdrew after {took:?}");
    let m = edge_metrics(1);
    assert!(
        m.contains("meridian_edge_anycast_check{vip=\"198.18.0.10/32\",check=\"backends\"} 0")
            && m.contains("meridian_edge_anycast_announced{vip=\"198.18.0.10/32\"} 0"),
        "metrics show why:\n{m}"
    );
    lab(&["origin", "start"]);
    wait_all_three("origin back");
    let counts = spread(6, "after recovery");
    eprintln!("after recovery: {:?}", &counts[1..]);
    eprintln!("anycast_lab took {:?}", started.elapsed());
}

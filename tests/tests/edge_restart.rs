//! A restarted edge loses no connection attempt: a second edge process binds the same ports
//! (`SO_REUSEPORT`) while the first serves, then the first drains on SIGTERM, while wrk opens a
//! new connection for every request the whole time. With `net.ipv4.tcp_migrate_req = 1` (set in
//! the test's own network namespace, `edge-rs`) connections queued on the old listener move to
//! the new one. Both processes must have served, and wrk must report no socket error.
//!
//! Needs root (namespaces), iproute2, wrk and openssl; skips with the reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::dev::Proc;
use meridian_tests::{have_tool, meridian_bin, must, sh};

const NS: &str = "edge-rs";

/// The namespace (loopback only), removed however the test ends.
struct Netns;

impl Netns {
    fn create() -> Self {
        let _ = sh(&["ip", "netns", "del", NS]);
        must(&["ip", "netns", "add", NS]);
        let guard = Self;
        must(&["ip", "-n", NS, "link", "set", "lo", "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            NS,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_migrate_req=1",
        ]);
        guard
    }

    fn edge(&self, id: &str, dir: &Path) -> Proc {
        let arg = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        Proc(
            Command::new("ip")
                .args(["netns", "exec", NS])
                .arg(meridian_bin())
                .args(["edge", "--id", id, "--region", "rs"])
                .args(["--http-listen", "127.0.0.1:8080"])
                .args(["--tunnel-listen", "127.0.0.1:7443"])
                .args(["--tls-cert", &arg("cert.pem"), "--tls-key", &arg("key.pem")])
                // Nothing listens there: the edge serves without configuration (404/503 for
                // every request), which is all a connection attempt needs.
                .args(["--coordinator", "http://127.0.0.1:9"])
                .args(["--access-log", &arg(&format!("{id}.access"))])
                .args(["--drain-timeout", "2s"])
                .env("MERIDIAN_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{id}.log"))).unwrap())
                .spawn()
                .expect("spawn edge in namespace"),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", NS]);
    }
}

fn why_skip() -> Option<String> {
    if String::from_utf8_lossy(&sh(&["id", "-u"]).stdout).trim() != "0" {
        return Some("needs root for a network namespace".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("wrk", "wrk"), ("openssl", "openssl")] {
        if !have_tool(tool) {
            return Some(format!("needs {tool} (apt-get install {pkg})"));
        }
    }
    None
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn restart_with_reuseport_loses_no_connection_attempt() {
    if let Some(why) = why_skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    must(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edge.meridian.test",
        "-keyout",
        d.join("key.pem").to_str().unwrap(),
        "-out",
        d.join("cert.pem").to_str().unwrap(),
    ]);
    let ns = Netns::create();
    let ready = |id: &str| {
        std::fs::read_to_string(d.join(format!("{id}.log"))).is_ok_and(|s| s.contains("ready"))
    };

    let mut old = ns.edge("edge-old", d);
    wait_for(Duration::from_secs(30), "the old edge to be ready", || {
        ready("edge-old")
    });

    // A new TCP connection per request, for the whole restart.
    let wrk = Command::new("ip")
        .args(["netns", "exec", NS, "wrk", "-t1", "-c4", "-d12s"])
        .args(["-H", "Connection: close", "http://127.0.0.1:8080/"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wrk");
    let old_log = d.join("edge-old.access");
    let new_log = d.join("edge-new.access");
    wait_for(Duration::from_secs(10), "load on the old edge", || {
        lines(&old_log) >= 100
    });

    let _new = ns.edge("edge-new", d);
    wait_for(Duration::from_secs(30), "the new edge to be ready", || {
        ready("edge-new")
    });
    // Both processes share the port: the kernel spreads new connections over them.
    wait_for(
        Duration::from_secs(5),
        "the new edge to take connections",
        || lines(&new_log) >= 100,
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = old.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the old edge did not drain within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "old edge exited with {status}");
    let after_stop = lines(&new_log);
    wait_for(
        Duration::from_secs(5),
        "the new edge to carry on alone",
        || lines(&new_log) >= after_stop + 200,
    );

    let out = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {report}");
    let requests: u64 = report
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().unwrap())
        })
        .expect("wrk's request count");
    eprintln!(
        "{requests} requests, old edge served {}, new edge {}\n{report}",
        lines(&old_log),
        lines(&new_log)
    );
    assert!(
        !report.contains("Socket errors"),
        "connection attempts were lost during the restart:\n{report}"
    );
    assert!(
        requests > 1000,
        "too little load to mean anything: {requests} requests"
    );
}

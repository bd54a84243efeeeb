//! A real etcd cluster for tests: `members` `etcd` processes (Debian's etcd-server) on loopback
//! ports starting at `base_port`, data in a temporary directory, ready once every member's
//! `/health` says so. Killed and removed on drop. Std only, so other test crates can include it
//! with `#[path]`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to elect a leader and report healthy.
const READY_WITHIN: Duration = Duration::from_secs(20);

pub struct EtcdCluster {
    children: Vec<Child>,
    dir: PathBuf,
    /// Client URLs, one per member.
    pub endpoints: Vec<String>,
}

/// Whether the `etcd` binary is installed; prints why a test is skipped when not. Under CI
/// (which installs `.ci/packages`) a missing etcd is a failure, not a skip.
pub fn have_etcd(test: &str) -> bool {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: etcd is missing; .ci/run installs it from .ci/packages (etcd-server)"
        );
        eprintln!("SKIPPED {test}: `etcd` not found (apt-get install etcd-server)");
    }
    ok
}

impl EtcdCluster {
    /// Starts the cluster: member `i` serves clients on `base_port + 2i` and peers on
    /// `base_port + 2i + 1`, all on 127.0.0.1.
    pub fn start(name: &str, base_port: u16, members: u16) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("mrd-etcd-{name}-{}-{nanos}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client = |i: u16| format!("http://127.0.0.1:{}", base_port + 2 * i);
        let peer = |i: u16| format!("http://127.0.0.1:{}", base_port + 2 * i + 1);
        let initial: Vec<String> = (0..members).map(|i| format!("m{i}={}", peer(i))).collect();
        let initial = initial.join(",");
        let mut children = Vec::new();
        for i in 0..members {
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client(i)])
                .args(["--advertise-client-urls", &client(i)])
                .args(["--listen-peer-urls", &peer(i)])
                .args(["--initial-advertise-peer-urls", &peer(i)])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--initial-cluster-token",
                    &format!("{name}-{}", std::process::id()),
                ])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd");
            children.push(child);
        }
        let cluster = Self {
            children,
            dir,
            endpoints: (0..members).map(client).collect(),
        };
        cluster.wait_healthy();
        cluster
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        for ep in &self.endpoints {
            let addr = ep.trim_start_matches("http://");
            while !healthy(addr) {
                if Instant::now() > deadline {
                    let logs: String = (0..self.endpoints.len())
                        .map(|i| {
                            std::fs::read_to_string(self.dir.join(format!("m{i}.log")))
                                .unwrap_or_default()
                        })
                        .collect();
                    panic!("etcd member {ep} not healthy within {READY_WITHIN:?}; logs:\n{logs}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// GET /health answers `{"health":"true"}` once the member has a leader.
fn healthy(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

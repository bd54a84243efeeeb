//! `meridian dev` as a test fixture: started in a temp data dir, ready when it prints so.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// `meridian dev` binds fixed addresses, so only one may run at a time: a mutex within a test
/// binary, and a file lock across test binaries (nextest, or suites run side by side).
static DEV_LOCK: Mutex<()> = Mutex::new(());

fn machine_wide_lock() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("meridian-dev-network.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("lock file");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock")
}

pub struct DevNetwork {
    child: Child,
    pub data: tempfile::TempDir,
    _machine_lock: nix::fcntl::Flock<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

impl DevNetwork {
    /// Starts `meridian dev` and returns once it printed `meridian dev: ready`.
    pub fn start() -> Self {
        let guard = DEV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let machine_lock = machine_wide_lock();
        let data = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(data.path().join("dev.log")).expect("log file");
        let mut child = Command::new(crate::meridian_bin())
            .args(["dev", "--data-dir"])
            .arg(data.path())
            .env("MERIDIAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start meridian dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("meridian dev: ready") {
                    let _ = tx.send(());
                }
            }
        });
        let net = Self {
            child,
            data,
            _machine_lock: machine_lock,
            _guard: guard,
        };
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            panic!("meridian dev did not become ready; log:\n{}", net.log());
        }
        net
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.data.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    pub fn admin_token(&self) -> String {
        self.read("admin.token")
    }

    /// PID of one of dev's children (`agent`, `edge-iad`, …).
    pub fn pid(&self, child: &str) -> i32 {
        self.read(&format!("pids/{child}.pid"))
            .parse()
            .expect("pid file")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("dev.log")).unwrap_or_default()
    }

    /// Runs `meridian ctl ARGS --json` against this network and parses the output.
    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(crate::meridian_bin())
            .arg("ctl")
            .args(args)
            .arg("--json")
            .env("MERIDIAN_ADMIN_TOKEN", self.admin_token())
            .output()
            .expect("run meridian ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl --json prints JSON")
    }
}

impl DevNetwork {
    /// Sends Ctrl-C (SIGINT) and waits for `meridian dev` to exit; `None` if it did not within 20 s.
    pub fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for DevNetwork {
    fn drop(&mut self) {
        if self.interrupt().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills a process with SIGKILL, as a crash would.
pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
}

pub fn is_alive(pid: i32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
}

/// Starts a tunnel agent for `service` that dials the dev edges.
pub fn start_agent(
    net: &DevNetwork,
    token: &str,
    service: &str,
    to: &str,
    extra: &[&str],
) -> Child {
    Command::new(crate::meridian_bin())
        .args([
            "agent",
            "--edge",
            "127.0.0.11:7443,127.0.0.12:7443,127.0.0.13:7443",
            "--ca",
        ])
        .arg(net.ca())
        .args(["--service", service, "--to", to, "--regions", "3"])
        .args(extra)
        .env("MERIDIAN_AGENT_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent")
}

/// A child process killed and reaped when the guard drops, so a failing test leaves no process
/// behind holding ports or tunnel connections.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A demo app (`meridian demo-app`) on `listen` that names itself `name` on `/`.
pub fn demo_app(listen: &str, name: &str) -> Proc {
    Proc(
        Command::new(crate::meridian_bin())
            .args(["demo-app", "--listen", listen, "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-app"),
    )
}

/// A port free on `ip` for TCP (and for UDP too when `udp`), for suites that start their own
/// processes outside the dev network.
pub fn free_port(ip: &str, udp: bool) -> u16 {
    loop {
        let t = std::net::TcpListener::bind((ip, 0)).unwrap();
        let port = t.local_addr().unwrap().port();
        if !udp || std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// A standalone `meridian coordinator` on `listen`, keeping its state in `data`, with the given
/// admin and node tokens; killed when dropped.
pub fn coordinator(
    listen: std::net::SocketAddr,
    data: &std::path::Path,
    admin: &str,
    node: &str,
) -> Proc {
    Proc(
        Command::new(crate::meridian_bin())
            .args(["coordinator", "--listen", &listen.to_string(), "--data-dir"])
            .arg(data)
            .env("MERIDIAN_ADMIN_TOKEN", admin)
            .env("MERIDIAN_NODE_TOKEN", node)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start coordinator"),
    )
}

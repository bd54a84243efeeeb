//! Child processes of `meridian dev`: each role runs as its own `meridian <role>` process so it
//! can be killed, restarted and observed like on a real host, and all of them die with `dev`.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub(crate) struct Supervisor {
    exe: PathBuf,
    pid_dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Supervisor {
    pub(crate) fn new(pid_dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&pid_dir)?;
        let exe = std::env::current_exe().context("locating the meridian binary")?;
        Ok(Self {
            exe,
            pid_dir,
            children: Vec::new(),
        })
    }

    /// Starts `meridian <args>` with `env`, prefixing its log lines with `[name]`.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe; it allocates nothing and touches no locks.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        if let Some(pid) = child.id() {
            std::fs::write(self.pid_dir.join(format!("{name}.pid")), pid.to_string())?;
        }
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(name.to_owned(), BufReader::new(out)));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(name.to_owned(), BufReader::new(err)));
        }
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Resolves when any child exits, naming it; pending forever when there are none.
    pub(crate) async fn any_exited(
        &mut self,
    ) -> (String, std::io::Result<std::process::ExitStatus>) {
        if self.children.is_empty() {
            std::future::pending::<()>().await;
        }
        let waits = self.children.iter_mut().map(|(name, child)| {
            let name = name.clone();
            Box::pin(async move { (name, child.wait().await) })
        });
        let (result, index, _) = futures_util::future::select_all(waits).await;
        self.children.remove(index);
        result
    }

    /// SIGTERM in reverse start order (agents drain before edges, edges before the coordinator),
    /// then SIGKILL whatever is still running once `grace` has passed. `grace` bounds the whole
    /// shutdown, not each child: seven children each allowed the full grace in turn made one
    /// Ctrl-C take far longer than anyone waits for.
    pub(crate) async fn shutdown(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("[dev] {name} still running {grace:?} after Ctrl-C; killing it");
                    let _ = child.kill().await;
                }
            }
            let _ = std::fs::remove_file(self.pid_dir.join(format!("{name}.pid")));
        }
    }
}

async fn forward<R: tokio::io::AsyncBufRead + Unpin>(name: String, reader: R) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
    }
}

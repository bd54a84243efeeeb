//! The BIRD2 backend: toggles the protocol that originates the VIP over BIRD's control socket,
//! optionally running that BIRD as a child that cannot outlive the edge.
//!
//! Disabling the originating protocol (a `direct` or `static` one) withdraws the route in
//! milliseconds while the BGP session and its BFD stay up; dropping the session instead costs
//! the peer's reconnect back-off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{error, info, warn};

use super::birdc::{self, BirdError};
use super::{AnnounceError, Announcer};

/// Time one control-socket command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// How to reach (and optionally start) BIRD.
#[derive(Clone, Debug)]
pub struct BirdOptions {
    /// BIRD's control socket.
    pub socket: PathBuf,
    /// The protocol that originates the VIP (declared `disabled` in BIRD's config).
    pub protocol: String,
    /// Start `bird -f -c CONFIG -s SOCKET` as a child bound to this process's life.
    pub spawn: Option<SpawnOptions>,
}

/// A BIRD the edge runs itself.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    pub binary: PathBuf,
    pub config: PathBuf,
}

/// The BIRD2 [`Announcer`].
#[derive(Debug)]
pub struct Bird {
    socket: PathBuf,
    protocol: String,
    child: Option<Child>,
}

impl Bird {
    /// Validates the options and, with `spawn`, starts BIRD.
    pub fn start(opts: BirdOptions) -> Result<Self, AnnounceError> {
        birdc::check_name(&opts.protocol)?;
        let child = match &opts.spawn {
            Some(s) => Some(Child::spawn(&s.binary, &s.config, &opts.socket)?),
            None => {
                warn!(
                    socket = %opts.socket.display(),
                    "using an external BIRD: it keeps announcing if this edge is killed; prefer --bird-config (BIRD as a child that dies with the edge)"
                );
                None
            }
        };
        Ok(Self {
            socket: opts.socket,
            protocol: opts.protocol,
            child,
        })
    }
}

impl Announcer for Bird {
    async fn set(&mut self, announce: bool) -> Result<(), AnnounceError> {
        if let Some(c) = &self.child
            && c.exited.load(Ordering::Relaxed)
        {
            return Err(AnnounceError::Backend("the child BIRD exited".into()));
        }
        birdc::set_protocol(&self.socket, &self.protocol, announce, COMMAND_TIMEOUT).await?;
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            c.stop().await;
        }
    }

    fn describe(&self) -> String {
        format!(
            "BIRD protocol {} via {}{}",
            self.protocol,
            self.socket.display(),
            if self.child.is_some() { " (child)" } else { "" }
        )
    }
}

/// A BIRD process started with `setpriv --pdeathsig KILL`, so the kernel kills it the moment
/// the thread that started it dies — which is the whole edge on `kill -9`. Its BGP session then
/// closes and BFD goes silent, and the router drops the route: no blackhole for a dead edge.
///
/// The death signal is tied to the *thread* that forked, so a dedicated thread starts BIRD and
/// lives exactly as long as it (a tokio blocking thread could retire and take BIRD with it).
#[derive(Debug)]
struct Child {
    stop: Arc<AtomicBool>,
    exited: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Child {
    fn spawn(binary: &Path, config: &Path, socket: &Path) -> Result<Self, AnnounceError> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(binary)
            .arg("-f")
            .arg("-c")
            .arg(config)
            .arg("-s")
            .arg(socket)
            .stdin(Stdio::null());
        let stop = Arc::new(AtomicBool::new(false));
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (stop2, exited2) = (stop.clone(), exited.clone());
        let what = format!("{} -c {}", binary.display(), config.display());
        let thread = std::thread::Builder::new()
            .name("bird-child".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => {
                        let _ = tx.send(Ok(c.id()));
                        c
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) => {
                            if !stop2.load(Ordering::Relaxed) {
                                error!(%status, "the child BIRD exited; the VIP is no longer announced");
                            }
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            error!(error = %e, "cannot wait for the child BIRD");
                            break;
                        }
                    }
                    if stop2.load(Ordering::Relaxed) {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                exited2.store(true, Ordering::Relaxed);
            })
            .map_err(|e| AnnounceError::Backend(format!("cannot start a thread for BIRD: {e}")))?;
        match rx.recv() {
            Ok(Ok(pid)) => {
                info!(pid, bird = %what, "started BIRD (dies with this edge)");
                Ok(Self {
                    stop,
                    exited,
                    thread: Some(thread),
                })
            }
            Ok(Err(e)) => Err(AnnounceError::Backend(format!(
                "cannot start `setpriv --pdeathsig KILL -- {what}` (util-linux setpriv and bird2 needed): {e}"
            ))),
            Err(_) => Err(AnnounceError::Backend(
                "the BIRD starter thread ended early".into(),
            )),
        }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl From<BirdError> for AnnounceError {
    fn from(e: BirdError) -> Self {
        Self::Bird(e)
    }
}

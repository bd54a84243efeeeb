//! `meridian`: one binary for every role of the network, plus `dev` and `ctl`.

mod ctl;
mod demo_app;
mod dev;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

// mimalloc instead of glibc malloc: the allocator was ~11% of the edge's CPU per request in
// profiles (small, short-lived allocations freed on another task); see docs/benchmarks.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "meridian",
    version,
    about = "A self-hostable global edge network"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); also `RUST_LOG`. rustls logs a warning for every
    /// handshake a client gets slightly wrong (e.g. an IP address as SNI, which it then ignores):
    /// nothing an operator can act on, and a way for anyone to flood the edge's log.
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_LOG",
        default_value = "info,rustls=error"
    )]
    log: String,
    /// Async worker threads: 0 = one per core; 1 = a single-threaded event loop (no work
    /// stealing or cross-thread wake-ups: the analogue of nginx's `worker_processes 1` or
    /// HAProxy's `nbthread 1`, and what a process pinned to one core wants). Default: 1 for
    /// `agent` (a sidecar, see `Command::default_worker_threads`), one per core otherwise.
    #[arg(long, global = true, env = "MERIDIAN_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup and moved into the role: the size of the largest config does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane.
    Coordinator(coordinator::Config),
    /// Run an edge proxy.
    Edge(edge_proxy::Config),
    /// Run the authoritative GeoDNS server.
    Geodns(geodns::Config),
    /// Run a tunnel agent beside an app.
    Agent(tunnel_agent::Config),
    /// Run the demo app (an httpbin-like origin used by `dev` and the tests).
    DemoApp(demo_app::Config),
    /// Start a whole three-region network on this machine.
    Dev(dev::Config),
    /// Manage the network through the coordinator's API.
    Ctl(ctl::Args),
    /// GeoDNS tools.
    #[command(subcommand)]
    Dns(DnsCommand),
}

impl Cli {
    /// `--worker-threads`, else the role's default.
    fn threads(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(|| self.command.default_worker_threads())
    }
}

impl Command {
    /// Worker threads when `--worker-threads` is not given. The agent runs beside the app it
    /// serves and its QUIC connections are driven by one task each anyway: one thread cut its
    /// CPU per tunnelled request by a quarter (no cross-thread wake-ups), leaving the app's cores
    /// to the app. Roles that serve many clients use every core.
    fn default_worker_threads(&self) -> usize {
        match self {
            Self::Agent(_) => 1,
            _ => 0,
        }
    }
}

#[derive(Subcommand, Debug)]
enum DnsCommand {
    /// How an address maps to a region (prefix, database fields) and what it would be answered.
    Explain(geodns::ExplainArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(
        &cli.log,
        matches!(cli.command, Command::Ctl(_) | Command::Dns(_)),
    );
    let mut builder = match cli.threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meridian: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ctl(args) => ctl::run(args).await,
        Command::Dev(cfg) => dev::run(cfg).await,
        Command::Dns(DnsCommand::Explain(args)) => {
            print!("{}", geodns::explain(args).await?);
            Ok(())
        }
        role => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            match role {
                Command::Coordinator(cfg) => coordinator::run(cfg, shutdown).await?,
                Command::Edge(cfg) => edge_proxy::run(cfg, shutdown).await?,
                Command::Geodns(cfg) => geodns::run(cfg, shutdown).await?,
                Command::Agent(cfg) => tunnel_agent::run(cfg, shutdown).await?,
                Command::DemoApp(cfg) => demo_app::run(cfg, shutdown).await?,
                Command::Ctl(_) | Command::Dev(_) | Command::Dns(_) => {
                    unreachable!("handled above")
                }
            }
            Ok(())
        }
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM so every role drains the same way.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        shutdown.cancel();
    });
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without signal handlers we can still stop on Ctrl-C through tokio's portable path.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(filter: &str, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        if quiet {
            "warn".to_string()
        } else {
            filter.to_string()
        }
    });
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_defaults_to_one_worker_thread_and_the_flag_wins() {
        if std::env::var_os("MERIDIAN_WORKER_THREADS").is_some() {
            return; // the environment would override every default
        }
        // The agent's settings its config validation requires at parse time.
        let agent = [
            "agent",
            "--edge",
            "127.0.0.1:9",
            "--token",
            "t",
            "--service",
            "s",
            "--to",
            "http://127.0.0.1:9",
            "--ca",
            "/dev/null",
        ];
        let threads = |pre: &[&str], post: &[&str]| {
            let args = ["meridian"].iter().chain(pre).chain(&agent).chain(post);
            Cli::try_parse_from(args).map(|c| c.threads()).ok()
        };
        assert_eq!(threads(&[], &[]), Some(1));
        assert_eq!(threads(&["--worker-threads", "4"], &[]), Some(4));
        assert_eq!(threads(&[], &["--worker-threads", "0"]), Some(0));
        let demo = Cli::try_parse_from(["meridian", "demo-app"]).map(|c| c.threads());
        assert_eq!(demo.ok(), Some(0));
    }
}

//! Serves GeoDNS from a snapshot JSON file instead of a coordinator: what bench/dns.sh runs, so
//! the benchmark builds only this crate. Takes every `meridian geodns` flag plus `--snapshot`.
//!
//! `cargo run --release -p geodns --example serve_snapshot -- --snapshot S.json --listen ...`

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// A coordinator snapshot (the `snapshot.json` a GeoDNS node caches in --state-dir).
    #[arg(long)]
    snapshot: PathBuf,
    #[command(flatten)]
    config: geodns::Config,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber_init();
    let data = std::fs::read(&args.snapshot)?;
    let snap: coordinator_api::Snapshot = serde_json::from_slice(&data)?;
    let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(snap)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    geodns::serve(args.config, rx, shutdown).await?;
    Ok(())
}

/// No subscriber crate in this package: readiness is signalled by the bound port answering.
fn tracing_subscriber_init() {}

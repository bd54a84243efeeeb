//! JSON access log, off the hot path: requests push a record into a bounded channel with
//! `try_send` (dropping and counting when the writer falls behind), one task formats and writes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::Metrics;

/// Records buffered before new ones are dropped.
const QUEUE: usize = 8192;

/// One line of the access log.
#[derive(Debug, Serialize)]
pub(crate) struct Record {
    /// Unix milliseconds when the response head was sent.
    pub(crate) ts_ms: u64,
    pub(crate) client: String,
    pub(crate) proto: &'static str,
    pub(crate) method: String,
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) route: String,
    pub(crate) duration_us: u64,
    pub(crate) request_id: Option<String>,
}

/// The sending half handed to request handlers.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    tx: mpsc::Sender<Record>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    pub(crate) fn log(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.metrics
                .access_log_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens the destination (`-` = stdout) and spawns the writer; it ends when every sender is gone.
pub(crate) async fn start(
    dest: &PathBuf,
    metrics: Arc<Metrics>,
) -> std::io::Result<(AccessLog, tokio::task::JoinHandle<()>)> {
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if dest.as_os_str() == "-" {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dest)
                .await?,
        )
    };
    let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
    let task = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(r) = rx.recv().await {
            buf.clear();
            let mut next = Some(r);
            // Batch whatever is queued into one write.
            while let Some(r) = next {
                if serde_json::to_writer(&mut buf, &r).is_ok() {
                    buf.push(b'\n');
                }
                next = if buf.len() < 60 * 1024 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if let Err(e) = out.write_all(&buf).await {
                warn!(error = %e, "access log write failed");
            }
            let _ = out.flush().await;
        }
    });
    Ok((AccessLog { tx, metrics }, task))
}

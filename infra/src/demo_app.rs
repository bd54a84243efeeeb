//! An httpbin/whoami-like origin: what `meridian dev` puts behind the tunnel and what tests lean on.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{
        Path, State,
        ws::{WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use futures_util::{StreamExt, stream};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7781")]
    listen: SocketAddr,
    /// Instance name reported by `/`.
    #[arg(long, default_value = "demo")]
    name: String,
}

/// Largest body `/bytes/{n}` will produce: big enough for multi-GiB streaming tests, bounded anyway.
const MAX_BYTES: u64 = 16 << 30;
const MAX_STREAM_CHUNKS: u32 = 100_000;
const MAX_DELAY_MS: u64 = 60_000;
const CHUNK: usize = 64 * 1024;

pub(crate) async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, name = %cfg.name, "ready");
    axum::serve(listener, router(cfg.name))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

fn router(name: String) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/headers", any(headers))
        .route("/status/{code}", any(status))
        .route("/delay/{ms}", any(delay))
        .route("/bytes/{n}", get(bytes))
        .route("/stream/{n}", get(stream_chunks))
        .route("/upload", post(upload))
        .route("/ws", get(ws))
        .with_state(name)
}

async fn index(State(name): State<String>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "app": "meridian-demo", "instance": name }))
}

async fn headers(headers: HeaderMap) -> Json<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for (k, v) in &headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match map.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                map.insert(k.as_str().to_owned(), serde_json::Value::String(v));
            }
        }
    }
    Json(serde_json::json!({ "headers": map }))
}

async fn status(Path(code): Path<u16>) -> Response {
    match StatusCode::from_u16(code) {
        Ok(code) => (code, format!("status {}\n", code.as_u16())).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "status must be 100..=999\n").into_response(),
    }
}

async fn delay(Path(ms): Path<u64>) -> Response {
    if ms > MAX_DELAY_MS {
        return (
            StatusCode::BAD_REQUEST,
            format!("delay is at most {MAX_DELAY_MS} ms\n"),
        )
            .into_response();
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(serde_json::json!({ "delayed_ms": ms })).into_response()
}

/// `n` bytes of a repeating pattern, streamed in 64 KiB chunks so any size costs constant memory.
async fn bytes(Path(n): Path<u64>) -> Response {
    if n > MAX_BYTES {
        return (
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_BYTES} bytes\n"),
        )
            .into_response();
    }
    // Built once: per request it cost the origin more than proxying did, and the benchmarks put
    // the origin on the load generator's core.
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let pattern = PATTERN
        .get_or_init(|| Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
        .clone();
    let chunks = stream::unfold(n, move |left| {
        let pattern = pattern.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64);
            // `take` ≤ CHUNK, so the cast and the slice are in range.
            Some((
                Ok::<_, std::io::Error>(pattern.slice(..take as usize)),
                left - take,
            ))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, n)
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `n` newline-delimited JSON chunks, each flushed separately (chunked encoding).
async fn stream_chunks(Path(n): Path<u32>) -> Response {
    if n > MAX_STREAM_CHUNKS {
        return (
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_STREAM_CHUNKS} chunks\n"),
        )
            .into_response();
    }
    let chunks = stream::iter(0..n).then(|i| async move {
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(Bytes::from(format!("{{\"chunk\":{i}}}\n")))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Hashes the body as it streams in: uploads of any size cost constant memory.
async fn upload(body: Body) -> Response {
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(chunk) => {
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("body read failed: {e}\n"))
                    .into_response();
            }
        }
    }
    Json(serde_json::json!({ "bytes": n, "sha256": hex::encode(hasher.finalize()) }))
        .into_response()
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        if socket.send(msg).await.is_err() {
            break;
        }
    }
}

//! The local origin: one pooled HTTP/1.1 keep-alive client per agent, and the request body type
//! that streams tunnel `Data` frames into hyper through a bounded channel (backpressure reaches
//! the edge through QUIC flow control; nothing is buffered whole).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::Error;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// Body chunks in flight between the tunnel reader and hyper for one request.
pub(crate) const BODY_CHANNEL: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BodyError(pub(crate) String);

pub(crate) type BodyItem = Result<http_body::Frame<Bytes>, BodyError>;

/// Request body fed from the tunnel: an optional first frame, then whatever the channel yields.
/// The sender drops the channel after `End`; an `Err` item aborts the request.
#[derive(Debug)]
pub(crate) struct TunnelBody {
    first: Option<http_body::Frame<Bytes>>,
    rx: Option<mpsc::Receiver<BodyItem>>,
}

impl TunnelBody {
    pub(crate) fn empty() -> Self {
        Self {
            first: None,
            rx: None,
        }
    }

    pub(crate) fn channel(first: http_body::Frame<Bytes>) -> (Self, mpsc::Sender<BodyItem>) {
        let (tx, rx) = mpsc::channel(BODY_CHANNEL);
        (
            Self {
                first: Some(first),
                rx: Some(rx),
            },
            tx,
        )
    }
}

impl http_body::Body for TunnelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => {
                self.rx = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }
}

pub(crate) struct Origin {
    pub(crate) client: Client<HttpConnector, TunnelBody>,
    /// `http://authority[/path]` without a trailing slash.
    base: String,
    /// `host:port` for TCP health probes.
    authority: String,
    /// Path for HTTP health probes; `None`: a TCP connect is the probe.
    health_path: Option<String>,
}

impl Origin {
    pub(crate) fn new(to: &str, health_path: Option<String>) -> Result<Self, Error> {
        // `h2c://` is an origin speaking HTTP/2 without TLS (gRPC servers): prior knowledge.
        let (base, h2c) = match to.strip_prefix("h2c://") {
            Some(rest) => (parse_base(&format!("http://{rest}"))?, true),
            None => (parse_base(to)?, false),
        };
        let authority = base_authority(&base);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_only(h2c)
            .build(connector);
        if let Some(p) = &health_path {
            join(&base, p.as_bytes()).map_err(|e| Error::Config(format!("--health-path: {e}")))?;
        }
        Ok(Self {
            client,
            base,
            authority,
            health_path,
        })
    }

    /// One health probe: `GET --health-path` answering below 500, else a TCP connect.
    pub(crate) async fn probe(&self) -> bool {
        match &self.health_path {
            Some(path) => {
                let Ok(uri) = self.uri_for(path.as_bytes()) else {
                    return false;
                };
                let mut req = http::Request::new(TunnelBody::empty());
                *req.uri_mut() = uri;
                match self.client.request(req).await {
                    Ok(resp) => !resp.status().is_server_error(),
                    Err(_) => false,
                }
            }
            None => tokio::net::TcpStream::connect(self.authority.as_str())
                .await
                .is_ok(),
        }
    }

    /// `--to` base joined with the origin-form target from the request head.
    pub(crate) fn uri_for(&self, target: &[u8]) -> Result<Uri, String> {
        join(&self.base, target)
    }
}

fn parse_base(to: &str) -> Result<String, Error> {
    let uri: Uri = to
        .parse()
        .map_err(|e| Error::Config(format!("--to {to:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(Error::Config(format!(
            "--to {to:?}: only http:// origins are supported"
        )));
    }
    let Some(authority) = uri.authority() else {
        return Err(Error::Config(format!("--to {to:?}: missing host")));
    };
    if uri.query().is_some() {
        return Err(Error::Config(format!("--to {to:?}: must not have a query")));
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!("http://{authority}{path}"))
}

/// `host:port` of a base made by [`parse_base`] (port 80 when absent).
fn base_authority(base: &str) -> String {
    let rest = base.trim_start_matches("http://");
    let authority = rest.split('/').next().unwrap_or(rest);
    // A bracketed IPv6 host or a host without a colon has no explicit port.
    if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    }
}

fn join(base: &str, target: &[u8]) -> Result<Uri, String> {
    let target =
        std::str::from_utf8(target).map_err(|_| "request target is not UTF-8".to_owned())?;
    let mut s = String::with_capacity(base.len() + target.len() + 1);
    s.push_str(base);
    if !target.starts_with('/') {
        s.push('/');
    }
    s.push_str(target);
    Uri::try_from(s).map_err(|e| format!("invalid request target {target:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn base_parsing() {
        assert_eq!(
            parse_base("http://127.0.0.1:3000").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            parse_base("http://127.0.0.1:3000/").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(parse_base("http://app/api/").unwrap(), "http://app/api");
        assert!(parse_base("https://app").is_err());
        assert!(parse_base("127.0.0.1:3000").is_err());
        assert!(parse_base("http://app/?q=1").is_err());
    }

    #[test]
    fn authority() {
        assert_eq!(base_authority("http://127.0.0.1:3000"), "127.0.0.1:3000");
        assert_eq!(base_authority("http://app/api"), "app:80");
        assert_eq!(base_authority("http://[::1]:8080/x"), "[::1]:8080");
        assert_eq!(base_authority("http://[::1]"), "[::1]:80");
    }

    #[test]
    fn joining() {
        let base = "http://127.0.0.1:3000";
        assert_eq!(
            join(base, b"/a/b?c=d").unwrap().to_string(),
            "http://127.0.0.1:3000/a/b?c=d"
        );
        assert_eq!(
            join(base, b"").unwrap().to_string(),
            "http://127.0.0.1:3000/"
        );
        assert_eq!(
            join("http://h/api", b"/x").unwrap().to_string(),
            "http://h/api/x"
        );
        assert!(join(base, b"/a b").is_err());
        assert!(join(base, &[0xff]).is_err());
    }
}

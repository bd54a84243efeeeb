//! HTTP client of the coordinator API, used by edges, GeoDNS and `meridian ctl`.
//!
//! Every request carries the bearer token; unary calls are bounded by a 10 s timeout, the
//! watch stream only by a read timeout (the server sends progress lines every few seconds, so a
//! silent stream is a dead one).

use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::{
    AdminState, AgentView, ApiError, ApiTokenInfo, AuditEntry, CreateApiToken, CreateService,
    CreateToken, CreatedApiToken, CreatedToken, EdgeHeartbeat, EdgeStatus, Mount, Region, Revision,
    Service, SetAdminState, Snapshot, Status, TokenInfo, WatchAck, WatchEvent,
};

/// Longest NDJSON line the watch stream accepts; a full snapshot must fit in it.
pub const MAX_WATCH_LINE: usize = 16 * 1024 * 1024;
/// Largest non-streaming response body we read.
const MAX_BODY: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte for this long on a watch stream means the coordinator (or the path to it) is gone;
/// the server sends a progress line every 5 s.
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with a non-success status.
    #[error("coordinator answered {0}: {msg}", msg = display_api_error(.1))]
    Http(u16, ApiError),
    /// Connecting, sending or receiving failed (includes timeouts).
    #[error("transport: {0}")]
    Transport(String),
    /// The body was not what the API promises.
    #[error("decode: {0}")]
    Decode(String),
    /// A watch line or response body exceeded its limit.
    #[error("response too large: {0}")]
    TooLarge(String),
    /// Bad base URL or token given to [`Client::new`].
    #[error("invalid client configuration: {0}")]
    Config(String),
}

fn display_api_error(e: &ApiError) -> String {
    match &e.field {
        Some(f) => format!("{} (field {f})", e.error),
        None => e.error.clone(),
    }
}

impl ClientError {
    /// HTTP status when the coordinator answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http(s, _) => Some(*s),
            _ => None,
        }
    }
}

fn transport(e: reqwest::Error) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Cheap to clone: the connection pool is shared.
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    auth: HeaderValue,
    http: reqwest::Client,
    /// Separate client without an overall timeout, for the long-lived watch stream.
    stream_http: reqwest::Client,
}

impl Client {
    /// `base_url` like `http://127.0.0.1:7700`; `token` is the bare token (no `Bearer `).
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Result<Self, ClientError> {
        let mut base_s = base_url.into();
        if !base_s.ends_with('/') {
            base_s.push('/');
        }
        let base = Url::parse(&base_s)
            .map_err(|e| ClientError::Config(format!("base url {base_s:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Config(format!(
                "base url {base_s:?}: scheme must be http or https"
            )));
        }
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.into())).map_err(|_| {
                ClientError::Config("token contains characters not allowed in a header".into())
            })?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let stream_http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(WATCH_READ_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Self {
            base,
            auth,
            http,
            stream_http,
        })
    }

    /// The base URL this client talks to.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| ClientError::Config(format!("path {path:?}: {e}")))
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http
            .request(method, url)
            .header(AUTHORIZATION, self.auth.clone())
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, ClientError> {
        let resp = rb.send().await.map_err(transport)?;
        check_status(resp).await
    }

    async fn send_json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.send(rb).await?;
        let body = read_body(resp).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path)?;
        self.send_json(self.request(Method::GET, url)).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(path)?;
        self.send_json(self.request(Method::POST, url).json(body))
            .await
    }

    async fn delete(&self, url: Url) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, url)).await.map(drop)
    }

    /// Opens `GET /v1/watch`: a full snapshot first, then snapshots on change and progress lines.
    ///
    /// The stream ends (`None`) when the server closes it; callers reconnect.
    pub async fn watch(
        &self,
    ) -> Result<
        impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin + use<>,
        ClientError,
    > {
        self.watch_from(None).await
    }

    /// Like [`Self::watch`], resuming from the `(revision, observed_version)` the caller already
    /// holds: when nothing changed since, the first line is a progress line, not a snapshot.
    pub async fn watch_from(
        &self,
        have: Option<(Revision, u64)>,
    ) -> Result<
        impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin + use<>,
        ClientError,
    > {
        self.watch_stream(have, false).await
    }

    /// Like [`Self::watch_from`], asking for [`WatchEvent::Delta`] lines instead of a snapshot per
    /// change: the changes since `have` when the coordinator still has them in its change log
    /// (a snapshot otherwise), then one delta per change. The caller applies them with
    /// [`crate::delta::apply`] to the snapshot it holds.
    pub async fn watch_deltas(
        &self,
        have: Option<(Revision, u64)>,
    ) -> Result<
        impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin + use<>,
        ClientError,
    > {
        self.watch_stream(have, true).await
    }

    async fn watch_stream(
        &self,
        have: Option<(Revision, u64)>,
        deltas: bool,
    ) -> Result<BoxEventStream, ClientError> {
        let mut url = self.url("v1/watch")?;
        if let Some((revision, observed)) = have {
            url.query_pairs_mut()
                .append_pair("revision", &revision.to_string())
                .append_pair("observed_version", &observed.to_string());
        }
        if deltas {
            url.query_pairs_mut().append_pair("deltas", "true");
        }
        let rb = self
            .stream_http
            .get(url)
            .header(AUTHORIZATION, self.auth.clone());
        let resp = self.send(rb).await?;
        Ok(ndjson_events(resp.bytes_stream()))
    }

    /// `POST /v1/watch/ack`: report that a snapshot was applied (or refused).
    pub async fn ack(&self, ack: &WatchAck) -> Result<(), ClientError> {
        let url = self.url("v1/watch/ack")?;
        self.send(self.request(Method::POST, url).json(ack))
            .await
            .map(drop)
    }

    /// `POST /v1/edges/heartbeat`.
    pub async fn heartbeat(&self, hb: &EdgeHeartbeat) -> Result<(), ClientError> {
        let url = self.url("v1/edges/heartbeat")?;
        self.send(self.request(Method::POST, url).json(hb))
            .await
            .map(drop)
    }

    pub async fn snapshot(&self) -> Result<Snapshot, ClientError> {
        self.get("v1/snapshot").await
    }

    pub async fn create_service(&self, svc: &CreateService) -> Result<Service, ClientError> {
        self.post("v1/services", svc).await
    }

    /// `POST /v1/services` with a whole [`Service`] (origins, stickiness, health checks...).
    pub async fn create_service_spec(&self, svc: &Service) -> Result<Service, ClientError> {
        self.post("v1/services", svc).await
    }

    /// `PUT /v1/services/{name}`: replaces the whole service.
    pub async fn update_service(&self, svc: &Service) -> Result<Service, ClientError> {
        let mut url = self.url("v1/services")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Config("base url cannot have paths".into()))?
            .push(&svc.name);
        self.send_json(self.request(Method::PUT, url).json(svc))
            .await
    }

    pub async fn list_services(&self) -> Result<Vec<Service>, ClientError> {
        self.get("v1/services").await
    }

    pub async fn delete_service(&self, name: &str) -> Result<(), ClientError> {
        let mut url = self.url("v1/services")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Config("base url cannot have paths".into()))?
            .push(name);
        self.delete(url).await
    }

    pub async fn add_mount(&self, mount: &Mount) -> Result<Mount, ClientError> {
        self.post("v1/mounts", mount).await
    }

    /// `PUT /v1/mounts`: replaces the mount at `mount.host` + `mount.path_prefix`.
    pub async fn update_mount(&self, mount: &Mount) -> Result<Mount, ClientError> {
        let url = self.url("v1/mounts")?;
        self.send_json(self.request(Method::PUT, url).json(mount))
            .await
    }

    /// `POST /v1/dns/records`: creates or replaces the RRset (name, type); returns it normalised.
    pub async fn put_dns_record(
        &self,
        record: &crate::DnsRecord,
    ) -> Result<crate::DnsRecord, ClientError> {
        self.post("v1/dns/records", record).await
    }

    pub async fn list_dns_records(&self) -> Result<Vec<crate::DnsRecord>, ClientError> {
        self.get("v1/dns/records").await
    }

    pub async fn delete_dns_record(
        &self,
        name: &str,
        rtype: crate::DnsRecordType,
    ) -> Result<(), ClientError> {
        let mut url = self.url("v1/dns/records")?;
        url.query_pairs_mut()
            .append_pair("name", name)
            .append_pair("type", rtype.as_str());
        self.delete(url).await
    }

    pub async fn list_mounts(&self) -> Result<Vec<Mount>, ClientError> {
        self.get("v1/mounts").await
    }

    pub async fn delete_mount(&self, host: &str, path_prefix: &str) -> Result<(), ClientError> {
        let mut url = self.url("v1/mounts")?;
        url.query_pairs_mut()
            .append_pair("host", host)
            .append_pair("path_prefix", path_prefix);
        self.delete(url).await
    }

    /// Returns the token secret; it is shown only this once.
    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, ClientError> {
        self.post("v1/tokens", req).await
    }

    /// `POST /v1/agent/certificate`: a tunnel client certificate for the public key in
    /// `csr_pem` (PKCS#10). This client's token must be an agent token; the certificate names
    /// that token's service.
    pub async fn agent_certificate(
        &self,
        csr_pem: &str,
    ) -> Result<crate::types::AgentCertificate, ClientError> {
        let req = crate::types::AgentCertificateRequest {
            csr: csr_pem.to_owned(),
        };
        self.post("v1/agent/certificate", &req).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.get("v1/tokens").await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        let mut url = self.url("v1/tokens")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Config("base url cannot have paths".into()))?
            .push(id);
        self.delete(url).await
    }

    pub async fn create_region(&self, region: &Region) -> Result<Region, ClientError> {
        self.post("v1/regions", region).await
    }

    pub async fn list_regions(&self) -> Result<Vec<Region>, ClientError> {
        self.get("v1/regions").await
    }

    pub async fn list_edges(&self) -> Result<Vec<EdgeStatus>, ClientError> {
        self.get("v1/edges").await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentView>, ClientError> {
        self.get("v1/agents").await
    }

    /// `PUT /v1/regions/{name}/admin_state`: force a region up or down, or back to auto.
    pub async fn set_region_admin_state(
        &self,
        name: &str,
        state: AdminState,
    ) -> Result<Region, ClientError> {
        let mut url = self.url("v1/regions")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Config("base url cannot have paths".into()))?
            .push(name)
            .push("admin_state");
        self.send_json(
            self.request(Method::PUT, url)
                .json(&SetAdminState { state }),
        )
        .await
    }

    /// Returns the token secret; it is shown only this once.
    pub async fn create_api_token(
        &self,
        req: &CreateApiToken,
    ) -> Result<CreatedApiToken, ClientError> {
        self.post("v1/api-tokens", req).await
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenInfo>, ClientError> {
        self.get("v1/api-tokens").await
    }

    pub async fn revoke_api_token(&self, id: &str) -> Result<(), ClientError> {
        let mut url = self.url("v1/api-tokens")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Config("base url cannot have paths".into()))?
            .push(id);
        self.delete(url).await
    }

    /// Audit entries after id `after`, oldest first, at most `limit` (server caps at 1000).
    pub async fn list_audit(&self, after: u64, limit: u32) -> Result<Vec<AuditEntry>, ClientError> {
        let mut url = self.url("v1/audit")?;
        url.query_pairs_mut()
            .append_pair("after", &after.to_string())
            .append_pair("limit", &limit.to_string());
        self.send_json(self.request(Method::GET, url)).await
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("v1/status").await
    }
}

/// Turns a non-2xx response into [`ClientError::Http`], keeping the server's `ApiError` when
/// the body is one.
async fn check_status(resp: Response) -> Result<Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_body_limited(resp, 64 * 1024).await.unwrap_or_default();
    let err = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
        error: if body.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        },
        field: None,
    });
    Err(ClientError::Http(status.as_u16(), err))
}

async fn read_body(resp: Response) -> Result<Bytes, ClientError> {
    read_body_limited(resp, MAX_BODY).await
}

/// Reads a whole body, refusing one larger than `limit`.
async fn read_body_limited(resp: Response, limit: usize) -> Result<Bytes, ClientError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(ClientError::TooLarge(format!(
            "body larger than {limit} bytes"
        )));
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if buf.len() + chunk.len() > limit {
            return Err(ClientError::TooLarge(format!(
                "body larger than {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Sans-IO NDJSON framer: push bytes in, take complete lines out, with a bound on line length.
#[derive(Debug)]
pub struct LineSplitter {
    buf: BytesMut,
    max_line: usize,
    /// Bytes already scanned for a newline (so we never rescan a long partial line).
    scanned: usize,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_line,
            scanned: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its `\n` (and `\r`), `Ok(None)` when more input is needed,
    /// or an error once a line exceeds the bound.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, ClientError> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let end = self.scanned + pos;
                self.scanned = 0;
                if end > self.max_line {
                    return Err(self.too_long());
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line {
                    return Err(self.too_long());
                }
                Ok(None)
            }
        }
    }

    /// Bytes left without a terminating newline.
    pub fn remainder(&self) -> &[u8] {
        &self.buf
    }

    fn too_long(&mut self) -> ClientError {
        self.buf.clear();
        self.scanned = 0;
        ClientError::TooLarge(format!("watch line longer than {} bytes", self.max_line))
    }
}

type BoxEventStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, ClientError>> + Send>>;

/// Parses an NDJSON byte stream into watch events. Blank lines are skipped; the stream stops
/// after the first error (the caller reconnects).
fn ndjson_events<S>(bytes: S) -> BoxEventStream
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
{
    struct State<S> {
        bytes: Pin<Box<S>>,
        lines: LineSplitter,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        lines: LineSplitter::new(MAX_WATCH_LINE),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.lines.next_line() {
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Ok(Some(line)) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let ev = serde_json::from_slice::<WatchEvent>(&line)
                        .map_err(|e| ClientError::Decode(e.to_string()));
                    if ev.is_err() {
                        st.done = true;
                    }
                    return Some((ev, st));
                }
                Ok(None) => {}
            }
            match st.bytes.next().await {
                Some(Ok(mut chunk)) => {
                    while chunk.has_remaining() {
                        let c = chunk.chunk();
                        let n = c.len();
                        st.lines.push(c);
                        chunk.advance(n);
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(transport(e)), st));
                }
                None => {
                    st.done = true;
                    if st.lines.remainder().iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    return Some((
                        Err(ClientError::Decode("watch stream ended mid-line".into())),
                        st,
                    ));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_pushes() {
        let mut s = LineSplitter::new(100);
        s.push(b"ab");
        assert_eq!(s.next_line().unwrap(), None);
        s.push(b"c\r\nde\n\nf");
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"de"[..]));
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(s.next_line().unwrap(), None);
        assert_eq!(s.remainder(), b"f");
    }

    #[test]
    fn rejects_long_lines() {
        let mut s = LineSplitter::new(4);
        s.push(b"abcde");
        assert!(matches!(s.next_line(), Err(ClientError::TooLarge(_))));
        let mut s = LineSplitter::new(4);
        s.push(b"abcd\nabcdefg\n");
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"abcd"[..]));
        assert!(s.next_line().is_err());
    }

    #[test]
    fn new_validates_config() {
        assert!(Client::new("http://127.0.0.1:7700", "t").is_ok());
        assert!(Client::new("not a url", "t").is_err());
        assert!(Client::new("ftp://x", "t").is_err());
        assert!(Client::new("http://x", "bad\ntoken").is_err());
        let c = Client::new("http://h:1/prefix", "t").unwrap();
        assert_eq!(
            c.url("v1/watch").unwrap().as_str(),
            "http://h:1/prefix/v1/watch"
        );
    }

    #[tokio::test]
    async fn parses_ndjson_stream() {
        let snap = serde_json::to_string(&WatchEvent::Snapshot(Snapshot::default())).unwrap();
        let prog = serde_json::to_string(&WatchEvent::Progress {
            revision: 3,
            observed_version: 1,
        })
        .unwrap();
        let all = format!("{snap}\n{prog}\n");
        let (a, b) = all.as_bytes().split_at(7);
        let chunks: Vec<reqwest::Result<Bytes>> =
            vec![Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))];
        let mut ev = ndjson_events(futures_util::stream::iter(chunks));
        assert_eq!(
            ev.next().await.unwrap().unwrap(),
            WatchEvent::Snapshot(Snapshot::default())
        );
        assert_eq!(
            ev.next().await.unwrap().unwrap(),
            WatchEvent::Progress {
                revision: 3,
                observed_version: 1
            }
        );
        assert!(ev.next().await.is_none());

        let chunks: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from_static(b"{not json}\n"))];
        let mut ev = ndjson_events(futures_util::stream::iter(chunks));
        assert!(matches!(ev.next().await, Some(Err(ClientError::Decode(_)))));
        assert!(ev.next().await.is_none());
    }
}

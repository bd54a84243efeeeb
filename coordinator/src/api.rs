//! The HTTP API (axum): bearer auth by token hash, JSON bodies, NDJSON watch streams.
//!
//! Scope `admin` may call everything; scope `node` (edges, GeoDNS) only the watch, snapshot and
//! heartbeat routes. Every error body is an [`ApiError`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use coordinator_api::{
    AgentTokenRecord, ApiError, ApiTokenInfo, AuditEntry, CreateApiToken, CreateToken,
    CreatedApiToken, CreatedToken, EdgeHeartbeat, Mount, Region, Service, SetAdminState, Snapshot,
    Status, SubscriberState, TokenInfo, WatchAck, token,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::bootstrap::{MAX_TOKEN_LEN, new_secret, new_token_id};
use crate::hub::Hub;
use crate::observed::ObservedError;
use crate::resume;
use crate::store::{Scope, StoreError};
use coordinator_api::{Delta, ObservedState, delta};

/// Most audit entries one `GET /v1/audit` returns.
pub(crate) const MAX_AUDIT_PAGE: usize = 1000;
use crate::validate::{self, Invalid};

/// Largest request body accepted on any route.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Most concurrent watch streams; more get 503 so one misbehaving fleet cannot exhaust us.
pub(crate) const MAX_WATCHERS: usize = 4096;
/// A progress line goes out after this long without a snapshot line.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) hub: Arc<Hub>,
    /// Cancelled at shutdown so watch streams end and graceful shutdown can complete.
    pub(crate) shutdown: CancellationToken,
    pub(crate) watchers: Arc<Semaphore>,
    /// Quiet time before a progress line ([`PROGRESS_EVERY`]; shorter in tests).
    pub(crate) progress_every: Duration,
    /// Last ack/nack per subscriber, at most [`MAX_SUBSCRIBERS`].
    pub(crate) acks: Arc<std::sync::Mutex<std::collections::BTreeMap<String, SubscriberState>>>,
    /// The latest snapshot's watch line, shared by every stream.
    encoded: Arc<EncodedSnapshot>,
    /// The latest changes' delta lines, shared by every stream that asked for deltas.
    deltas: Arc<EncodedDeltas>,
}

/// Most subscribers whose acks we remember; the oldest is forgotten first.
pub(crate) const MAX_SUBSCRIBERS: usize = 10_000;

impl AppState {
    pub(crate) fn new(hub: Arc<Hub>, shutdown: CancellationToken) -> Self {
        Self {
            hub,
            shutdown,
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
            progress_every: PROGRESS_EVERY,
            acks: Arc::default(),
            encoded: Arc::default(),
            deltas: Arc::default(),
        }
    }
}

pub(crate) fn router(state: AppState) -> Router {
    let node = Router::new()
        .route("/v1/watch", get(watch_stream))
        .route("/v1/watch/ack", post(watch_ack))
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/edges/heartbeat", post(heartbeat))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_node));
    let admin = Router::new()
        .route("/v1/services", post(create_service).get(list_services))
        .route(
            "/v1/services/{name}",
            delete(delete_service).put(update_service),
        )
        .route(
            "/v1/mounts",
            post(add_mount)
                .get(list_mounts)
                .delete(delete_mount)
                .put(update_mount),
        )
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route(
            "/v1/api-tokens",
            post(create_api_token).get(list_api_tokens),
        )
        .route("/v1/api-tokens/{id}", delete(revoke_api_token))
        .route("/v1/regions", post(create_region).get(list_regions))
        .route("/v1/regions/{name}/admin_state", put(set_admin_state))
        .route("/v1/edges", get(list_edges))
        .route("/v1/agents", get(list_agents))
        .route("/v1/status", get(status))
        .route("/v1/audit", get(list_audit))
        .route(
            "/v1/dns/records",
            post(put_dns_record)
                .get(list_dns_records)
                .delete(delete_dns_record),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(crate::openapi::serve))
        // Authenticated by an agent token, not an API token: see `agent_certificate`.
        .route("/v1/agent/certificate", post(agent_certificate))
        .route("/", get(crate::dashboard::serve))
        .merge(node)
        .merge(admin)
        .fallback(|| async { ApiErr::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

// ---- errors ----

/// An error response: status plus an [`ApiError`] body.
#[derive(Debug)]
pub(crate) struct ApiErr {
    status: StatusCode,
    body: ApiError,
}

impl ApiErr {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                error: msg.into(),
                field: None,
            },
        }
    }

    fn field(status: StatusCode, msg: impl Into<String>, field: &str) -> Self {
        Self {
            status,
            body: ApiError {
                error: msg.into(),
                field: Some(field.to_owned()),
            },
        }
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<Invalid> for ApiErr {
    fn from(e: Invalid) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: e.into(),
        }
    }
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Duplicate { what: "mount", key } => Self::field(
                StatusCode::CONFLICT,
                format!(
                    "mount {key} already exists: an identical host and prefix would shadow it (remove it first)"
                ),
                "path_prefix",
            ),
            StoreError::Duplicate { what, .. } if matches!(*what, "service" | "region") => {
                Self::field(StatusCode::CONFLICT, e.to_string(), "name")
            }
            StoreError::Duplicate { .. } | StoreError::InUse(_) => {
                Self::new(StatusCode::CONFLICT, e.to_string())
            }
            StoreError::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::UnknownService(_) => {
                Self::field(StatusCode::UNPROCESSABLE_ENTITY, e.to_string(), "service")
            }
            StoreError::Conflict { field, message } => {
                Self::field(StatusCode::CONFLICT, message.clone(), field)
            }
            StoreError::SchemaTooNew { .. }
            | StoreError::Compacted { .. }
            | StoreError::Backend(_) => {
                error!(error = %e, "store error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal storage error")
            }
        }
    }
}

impl From<JsonRejection> for ApiErr {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiErr {
    fn from(r: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiErr>;

/// `Json<T>` whose rejections are [`ApiError`] bodies rather than plain text.
fn body<T>(r: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    r.map(|Json(v)| v).map_err(ApiErr::from)
}

// ---- auth ----

fn bearer(headers: &HeaderMap) -> Result<&str, ApiErr> {
    let unauthorized = |m: &str| ApiErr::new(StatusCode::UNAUTHORIZED, m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| unauthorized("expected Authorization: Bearer <token>"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized("expected Authorization: Bearer <token>"));
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(unauthorized("invalid token"));
    }
    Ok(token)
}

/// The authenticated API token of a request, for scope checks and the audit log.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    scope: Scope,
    token_id: String,
}

impl Caller {
    fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    let hash = token::sha256_hex(bearer(headers)?);
    let (scope, token_id) = state
        .hub
        .store()
        .call(move |s| s.api_token(&hash))
        .await?
        .ok_or_else(|| ApiErr::new(StatusCode::UNAUTHORIZED, "invalid token"))?;
    Ok(Caller { scope, token_id })
}

fn forbidden(scope: Scope) -> Response {
    ApiErr::new(
        StatusCode::FORBIDDEN,
        format!(
            "this token's scope ({}) does not allow this call",
            scope.as_str()
        ),
    )
    .into_response()
}

/// Whether `scope` may make a `method` call on a route group that needs `needed`.
fn allowed(scope: Scope, method: &Method, needed: Scope) -> bool {
    let read_only = matches!(*method, Method::GET | Method::HEAD);
    match (needed, scope) {
        (_, Scope::Admin) => true,
        // Node routes: watch and snapshot are reads anyone may make; heartbeats only nodes.
        (Scope::Node, Scope::Node) => true,
        (Scope::Node, Scope::Read) => read_only,
        (Scope::Admin | Scope::Read, Scope::Read) => read_only,
        (Scope::Admin | Scope::Read, Scope::Node) => false,
    }
}

async fn check(state: AppState, mut req: Request, next: Next, needed: Scope) -> Response {
    match authenticate(&state, req.headers()).await {
        Ok(caller) if allowed(caller.scope, req.method(), needed) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(caller) => forbidden(caller.scope),
        Err(e) => e.into_response(),
    }
}

async fn require_node(State(state): State<AppState>, req: Request, next: Next) -> Response {
    check(state, req, next, Scope::Node).await
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    check(state, req, next, Scope::Admin).await
}

// ---- services ----

async fn create_service(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<Service>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Service>)> {
    // A whole `Service` (a `CreateService` body is one with every other field defaulted).
    let svc = validate::service(&body(req)?)?;
    let s = svc.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |store| store.create_service(&s))
        .await?;
    st.hub.refresh_desired().await?;
    Ok((StatusCode::CREATED, Json(svc)))
}

/// `PUT /v1/services/{name}`: replaces the whole service (404 when there is none).
async fn update_service(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<Service>, JsonRejection>,
) -> ApiResult<Json<Service>> {
    let svc = validate::service(&body(req)?)?;
    if svc.name != name {
        return Err(ApiErr::field(
            StatusCode::BAD_REQUEST,
            format!(
                "body names service {:?} but the path names {name:?} (services cannot be renamed)",
                svc.name
            ),
            "name",
        ));
    }
    let s = svc.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |store| store.update_service(&s))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(Json(svc))
}

async fn list_services(State(st): State<AppState>) -> ApiResult<Json<Vec<Service>>> {
    Ok(Json(st.hub.store().call(|s| s.list_services()).await?))
}

async fn delete_service(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.delete_service(&name))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- GeoDNS zone records ----

/// `POST /v1/dns/records`: creates or replaces the RRset (name, type).
async fn put_dns_record(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<coordinator_api::DnsRecord>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<coordinator_api::DnsRecord>)> {
    let r = validate::dns_record(&body(req)?)?;
    let r2 = r.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.put_dns_record(&r2))
        .await?;
    st.hub.refresh_desired().await?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn list_dns_records(
    State(st): State<AppState>,
) -> ApiResult<Json<Vec<coordinator_api::DnsRecord>>> {
    Ok(Json(st.hub.store().call(|s| s.list_dns_records()).await?))
}

#[derive(Debug, Deserialize)]
struct DnsRecordKey {
    name: String,
    #[serde(rename = "type")]
    rtype: String,
}

/// `DELETE /v1/dns/records?name=N&type=T`.
async fn delete_dns_record(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    q: Result<Query<DnsRecordKey>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = q?;
    let name = coordinator_api::dns_name(&q.name)
        .map_err(|e| ApiErr::field(StatusCode::BAD_REQUEST, e, "name"))?;
    let rtype: coordinator_api::DnsRecordType = q
        .rtype
        .parse()
        .map_err(|e: String| ApiErr::field(StatusCode::BAD_REQUEST, e, "type"))?;
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.delete_dns_record(&name, rtype))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- mounts ----

async fn add_mount(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<Mount>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Mount>)> {
    let m = validate::mount(&body(req)?)?;
    let m2 = m.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.add_mount(&m2))
        .await?;
    st.hub.refresh_desired().await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// `PUT /v1/mounts`: replaces the mount at the body's host and prefix (404 when there is none).
async fn update_mount(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<Mount>, JsonRejection>,
) -> ApiResult<Json<Mount>> {
    let m = validate::mount(&body(req)?)?;
    let m2 = m.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.update_mount(&m2))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(Json(m))
}

async fn list_mounts(State(st): State<AppState>) -> ApiResult<Json<Vec<Mount>>> {
    Ok(Json(st.hub.store().call(|s| s.list_mounts()).await?))
}

#[derive(Debug, Deserialize)]
struct MountKey {
    host: String,
    path_prefix: String,
}

async fn delete_mount(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    q: Result<Query<MountKey>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = q?;
    // Normalise the same way as on insert, so `/api/` deletes the mount stored as `/api`.
    let host = validate::host(&q.host)?;
    let prefix = validate::path_prefix(&q.path_prefix)?;
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.delete_mount(&host, &prefix))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- agent tokens ----

async fn create_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<CreateToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let req = body(req)?;
    validate::name("service", &req.service)?;
    let id = new_token_id();
    let secret = token::format(token::AGENT, &id, &new_secret());
    let rec = AgentTokenRecord {
        id: id.clone(),
        service: req.service.clone(),
        sha256: token::sha256_hex(&secret),
        created_at_ms: crate::clock::unix_ms(),
    };
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.create_agent_token(&rec))
        .await?;
    st.hub.refresh_desired().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            service: req.service,
            token: secret,
        }),
    ))
}

async fn list_tokens(State(st): State<AppState>) -> ApiResult<Json<Vec<TokenInfo>>> {
    let tokens = st.hub.store().call(|s| s.list_agent_tokens()).await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| TokenInfo {
                id: t.id,
                service: t.service,
                created_at_ms: t.created_at_ms,
            })
            .collect(),
    ))
}

async fn revoke_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.revoke_agent_token(&id))
        .await?;
    st.hub.refresh_desired().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- agent certificates (optional tunnel mTLS) ----

/// `POST /v1/agent/certificate`: an agent holding a valid agent token gets a short-lived
/// client certificate for the token's service, for the public key in its CSR. Tokens are
/// checked against the published snapshot, so a revoked token gets 401 as soon as edges stop
/// accepting it.
async fn agent_certificate(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Result<Json<coordinator_api::AgentCertificateRequest>, JsonRejection>,
) -> ApiResult<Json<coordinator_api::AgentCertificate>> {
    let sha = token::sha256_hex(bearer(&headers)?);
    let snap = st.hub.current();
    let record = snap
        .agent_tokens
        .iter()
        .find(|t| t.sha256 == sha)
        .ok_or_else(|| ApiErr::new(StatusCode::UNAUTHORIZED, "invalid agent token"))?;
    let (token_id, service) = (record.id.clone(), record.service.clone());
    drop(snap);
    let req = body(req)?;
    let cert = st
        .hub
        .tunnel_ca()
        .issue(
            &req.csr,
            &service,
            std::time::SystemTime::now(),
            crate::pki::AGENT_CERT_VALIDITY,
        )
        .map_err(|e| match e {
            crate::pki::PkiError::Csr(_) => {
                ApiErr::field(StatusCode::BAD_REQUEST, e.to_string(), "csr")
            }
            other => {
                error!(error = %other, "issuing an agent certificate failed");
                ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        })?;
    tracing::info!(
        token_id,
        service,
        not_after_ms = cert.not_after_ms,
        "issued an agent tunnel certificate"
    );
    Ok(Json(cert))
}

// ---- regions ----

async fn create_region(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<Region>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Region>)> {
    let r = body(req)?;
    validate::name("name", &r.name)?;
    validate::coordinates(r.latitude, r.longitude)?;
    let r2 = r.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.create_region(&r2))
        .await?;
    st.hub.refresh_desired().await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// `PUT /v1/regions/{name}/admin_state`: force a region up or down, or back to `auto`.
async fn set_admin_state(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<SetAdminState>, JsonRejection>,
) -> ApiResult<Json<Region>> {
    let state = body(req)?.state;
    let n = name.clone();
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.set_region_admin_state(&n, state))
        .await?;
    st.hub.refresh_desired().await?;
    let region = st
        .hub
        .current()
        .regions
        .iter()
        .find(|r| r.name == name)
        .cloned()
        .ok_or_else(|| ApiErr::new(StatusCode::NOT_FOUND, format!("region {name:?} not found")))?;
    Ok(Json(region))
}

// ---- API tokens ----

async fn create_api_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<CreateApiToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedApiToken>)> {
    let req = body(req)?;
    validate::description("description", &req.description)?;
    let id = new_token_id();
    let secret = token::format(token::API, &id, &new_secret());
    let row = crate::store::ApiTokenRow {
        id: id.clone(),
        sha256: token::sha256_hex(&secret),
        scope: req.scope.into(),
        description: req.description,
        created_at_ms: crate::clock::unix_ms(),
    };
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.put_api_token(&row))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiToken {
            id,
            scope: req.scope,
            token: secret,
        }),
    ))
}

async fn list_api_tokens(State(st): State<AppState>) -> ApiResult<Json<Vec<ApiTokenInfo>>> {
    Ok(Json(st.hub.store().call(|s| s.list_api_tokens()).await?))
}

async fn revoke_api_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.hub
        .store()
        .call_as(who.actor(), move |s| s.revoke_api_token(&id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- audit and status ----

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_audit(
    State(st): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(MAX_AUDIT_PAGE).clamp(1, MAX_AUDIT_PAGE);
    Ok(Json(
        st.hub
            .store()
            .call(move |s| s.list_audit(q.after, limit))
            .await?,
    ))
}

async fn status(State(st): State<AppState>) -> Json<Status> {
    let snap = st.hub.current();
    let watchers = MAX_WATCHERS.saturating_sub(st.watchers.available_permits());
    Json(Status {
        revision: snap.revision,
        observed_version: snap.observed_version,
        uptime_ms: u64::try_from(st.hub.started().elapsed().as_millis()).unwrap_or(u64::MAX),
        backend: st.hub.store().backend().into(),
        watchers: watchers as u64,
        regions: snap.region_health.clone(),
        services: snap.services.len() as u64,
        mounts: snap.mounts.len() as u64,
        edges_alive: snap.edges.iter().filter(|e| e.alive).count() as u64,
        agents: snap
            .edges
            .iter()
            .filter(|e| e.alive)
            .map(|e| e.agents.len() as u64)
            .sum(),
        subscribers: st
            .acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect(),
    })
}

/// `POST /v1/watch/ack`: a subscriber applied (or refused) a snapshot.
async fn watch_ack(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: Result<Json<WatchAck>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let ack = body(req)?;
    validate::reported_id("subscriber", &ack.subscriber)?;
    // Bounded: a subscriber's error text is stored and shown, never trusted to be short.
    let error = ack.error.map(|e| e.chars().take(512).collect::<String>());
    if !ack.ok {
        warn!(subscriber = ack.subscriber, revision = ack.revision, error = ?error, "subscriber refused a snapshot");
    }
    let state = SubscriberState {
        subscriber: ack.subscriber.clone(),
        token_id: who.token_id,
        revision: ack.revision,
        observed_version: ack.observed_version,
        ok: ack.ok,
        error,
        at_ms: crate::clock::unix_ms(),
    };
    let mut acks = st
        .acks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !acks.contains_key(&ack.subscriber) && acks.len() >= MAX_SUBSCRIBERS {
        let oldest = acks
            .iter()
            .min_by_key(|(_, s)| s.at_ms)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            acks.remove(&k);
        }
    }
    acks.insert(ack.subscriber, state);
    Ok(StatusCode::NO_CONTENT)
}

async fn list_regions(State(st): State<AppState>) -> ApiResult<Json<Vec<Region>>> {
    Ok(Json(st.hub.store().call(|s| s.list_regions()).await?))
}

// ---- observed state ----

async fn list_edges(State(st): State<AppState>) -> Json<Vec<coordinator_api::EdgeStatus>> {
    Json(st.hub.edges())
}

async fn list_agents(State(st): State<AppState>) -> Json<Vec<coordinator_api::AgentView>> {
    Json(st.hub.agents())
}

fn validate_heartbeat(hb: &EdgeHeartbeat) -> Result<(), Invalid> {
    validate::reported_id("info.id", &hb.info.id)?;
    validate::reported_id("info.region", &hb.info.region)?;
    for a in &hb.agents {
        validate::reported_id("agents.agent_id", &a.agent_id)?;
        validate::reported_id("agents.service", &a.service)?;
        validate::reported_id("agents.token_id", &a.token_id)?;
        validate::reported_id("agents.remote_addr", &a.remote_addr)?;
    }
    Ok(())
}

async fn heartbeat(
    State(st): State<AppState>,
    req: Result<Json<EdgeHeartbeat>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let hb = body(req)?;
    validate_heartbeat(&hb)?;
    match st
        .hub
        .heartbeat(hb, Instant::now(), crate::clock::unix_ms())
    {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e @ ObservedError::TooManyEdges) => {
            Err(ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
    }
}

// ---- snapshot and watch ----

async fn snapshot(State(st): State<AppState>) -> Json<Snapshot> {
    Json(Snapshot::clone(&st.hub.current()))
}

/// Serialises like `WatchEvent` without cloning the snapshot.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WatchLine<'a> {
    Snapshot(&'a Snapshot),
    Progress {
        revision: u64,
        observed_version: u64,
    },
    Delta(&'a Delta),
}

fn ndjson(line: &WatchLine<'_>) -> Option<Bytes> {
    match serde_json::to_vec(line) {
        Ok(mut v) => {
            v.push(b'\n');
            Some(Bytes::from(v))
        }
        Err(e) => {
            error!(error = %e, "could not serialise a watch line; closing the stream");
            None
        }
    }
}

/// A change is serialised once, not once per subscriber: with a thousand watch streams that is
/// the difference between one encode and a thousand on every write. Keyed by the snapshot's
/// `Arc` (the cache holds a clone, so the address cannot be reused while cached); the lock is
/// held for one encode at most, never across `.await`.
#[derive(Debug, Default)]
struct EncodedSnapshot(std::sync::Mutex<Option<(Arc<Snapshot>, Bytes)>>);

impl EncodedSnapshot {
    fn line(&self, snap: &Arc<Snapshot>) -> Option<Bytes> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, line)) = cached.as_ref()
            && Arc::ptr_eq(s, snap)
        {
            return Some(line.clone());
        }
        let line = ndjson(&WatchLine::Snapshot(snap))?;
        *cached = Some((snap.clone(), line.clone()));
        Some(line)
    }
}

/// Delta lines for the live stream, computed and encoded once per change for every stream that
/// holds the same previous snapshot. A few entries, because streams that fell behind (the watch
/// channel coalesced changes for them) start from older snapshots. The lock is held for one
/// computation at most, never across `.await`.
#[derive(Debug, Default)]
struct EncodedDeltas {
    lines: std::sync::Mutex<std::collections::VecDeque<DeltaLine>>,
    /// [`delta::digest`] of the latest snapshot, for resumes (many at once after a restart).
    digest: std::sync::Mutex<Option<(Arc<Snapshot>, String)>>,
}

/// A cached delta line: (from, to, encoded line).
type DeltaLine = (Arc<Snapshot>, Arc<Snapshot>, Bytes);

/// Delta lines remembered per [`EncodedDeltas`].
const DELTA_CACHE: usize = 4;

impl EncodedDeltas {
    /// The line that takes a stream from `old` to `new`: a delta, or the snapshot when a delta
    /// cannot say it (a field [`delta::diff`] does not carry changed, caught by the digest).
    fn line(
        &self,
        old: &Arc<Snapshot>,
        new: &Arc<Snapshot>,
        full: &EncodedSnapshot,
    ) -> Option<Bytes> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, line)) = lines
            .iter()
            .find(|(o, n, _)| Arc::ptr_eq(o, old) && Arc::ptr_eq(n, new))
        {
            return Some(line.clone());
        }
        let mut d = delta::diff(old, new);
        d.digest = Some(self.digest(new));
        let line = match delta::apply(old, &d) {
            Ok(_) => ndjson(&WatchLine::Delta(&d))?,
            Err(e) => {
                tracing::debug!(error = %e, "change not expressible as a delta; sending a snapshot");
                full.line(new)?
            }
        };
        lines.push_back((old.clone(), new.clone(), line.clone()));
        if lines.len() > DELTA_CACHE {
            lines.pop_front();
        }
        Some(line)
    }

    fn digest(&self, snap: &Arc<Snapshot>) -> String {
        let mut cached = self.digest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, d)) = cached.as_ref()
            && Arc::ptr_eq(s, snap)
        {
            return d.clone();
        }
        let d = delta::digest(snap);
        *cached = Some((snap.clone(), d.clone()));
        d
    }
}

/// The first line for a subscriber that holds `from` and asked for deltas: the changes since
/// then from the change log, or `None` (send a snapshot) when the log no longer has them
/// (compacted), they are too many, or they include something deltas do not carry.
async fn resume_delta(st: &AppState, from: u64, current: &Arc<Snapshot>) -> Option<Bytes> {
    let to = current.revision;
    if from > to {
        return None;
    }
    let ops = if from == to {
        Vec::new()
    } else {
        let changes = match st
            .hub
            .store()
            .call(move |s| s.changes_since(from, resume::RESUME_MAX_CHANGES))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(from, error = %e, "no delta for this resume; sending a snapshot");
                return None;
            }
        };
        // The log must reach the snapshot's revision within one page.
        if changes.len() >= resume::RESUME_MAX_CHANGES || !changes.iter().any(|c| c.revision == to)
        {
            return None;
        }
        resume::ops_from_changes(&changes, to)?
    };
    let d = Delta {
        from_revision: from,
        revision: to,
        ops,
        observed: Some(ObservedState {
            observed_version: current.observed_version,
            edges: current.edges.clone(),
            region_health: current.region_health.clone(),
        }),
        digest: Some(st.deltas.digest(current)),
    };
    ndjson(&WatchLine::Delta(&d))
}

/// `?revision=&observed_version=`: what the subscriber already holds; `deltas=true` asks for
/// delta lines instead of a snapshot per change.
#[derive(Debug, Deserialize)]
struct WatchFrom {
    revision: Option<u64>,
    observed_version: Option<u64>,
    #[serde(default)]
    deltas: bool,
}

async fn watch_stream(
    State(st): State<AppState>,
    q: Result<Query<WatchFrom>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(from) = q?;
    let Ok(permit) = st.watchers.clone().try_acquire_owned() else {
        warn!(
            limit = MAX_WATCHERS,
            "refusing watch stream: too many watchers"
        );
        return Err(ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many watch streams",
        ));
    };
    let mut rx = st.hub.subscribe();
    // A subscriber that already holds the current state gets a progress line first, not the
    // whole snapshot again (reconnects after a coordinator restart cost one line).
    let current = rx.borrow_and_update().clone();
    let up_to_date = from.revision == Some(current.revision)
        && from.observed_version == Some(current.observed_version);
    let first = if up_to_date {
        First::Progress
    } else if let Some(rev) = from.revision.filter(|_| from.deltas) {
        match resume_delta(&st, rev, &current).await {
            Some(line) => First::Line(line),
            None => First::Snapshot,
        }
    } else {
        First::Snapshot
    };
    let stream = watch_lines(WatchState {
        rx,
        last: current,
        first: Some(first),
        deltas: from.deltas.then(|| st.deltas.clone()),
        shutdown: st.shutdown.clone(),
        progress_every: st.progress_every,
        encoded: st.encoded.clone(),
        _permit: permit,
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// What a watch stream sends first.
enum First {
    /// The current snapshot.
    Snapshot,
    /// The subscriber is up to date: a progress line.
    Progress,
    /// A resume delta ([`resume_delta`]).
    Line(Bytes),
}

struct WatchState {
    rx: watch::Receiver<Arc<Snapshot>>,
    /// The snapshot the subscriber holds once it has applied what this stream sent.
    last: Arc<Snapshot>,
    first: Option<First>,
    /// Set when the subscriber asked for deltas.
    deltas: Option<Arc<EncodedDeltas>>,
    shutdown: CancellationToken,
    progress_every: Duration,
    encoded: Arc<EncodedSnapshot>,
    _permit: OwnedSemaphorePermit,
}

/// The first line is the current snapshot (or a progress line, or a resume delta); then a
/// snapshot or delta line on every change (the watch channel coalesces, so a slow reader skips to
/// the latest rather than buffering, and its delta spans the skipped changes), and a progress
/// line after `progress_every` of quiet. Ends at shutdown.
fn watch_lines(
    state: WatchState,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            let line = match first {
                First::Snapshot => s.encoded.line(&s.last),
                First::Progress => ndjson(&WatchLine::Progress {
                    revision: s.last.revision,
                    observed_version: s.last.observed_version,
                }),
                First::Line(line) => Some(line),
            };
            return line.map(|b| (Ok(b), s));
        }
        let line = tokio::select! {
            () = s.shutdown.cancelled() => return None,
            r = tokio::time::timeout(s.progress_every, s.rx.changed()) => match r {
                Ok(Ok(())) => {
                    let snap = s.rx.borrow_and_update().clone();
                    let line = match &s.deltas {
                        Some(deltas) => deltas.line(&s.last, &snap, &s.encoded),
                        None => s.encoded.line(&snap),
                    };
                    s.last = snap;
                    line
                }
                // The hub is gone: the server is stopping.
                Ok(Err(_)) => return None,
                Err(_) => {
                    let snap = s.rx.borrow().clone();
                    ndjson(&WatchLine::Progress { revision: snap.revision, observed_version: snap.observed_version })
                }
            },
        };
        line.map(|b| (Ok(b), s))
    })
}

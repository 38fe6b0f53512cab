//! The API edge: HTTP/1.1 on the agent's Unix socket. Bodies and queries
//! parse strictly into the closed command set of [`kiln_core::api`]; every
//! [`AgentError`] kind maps to exactly one status.

use kiln_core::api::{
    AbortResponse, PromoteResponse, RemoveResponse, RollbackRequest, RollbackResponse,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Extension, Json};
use kiln_core::api::{ApplyRequest, ApplyResponse, ErrorBody, HistoryResponse, StatusResponse};
use kiln_core::api::{
    GcRequest, TokenCreateRequest, TokenCreateResponse, TokenListResponse, TokenRevokeResponse,
    WhoAmIResponse,
};
use kiln_core::auth::{Role, TokenName};
use kiln_core::event::Actor;
use kiln_core::spec::ServiceName;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::agent::{Agent, AgentError};
use crate::controller::ControllerError;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self {
            AgentError::BadRequest(_) | AgentError::DuplicateService(_) => StatusCode::BAD_REQUEST,
            AgentError::NoEndpoint
            | AgentError::NoService(_)
            | AgentError::NoInstance { .. }
            | AgentError::NoRelease { .. }
            | AgentError::ImageMissing { .. } => StatusCode::NOT_FOUND,
            AgentError::RolloutInProgress { .. } | AgentError::NoRollout { .. } => {
                StatusCode::CONFLICT
            }
            AgentError::Refused(e) => match e {
                ControllerError::State(_) => StatusCode::INTERNAL_SERVER_ERROR,
                ControllerError::NoService(_)
                | ControllerError::NoRelease { .. }
                | ControllerError::NoInstance { .. } => StatusCode::NOT_FOUND,
                ControllerError::Materialize { .. }
                | ControllerError::Unpacker(..)
                | ControllerError::Runtime(_)
                | ControllerError::Volume { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                ControllerError::Peers(_) => StatusCode::BAD_GATEWAY,
                ControllerError::User { .. }
                | ControllerError::Unreachable { .. }
                | ControllerError::ProcessNotAllowed { .. }
                | ControllerError::NotSelfContained { .. }
                | ControllerError::MissingSecret { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                ControllerError::NotWaitingForPromotion(_)
                | ControllerError::NotLeader { .. }
                | ControllerError::NothingToAbort { .. }
                | ControllerError::FirstRelease { .. } => StatusCode::CONFLICT,
            },
            AgentError::NoBubblewrap(_)
            | AgentError::OciUnavailable(_)
            | AgentError::ProcessNotAllowed(..)
            | AgentError::BadUser(..)
            | AgentError::Untrusted { .. }
            | AgentError::ImageNameMismatch { .. }
            | AgentError::Unpack { .. }
            | AgentError::NoCommand(_)
            | AgentError::NoSuchCommand { .. }
            | AgentError::Route(_)
            | AgentError::Listen(_)
            | AgentError::NothingToRollBackTo(_)
            | AgentError::AlreadyOn { .. }
            | AgentError::HookFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::TokenExists(_) => StatusCode::CONFLICT,
            AgentError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::Collect(_)
            | AgentError::Task(_)
            | AgentError::Signatures(..)
            | AgentError::Layers(..) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::NoToken(_) | AgentError::NoNode { .. } => StatusCode::NOT_FOUND,
            AgentError::NotInCluster(_) | AgentError::LastNode(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            // The cluster's state store is away: try again later.
            AgentError::State(crate::state::StateError::Cluster { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AgentError::State(
                crate::state::StateError::Conflict { .. } | crate::state::StateError::Fenced { .. },
            ) => StatusCode::CONFLICT,
            AgentError::Unpacker { .. } | AgentError::State(_) | AgentError::Random(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// The API on the Unix socket.
pub fn local_router(agent: Arc<Agent>) -> Router {
    router(agent).layer(axum::middleware::from_fn(local_caller))
}

/// Every endpoint, for whichever edge puts a [`Caller`] on the request.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/gc", post(collect))
        .route("/v1/metrics", get(metrics))
        .route("/v1/audit", get(audit))
        .route("/v1/drift", get(drift))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{name}/revoke", post(revoke_token))
        .route("/v1/apply", post(apply))
        .route("/v1/records", post(record))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/nodes/{name}/undrain", post(undrain))
        .route("/v1/services/{name}/history", get(history))
        .route("/v1/services/{name}/rollback", post(rollback))
        .route("/v1/services/{name}/promote", post(promote))
        .route("/v1/services/{name}/abort", post(abort))
        .route("/v1/services/{name}/pause", post(pause))
        .route("/v1/services/{name}/resume", post(resume))
        .route("/v1/services/{name}/remove", post(remove))
        .route("/v1/services/{name}/run", post(run_command))
        .route("/v1/instances/{id}/exec", post(exec_command))
        .route("/v1/logs", get(logs))
        .fallback(|| async { AgentError::NoEndpoint })
        .with_state(agent)
}

/// `GET /metrics` on `kiln serve --metrics ADDR`: Prometheus text format.
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Result<Response, AgentError> {
    let mut out = String::new();
    agent.render_metrics(&mut out).await?;
    Ok(([("content-type", "text/plain; version=0.0.4")], out).into_response())
}

/// `POST /v1/gc`: what was (or would be) freed.
async fn collect(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<GcRequest>, JsonRejection>,
) -> Result<Json<kiln_store::gc::GcReport>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(
        agent
            .collect(
                req.keep_releases,
                Duration::from_secs(req.grace_secs),
                req.dry_run,
            )
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
}

/// `GET /v1/audit?after=N`: the ledger, through the state store.
async fn audit(
    State(agent): State<Arc<Agent>>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<kiln_core::api::AuditResponse>, AgentError> {
    let Query(q) =
        q.map_err(|r| AgentError::BadRequest(format!("invalid query: {}", r.body_text())))?;
    let r = agent.audit(q.after).await?;
    Ok(Json(r))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriftQuery {
    service: Option<String>,
}

/// `GET /v1/drift[?service=NAME]`: what the drift detector watches and
/// found.
async fn drift(
    State(agent): State<Arc<Agent>>,
    q: Result<Query<DriftQuery>, QueryRejection>,
) -> Result<Json<kiln_core::api::DriftResponse>, AgentError> {
    let Query(q) =
        q.map_err(|r| AgentError::BadRequest(format!("invalid query: {}", r.body_text())))?;
    let service = match q.service {
        Some(s) => {
            let name = ServiceName::try_from(s.as_str()).map_err(AgentError::BadRequest)?;
            if !agent.knows(&name).await? {
                return Err(AgentError::NoService(name));
            }
            Some(name)
        }
        None => None,
    };
    Ok(Json(agent.drift(service.as_ref())))
}

/// `GET /v1/whoami`.
async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmIResponse> {
    Json(WhoAmIResponse {
        actor: caller.actor.to_string(),
        role: caller.role,
    })
}

/// `GET /v1/tokens`: every token's record (never a token).
async fn tokens(State(agent): State<Arc<Agent>>) -> Result<Json<TokenListResponse>, AgentError> {
    Ok(Json(TokenListResponse {
        tokens: agent.tokens().await?,
    }))
}

/// `POST /v1/tokens`: the token is in this answer and nowhere else.
async fn create_token(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TokenCreateRequest>, JsonRejection>,
) -> Result<Json<TokenCreateResponse>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(
        agent.create_token(&req, unix_now(), caller.actor).await?,
    ))
}

/// `POST /v1/tokens/{name}/revoke`.
async fn revoke_token(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<TokenRevokeResponse>, AgentError> {
    let name = TokenName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    agent.revoke_token(name, caller.actor).await?;
    Ok(Json(TokenRevokeResponse { name }))
}

/// Seconds since the epoch: the clock, read at the edge.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bad_json(r: JsonRejection) -> AgentError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return AgentError::TooLarge;
    }
    AgentError::BadRequest(format!("invalid request body: {}", r.body_text()))
}

/// Who is at the other end of an API connection: the uid the Unix
/// socket's peer credentials give. Every change a command makes is
/// recorded with it.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The token that authenticated a request on the TLS port (the dashboard
/// derives its anti-forgery value from it; a stream checks it again).
/// Never logged.
#[derive(Clone)]
pub(crate) struct Presented(pub String);

/// Who asks, as the edge that took the request established it: a local
/// user on the socket (who may do anything the socket's owner may), or a
/// token's name and role on the TLS port ([`crate::remote`]).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub actor: Actor,
    pub role: Role,
}

/// On the Unix socket, the caller is the peer's uid, with every role: the
/// socket is its owner's alone (0600).
async fn local_caller(
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(uid) = peer.uid else {
        return AgentError::BadRequest("the API socket gave no peer credentials".into())
            .into_response();
    };
    req.extensions_mut().insert(Caller {
        actor: Actor::Local { uid },
        role: Role::Admin,
    });
    next.run(req).await
}

/// `POST /v1/apply`: allowed any time but during shutdown.
async fn apply(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> Result<Json<ApplyResponse>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(agent.apply(req, caller.actor).await?))
}

/// `POST /v1/records`: a bake or pull the CLI made, for the ledger.
async fn record(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<kiln_core::api::RecordRequest>, JsonRejection>,
) -> Result<Json<kiln_core::api::RecordResponse>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    let seq = agent.record(req.change, caller.actor).await?;
    Ok(Json(kiln_core::api::RecordResponse { seq }))
}

/// `POST /v1/services/{name}/run` (`kiln run`): the command's output and
/// how it ended, one JSON object a line, as they come. The body is the
/// request (one JSON line), then, with `stdin`, the command's input.
async fn run_command(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Body,
) -> Result<Response, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    let (req, input) = first_line::<kiln_core::api::RunRequest>(body).await?;
    let input = req.stdin.then_some(input);
    let frames = agent
        .run_command(&name, req.release, req.argv, input, caller.actor)
        .await?;
    Ok(ndjson(frames))
}

/// `POST /v1/instances/{id}/exec` (`kiln exec`): as `run`, inside a running
/// instance; `keep` is an admin's.
async fn exec_command(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Result<Response, AgentError> {
    let (req, input) = first_line::<kiln_core::api::ExecRequest>(body).await?;
    if req.keep && caller.role < Role::Admin {
        return Err(AgentError::Forbidden(
            "kiln exec --keep needs admin (it leaves a changed instance running)".to_owned(),
        ));
    }
    let input = req.stdin.then_some(input);
    let frames = agent
        .exec_command(&id, req.argv, req.keep, input, caller.actor)
        .await?;
    Ok(ndjson(frames))
}

/// The longest request line of a `run` or `exec`.
const MAX_REQUEST_LINE: usize = 1 << 20;

/// A request whose body is one JSON line, then a stream (a command's
/// input): the request, and the rest as chunks, forwarded as they come
/// (the channel ends with the body).
async fn first_line<T: serde::de::DeserializeOwned>(
    body: Body,
) -> Result<(T, tokio::sync::mpsc::Receiver<Vec<u8>>), AgentError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut head: Vec<u8> = Vec::new();
    let rest = loop {
        if let Some(end) = head.iter().position(|b| *b == b'\n') {
            break head.split_off(end + 1);
        }
        if head.len() > MAX_REQUEST_LINE {
            return Err(AgentError::TooLarge);
        }
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(AgentError::BadRequest(format!("request body: {e}"))),
            None => break Vec::new(),
        }
    };
    let req: T = serde_json::from_slice(head.trim_ascii_end())
        .map_err(|e| AgentError::BadRequest(format!("invalid request: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    tokio::spawn(async move {
        if !rest.is_empty() && tx.send(rest).await.is_err() {
            return;
        }
        while let Some(Ok(chunk)) = stream.next().await {
            if tx.send(chunk.to_vec()).await.is_err() {
                return;
            }
        }
    });
    Ok((req, rx))
}

/// Frames as JSON lines, streamed as they come.
fn ndjson(frames: tokio::sync::mpsc::Receiver<kiln_core::api::RunFrame>) -> Response {
    let lines = futures_util::stream::unfold(frames, |mut rx| async move {
        let frame = rx.recv().await?;
        let mut line = serde_json::to_vec(&frame).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(line), rx))
    });
    (
        [("content-type", "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// `POST /v1/services/{name}/pause`: its new requests wait at the router
/// (at most the request's `timeout_ms`) until it is resumed.
async fn pause(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<kiln_core::api::PauseRequest>, JsonRejection>,
) -> Result<Json<kiln_core::api::PauseResponse>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    // 0: maintenance (every request answered 503 at once).
    if req.timeout_ms > MAX_PAUSE_MS {
        return Err(AgentError::BadRequest(format!(
            "a pause's timeout must be at most {}",
            humantime::format_duration(Duration::from_millis(MAX_PAUSE_MS))
        )));
    }
    Ok(Json(
        agent
            .pause(&name, Some(req.timeout_ms), caller.actor)
            .await?,
    ))
}

/// The longest a paused request may wait: a day.
const MAX_PAUSE_MS: u64 = 24 * 3600 * 1000;

/// `POST /v1/services/{name}/resume`: the requests waiting go on.
async fn resume(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<kiln_core::api::PauseResponse>, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.pause(&name, None, caller.actor).await?))
}

/// `POST /v1/nodes/{name}/drain`: the node takes no new instance and the
/// leader moves its instances to the others.
async fn drain(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<kiln_core::api::DrainResponse>, AgentError> {
    kiln_core::cluster::check_node_name(&name).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.drain(&name, true, caller.actor).await?))
}

/// `POST /v1/nodes/{name}/undrain`: the node takes new instances again.
async fn undrain(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<kiln_core::api::DrainResponse>, AgentError> {
    kiln_core::cluster::check_node_name(&name).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.drain(&name, false, caller.actor).await?))
}

/// `GET /v1/nodes`: the cluster's members.
async fn nodes(
    State(agent): State<Arc<Agent>>,
) -> Result<Json<kiln_core::api::NodesResponse>, AgentError> {
    Ok(Json(agent.nodes().await?))
}

/// `GET /v1/status`: always allowed.
async fn status(State(agent): State<Arc<Agent>>) -> Result<Json<StatusResponse>, AgentError> {
    Ok(Json(agent.status().await?))
}

/// `GET /v1/services/{name}/history`: always allowed.
async fn history(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<HistoryResponse>, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.history(&name).await?))
}

/// `POST /v1/services/{name}/rollback`: allowed any time but during shutdown.
async fn rollback(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RollbackRequest>, JsonRejection>,
) -> Result<Json<RollbackResponse>, AgentError> {
    let Json(req) = body.map_err(bad_json)?;
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.rollback(&name, req.to, caller.actor).await?))
}

/// `POST /v1/services/{name}/promote`: allowed while a blue-green rollout
/// waits for it or a canary runs (else 409).
async fn promote(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<PromoteResponse>, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    let (revision, canary_step) = agent.promote(&name, caller.actor).await?;
    Ok(Json(PromoteResponse {
        revision,
        canary_step,
    }))
}

/// `POST /v1/services/{name}/abort`: allowed while a rollout is in
/// progress and a release before it exists (else 409).
async fn abort(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<AbortResponse>, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.abort(&name, caller.actor).await?))
}

/// `POST /v1/services/{name}/remove`: allowed any time but during
/// shutdown; answers once every instance has stopped.
async fn remove(
    State(agent): State<Arc<Agent>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<RemoveResponse>, AgentError> {
    let name = ServiceName::try_from(name.as_str()).map_err(AgentError::BadRequest)?;
    Ok(Json(agent.remove(&name, caller.actor).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    service: String,
    release: Option<u64>,
    instance: Option<String>,
    #[serde(default)]
    follow: bool,
    /// Only lines made at or after this time (RFC 3339).
    since: Option<String>,
    /// Only the last lines of each instance's log, this many.
    tail: Option<usize>,
    /// Only the release tasks' logs (`NAME-rREV-hook-HOOK`).
    #[serde(default)]
    hook: bool,
}

/// `GET /v1/logs`: the matching instances' logs, oldest instance first,
/// each line prefixed with its instance id; `follow` keeps streaming.
async fn logs(
    State(agent): State<Arc<Agent>>,
    presented: Option<axum::Extension<Presented>>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, AgentError> {
    // Over TLS, the token that opened the stream is checked again before
    // each chunk: a revoked token's `-f` ends.
    let token = presented.map(|axum::Extension(p)| p.0);
    let Query(q) =
        q.map_err(|r| AgentError::BadRequest(format!("invalid query: {}", r.body_text())))?;
    let service = ServiceName::try_from(q.service.as_str()).map_err(AgentError::BadRequest)?;
    if !agent.knows(&service).await? {
        return Err(AgentError::NoService(service));
    }
    let dir = agent.home().join("logs").join(service.as_str());
    // A release or instance that never was is an error naming it, not an
    // empty log.
    if let Some(r) = q.release {
        let releases = agent.history(&service).await?.releases;
        let latest = releases.iter().map(|r| r.revision).max().unwrap_or(0);
        if !releases.iter().any(|x| x.revision == r) {
            return Err(AgentError::NoRelease {
                service,
                revision: r,
                latest,
            });
        }
    }
    if let Some(want) = q.instance.as_deref() {
        let want = want.to_owned();
        if log_files(&dir, &|id: &str| id == want).await.is_empty() {
            return Err(AgentError::NoInstance {
                service,
                instance: want,
            });
        }
    }
    let filter = move |id: &str| {
        (!q.hook || id.contains("-hook-"))
            && q.instance.as_deref().is_none_or(|want| want == id)
            && q.release
                .is_none_or(|r| id.starts_with(&format!("{service}-r{r}-")))
    };
    // Normalized to the stamps' own form, so that a comparison of text is
    // one of times.
    let since = match &q.since {
        Some(t) => Some(
            humantime::parse_rfc3339_weak(t)
                .map(|t| humantime::format_rfc3339_millis(t).to_string())
                .map_err(|_| {
                    AgentError::BadRequest(format!("since: `{t}` is not a time (RFC 3339)"))
                })?,
        ),
        None => None,
    };
    let tail = q.tail;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    let follow = q.follow;
    tokio::spawn(async move {
        let mut offsets: BTreeMap<PathBuf, u64> = BTreeMap::new();
        loop {
            for (id, path) in log_files(&dir, &filter).await {
                let first = !offsets.contains_key(&path);
                let offset = offsets.entry(path.clone()).or_insert(0);
                let Ok(mut chunk) = read_from(&path, offset).await else {
                    continue;
                };
                // What was kept before the request: only what it asks for.
                if first {
                    chunk = kiln_core::logs::select(&chunk, since.as_deref(), tail);
                }
                if chunk.is_empty() {
                    continue;
                }
                if let Some(t) = &token
                    && agent.authenticate(t, unix_now()).await.is_err()
                {
                    return;
                }
                let mut out = Vec::with_capacity(chunk.len() + 64);
                for line in chunk.split_inclusive(|b| *b == b'\n') {
                    out.extend_from_slice(id.as_bytes());
                    out.extend_from_slice(b" | ");
                    out.extend_from_slice(line);
                }
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
            if !follow || tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "text/plain; charset=utf-8")], body).into_response())
}

/// `(instance id, path)` of the log files in `dir` that pass `filter`,
/// oldest first.
async fn log_files(dir: &Path, filter: &impl Fn(&str) -> bool) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return Vec::new();
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".log") else {
            continue;
        };
        if filter(id) {
            let modified = e
                .metadata()
                .await
                .ok()
                .and_then(|m| m.created().or_else(|_| m.modified()).ok());
            out.push((modified, id.to_owned(), e.path()));
        }
    }
    out.sort();
    out.into_iter().map(|(_, id, p)| (id, p)).collect()
}

/// Complete lines of `path` from `offset` on; advances `offset`.
async fn read_from(path: &Path, offset: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    if len < *offset {
        *offset = 0; // rotated
    }
    f.seek(std::io::SeekFrom::Start(*offset)).await?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).await?;
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    buf.truncate(complete);
    *offset += complete as u64;
    Ok(buf)
}

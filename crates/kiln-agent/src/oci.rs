//! The agent's store as an OCI distribution endpoint, on the API's TLS
//! port and behind its tokens (`/v2/`: reads for viewers, uploads for
//! deployers): `kiln apply --agent URL` uploads the blobs the agent lacks
//! through it, and `docker pull` / `skopeo` read from it.
//!
//! Everything a client sends is hostile: names, tags and digests are
//! parsed strictly; a blob is kept only once its bytes hash to the digest
//! it was uploaded as (verified as it streams, written to `tmp/` until
//! then); a manifest is at most 4 MiB, must hash to the digest it is put
//! under, and may only reference blobs the store has. Nothing is deleted
//! through this endpoint.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::StreamExt;
use kiln_core::Digest;
use kiln_core::oci::{Descriptor, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST};
use kiln_core::reference::{ImageName, ImageRef, Tag};
use kiln_store::Store;
use kiln_store::registry::{MAX_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST};
use kiln_store::store::BlobWriter;
use serde::Deserialize;

use crate::agent::Agent;

/// Upload sessions open at once; more are refused (429) until one ends
/// or expires.
const MAX_UPLOADS: usize = 64;
/// An upload session nobody touched for this long is dropped (its bytes
/// in `tmp/` with it): abandoned sessions cannot hold every slot.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// An upload in progress: its bytes so far, who opened it (only they may
/// go on with it), and when it was last written.
struct Upload {
    writer: BlobWriter,
    owner: String,
    touched: std::time::Instant,
}

struct Oci {
    store: Store,
    uploads: Mutex<HashMap<String, Upload>>,
}

/// Who is calling, as the gate authenticated them (`token:NAME`; the
/// socket's `uid:N`).
fn owner_of(caller: &Option<axum::Extension<crate::api::Caller>>) -> String {
    caller
        .as_ref()
        .map(|axum::Extension(c)| c.actor.to_string())
        .unwrap_or_default()
}

pub fn router(agent: Arc<Agent>) -> Router {
    let oci = Arc::new(Oci {
        store: agent.store().clone(),
        uploads: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/v2/", get(ping))
        .route("/v2/{name}/tags/list", get(tags))
        .route("/v2/{name}/blobs/{digest}", get(blob))
        .route("/v2/{name}/blobs/uploads/", post(start_upload))
        .route(
            "/v2/{name}/blobs/uploads/{id}",
            put(finish_upload).patch(append_upload),
        )
        .route(
            "/v2/{name}/manifests/{reference}",
            get(manifest).put(put_manifest),
        )
        .with_state(oci)
}

/// The read side only (ping, tags, manifests, blobs): what the other
/// members of a cluster pull from ([`crate::peers`]).
pub fn read_router(store: Store) -> Router {
    let oci = Arc::new(Oci {
        store,
        uploads: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/v2/", get(ping))
        .route("/v2/{name}/tags/list", get(tags))
        .route("/v2/{name}/blobs/{digest}", get(blob))
        .route("/v2/{name}/manifests/{reference}", get(manifest))
        .with_state(oci)
}

/// A refusal, as the distribution spec words it:
/// `{"errors":[{"code","message"}]}`.
#[derive(Debug)]
struct OciError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn oci_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> OciError {
    OciError {
        status,
        code,
        message: message.into(),
    }
}

impl IntoResponse for OciError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message }]
        });
        (self.status, axum::Json(body)).into_response()
    }
}

type Answer = Result<Response, OciError>;

fn name_of(name: &str) -> Result<ImageName, OciError> {
    ImageName::try_from(name)
        .map_err(|e| oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string()))
}

fn digest_of(d: &str) -> Result<Digest, OciError> {
    d.parse::<Digest>()
        .map_err(|e| oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> OciError {
    tracing::error!("OCI endpoint: {e}");
    oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
}

async fn ping() -> Response {
    (
        [("docker-distribution-api-version", "registry/2.0")],
        axum::Json(serde_json::json!({})),
    )
        .into_response()
}

/// `GET /v2/NAME/tags/list`: the store's tags of NAME.
async fn tags(State(oci): State<Arc<Oci>>, Path(name): Path<String>) -> Answer {
    let name = name_of(&name)?;
    let mut tags: Vec<String> = oci
        .store
        .images()
        .map_err(internal)?
        .into_iter()
        .filter(|r| r.name == name)
        .flat_map(|r| r.tags.into_iter().map(|t| t.to_string()))
        .collect();
    if tags.is_empty() {
        return Err(oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no image named {name}"),
        ));
    }
    tags.sort();
    Ok(axum::Json(serde_json::json!({ "name": name.as_str(), "tags": tags })).into_response())
}

/// `GET`/`HEAD /v2/NAME/blobs/DIGEST`: streamed from the store.
async fn blob(
    State(oci): State<Arc<Oci>>,
    method: axum::http::Method,
    Path((name, digest)): Path<(String, String)>,
) -> Answer {
    name_of(&name)?;
    let digest = digest_of(&digest)?;
    let file = oci.store.open_blob(&digest).map_err(|_| {
        oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("no blob {digest}"),
        )
    })?;
    let len = file.metadata().map_err(internal)?.len();
    let headers = [
        (header::CONTENT_LENGTH, len.to_string()),
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (DIGEST_HEADER, digest.to_string()),
    ];
    if method == axum::http::Method::HEAD {
        return Ok((headers, Body::empty()).into_response());
    }
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((headers, Body::from_stream(stream)).into_response())
}

const DIGEST_HEADER: header::HeaderName = header::HeaderName::from_static("docker-content-digest");

#[derive(Deserialize)]
struct UploadQuery {
    digest: Option<String>,
    mount: Option<String>,
}

fn upload_location(name: &str, id: &str, size: u64) -> Response {
    (
        StatusCode::ACCEPTED,
        [
            (header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}")),
            (header::RANGE, format!("0-{}", size.saturating_sub(1))),
            (
                header::HeaderName::from_static("docker-upload-uuid"),
                id.to_owned(),
            ),
        ],
    )
        .into_response()
}

fn created(name: &str, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v2/{name}/blobs/{digest}")),
            (DIGEST_HEADER, digest.to_string()),
        ],
    )
        .into_response()
}

/// `POST /v2/NAME/blobs/uploads/`: a monolithic upload (`?digest=`, the
/// body is the blob), a mount (`?mount=`: one store holds every
/// repository's blobs, so a blob it has is mounted), or a session.
async fn start_upload(
    State(oci): State<Arc<Oci>>,
    caller: Option<axum::Extension<crate::api::Caller>>,
    Path(name): Path<String>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Answer {
    name_of(&name)?;
    if let Some(m) = &q.mount {
        let d = digest_of(m)?;
        if oci.store.has_blob(&d) {
            return Ok(created(&name, &d));
        }
    }
    let writer = oci.store.blob_writer().map_err(internal)?;
    if let Some(d) = &q.digest {
        let want = digest_of(d)?;
        let writer = write_body(writer, body).await?;
        return commit(&oci.store, writer, &want, &name);
    }
    let mut uploads = lock(&oci.uploads);
    let now = std::time::Instant::now();
    uploads.retain(|_, u| now.duration_since(u.touched) < UPLOAD_IDLE);
    if uploads.len() >= MAX_UPLOADS {
        return Err(oci_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            "too many uploads in progress",
        ));
    }
    let id = upload_id();
    uploads.insert(
        id.clone(),
        Upload {
            writer,
            owner: owner_of(&caller),
            touched: now,
        },
    );
    Ok(upload_location(&name, &id, 0))
}

/// The session `id`, if `owner` opened it and it has not expired: another
/// token cannot write into (or finish) someone else's upload.
fn take_upload(
    oci: &Oci,
    id: &str,
    owner: &str,
    now: std::time::Instant,
) -> Result<BlobWriter, OciError> {
    let unknown = || {
        oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            "no such upload",
        )
    };
    let mut uploads = lock(&oci.uploads);
    match uploads.get(id) {
        Some(u) if u.owner == owner && now.saturating_duration_since(u.touched) < UPLOAD_IDLE => {}
        _ => return Err(unknown()),
    }
    uploads.remove(id).map(|u| u.writer).ok_or_else(unknown)
}

/// `PATCH /v2/NAME/blobs/uploads/ID`: a chunk, appended.
async fn append_upload(
    State(oci): State<Arc<Oci>>,
    caller: Option<axum::Extension<crate::api::Caller>>,
    Path((name, id)): Path<(String, String)>,
    body: Body,
) -> Answer {
    let owner = owner_of(&caller);
    let writer = write_body(
        take_upload(&oci, &id, &owner, std::time::Instant::now())?,
        body,
    )
    .await?;
    let size = writer.written();
    lock(&oci.uploads).insert(
        id.clone(),
        Upload {
            writer,
            owner,
            touched: std::time::Instant::now(),
        },
    );
    Ok(upload_location(&name, &id, size))
}

/// `PUT /v2/NAME/blobs/uploads/ID?digest=D`: the last bytes (if any), then
/// the blob is kept if it hashes to D; the session ends either way.
async fn finish_upload(
    State(oci): State<Arc<Oci>>,
    caller: Option<axum::Extension<crate::api::Caller>>,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Answer {
    let writer = take_upload(&oci, &id, &owner_of(&caller), std::time::Instant::now())?;
    let want = digest_of(
        q.digest
            .as_deref()
            .ok_or_else(|| oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "no ?digest="))?,
    )?;
    let writer = write_body(writer, body).await?;
    commit(&oci.store, writer, &want, &name)
}

/// Keep the blob if it is what the client said it is; else nothing stays.
fn commit(store: &Store, writer: BlobWriter, want: &Digest, name: &str) -> Answer {
    let pending = writer.finish().map_err(internal)?;
    if &pending.digest != want {
        return Err(oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!(
                "the upload hashes to {}, not {want}; nothing was kept",
                pending.digest
            ),
        ));
    }
    let digest = pending.digest.clone();
    pending.commit(store).map_err(internal)?;
    Ok(created(name, &digest))
}

/// Stream a request body into a blob writer (file writes off the async
/// threads), hashing as it goes.
async fn write_body(writer: BlobWriter, body: Body) -> Result<BlobWriter, OciError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let sink = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        while let Some(chunk) = rx.blocking_recv() {
            writer.write_all(&chunk)?;
        }
        Ok::<_, std::io::Error>(writer)
    });
    let mut stream = body.into_data_stream();
    let mut broken = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let writer = sink.await.map_err(internal)?.map_err(internal)?;
    if let Some(e) = broken {
        // The writer is dropped: its temporary file goes with it.
        return Err(oci_error(
            StatusCode::BAD_REQUEST,
            "BLOB_UPLOAD_INVALID",
            format!("the upload broke off: {e}"),
        ));
    }
    Ok(writer)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map holds no invariant a panic could break.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn upload_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `GET`/`HEAD /v2/NAME/manifests/REF`: by tag or digest, the store's
/// exact bytes.
async fn manifest(
    State(oci): State<Arc<Oci>>,
    method: axum::http::Method,
    Path((name, reference)): Path<(String, String)>,
) -> Answer {
    let name = name_of(&name)?;
    let digest = if reference.starts_with("sha256:") {
        digest_of(&reference)?
    } else {
        let tag = Tag::try_from(reference.as_str())
            .map_err(|e| oci_error(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?;
        oci.store
            .resolve(&ImageRef::Tagged(name.clone(), tag))
            .map_err(|_| {
                oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    format!("no manifest {name}:{reference}"),
                )
            })?
            .digest
    };
    let unknown = || {
        oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("no manifest {digest}"),
        )
    };
    // Only a manifest is served as one, and only with a manifest's media
    // type: any other blob (a JSON blob claiming `text/html`, a layer) is
    // unknown here. Its size is checked before anything is read, and the
    // read is off the async threads.
    let store = oci.store.clone();
    let d = digest.clone();
    let read = tokio::task::spawn_blocking(move || -> Option<(Vec<u8>, &'static str)> {
        use std::io::Read as _;
        let file = store.open_blob(&d).ok()?;
        if file.metadata().ok()?.len() > MAX_MANIFEST as u64 {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST as u64 + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        let media = manifest_media_type(&bytes)?;
        Some((bytes, media))
    })
    .await
    .map_err(internal)?;
    let (bytes, media) = read.ok_or_else(unknown)?;
    let headers = [
        (header::CONTENT_TYPE, media.to_owned()),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
        (DIGEST_HEADER, digest.to_string()),
    ];
    if method == axum::http::Method::HEAD {
        return Ok((headers, Body::empty()).into_response());
    }
    Ok((headers, bytes).into_response())
}

/// The media type a manifest endpoint may serve `bytes` with: one of the
/// four manifest types (OCI image manifest or index, Docker schema 2
/// manifest or list), when the JSON says so (or, saying nothing, has an
/// image manifest's shape) and has `schemaVersion` 2; else `None`.
fn manifest_media_type(bytes: &[u8]) -> Option<&'static str> {
    const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if value.get("schemaVersion")?.as_u64()? != 2 {
        return None;
    }
    let image = value.get("config").is_some() && value.get("layers").is_some_and(|l| l.is_array());
    let index = value.get("manifests").is_some_and(|m| m.is_array());
    match value.get("mediaType").map(|m| m.as_str()) {
        None if image => Some(MEDIA_TYPE_MANIFEST),
        None if index => Some(MEDIA_TYPE_INDEX),
        Some(Some(MEDIA_TYPE_MANIFEST)) if image => Some(MEDIA_TYPE_MANIFEST),
        Some(Some(MEDIA_TYPE_DOCKER_MANIFEST)) if image => Some(MEDIA_TYPE_DOCKER_MANIFEST),
        Some(Some(MEDIA_TYPE_INDEX)) if index => Some(MEDIA_TYPE_INDEX),
        Some(Some(DOCKER_LIST)) if index => Some(DOCKER_LIST),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutManifest {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    subject: Option<Descriptor>,
}

/// `PUT /v2/NAME/manifests/REF`: an image manifest whose blobs are all
/// here, recorded as NAME with tag REF (or only its automatic tag when REF
/// is its digest); a referrer when it has a `subject`.
async fn put_manifest(
    State(oci): State<Arc<Oci>>,
    Path((name, reference)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let name = name_of(&name)?;
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST)
        .await
        .map_err(|_| {
            oci_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "MANIFEST_INVALID",
                "a manifest is at most 4 MiB",
            )
        })?;
    let digest = Digest::of(&bytes);
    let tags = if reference.starts_with("sha256:") {
        let d = digest_of(&reference)?;
        if d != digest {
            return Err(oci_error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!("the manifest hashes to {digest}, not {d}"),
            ));
        }
        Vec::new()
    } else {
        vec![
            Tag::try_from(reference.as_str())
                .map_err(|e| oci_error(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?,
        ]
    };
    let parsed: PutManifest = serde_json::from_slice(&bytes).map_err(|e| {
        oci_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("not an image manifest: {e}"),
        )
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let media = parsed
        .media_type
        .clone()
        .or(content_type)
        .unwrap_or_else(|| MEDIA_TYPE_MANIFEST.to_owned());
    if media == MEDIA_TYPE_INDEX
        || (media != MEDIA_TYPE_MANIFEST && media != MEDIA_TYPE_DOCKER_MANIFEST)
    {
        return Err(oci_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("{media}: only image manifests (OCI or Docker schema 2) are accepted"),
        ));
    }
    for d in std::iter::once(&parsed.config).chain(&parsed.layers) {
        if !oci.store.has_blob(&d.digest) {
            return Err(oci_error(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!("blob {} is not here: upload it first", d.digest),
            ));
        }
    }
    let descriptor = Descriptor::new(&media, digest.clone(), bytes.len() as u64);
    let store = oci.store.clone();
    let subject = parsed.subject.is_some();
    let done = tokio::task::spawn_blocking(move || {
        let staged = store.stage_blob(&bytes)?;
        if subject {
            store.add_referrer(vec![staged], &descriptor)
        } else {
            store.publish_image(&name, vec![staged], &descriptor, &tags)
        }
    })
    .await
    .map_err(internal)?;
    match done {
        Ok(()) => Ok((StatusCode::CREATED, [(DIGEST_HEADER, digest.to_string())]).into_response()),
        Err(kiln_store::StoreError::TagTaken {
            name,
            tag,
            existing,
            ..
        }) => Err(oci_error(
            StatusCode::CONFLICT,
            "TAG_INVALID",
            format!("{name}:{tag} names {existing} here, and tags on a kiln store never move"),
        )),
        Err(e) => Err(internal(e)),
    }
}

#[cfg(test)]
mod manifest_tests {
    use super::*;

    #[test]
    fn an_upload_session_is_its_openers_and_expires_when_idle() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let oci = Oci {
            store: store.clone(),
            uploads: Mutex::new(HashMap::new()),
        };
        let open = |id: &str, owner: &str| {
            let writer = store.blob_writer().unwrap_or_else(|e| panic!("{e}"));
            lock(&oci.uploads).insert(
                id.to_owned(),
                Upload {
                    writer,
                    owner: owner.to_owned(),
                    touched: std::time::Instant::now(),
                },
            );
        };
        let now = std::time::Instant::now();
        open("a", "token:ci");
        assert!(
            take_upload(&oci, "a", "token:other", now).is_err(),
            "another token"
        );
        assert!(
            take_upload(&oci, "a", "token:ci", now).is_ok(),
            "its opener"
        );
        open("b", "token:ci");
        let later = now + UPLOAD_IDLE + std::time::Duration::from_secs(1);
        assert!(
            take_upload(&oci, "b", "token:ci", later).is_err(),
            "expired"
        );
        assert!(take_upload(&oci, "nope", "token:ci", now).is_err());
    }

    #[test]
    fn only_manifests_are_served_and_only_as_manifests() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(image), Some(MEDIA_TYPE_MANIFEST));
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(bare), Some(MEDIA_TYPE_MANIFEST));
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(manifest_media_type(index), Some(MEDIA_TYPE_INDEX));
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#;
        assert_eq!(
            manifest_media_type(docker),
            Some(MEDIA_TYPE_DOCKER_MANIFEST)
        );
        for hostile in [
            &br#"{"schemaVersion":2,"mediaType":"text/html","config":{},"layers":[]}"#[..],
            br#"{"mediaType":"text/html","x":"<script>alert(1)</script>"}"#,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","config":{},"layers":[]}"#,
            br#"{"schemaVersion":1,"config":{},"layers":[]}"#,
            br#"{"architecture":"amd64","rootfs":{}}"#,
            b"<html>",
            b"",
        ] {
            assert_eq!(manifest_media_type(hostile), None, "{}", String::from_utf8_lossy(hostile));
        }
    }
}

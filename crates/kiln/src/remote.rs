//! Remote agents: `kiln login https://HOST:PORT` pins the agent's
//! certificate on first use (as SSH's known hosts do) and keeps it with the
//! token in `$KILN_HOME/agents.json` (0600); `--agent URL` / `KILN_AGENT`
//! sends any command there, with `KILN_TOKEN` if set. A certificate that
//! is not the pinned one is refused, with both fingerprints named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kiln_store::registry::pin::Pin;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An agent's address as kiln keys it: `https://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    host: String,
    port: u16,
}

impl AgentUrl {
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("invalid agent URL `{s}`: it starts with https://"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| anyhow!("invalid agent URL `{s}`: bad port `{p}`"))?,
            ),
            _ => (rest, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty()
            || host.contains(['/', '@', '?', '#'])
            || ServerName::try_from(host.to_owned()).is_err()
        {
            bail!("invalid agent URL `{s}`: no host");
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

/// `$KILN_HOME/agents.json`.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Agents {
    pub(crate) agents: BTreeMap<String, Known>,
}

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Known {
    pub(crate) fingerprint: String,
    pub(crate) token: String,
}

pub(crate) fn agents_path(home: &Path) -> PathBuf {
    home.join("agents.json")
}

impl Agents {
    pub(crate) fn open(home: &Path) -> Result<Self> {
        let path = agents_path(home);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not valid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow!("{}: {e}", path.display())),
        }
    }

    pub(crate) fn save(&self, home: &Path) -> Result<()> {
        let path = agents_path(home);
        std::fs::create_dir_all(home).with_context(|| home.display().to_string())?;
        kiln_store::fsutil::write_private(&path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| path.display().to_string())
    }
}

/// A remote agent: where, which certificate, which token.
pub struct Remote {
    pub(crate) url: AgentUrl,
    token: String,
    pin: Arc<Pin>,
    tls: tokio_rustls::TlsConnector,
    /// The pin came from `KILN_AGENT_FINGERPRINT`, not from `kiln login`:
    /// a refusal says to change that, not to log out.
    pub(crate) pin_from_env: bool,
}

impl Remote {
    pub(crate) fn new(url: AgentUrl, fingerprint: Option<String>, token: String) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pin = Arc::new(Pin::new(fingerprint, provider));
        let mut config = pin
            .client_config()
            // ring's default versions are always valid: unreachable.
            .unwrap_or_else(|_| unreachable!("ring supports the default TLS versions"));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            url,
            token,
            pin,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            pin_from_env: false,
        }
    }

    /// The fingerprint the agent presented on the last connection.
    pub(crate) fn seen(&self) -> Option<String> {
        self.pin.seen()
    }

    /// Connect and shake hands only (nothing sent over TLS, no token): the
    /// certificate the agent presents, checked against the pin if any.
    pub async fn certificate(&self) -> Result<String> {
        let addr = self.url.authority();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("cannot reach the agent at {}: no answer in 10 s", self.url))?
            .map_err(|e| anyhow!("cannot reach the agent at {}: {e}", self.url))?;
        let name = ServerName::try_from(self.url.host.clone())
            .map_err(|e| anyhow!("invalid agent host {}: {e}", self.url.host))?;
        let shake = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp)).await;
        let seen = self.seen();
        match shake {
            Ok(Ok(_)) => {
                seen.ok_or_else(|| anyhow!("the agent at {} presented no certificate", self.url))
            }
            Ok(Err(e)) => match (self.pin.want(), seen) {
                (Some(want), Some(seen)) if want != seen => bail!(
                    "the agent at {} presents certificate {seen}, not the expected {want}: refused, no token sent",
                    self.url
                ),
                _ => bail!("TLS with the agent at {}: {e}", self.url),
            },
            Err(_) => bail!("TLS with the agent at {}: no handshake in 10 s", self.url),
        }
    }

    pub async fn send<B>(
        &self,
        req: hyper::http::request::Builder,
        body: B,
    ) -> Result<hyper::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let addr = self.url.authority();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("cannot reach the agent at {}: no answer in 10 s", self.url))?
            .map_err(|e| anyhow!("cannot reach the agent at {}: {e}", self.url))?;
        let name = ServerName::try_from(self.url.host.clone())
            .map_err(|e| anyhow!("invalid agent host {}: {e}", self.url.host))?;
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if let (Some(want), Some(seen)) = (self.pin.want(), self.seen())
                    && want != seen
                {
                    if self.pin_from_env {
                        bail!(
                            "the agent at {} presents certificate {seen}, not {want} from KILN_AGENT_FINGERPRINT: refused \
                             (if it was changed on purpose, set KILN_AGENT_FINGERPRINT={seen})",
                            self.url
                        );
                    }
                    bail!(
                        "the agent at {} presents certificate {seen}, not the pinned {want}: refused \
                         (if it was changed on purpose: kiln logout {0}, then kiln login {0})",
                        self.url
                    );
                }
                bail!("TLS with the agent at {}: {e}", self.url);
            }
            Err(_) => bail!("TLS with the agent at {}: no handshake in 10 s", self.url),
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("cannot talk to the agent")?;
        tokio::spawn(conn);
        let req = req
            .header("host", addr)
            .header("authorization", format!("Bearer {}", self.token))
            .body(body)?;
        send.send_request(req)
            .await
            .context("the agent did not answer")
    }
}

/// What an upload to an agent did.
#[derive(Debug, Default, Serialize)]
pub struct Upload {
    pub images: usize,
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    /// Blobs the agent had already.
    pub present: usize,
}

/// Upload images of the local store to a remote agent through its OCI
/// endpoint: only the blobs it lacks (asked first), four at a time, each
/// streamed from the store; then each manifest, by digest. The agent keeps
/// a blob only once it hashes to its digest.
pub async fn upload(
    remote: &Remote,
    store: &kiln_store::Store,
    images: &[(String, kiln_core::Digest)],
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Upload> {
    use futures_util::{StreamExt as _, TryStreamExt as _};
    let mut report = Upload::default();
    for (name, digest) in images {
        // The agent's store names images by one path component.
        let repo = kiln_core::reference::ImageName::try_from(name.rsplit('/').next().unwrap_or(""))
            .map(|n| n.as_str().to_owned())
            .unwrap_or_else(|_| "upload".to_owned());
        let manifest = store.manifest(digest)?;
        let blobs: Vec<kiln_core::oci::Descriptor> = std::iter::once(manifest.config.clone())
            .chain(manifest.layers.iter().cloned())
            .collect();
        let sent: Vec<Option<u64>> = futures_util::stream::iter(blobs.iter())
            .map(|b| upload_blob(remote, store, &repo, b, progress))
            .buffer_unordered(4)
            .try_collect()
            .await?;
        for s in sent {
            match s {
                Some(n) => {
                    report.uploaded += 1;
                    report.uploaded_bytes += n;
                }
                None => report.present += 1,
            }
        }
        let bytes = store.read_blob(digest)?;
        let media = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| kiln_core::oci::MEDIA_TYPE_MANIFEST.to_owned());
        let req = hyper::Request::builder()
            .method(hyper::Method::PUT)
            .uri(format!("/v2/{repo}/manifests/{digest}"))
            .header("content-type", media);
        let resp = remote.send(req, Full::new(Bytes::from(bytes))).await?;
        expect(resp, "uploading the manifest", &[201]).await?;
        report.images += 1;
    }
    Ok(report)
}

/// `Some(bytes)` uploaded, `None` already there.
async fn upload_blob(
    remote: &Remote,
    store: &kiln_store::Store,
    repo: &str,
    blob: &kiln_core::oci::Descriptor,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Option<u64>> {
    use futures_util::TryStreamExt as _;
    let head = hyper::Request::builder()
        .method(hyper::Method::HEAD)
        .uri(format!("/v2/{repo}/blobs/{}", blob.digest));
    let resp = remote.send(head, Full::new(Bytes::new())).await?;
    if resp.status() == 200 {
        return Ok(None);
    }
    expect(resp, "asking for a blob", &[404]).await?;
    let file = tokio::fs::File::from_std(store.open_blob(&blob.digest)?);
    let len = file.metadata().await?.len();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)
        .map_ok(hyper::body::Frame::data);
    let body = http_body_util::StreamBody::new(stream);
    let req = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest))
        .header("content-type", "application/octet-stream")
        .header("content-length", len);
    let resp = remote.send(req, body).await?;
    expect(resp, "uploading a blob", &[201]).await?;
    progress(&format!(
        "uploaded {} ({})",
        blob.digest.short(),
        crate::progress::human_bytes(len)
    ));
    Ok(Some(len))
}

/// The answer, or its error message when its status is not one expected.
async fn expect(
    resp: hyper::Response<hyper::body::Incoming>,
    doing: &str,
    ok: &[u16],
) -> Result<()> {
    use http_body_util::BodyExt as _;
    let status = resp.status().as_u16();
    if ok.contains(&status) {
        return Ok(());
    }
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let msg = v
        .pointer("/errors/0/message")
        .or_else(|| v.get("error"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    bail!("{doing}: the agent answered {status}: {msg}")
}

static CHOSEN: OnceLock<Arc<Remote>> = OnceLock::new();

/// The remote agent `--agent` / `KILN_AGENT` named, once [`choose`] ran.
pub fn chosen() -> Option<Arc<Remote>> {
    CHOSEN.get().cloned()
}

/// Send the commands that talk to an agent to `url`: its pin and token
/// from `kiln login`, the token from `KILN_TOKEN` when set, the pin from
/// `KILN_AGENT_FINGERPRINT` when there is none (CI).
pub fn choose(home: &Path, url: &str) -> Result<()> {
    let url = AgentUrl::parse(url)?;
    let known = Agents::open(home)?.agents.get(&url.to_string()).cloned();
    let env_token = std::env::var("KILN_TOKEN").ok().filter(|t| !t.is_empty());
    let env_pin = std::env::var("KILN_AGENT_FINGERPRINT")
        .ok()
        .filter(|t| !t.is_empty());
    let pin_from_env = known.is_none();
    let fingerprint = known
        .as_ref()
        .map(|k| k.fingerprint.clone())
        .or(env_pin)
        .ok_or_else(|| {
            anyhow!("{url} is not a known agent: kiln login {url} (or set KILN_AGENT_FINGERPRINT)")
        })?;
    let token = env_token
        .or(known.map(|k| k.token))
        .ok_or_else(|| anyhow!("no token for {url}: kiln login {url}, or KILN_TOKEN"))?;
    let mut remote = Remote::new(url, Some(fingerprint), token);
    remote.pin_from_env = pin_from_env;
    let _ = CHOSEN.set(Arc::new(remote));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AgentUrl;

    #[test]
    fn agent_urls_parse_strictly() {
        let u = AgentUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(u.to_string(), "https://127.0.0.1:8443");
        assert_eq!(
            AgentUrl::parse("https://kiln.example/")
                .unwrap()
                .to_string(),
            "https://kiln.example:443"
        );
        assert_eq!(
            AgentUrl::parse("https://[::1]:9").unwrap().to_string(),
            "https://[::1]:9"
        );
        for bad in [
            "http://x:1",
            "x:1",
            "https://",
            "https://x:port",
            "https://u@x:1",
            "https://x:1/path",
        ] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad}");
        }
    }
}

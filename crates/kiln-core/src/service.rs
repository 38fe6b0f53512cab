//! `[services.NAME]`: what to run, and how to judge and stop it.
//!
//! Everything an instance is made from (image, command, env, volumes,
//! runtime, probes, stop) becomes part of a [`crate::release`]; `replicas`,
//! `listen` and `rollout` are service settings that change without a new
//! release.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{AbsolutePath, EnvName};
use crate::reference::{ImageName, ImageRef};
use crate::secret::SecretSource;

/// `[services.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// An `[images]` name of the same spec (baked at apply), or a store
    /// reference `NAME:TAG` / `NAME@sha256:…`.
    pub image: ImageSource,
    /// Whether the image must be signed by a `[trust]` allowed signer
    /// (default: `[trust] require_signed`).
    #[serde(default)]
    pub require_signed: Option<bool>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// The router's address for this service. Several services may share
    /// one, told apart by `hosts` and `path_prefix`.
    pub listen: Option<ListenAddr>,
    /// The hosts this service answers on its `listen` address
    /// (`app.example.com`, `*.app.example.com`); default: any.
    #[serde(default)]
    pub hosts: Vec<crate::edge::HostPattern>,
    /// The path prefix it answers (`/api`: `/api` and `/api/...`, never
    /// `/apix`); default: every path.
    #[serde(default)]
    pub path_prefix: Option<crate::edge::PathPrefix>,
    /// The instance sees the path without the prefix (`/api/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// The load balancers in front (CIDRs) whose word on the client's
    /// address is taken.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// Connections from `trusted_proxies` begin with a PROXY protocol
    /// header (v1 or v2).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// HTTPS on `listen` (`[services.NAME.tls]`).
    #[serde(default)]
    pub tls: Option<TlsSpec>,
    /// A directory (relative to the spec) of pages for the router's own
    /// answers: `503.html`, `502.html`, … (`NNN.html`, 400 to 599).
    #[serde(default)]
    pub error_pages: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    /// Env vars whose values are secret: never in a command line, a log,
    /// `plan` or `history` (see [`crate::secret`]).
    #[serde(default)]
    pub secrets: BTreeMap<EnvName, SecretSource>,
    /// A file of `NAME=VALUE` lines (relative to the spec), every one a
    /// secret.
    pub env_file: Option<String>,
    /// Replaces the image's entrypoint and cmd.
    #[serde(default)]
    pub command: Vec<String>,
    /// Volume name → mount path (or `{ path = "/data", shared = true }`).
    #[serde(default)]
    pub volumes: BTreeMap<VolumeName, VolumeSpec>,
    /// `sandbox` (bubblewrap), `oci` (the embedded OCI runtime: a full
    /// container), or `process`. Default: `sandbox` when bubblewrap is
    /// installed, else `oci` (an agent running as root), else `process`
    /// (when the agent allows it).
    pub runtime: Option<RuntimeKind>,
    /// Who the instances run as (`NAME|UID[:GROUP|GID]`, `root`); default:
    /// the image's `USER`, else `nobody` (65534). Checked by
    /// [`crate::user::check`].
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub stop: StopSpec,
    /// Commands run once per release, each as a one-off instance of a
    /// release (`[services.NAME.hooks]`).
    #[serde(default)]
    pub hooks: HooksSpec,
    /// How long the router waits for an instance's response headers before
    /// answering 504.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// The router's limits for this service's listener.
    #[serde(default)]
    pub router: RouterSpec,
    /// In a cluster, only nodes with every one of these labels (`kiln serve
    /// --label KEY=VALUE`) run this service's instances.
    #[serde(default, deserialize_with = "node_labels")]
    pub node_labels: BTreeMap<String, String>,
    /// CPUs each instance may use (`0.5`, `2`, `"500m"`): a node places it
    /// only with that much unreserved, and the runtime holds it to that
    /// quota (cgroups). Default: none reserved, unlimited.
    #[serde(default, deserialize_with = "crate::resources::cpu_field")]
    pub cpu: Option<u32>,
    /// Memory each instance may use (`"256M"`, `"1G"`): reserved on its
    /// node, and its limit (past it, the kernel ends the instance, which is
    /// replaced). Default: none reserved, unlimited.
    #[serde(default, deserialize_with = "crate::resources::memory_field")]
    pub memory: Option<u64>,
    /// The most processes and threads each instance may have at once
    /// (`256`): a fork past it fails (EAGAIN). A limit, not reserved.
    /// Default: unlimited.
    #[serde(default, deserialize_with = "crate::resources::pids_field")]
    pub pids: Option<u32>,
}

fn node_labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &labels {
        crate::cluster::check_label(k, v).map_err(serde::de::Error::custom)?;
    }
    Ok(labels)
}

/// `[services.NAME.router]`: what the router allows a peer before it gives
/// up on it (nginx's `client_body_timeout`, `proxy_read_timeout`,
/// `send_timeout` and `worker_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// A request body that sends nothing for this long is answered 408.
    #[serde(default = "sixty_seconds")]
    pub body_timeout: Duration,
    /// An instance that sends nothing of a response body for this long:
    /// the response is cut and both connections closed.
    #[serde(default = "sixty_seconds")]
    pub read_timeout: Duration,
    /// A client that reads nothing of its response for this long: closed.
    #[serde(default = "sixty_seconds")]
    pub send_timeout: Duration,
    /// At most this many client connections at once on the listener;
    /// more wait in the kernel's accept queue. Default: the share of the
    /// agent's descriptor limit that traffic may take.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// The largest request body an instance gets (`"10M"`, or bytes);
    /// past it the router answers 413. Default: no limit.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "body_size"
    )]
    pub max_body: Option<u64>,
    /// The service's plain `listen` address also takes HTTP/2 with prior
    /// knowledge (h2c: a client that opens with the HTTP/2 preface, as
    /// gRPC clients and load balancers do without TLS). Over TLS, HTTP/2 is
    /// always offered (ALPN `h2`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2c: bool,
    /// How the router speaks to the instances: `http1` (HTTP/1.1, the
    /// default) or `h2c` (HTTP/2 without TLS, with prior knowledge: what a
    /// gRPC server speaks; trailers pass through to HTTP/2 clients).
    #[serde(default, skip_serializing_if = "BackendProtocol::is_default")]
    pub backend_protocol: BackendProtocol,
    /// One JSON line per request in `$KILN_HOME/logs/access/SERVICE.log`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
    /// Compress text responses (zstd, br or gzip, as the client accepts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compress: bool,
}

/// `router.backend_protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Http1,
    H2c,
}

impl BackendProtocol {
    fn is_default(&self) -> bool {
        *self == Self::Http1
    }
}

/// `"10M"` as a spec writes it, or the bytes a recorded setting holds.
fn body_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(t) => crate::resources::parse_size(&t)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("router.max_body: {e}"))),
    }
}

fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            body_timeout: sixty_seconds(),
            read_timeout: sixty_seconds(),
            send_timeout: sixty_seconds(),
            max_connections: None,
            max_body: None,
            h2c: false,
            backend_protocol: BackendProtocol::Http1,
            access_log: false,
            compress: false,
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn one() -> u32 {
    1
}

impl ServiceSpec {
    /// Rules between fields of one service.
    /// Its place on its listener.
    pub fn route(&self) -> crate::edge::RouteSpec {
        crate::edge::RouteSpec {
            hosts: self.hosts.clone(),
            path_prefix: self.path_prefix.clone(),
            strip_prefix: self.strip_prefix,
            trusted_proxies: self.trusted_proxies.clone(),
            proxy_protocol: self.proxy_protocol,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        for (hook, argv) in [
            ("pre_deploy", &self.hooks.pre_deploy),
            ("pre_rollback", &self.hooks.pre_rollback),
            ("post_deploy", &self.hooks.post_deploy),
        ] {
            if argv.first().is_some_and(String::is_empty) {
                return Err(format!(
                    "hooks.{hook}: the command is empty (an argv: [\"/bin/migrate\", \"--up\"])"
                ));
            }
        }
        let route = self.route();
        route.check()?;
        if self.listen.is_none() && !route.is_default() {
            return Err("hosts, path_prefix, strip_prefix, trusted_proxies and proxy_protocol need a listen address".to_owned());
        }
        if self.error_pages.is_some() && self.listen.is_none() {
            return Err("error_pages needs a listen address".to_owned());
        }
        if let Some(tls) = &self.tls {
            if self.listen.is_none() {
                return Err("tls needs a listen address".to_owned());
            }
            if tls.redirect_from.is_some() && tls.redirect_from == self.listen {
                return Err(format!(
                    "tls.redirect_from {} is the same as listen",
                    tls.redirect_from.map_or(String::new(), |a| a.0.to_string())
                ));
            }
            tls.check(&self.hosts)?;
        }
        let r = &self.router;
        for (key, d) in [
            ("body_timeout", r.body_timeout),
            ("read_timeout", r.read_timeout),
            ("send_timeout", r.send_timeout),
            ("timeout", self.timeout),
        ] {
            if d.0.is_zero() {
                let table = if key == "timeout" { "" } else { "router." };
                return Err(format!("{table}{key} must be more than 0"));
            }
        }
        if r.max_connections == Some(0) {
            return Err("router.max_connections must be at least 1".to_owned());
        }
        if r.max_body == Some(0) {
            return Err("router.max_body must be at least 1 byte".to_owned());
        }
        if self.replicas > 1000 {
            return Err(format!("replicas = {} is more than 1000", self.replicas));
        }
        let mut paths = BTreeMap::new();
        for (name, v) in &self.volumes {
            if v.path.as_str() == "/" {
                return Err(format!("volume {name} cannot be mounted at /"));
            }
            if let Some(other) = paths.insert(v.path.as_str(), name) {
                return Err(format!(
                    "volumes {other} and {name} are both mounted at {}",
                    v.path
                ));
            }
        }
        let r = &self.rollout;
        if r.strategy != Strategy::BlueGreen && (r.preview_listen.is_some() || !r.auto_promote) {
            return Err("rollout.preview_listen and rollout.auto_promote apply only to strategy = \"blue-green\"".to_owned());
        }
        if let Some(p) = r.preview_listen
            && Some(p) == self.listen
        {
            return Err(format!(
                "rollout.preview_listen {} is the same as listen",
                p.0
            ));
        }
        if matches!(r.strategy, Strategy::BlueGreen | Strategy::Canary)
            && let Some((name, _)) = self.volumes.iter().find(|(_, v)| !v.shared)
        {
            return Err(format!(
                "{} runs two releases at once, so volume {name} must be marked shared-safe: volumes.{name} = {{ path = \"...\", shared = true }}",
                if r.strategy == Strategy::Canary {
                    "canary"
                } else {
                    "blue-green"
                }
            ));
        }
        if r.strategy != Strategy::Canary
            && (!r.steps.is_empty() || r.sticky || r.analysis.is_some())
        {
            return Err(
                "rollout.steps, rollout.sticky and rollout.analysis apply only to strategy = \"canary\""
                    .to_owned(),
            );
        }
        if r.strategy == Strategy::Canary {
            if r.steps.is_empty() {
                return Err("strategy = \"canary\" needs rollout.steps, e.g. steps = [{ weight = 10, pause = \"1m\" }, { weight = 100 }]".to_owned());
            }
            if let Some((i, s)) = r
                .steps
                .iter()
                .enumerate()
                .find(|(_, s)| s.weight == 0 || s.weight > 100)
            {
                return Err(format!(
                    "rollout.steps[{i}]: weight {} is not from 1 to 100",
                    s.weight
                ));
            }
            if let Some(last) = r.steps.last()
                && last.weight != 100
            {
                return Err(format!(
                    "rollout.steps must end at weight 100 (the last is {}): the canary takes all traffic before it becomes the release",
                    last.weight
                ));
            }
        }
        if self.rollout.max_surge == 0 && self.rollout.max_unavailable == 0 {
            return Err(
                "rollout.max_surge and rollout.max_unavailable cannot both be 0".to_owned(),
            );
        }
        Ok(())
    }
}

/// Where a service's image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// An `[images.NAME]` of the same spec.
    Spec(ImageName),
    /// An image already in the store.
    Store(ImageRef),
    /// An image in a registry (`HOST[:PORT]/REPO:TAG` or `…@sha256:…`),
    /// pulled by `apply` when the store lacks it; the release records its
    /// digest, so a tag that moves later never changes a release.
    Registry(crate::registry::RegistryRef),
}

impl<'de> Deserialize<'de> for ImageSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if crate::registry::RegistryRef::looks_like(&s) {
            crate::registry::RegistryRef::parse(&s)
                .map(Self::Registry)
                .map_err(serde::de::Error::custom)
        } else if s.contains(':') || s.contains('@') {
            ImageRef::parse(&s)
                .map(Self::Store)
                .map_err(serde::de::Error::custom)
        } else {
            ImageName::try_from(s.as_str())
                .map(Self::Spec)
                .map_err(serde::de::Error::custom)
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spec(n) => write!(f, "{n}"),
            Self::Store(r) => write!(f, "{r}"),
            Self::Registry(r) => write!(f, "{r}"),
        }
    }
}

/// `[services.NAME.tls]`: HTTPS on the service's `listen` address, with a
/// certificate from PEM files the agent reads (and reads again when they
/// change), chosen by SNI among the services on that address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// The certificate chain, leaf first (relative to the spec; `kiln
    /// apply` sends it made absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Instead of files: certificates issued and renewed by this ACME
    /// directory (`https://acme-v02.api.letsencrypt.org/directory`), over
    /// HTTP-01 on `redirect_from` when there is one, else TLS-ALPN-01 on
    /// `listen` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<String>,
    /// The root certificate the ACME directory's own HTTPS is signed by,
    /// when it is a private CA's (a PEM file); default: the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_root: Option<String>,
    /// A contact address for the CA's account (`mailto:` added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_email: Option<String>,
    /// Prove the names by DNS-01 instead of HTTP-01 (what a wildcard
    /// needs): this command is run as `HOOK... present NAME VALUE` to set
    /// the TXT record `NAME` (`_acme-challenge.example.com`) to `VALUE`,
    /// and `HOOK... cleanup NAME VALUE` after; exit 0 means done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_hook: Vec<String>,
    /// Also answer plain HTTP on this address, for the same hosts and
    /// prefix, with a redirect (308) to HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_from: Option<ListenAddr>,
    /// Send `Strict-Transport-Security: max-age=…` with its responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Duration>,
}

impl TlsSpec {
    /// With its file names made absolute against `dir` (the spec's).
    pub fn under(&self, dir: &std::path::Path) -> Self {
        let abs = |p: &Option<String>| {
            p.as_ref()
                .map(|p| dir.join(p).to_string_lossy().into_owned())
        };
        Self {
            cert: abs(&self.cert),
            key: abs(&self.key),
            acme_root: abs(&self.acme_root),
            ..self.clone()
        }
    }

    /// Its own mistakes, and what ACME needs of the service's hosts.
    pub fn check(&self, hosts: &[crate::edge::HostPattern]) -> Result<(), String> {
        match (&self.cert, &self.key, &self.acme) {
            (Some(c), Some(k), None) if !c.is_empty() && !k.is_empty() => Ok(()),
            (None, None, Some(url)) => {
                if !url.starts_with("https://") {
                    return Err(format!(
                        "tls.acme `{url}` must be an https:// directory URL"
                    ));
                }
                if hosts.is_empty() {
                    return Err("tls.acme needs hosts: the names to certify".to_owned());
                }
                if self.dns_hook.first().is_some_and(String::is_empty) {
                    return Err("tls.dns_hook: the command is empty (an argv: [\"/usr/local/bin/dns-hook\"])".to_owned());
                }
                if !self.dns_hook.is_empty() {
                    return Ok(());
                }
                if let Some(w) = hosts
                    .iter()
                    .find(|h| matches!(h, crate::edge::HostPattern::Wildcard(_)))
                {
                    return Err(format!(
                        "tls.acme cannot certify {w} by HTTP-01 or TLS-ALPN-01, which prove one name at a time: give a dns_hook (DNS-01)"
                    ));
                }
                // With redirect_from: HTTP-01 there; without: TLS-ALPN-01
                // on the HTTPS address itself.
                Ok(())
            }
            (_, _, Some(_)) => Err("tls.acme or tls.cert and tls.key, not both".to_owned()),
            _ => Err("tls needs cert and key (PEM files), or acme (a directory URL)".to_owned()),
        }
    }
}

/// A `listen` address: `IP:PORT` (e.g. `127.0.0.1:8080`), or `:PORT` for
/// every address of the host (`0.0.0.0:PORT`) — in a cluster, that port
/// on each node's advertised address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parsed = match s.strip_prefix(':') {
            Some(port) => port
                .parse::<u16>()
                .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
                .map_err(|_| ()),
            None => s.parse::<SocketAddr>().map_err(|_| ()),
        };
        match parsed {
            Ok(a) if a.port() != 0 => Ok(Self(a)),
            Ok(_) => Err(serde::de::Error::custom(format!(
                "listen address `{s}` needs a port other than 0"
            ))),
            Err(_) => Err(serde::de::Error::custom(format!(
                "invalid listen address `{s}`: expected IP:PORT or :PORT, e.g. 127.0.0.1:8080"
            ))),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

crate::names::validated_string_pub!(
    /// A volume name: the same grammar as an image name.
    VolumeName,
    |s| ImageName::try_from(s)
        .map(|_| ())
        .map_err(|_| format!("invalid volume name `{s}`"))
);

/// A volume's mount: `NAME = "/data"` or `NAME = { path = "/data", shared = true }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawVolume")]
pub struct VolumeSpec {
    pub path: AbsolutePath,
    /// Safe to mount in two releases at once (blue-green needs it).
    pub shared: bool,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a mount path like \"/data\" or a table { path = \"/data\", shared = true }"
)]
enum RawVolume {
    Path(String),
    Table(VolumeTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeTable {
    path: String,
    #[serde(default)]
    shared: bool,
}

impl TryFrom<RawVolume> for VolumeSpec {
    type Error = String;
    fn try_from(raw: RawVolume) -> Result<Self, String> {
        let (path, shared) = match raw {
            RawVolume::Path(p) => (p, false),
            RawVolume::Table(t) => (t.path, t.shared),
        };
        Ok(Self {
            path: AbsolutePath::try_from(path.as_str())?,
            shared,
        })
    }
}

/// How an instance is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// bubblewrap: the image's tree read-only (kernel-enforced), private /tmp,
    /// pid and ipc namespaces.
    Sandbox,
    /// A plain child process run from the read-only tree.
    Process,
    /// runc (not yet available).
    Oci,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sandbox => "sandbox",
            Self::Process => "process",
            Self::Oci => "oci",
        })
    }
}

/// A duration written like `500ms`, `2s` or `1m30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Self(StdDuration::from_secs(s))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Self).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{s}` ({e}); write e.g. 500ms, 2s, 1m"
            ))
        })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// `[services.NAME.health]`: up to three probes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Until it succeeds, readiness and liveness are not checked.
    pub startup: Option<Probe>,
    /// Ready instances get traffic. Without it: ready when the port accepts.
    pub readiness: Option<Probe>,
    /// An instance failing it is replaced.
    pub liveness: Option<Probe>,
}

/// How long a worker (no `listen`: nothing routes to it, so nothing
/// checks it answers) without a readiness probe must run before it counts
/// as ready, when `rollout.min_ready` asks for less: one that exits at once
/// must not count (Nomad's `min_healthy_time` is 10 s).
pub const WORKER_MIN_READY: std::time::Duration = std::time::Duration::from_secs(3);

/// The `min_ready` a service's instances are held to: its own, or for a
/// worker without a readiness probe at least `worker_floor` (the agent's
/// is [`WORKER_MIN_READY`]).
pub fn effective_min_ready(
    min_ready: std::time::Duration,
    listens: bool,
    health: &HealthSpec,
    worker_floor: std::time::Duration,
) -> std::time::Duration {
    if listens || health.readiness.is_some() {
        min_ready
    } else {
        min_ready.max(worker_floor)
    }
}

/// One probe: exactly one of `http`, `tcp`, `exec`, plus timing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawProbe", into = "RawProbe")]
pub struct Probe {
    pub check: ProbeCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub initial_delay: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeCheck {
    /// GET `path` on the instance's port; healthy when the status is `status`.
    Http { path: String, status: u16 },
    /// Healthy when the instance's port accepts a connection.
    Tcp,
    /// Healthy when the command exits 0. It runs inside the instance (its
    /// mount, pid and ipc namespaces, root, workdir and env), as
    /// `kubectl exec` does.
    Exec { command: Vec<String> },
}

/// The written form of a probe (in `kiln.toml`, the API and the state store).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<Vec<String>>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    success_threshold: Option<u32>,
    failure_threshold: Option<u32>,
    initial_delay: Option<Duration>,
}

impl From<Probe> for RawProbe {
    fn from(p: Probe) -> Self {
        let (http, status, tcp, exec) = match p.check {
            ProbeCheck::Http { path, status } => (Some(path), Some(status), None, None),
            ProbeCheck::Tcp => (None, None, Some(true), None),
            ProbeCheck::Exec { command } => (None, None, None, Some(command)),
        };
        Self {
            http,
            status,
            tcp,
            exec,
            interval: Some(p.interval),
            timeout: Some(p.timeout),
            success_threshold: Some(p.success_threshold),
            failure_threshold: Some(p.failure_threshold),
            initial_delay: Some(p.initial_delay),
        }
    }
}

impl TryFrom<RawProbe> for Probe {
    type Error = String;
    fn try_from(r: RawProbe) -> Result<Self, String> {
        let check = match (r.http, r.tcp, r.exec) {
            (Some(path), None | Some(false), None) => {
                if !path.starts_with('/') {
                    return Err(format!("probe http path `{path}` must start with /"));
                }
                ProbeCheck::Http {
                    path,
                    status: r.status.unwrap_or(200),
                }
            }
            (None, Some(true), None) => ProbeCheck::Tcp,
            (None, None | Some(false), Some(command)) => {
                if command.is_empty() {
                    return Err("probe exec needs a command".to_owned());
                }
                ProbeCheck::Exec { command }
            }
            _ => return Err(
                "a probe needs exactly one of http = \"/path\", tcp = true, exec = [\"cmd\", ...]"
                    .to_owned(),
            ),
        };
        if r.status.is_some() && !matches!(check, ProbeCheck::Http { .. }) {
            return Err("probe status applies only to http probes".to_owned());
        }
        let probe = Self {
            check,
            interval: r.interval.unwrap_or(Duration::from_secs(1)),
            timeout: r.timeout.unwrap_or(Duration::from_secs(1)),
            success_threshold: r.success_threshold.unwrap_or(1),
            failure_threshold: r.failure_threshold.unwrap_or(3),
            initial_delay: r.initial_delay.unwrap_or(Duration::from_secs(0)),
        };
        if probe.success_threshold == 0 || probe.failure_threshold == 0 {
            return Err("probe thresholds must be at least 1".to_owned());
        }
        if probe.interval.0.is_zero() || probe.timeout.0.is_zero() {
            return Err("probe interval and timeout must be more than 0".to_owned());
        }
        Ok(probe)
    }
}

/// `[services.NAME.rollout]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSpec {
    pub strategy: Strategy,
    /// Instances above `replicas` allowed during a rollout.
    pub max_surge: u32,
    /// Ready instances below `replicas` allowed during a rollout.
    pub max_unavailable: u32,
    /// How long an instance must stay ready before it counts.
    pub min_ready: Duration,
    /// A rollout not complete after this long has failed.
    pub progress_deadline: Duration,
    /// Return to the previous release when a rollout fails.
    pub auto_rollback: bool,
    /// blue-green: where the new fleet is reachable before promotion.
    pub preview_listen: Option<ListenAddr>,
    /// blue-green: switch traffic as soon as the new fleet is ready (else
    /// wait for `kiln promote`).
    pub auto_promote: bool,
    /// blue-green: how long the old fleet stays warm after the switch, so
    /// that `kiln rollback` is a route swap.
    pub scale_down_delay: Duration,
    /// canary: the traffic steps, the last at weight 100.
    pub steps: Vec<CanaryStep>,
    /// canary: keep each client on one side of the split with a cookie.
    pub sticky: bool,
    /// canary: the limits each step is judged against.
    pub analysis: Option<AnalysisSpec>,
    /// How long a release is watched after it went live: if its instances
    /// crash-loop (or keep failing liveness) inside it, the service returns
    /// to the release before, as from a failed rollout. `0s`: not watched.
    pub watch: Duration,
}

/// One canary step: `{ weight = 10, pause = "30s" }` (or `pause = "manual"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryStep {
    /// Percent of requests sent to the canary, 1 to 100.
    pub weight: u32,
    /// How long the step lasts once its canary fleet is ready, or `manual`
    /// (until `kiln promote`). Default: no pause.
    #[serde(default)]
    pub pause: Pause,
}

/// How long a canary step waits before the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    For(Duration),
    Manual,
}

impl Default for Pause {
    fn default() -> Self {
        Self::For(Duration::from_secs(0))
    }
}

impl<'de> Deserialize<'de> for Pause {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "manual" {
            return Ok(Self::Manual);
        }
        humantime::parse_duration(&s)
            .map(|d| Self::For(Duration(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid pause `{s}` ({e}); write a duration like 30s or 5m, or \"manual\""
                ))
            })
    }
}

impl Serialize for Pause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Manual => s.serialize_str("manual"),
            Self::For(d) => d.serialize(s),
        }
    }
}

impl fmt::Display for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manual => f.write_str("manual"),
            Self::For(d) => d.fmt(f),
        }
    }
}

/// `[services.NAME.rollout.analysis]`: a canary step fails as soon as the
/// canary, over the step so far, breaks one of these limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// Highest error rate (5xx answers plus failed connections), e.g.
    /// `0.05` or `"5%"`.
    pub max_error_rate: Option<Ratio>,
    /// Highest 99th-percentile latency, e.g. `"250ms"`.
    pub max_p99: Option<Duration>,
    /// Highest error rate above the stable release's over the same window.
    pub max_error_rate_increase: Option<Ratio>,
    /// Requests the canary must have answered in a step before it is
    /// judged and before the step may end.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Whether the last step (weight 100, stable gets nothing) must also
    /// see `min_requests` before the canary becomes the release. Off by
    /// default: a quiet service would wait for traffic forever.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last_step_needs_traffic: bool,
}

fn default_min_requests() -> u64 {
    20
}

/// A fraction from 0 to 1, written `0.05` or `"5%"`; kept in parts per
/// million so settings stay comparable with `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ratio(pub u32);

impl Ratio {
    pub const ONE: u32 = 1_000_000;

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::ONE)
    }

    pub fn from_f64(f: f64) -> Option<Self> {
        (0.0..=1.0)
            .contains(&f)
            .then(|| Self((f * f64::from(Self::ONE)).round() as u32))
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
            Other(serde::de::IgnoredAny),
        }
        let bad = |v: &dyn fmt::Display| {
            serde::de::Error::custom(format!(
                "invalid ratio `{v}`: write a fraction from 0 to 1 (0.05) or a percentage (\"5%\")"
            ))
        };
        let f = match Raw::deserialize(d)? {
            Raw::Number(f) => f,
            Raw::Text(t) => match t.trim().strip_suffix('%').map(|p| p.trim().parse::<f64>()) {
                Some(Ok(p)) => p / 100.0,
                _ => return Err(bad(&t)),
            },
            Raw::Other(_) => return Err(bad(&"(not a number)")),
        };
        Self::from_f64(f).ok_or_else(|| bad(&f))
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.as_f64() * 100.0)
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: Strategy::Rolling,
            max_surge: 1,
            max_unavailable: 0,
            min_ready: Duration::from_secs(0),
            progress_deadline: Duration::from_secs(60),
            auto_rollback: true,
            preview_listen: None,
            auto_promote: true,
            scale_down_delay: Duration::from_secs(300),
            steps: Vec::new(),
            sticky: false,
            analysis: None,
            watch: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Rolling,
    Recreate,
    BlueGreen,
    Canary,
}

/// `[services.NAME.hooks]`: release tasks that know about rollback. Each
/// is an argv run as a one-off instance (the service's sandbox, env,
/// secrets, volumes, user, limits); part of the release (omitted when
/// empty, so releases without hooks keep their hashes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSpec {
    /// Run once when a release is applied, before it is recorded and
    /// before any of its instances starts (a migration): failing, the
    /// apply is refused with nothing changed. Never on a rollback.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pre_deploy: Vec<String>,
    /// Run, from the release being left, before `kiln rollback` goes to an
    /// older one (a down-migration): failing, the rollback is refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pre_rollback: Vec<String>,
    /// Run once the release is active (a smoke test, a cache warm-up):
    /// failing, the service returns to the release before it as a failed
    /// watch does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub post_deploy: Vec<String>,
}

impl HooksSpec {
    pub fn is_empty(&self) -> bool {
        self.pre_deploy.is_empty() && self.pre_rollback.is_empty() && self.post_deploy.is_empty()
    }
}

/// `[services.NAME.stop]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StopSpec {
    /// The signal that asks an instance to stop.
    pub signal: StopSignal,
    /// How long in-flight requests may take to finish once an instance is
    /// out of the routing table.
    pub drain_timeout: Duration,
    /// How long after `signal` before SIGKILL.
    pub kill_timeout: Duration,
}

impl Default for StopSpec {
    fn default() -> Self {
        Self {
            signal: StopSignal::Term,
            drain_timeout: Duration::from_secs(5),
            kill_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum StopSignal {
    #[serde(alias = "SIGTERM")]
    Term,
    #[serde(alias = "SIGINT")]
    Int,
    #[serde(alias = "SIGQUIT")]
    Quit,
    #[serde(alias = "SIGHUP")]
    Hup,
    #[serde(alias = "SIGUSR1")]
    Usr1,
    #[serde(alias = "SIGUSR2")]
    Usr2,
}

#[cfg(test)]
mod tests {
    use super::{HealthSpec, WORKER_MIN_READY, effective_min_ready};
    use crate::spec::Spec;

    #[test]
    fn a_worker_without_a_probe_must_run_a_while_before_it_counts() {
        let none = HealthSpec::default();
        let s = |n| std::time::Duration::from_secs(n);
        let w = WORKER_MIN_READY;
        assert_eq!(effective_min_ready(s(0), false, &none, w), w);
        assert_eq!(
            effective_min_ready(s(10), false, &none, w),
            s(10),
            "its own when longer"
        );
        assert_eq!(
            effective_min_ready(s(0), true, &none, w),
            s(0),
            "the router checks it"
        );
        assert_eq!(
            effective_min_ready(s(1), false, &none, s(0)),
            s(1),
            "no floor"
        );
        let probed = HealthSpec {
            readiness: Some(
                serde_json::from_value(serde_json::json!({"exec": ["/bin/true"]}))
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            ..HealthSpec::default()
        };
        assert_eq!(
            effective_min_ready(s(0), false, &probed, w),
            s(0),
            "its probe decides"
        );
    }

    /// A service of `body` (after `[services.web]`), parsed and checked.
    fn service(body: &str) -> Result<super::ServiceSpec, String> {
        let text = format!("[images.hello]\n[services.web]\nimage = \"hello\"\n{body}");
        Spec::parse(&text, "kiln.toml")
            .map_err(|e| e.to_string())
            .map(|s| {
                s.services
                    .into_values()
                    .next()
                    .unwrap_or_else(|| panic!("no service"))
            })
    }

    #[test]
    fn bounds_of_a_service_are_exact() {
        assert_eq!(service("").map(|s| s.replicas), Ok(1), "one by default");
        assert_eq!(service("replicas = 1000").map(|s| s.replicas), Ok(1000));
        let err = service("replicas = 1001").unwrap_err();
        assert!(err.contains("replicas = 1001 is more than 1000"), "{err}");
        // Either of surge and unavailable may be 0, not both.
        for (surge, unavailable) in [(0, 1), (1, 0)] {
            assert!(
                service(&format!(
                    "[services.web.rollout]\nmax_surge = {surge}\nmax_unavailable = {unavailable}\n"
                ))
                .is_ok(),
                "{surge}/{unavailable}"
            );
        }
        let err =
            service("[services.web.rollout]\nmax_surge = 0\nmax_unavailable = 0\n").unwrap_err();
        assert!(err.contains("cannot both be 0"), "{err}");
        let err = service("listen = \"127.0.0.1:0\"").unwrap_err();
        assert!(err.contains("needs a port other than 0"), "{err}");
        let err = service("listen = \":0\"").unwrap_err();
        assert!(err.contains("needs a port other than 0"), "{err}");
        for bad in [":", ":x", ":65536", "8080"] {
            let err = service(&format!("listen = \"{bad}\"")).unwrap_err();
            assert!(err.contains("expected IP:PORT or :PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn node_labels_are_checked_as_labels() {
        let s = service("node_labels = { zone = \"eu-1\", disk = \"ssd\" }").unwrap();
        assert_eq!(s.node_labels.len(), 2);
        assert_eq!(s.node_labels["zone"], "eu-1");
        assert!(service("").unwrap().node_labels.is_empty());
        let err = service("node_labels = { Zone = \"a\" }").unwrap_err();
        assert!(err.contains("label `Zone=a`"), "{err}");
    }

    #[test]
    fn hooks_are_argvs_and_part_of_the_release() {
        let s = service("[services.web.hooks]\npre_deploy = [\"/bin/migrate\", \"up\"]\n").unwrap();
        assert_eq!(s.hooks.pre_deploy, ["/bin/migrate", "up"]);
        assert!(s.hooks.pre_rollback.is_empty() && !s.hooks.is_empty());
        assert!(service("").unwrap().hooks.is_empty());
        let err = service("[services.web.hooks]\npre_rollback = [\"\"]\n").unwrap_err();
        assert!(
            err.contains("hooks.pre_rollback: the command is empty"),
            "{err}"
        );
        let err = service("[services.web.hooks]\npost_deploy = [\"\"]\n").unwrap_err();
        assert!(err.contains("hooks.post_deploy"), "{err}");
        let err = service("[services.web.hooks]\npre_deplyo = [\"x\"]\n").unwrap_err();
        assert!(err.contains("pre_deplyo"), "{err}");
        assert_eq!(
            serde_json::to_string(&super::HooksSpec::default()).unwrap(),
            "{}",
            "no hooks: nothing in the release"
        );
    }

    #[test]
    fn cpu_and_memory_are_read_as_a_spec_writes_them() {
        for (text, millis) in [
            ("cpu = 0.5", 500),
            ("cpu = 2", 2000),
            ("cpu = \"250m\"", 250),
            ("cpu = \"1.5\"", 1500),
        ] {
            assert_eq!(service(text).unwrap().cpu, Some(millis), "{text}");
        }
        let s = service("memory = \"256M\"").unwrap();
        assert_eq!(s.memory, Some(256 << 20));
        assert_eq!(service("memory = 8388608").unwrap().memory, Some(8 << 20));
        assert_eq!(service("pids = 256").unwrap().pids, Some(256));
        let none = service("").unwrap();
        assert_eq!((none.cpu, none.memory), (None, None));
        for (bad, says) in [
            ("cpu = 0", "more than 0"),
            ("cpu = -1", "write CPUs"),
            ("cpu = \"lots\"", "cpu `lots`"),
            ("memory = \"1K\"", "at least 4 MiB"),
            ("memory = \"much\"", "memory: unknown size unit"),
            ("cpu = true", "cpu: write CPUs"),
            ("memory = 1.5", "memory: write a size"),
            ("pids = 2", "pids `2`: at least 8"),
            ("pids = \"many\"", "pids: write a whole number"),
        ] {
            let err = service(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_listen_address_without_an_ip_is_every_address_of_the_host() {
        let l: super::ListenAddr = serde_json::from_str("\":8080\"").unwrap();
        assert_eq!(l.0, std::net::SocketAddr::from(([0, 0, 0, 0], 8080)));
        let l: super::ListenAddr = serde_json::from_str("\"[::1]:8081\"").unwrap();
        assert_eq!(l.0, "[::1]:8081".parse::<std::net::SocketAddr>().unwrap());
    }

    #[test]
    fn an_image_source_is_read_by_its_shape_and_shown_as_written() {
        for (written, kind) in [
            ("hello", "spec"),
            ("hello:v1", "store"),
            (
                "hello@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "store",
            ),
            ("registry.example.com/team/hello:v1", "registry"),
        ] {
            let image: super::ImageSource = serde_json::from_value(serde_json::json!(written))
                .unwrap_or_else(|e| panic!("{written}: {e}"));
            let got = match &image {
                super::ImageSource::Spec(_) => "spec",
                super::ImageSource::Store(_) => "store",
                super::ImageSource::Registry(_) => "registry",
            };
            assert_eq!((got, image.to_string().as_str()), (kind, written));
        }
        for (kind, shown) in [
            (super::RuntimeKind::Sandbox, "sandbox"),
            (super::RuntimeKind::Process, "process"),
            (super::RuntimeKind::Oci, "oci"),
        ] {
            assert_eq!(kind.to_string(), shown);
        }
    }

    /// A readiness probe of `body`, parsed and checked.
    fn probe(body: &str) -> Result<super::Probe, String> {
        service(&format!("[services.web.health.readiness]\n{body}\n"))
            .map(|s| s.health.readiness.unwrap_or_else(|| panic!("no probe")))
    }

    #[test]
    fn a_probe_is_exactly_one_check_with_sane_numbers() {
        assert_eq!(
            probe("tcp = true").map(|p| p.check),
            Ok(super::ProbeCheck::Tcp)
        );
        let http = probe("http = \"/healthz\"\ntcp = false").unwrap();
        assert_eq!(
            http.check,
            super::ProbeCheck::Http {
                path: "/healthz".to_owned(),
                status: 200
            }
        );
        for (body, says) in [
            ("tcp = false", "exactly one of"),
            ("http = \"/a\"\ntcp = true", "exactly one of"),
            ("tcp = true\nstatus = 204", "status applies only to http"),
            (
                "exec = [\"/bin/true\"]\nstatus = 204",
                "status applies only to http",
            ),
            (
                "tcp = true\nsuccess_threshold = 0",
                "thresholds must be at least 1",
            ),
            (
                "tcp = true\nfailure_threshold = 0",
                "thresholds must be at least 1",
            ),
            ("tcp = true\ninterval = \"0s\"", "must be more than 0"),
            ("tcp = true\ntimeout = \"0s\"", "must be more than 0"),
        ] {
            let err = probe(body).unwrap_err();
            assert!(err.contains(says), "{body}: {err}");
        }
        assert!(probe("http = \"/a\"\nstatus = 204").is_ok());
        assert_eq!(super::Pause::Manual.to_string(), "manual");
        assert_eq!(
            super::Pause::For(super::Duration::from_secs(90)).to_string(),
            "1m 30s"
        );
    }

    #[test]
    fn a_full_service_parses() {
        let text = r#"
[images.hello]
[services.web]
image = "hello"
replicas = 3
listen = "127.0.0.1:8080"
env = { A = "1" }
command = ["/bin/hello", "--x"]
volumes = { data = "/data", cache = { path = "/cache", shared = true } }
runtime = "sandbox"
[services.web.health.readiness]
http = "/healthz"
interval = "500ms"
[services.web.health.liveness]
exec = ["/bin/true"]
failure_threshold = 2
[services.web.rollout]
strategy = "recreate"
progress_deadline = "2m"
[services.web.stop]
signal = "SIGINT"
kill_timeout = "3s"
"#;
        let spec = Spec::parse(text, "k.toml").unwrap();
        let web = spec.services.values().next().unwrap();
        assert_eq!(web.replicas, 3);
        assert_eq!(web.volumes.len(), 2);
        assert!(web.volumes.values().any(|v| v.shared));
        let r = web.health.readiness.as_ref().unwrap();
        assert_eq!(r.interval.0, std::time::Duration::from_millis(500));
        assert_eq!(web.rollout.progress_deadline.0.as_secs(), 120);
        assert_eq!(web.stop.kill_timeout.0.as_secs(), 3);
    }

    #[test]
    fn service_errors_are_located_and_explained() {
        for (text, needle, line) in [
            (
                // At its `image` line, not the table header (issue 13).
                "[services.web]\nimage = \"nope\"\n",
                "not an [images] table",
                2,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nreplicas = -1\n",
                "invalid value",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nlisten = \"8080\"\n",
                "expected IP:PORT",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nruntime = \"sandbx\"\n",
                "did you mean `sandbox`",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nuser = \"a b\"\n",
                "user `a b` is not valid",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\n[services.web.health.readiness]\nhttp = \"/\"\ntcp = true\n",
                "exactly one of",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\n[services.web.health.readiness]\ntcp = true\ninterval = \"soon\"\n",
                "invalid duration",
                6,
            ),
            (
                "[images.a]\n[services.a]\nimage = \"a\"\nlisten = \"127.0.0.1:1\"\n[services.b]\nimage = \"a\"\nlisten = \"127.0.0.1:1\"\n",
                "service a and service b both route any host / on 127.0.0.1:1",
                5,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nvolumes = { d = \"data\" }\n",
                "must be absolute",
                4,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\n[services.web.stop]\nsignal = \"KILL\"\n",
                "unknown value",
                5,
            ),
            (
                "[images.a]\n[services.web]\nimage = \"a\"\nreplica = 2\n",
                "did you mean `replicas`",
                4,
            ),
        ] {
            let err = Spec::parse(text, "k.toml").unwrap_err();
            assert!(err.message.contains(needle), "{text:?}: {err}");
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }
}

#[cfg(test)]
mod blue_green_tests {
    use crate::spec::Spec;

    #[test]
    fn blue_green_settings_are_checked() {
        let base = "[images.a]\n[services.web]\nimage = \"a\"\nlisten = \"127.0.0.1:9000\"\n";
        for (extra, needle) in [
            (
                "[services.web.rollout]\nstrategy = \"blue-green\"\npreview_listen = \"127.0.0.1:9000\"\n",
                "service web and the preview of service web both route any host / on 127.0.0.1:9000",
            ),
            (
                "volumes = { d = \"/data\" }\n[services.web.rollout]\nstrategy = \"blue-green\"\n",
                "must be marked shared-safe",
            ),
            (
                "[services.web.rollout]\npreview_listen = \"127.0.0.1:9001\"\n",
                "apply only to strategy",
            ),
        ] {
            let err = Spec::parse(&format!("{base}{extra}"), "k.toml").unwrap_err();
            assert!(err.message.contains(needle), "{extra}: {err}");
        }
        let ok = format!(
            "{base}volumes = {{ d = {{ path = \"/data\", shared = true }} }}\n[services.web.rollout]\nstrategy = \"blue-green\"\npreview_listen = \"127.0.0.1:9001\"\nauto_promote = false\nscale_down_delay = \"10m\"\n"
        );
        let spec = Spec::parse(&ok, "k.toml").unwrap();
        let r = &spec.services.values().next().unwrap().rollout;
        assert!(!r.auto_promote);
        assert_eq!(r.scale_down_delay.0.as_secs(), 600);
    }
}

#[cfg(test)]
mod canary_tests {
    use super::{Pause, Ratio};
    use crate::spec::Spec;

    const BASE: &str = "[images.a]\n[services.web]\nimage = \"a\"\nlisten = \"127.0.0.1:9000\"\n";

    #[test]
    fn router_limits_parse_with_defaults_and_refuse_zero() {
        let spec = Spec::parse(BASE, "k.toml").unwrap();
        let r = spec.services.values().next().unwrap().router;
        assert_eq!(r, super::RouterSpec::default());
        assert_eq!(r.body_timeout.0.as_secs(), 60);
        assert_eq!(r.max_connections, None);
        let text = format!(
            "{BASE}[services.web.router]\nbody_timeout = \"5s\"\nread_timeout = \"2m\"\nsend_timeout = \"500ms\"\nmax_connections = 100\n"
        );
        let r = Spec::parse(&text, "k.toml")
            .unwrap()
            .services
            .values()
            .next()
            .unwrap()
            .router;
        assert_eq!(r.body_timeout.0.as_secs(), 5);
        assert_eq!(r.read_timeout.0.as_secs(), 120);
        assert_eq!(r.send_timeout.0.as_millis(), 500);
        assert_eq!(r.max_connections, Some(100));
        for (extra, says) in [
            (
                "body_timeout = \"0s\"",
                "router.body_timeout must be more than 0",
            ),
            (
                "max_connections = 0",
                "router.max_connections must be at least 1",
            ),
            ("max_conections = 5", "max_conections"),
        ] {
            let text = format!("{BASE}[services.web.router]\n{extra}\n");
            let err = Spec::parse(&text, "k.toml").unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
    }

    #[test]
    fn canary_settings_parse() {
        let text = format!(
            "{BASE}[services.web.rollout]\nstrategy = \"canary\"\nsticky = true\nsteps = [{{ weight = 10, pause = \"30s\" }}, {{ weight = 50, pause = \"manual\" }}, {{ weight = 100 }}]\n[services.web.rollout.analysis]\nmax_error_rate = \"5%\"\nmax_p99 = \"250ms\"\nmax_error_rate_increase = 0.02\n"
        );
        let spec = Spec::parse(&text, "k.toml").unwrap();
        let r = &spec.services.values().next().unwrap().rollout;
        assert_eq!(r.steps.len(), 3);
        assert_eq!(r.steps[0].pause, Pause::For(super::Duration::from_secs(30)));
        assert_eq!(r.steps[1].pause, Pause::Manual);
        assert_eq!(r.steps[2].pause, Pause::default());
        let a = r.analysis.as_ref().unwrap();
        assert_eq!(a.max_error_rate, Some(Ratio(50_000)));
        assert_eq!(a.max_error_rate_increase, Some(Ratio(20_000)));
        assert_eq!(a.max_p99.unwrap().0.as_millis(), 250);
        assert_eq!(a.min_requests, 20);
        assert!(r.sticky);
    }

    #[test]
    fn bad_canary_settings_are_refused_with_the_reason() {
        for (extra, needle) in [
            (
                "strategy = \"canary\"\nsteps = [{ weight = 10 }, { weight = 50 }]\n",
                "must end at weight 100",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 0 }, { weight = 100 }]\n",
                "weight 0 is not from 1 to 100",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 150 }]\n",
                "not from 1 to 100",
            ),
            ("strategy = \"canary\"\n", "needs rollout.steps"),
            (
                "steps = [{ weight = 100 }]\n",
                "apply only to strategy = \"canary\"",
            ),
            (
                "strategy = \"blue-green\"\n[services.web.rollout.analysis]\nmax_p99 = \"1s\"\n",
                "apply only to strategy = \"canary\"",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 100, pause = \"forever\" }]\n",
                "invalid pause `forever`",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 100, wait = \"1s\" }]\n",
                "unknown",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 100 }]\n[services.web.rollout.analysis]\nmax_error_rate = 1.5\n",
                "invalid ratio",
            ),
            (
                "strategy = \"canary\"\nsteps = [{ weight = 100 }]\n[services.web.rollout.analysis]\nmax_error_rate = \"lots\"\n",
                "invalid ratio `lots`",
            ),
        ] {
            let text = format!("{BASE}[services.web.rollout]\n{extra}");
            let err = Spec::parse(&text, "k.toml").unwrap_err();
            assert!(err.message.contains(needle), "{extra}: {err}");
        }
        let shared = format!(
            "{BASE}volumes = {{ d = \"/data\" }}\n[services.web.rollout]\nstrategy = \"canary\"\nsteps = [{{ weight = 100 }}]\n"
        );
        let err = Spec::parse(&shared, "k.toml").unwrap_err();
        assert!(err.message.contains("must be marked shared-safe"), "{err}");
    }
}

#[cfg(test)]
mod tls_tests {
    use crate::spec::Spec;

    #[test]
    fn tls_settings_are_checked() {
        let base = "[images.a]\n[services.web]\nimage = \"a\"\nlisten = \"127.0.0.1:9443\"\nhosts = [\"a.test\"]\n[services.web.tls]\n";
        let ok = |extra: &str| {
            Spec::parse(&format!("{base}{extra}"), "kiln.toml")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(ok("cert = \"c.pem\"\nkey = \"k.pem\"\n"), Ok(()));
        assert_eq!(
            ok("acme = \"https://ca.test/dir\"\nredirect_from = \"127.0.0.1:9080\"\n"),
            Ok(())
        );
        // Without a plain address: TLS-ALPN-01 on the HTTPS one.
        assert_eq!(ok("acme = \"https://ca.test/dir\"\n"), Ok(()));
        for (extra, needle) in [
            ("cert = \"c.pem\"\n", "tls needs cert and key"),
            ("", "tls needs cert and key"),
            (
                "cert = \"c.pem\"\nkey = \"k.pem\"\nacme = \"https://ca.test/dir\"\n",
                "not both",
            ),
            (
                "acme = \"http://ca.test/dir\"\nredirect_from = \"127.0.0.1:9080\"\n",
                "must be an https://",
            ),
            (
                "cert = \"c.pem\"\nkey = \"k.pem\"\nredirect_from = \"127.0.0.1:9443\"\n",
                "the HTTPS redirect of service web both route host a.test / on 127.0.0.1:9443",
            ),
            (
                "cert = \"c.pem\"\nkey = \"k.pem\"\nbogus = 1\n",
                "unknown key `bogus`",
            ),
        ] {
            let err = ok(extra).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let wild = base.replace("hosts = [\"a.test\"]", "hosts = [\"*.a.test\"]");
        let err = Spec::parse(
            &format!("{wild}acme = \"https://ca.test/dir\"\nredirect_from = \"127.0.0.1:9080\"\n"),
            "kiln.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot certify host *.a.test"), "{err}");
        // By DNS-01 a wildcard is fine, and no plain address is needed.
        assert!(
            Spec::parse(
                &format!("{wild}acme = \"https://ca.test/dir\"\ndns_hook = [\"/bin/hook\"]\n"),
                "kiln.toml"
            )
            .is_ok()
        );
        let err = Spec::parse(
            &format!("{wild}acme = \"https://ca.test/dir\"\ndns_hook = [\"\"]\n"),
            "kiln.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls.dns_hook: the command is empty"), "{err}");
        let anyhost = base.replace("hosts = [\"a.test\"]\n", "");
        let err = Spec::parse(
            &format!(
                "{anyhost}acme = \"https://ca.test/dir\"\nredirect_from = \"127.0.0.1:9080\"\n"
            ),
            "kiln.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls.acme needs hosts"), "{err}");
        let nolisten = base.replace("listen = \"127.0.0.1:9443\"\nhosts = [\"a.test\"]\n", "");
        let err = Spec::parse(
            &format!("{nolisten}cert = \"c.pem\"\nkey = \"k.pem\"\n"),
            "kiln.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls needs a listen address"), "{err}");
    }
}

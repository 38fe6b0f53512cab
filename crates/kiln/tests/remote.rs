//! Remote use, black-box over real TLS on loopback: `kiln serve --api`,
//! tokens and roles, `kiln login` with a pinned certificate, `--agent`,
//! images through the agent's OCI endpoint.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

/// An agent serving its API over TLS on a free loopback port.
struct Remote {
    env: Env,
    _agent: Agent,
    port: u16,
}

impl Remote {
    fn start() -> Self {
        let env = Env::new();
        let port = free_port();
        let agent = Agent::start_with(&env, |c| {
            c.args(["--api", &format!("127.0.0.1:{port}")]);
        });
        wait_for("the API port", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            env,
            _agent: agent,
            port,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A token made on the agent's machine (over its socket).
    fn token(&self, name: &str, role: &str) -> String {
        self.env
            .ok(&["token", "create", name, "--role", role])
            .trim()
            .to_owned()
    }

    /// One HTTPS request with curl (certificate not checked: pinning is
    /// kiln's, tested through kiln); the status and body.
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&str>,
    ) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args([
            "-sk",
            "--path-as-is",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg(format!("{}{path}", self.url()));
        for h in headers {
            c.args(["-H", h]);
        }
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        let out = c.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("a status line");
        (code.trim().parse().expect("a status"), body.to_owned())
    }

    /// What a refused request must leave as it was: every event, every token.
    fn fingerprint_of_state(&self) -> (i64, Vec<String>) {
        let db = rusqlite::Connection::open(self.env.home.join("state.db")).unwrap();
        let events: i64 = db
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        let mut stmt = db
            .prepare("SELECT record FROM tokens ORDER BY name")
            .unwrap();
        let tokens = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        (events, tokens)
    }
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}")
}

/// Each role against each endpoint: allowed from the role the endpoint
/// needs up, refused (401 without a valid token, 403 below the role) with
/// nothing changed.
#[test]
fn each_role_against_each_endpoint() {
    let r = Remote::start();
    let viewer = r.token("v", "viewer");
    let deployer = r.token("d", "deployer");
    let admin = r.token("a", "admin");
    let revoked = r.token("gone", "admin");
    r.env.ok(&["token", "revoke", "gone"]);
    let expiring = r.env.ok(&[
        "token",
        "create",
        "brief",
        "--role",
        "admin",
        "--expires",
        "1s",
    ]);
    let expiring = expiring.trim().to_owned();
    std::thread::sleep(Duration::from_millis(2100));

    let apply = r#"{"services":[],"dry_run":true,"explicit_runtime":[],"prune":false}"#;
    // (method, path, body, the least role allowed: 0 viewer, 1 deployer, 2 admin)
    let table: &[(&str, &str, Option<&str>, u8)] = &[
        ("GET", "/v1/status", None, 0),
        ("GET", "/v1/whoami", None, 0),
        ("GET", "/v1/services/web/history", None, 0),
        ("GET", "/v1/logs?service=web", None, 0),
        ("GET", "/v1/metrics", None, 0),
        ("GET", "/v1/audit", None, 0),
        ("GET", "/", None, 0),
        ("GET", "/v2/", None, 0),
        ("GET", "/v2/junk/tags/list", None, 0),
        ("POST", "/v1/apply", Some(apply), 1),
        ("POST", "/v1/services/web/rollback", Some(r#"{"to":1}"#), 1),
        ("POST", "/v1/services/web/promote", None, 1),
        ("POST", "/v1/services/web/abort", None, 1),
        ("POST", "/v1/services/web/remove", None, 1),
        (
            "POST",
            "/v1/services/web/run",
            Some(r#"{"argv":["true"]}"#),
            1,
        ),
        (
            "POST",
            "/v1/instances/nosuch/exec",
            Some(r#"{"argv":["true"]}"#),
            1,
        ),
        (
            "POST",
            "/v1/instances/nosuch/exec",
            Some(r#"{"argv":["true"],"keep":true}"#),
            2,
        ),
        ("POST", "/v2/junk/blobs/uploads/", None, 1),
        ("GET", "/v1/tokens", None, 2),
        (
            "POST",
            "/v1/tokens",
            Some(r#"{"name":"made","role":"viewer"}"#),
            2,
        ),
        ("POST", "/v1/tokens/nosuch/revoke", None, 2),
        (
            "POST",
            "/v1/gc",
            Some(r#"{"keep_releases":10,"grace_secs":3600,"dry_run":true}"#),
            2,
        ),
    ];
    let callers: &[(&str, Option<&str>, Option<u8>)] = &[
        ("no token", None, None),
        ("a malformed token", Some("kiln.x.nope"), None),
        ("a revoked token", Some(&revoked), None),
        ("an expired token", Some(&expiring), None),
        ("viewer", Some(&viewer), Some(0)),
        ("deployer", Some(&deployer), Some(1)),
        ("admin", Some(&admin), Some(2)),
    ];
    for (method, path, body, needs) in table {
        for (who, token, level) in callers {
            let before = r.fingerprint_of_state();
            let headers: Vec<String> = token.map(bearer).into_iter().collect();
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let (status, text) = r.call(method, path, &headers, *body);
            match level {
                None => {
                    // The dashboard sends a browser to sign in; the API says 401.
                    let want = if *path == "/" { 303 } else { 401 };
                    assert_eq!(status, want, "{who}: {method} {path}: {text}");
                }
                Some(l) if l < needs => {
                    assert_eq!(status, 403, "{who}: {method} {path}: {text}");
                    assert!(text.contains("needs"), "{text}");
                }
                Some(_) => assert!(
                    ![401, 403].contains(&status),
                    "{who} may {method} {path}: {status} {text}"
                ),
            }
            if level.is_none_or(|l| l < *needs) {
                assert_eq!(
                    r.fingerprint_of_state(),
                    before,
                    "a refused {method} {path} ({who}) changed nothing"
                );
            }
        }
    }
    // The admin's token creation was the one change, and names its actor.
    let tokens = r.env.ok(&["token", "list"]);
    assert!(tokens.contains("made"), "{tokens}");
    let db = rusqlite::Connection::open(r.env.home.join("state.db")).unwrap();
    let actor: String = db
        .query_row(
            "SELECT actor FROM events WHERE kind = 'token-created' AND detail LIKE '%made%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(actor, "token:a");
    // No token ever reaches the agent's log, not even a refused one.
    let log = std::fs::read_to_string(r.env.path("agent.log")).unwrap();
    for t in [&viewer, &deployer, &admin, &revoked, &expiring] {
        let secret = t.rsplit('.').next().unwrap();
        assert!(!log.contains(secret), "a token is in the log:\n{log}");
    }
}

/// Bad input on the TLS port: a clear status and message, nothing changed.
#[test]
fn bad_requests_get_a_clear_status_and_change_nothing() {
    let r = Remote::start();
    let admin = r.token("a", "admin");
    let auth = bearer(&admin);
    let before = r.fingerprint_of_state();
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "POST",
            "/v1/apply",
            Some("{not json"),
            400,
            "invalid request body",
        ),
        (
            "POST",
            "/v1/tokens",
            Some(r#"{"name":"x","role":"viewer","admin":true}"#),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/tokens",
            Some(r#"{"name":"Bad Name","role":"viewer"}"#),
            400,
            "invalid token name",
        ),
        (
            "POST",
            "/v1/tokens",
            Some(r#"{"name":"x","role":"root"}"#),
            400,
            "unknown variant",
        ),
        ("GET", "/etc/passwd", None, 404, "no such endpoint"),
        ("GET", "/v1/../../etc/passwd", None, 404, "no such endpoint"),
        (
            "DELETE",
            "/v2/junk/manifests/v1",
            None,
            404,
            "no such endpoint",
        ),
        (
            "PUT",
            "/v2/junk/manifests/v1",
            Some("{}"),
            400,
            "MANIFEST_INVALID",
        ),
        ("GET", "/v2/NOT_A_NAME/tags/list", None, 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/junk/blobs/sha256:zz",
            None,
            400,
            "DIGEST_INVALID",
        ),
    ];
    for (method, path, body, want, says) in cases {
        let (status, text) = r.call(method, path, &[&auth], *body);
        assert_eq!(status, *want, "{method} {path}: {text}");
        assert!(text.contains(says), "{method} {path}: {text}");
    }
    // A body over the limit.
    let big = format!(r#"{{"services":[],"pad":"{}"}}"#, "x".repeat(3 << 20));
    let path = r.env.path("big.json");
    write(&path, big.as_bytes());
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &auth, "-H", "content-type: application/json"])
        .arg("--data-binary")
        .arg(format!("@{}", path.display()))
        .arg(format!("{}/v1/apply", r.url()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    assert_eq!(r.fingerprint_of_state(), before);
}

/// Repeated failures from one address are slowed down; a valid token
/// still works afterwards.
#[test]
fn repeated_failures_from_one_address_are_slowed_down() {
    let r = Remote::start();
    let viewer = r.token("v", "viewer");
    let bad = bearer("kiln.v.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let mut took = Vec::new();
    for _ in 0..6 {
        let t = std::time::Instant::now();
        assert_eq!(r.call("GET", "/v1/status", &[&bad], None).0, 401);
        took.push(t.elapsed());
    }
    // The first three are free; from the fourth on each waits (250 ms,
    // 500 ms, 1 s): a floor, never a ceiling, so this cannot flake on a
    // slow machine.
    assert!(took[5] >= Duration::from_millis(900), "{took:?}");
    assert_eq!(
        r.call("GET", "/v1/status", &[&bearer(&viewer)], None).0,
        200
    );
}

/// `kiln login` pins the certificate; a changed one is refused by every
/// command, naming both fingerprints.
#[test]
fn a_pinned_fingerprint_that_changes_is_refused() {
    let env = Env::new();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let start = |env: &Env| {
        let a = Agent::start_with(env, |c| {
            c.args(["--api", &format!("127.0.0.1:{port}")]);
        });
        wait_for("the API port", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        a
    };
    let mut agent = start(&env);
    let token = env
        .ok(&["token", "create", "laptop", "--role", "viewer"])
        .trim()
        .to_owned();
    let laptop = Env::new();
    // A pin given that the agent does not match: refused in the handshake,
    // before the token is sent (nothing kept).
    let out = laptop
        .cmd()
        .args(["login", &url])
        .env("KILN_TOKEN", &token)
        .env(
            "KILN_AGENT_FINGERPRINT",
            format!("sha256:{}", "00".repeat(32)),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no token sent"),
        "{err}"
    );
    assert!(!laptop.home.join("agents.json").exists());
    let mut login = laptop.cmd();
    login
        .args(["login", &url, "--json"])
        .env("KILN_TOKEN", &token);
    let first = login.output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // First use: the certificate is shown before anything is sent.
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("presents certificate sha256:"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(out["role"], "viewer");
    assert_eq!(out["actor"], "token:laptop");
    let pinned = out["fingerprint"].as_str().unwrap().to_owned();
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap();
    assert!(log.contains(&pinned), "the agent logs what clients pin");
    let meta = std::fs::metadata(laptop.home.join("agents.json")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    laptop.ok(&["--agent", &url, "status"]);

    // A new certificate (as a man in the middle would present).
    agent.stop();
    std::fs::remove_dir_all(env.home.join("api")).unwrap();
    let _agent = start(&env);
    let err = laptop.fails(&["--agent", &url, "status"]);
    assert!(
        err.contains("not the pinned") && err.contains(&pinned),
        "{err}"
    );
    // A pin given by KILN_AGENT_FINGERPRINT (CI, never logged in): the
    // refusal says to change that, not to log out.
    let ci = Env::new();
    let out = ci
        .cmd()
        .args(["--agent", &url, "status"])
        .env("KILN_TOKEN", &token)
        .env("KILN_AGENT_FINGERPRINT", &pinned)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("from KILN_AGENT_FINGERPRINT")
            && err.contains("set KILN_AGENT_FINGERPRINT=")
            && !err.contains("logout"),
        "{err}"
    );
    let mut again = laptop.cmd();
    again.args(["login", &url]).env("KILN_TOKEN", &token);
    let out = again.output().unwrap();
    assert!(!out.status.success(), "login keeps the pin");
    // Forgetting the pin on purpose, then logging in again, works.
    laptop.ok(&["logout", &url]);
    succeed(&mut again);
    laptop.ok(&["--agent", &url, "status"]);
}

fn remote_spec(port: u16, version: &str) -> String {
    format!(
        r#"
[images.app]
context = "app"
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 1
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
"#
    )
}

/// `kiln apply --agent URL` from a second home: bakes there, uploads only
/// the blobs the agent lacks, then applies; the release records the token.
#[test]
fn a_remote_apply_uploads_only_missing_blobs_and_deploys() {
    let r = Remote::start();
    let deployer = r.token("ci", "deployer");
    let laptop = Env::new();
    let mut login = laptop.cmd();
    login.args(["login", &r.url()]).env("KILN_TOKEN", &deployer);
    succeed(&mut login);
    let port = free_port();
    // The spec outside the image's context: changing it changes no blob.
    hello_app(&laptop.path("app"), "");
    let spec = laptop.path("kiln.toml");
    write(&spec, remote_spec(port, "v1").as_bytes());
    let spec = spec.to_str().unwrap();
    let out = laptop.run(&["--agent", &r.url(), "apply", "-f", spec]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("uploaded 2 blobs"), "config and layer: {err}");
    assert!(
        http_get(port.into(), "/")
            .unwrap()
            .contains("hello from v1")
    );
    // The image is in the agent's store under its digest.
    let digest = laptop.json(&["images", "--json"])[0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(r.env.ok(&["images"]).contains(&digest[7..19]));
    // Same image, other settings: nothing to upload.
    write(Path::new(spec), remote_spec(port, "v2").as_bytes());
    let out = laptop.run(&["--agent", &r.url(), "apply", "-f", spec]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("uploaded 0 blobs") && err.contains("2 it had"),
        "{err}"
    );
    assert!(
        http_get(port.into(), "/")
            .unwrap()
            .contains("hello from v2")
    );
    let actors = actors_of(&r.env, &["release-created"]);
    assert_eq!(actors, ["token:ci", "token:ci"]);
    // A viewer cannot deploy: refused before anything is uploaded.
    let viewer = r.token("look", "viewer");
    let mut as_viewer = laptop.cmd();
    as_viewer
        .args(["--agent", &r.url(), "apply", "-f", spec])
        .env("KILN_TOKEN", &viewer);
    let out = as_viewer.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs deployer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(releases(&r.env, "web").len(), 2);
    // An admin collects the agent's store from afar; the running image stays.
    let admin = r.token("root", "admin");
    let mut gc = laptop.cmd();
    gc.args(["--agent", &r.url(), "gc", "--json"])
        .env("KILN_TOKEN", &admin);
    let report: serde_json::Value = serde_json::from_slice(&succeed(&mut gc)).unwrap();
    assert_eq!(report["kept_images"], 1, "{report}");
    // `kiln push` with no destination goes to the agent: all there already.
    let mut push = laptop.cmd();
    push.args(["--agent", &r.url(), "push", "app", "--json"])
        .env("KILN_TOKEN", &deployer);
    let pushed: serde_json::Value = serde_json::from_slice(&succeed(&mut push)).unwrap();
    assert_eq!(
        (pushed["uploaded"].as_u64(), pushed["present"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(pushed["digest"], digest.as_str());
    assert!(r.env.ok(&["images"]).contains(&digest[7..19]));
}

/// skopeo reads an image from the agent and writes one to it, both with
/// the same digest as the store's; a blob whose bytes do not match its
/// digest is refused with nothing kept.
#[test]
fn skopeo_reads_from_and_writes_to_the_agent() {
    require("skopeo");
    let r = Remote::start();
    let deployer = r.token("d", "deployer");
    let creds = format!("x:{deployer}");
    let app = r.env.path("app");
    write(&app.join("kiln.toml"), b"[images.junk]\n");
    write(&app.join("file"), b"junk\n");
    let digest = r.env.bake(&app.join("kiln.toml"), &["--tag", "v1"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let oci = r.env.path("oci");
    succeed(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--src-creds", &creds])
            .arg(format!("docker://127.0.0.1:{}/junk:v1", r.port))
            .arg(format!("oci:{}:junk", oci.display())),
    );
    succeed(
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--dest-creds", &creds])
            .arg(format!("oci:{}:junk", oci.display()))
            .arg(format!("docker://127.0.0.1:{}/copy:v2", r.port)),
    );
    let images = r.env.json(&["images", "--json"]);
    let copy = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "copy")
        .expect("the image skopeo wrote");
    assert_eq!(copy["digest"], digest.as_str());

    // A lying upload: bytes that are not the digest's.
    let before = r.env.store_state();
    let (status, text) = r.call(
        "POST",
        "/v2/junk/blobs/uploads/?digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
        &[&bearer(&deployer)],
        Some("these bytes hash to something else"),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("nothing was kept"), "{text}");
    assert_eq!(r.env.store_state(), before, "nothing kept");
}

use std::path::Path;

/// `--tls-cert` / `--tls-key`: the agent serves the user's certificate
/// (clients pin that one); a file that is not a certificate stops the
/// start with one line naming it.
#[test]
fn the_users_certificate_is_served_and_a_bad_one_refused() {
    let env = Env::new();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (env.path("mine.pem"), env.path("mine.key"));
    write(&cert, made.cert.pem().as_bytes());
    write(&key, made.signing_key.serialize_pem().as_bytes());
    let want = format!("sha256:{}", sha256_hex(made.cert.der()));
    let port = free_port();
    let agent = Agent::start_with(&env, |c| {
        c.args(["--api", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key);
    });
    wait_for("the API port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let token = env.ok(&["token", "create", "me", "--role", "viewer"]);
    let laptop = Env::new();
    let mut login = laptop.cmd();
    login
        .args(["login", &format!("https://127.0.0.1:{port}"), "--json"])
        .env("KILN_TOKEN", token.trim());
    let out: serde_json::Value = serde_json::from_slice(&succeed(&mut login)).unwrap();
    assert_eq!(out["fingerprint"], want.as_str());
    assert!(!env.home.join("api/cert.pem").exists(), "none made");
    drop(agent);

    // Not a certificate: the agent does not start, and says which file.
    let other = Env::new();
    let out = other
        .cmd()
        .args(["serve", "--api", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-cert")
        .arg(&key)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mine.key"), "{err}");
}

/// One HTTPS request with curl, returning the status line's code and the
/// response headers (lowercased names) and body.
fn call_with_headers(
    r: &Remote,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-sk", "--path-as-is", "-D", "-", "-o", "-", "-X", method])
        .arg(format!("{}{path}", r.url()));
    for h in headers {
        c.args(["-H", h]);
    }
    let out = c.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_owned())
}

/// Point 5 of the hostile-client review: stored blobs are never served as
/// a page, Basic credentials count on `/v2/` only, a change from another
/// site is refused, an upload session is its opener's, and a revoked
/// token's open log stream ends.
#[test]
fn hostile_browsers_and_tokens_on_the_tls_port() {
    let r = Remote::start();
    let deployer = r.token("d", "deployer");
    let other = r.token("o", "deployer");
    let viewer = r.token("v", "viewer");

    // A JSON blob that claims to be HTML, uploaded as a blob.
    let page = br#"{"schemaVersion":2,"mediaType":"text/html","config":{},"layers":[],"x":"<script>alert(1)</script>"}"#;
    let digest = format!("sha256:{}", sha256_hex(page));
    let body = r.env.path("page.json");
    write(&body, page);
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &bearer(&deployer), "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("{}/v2/x/blobs/uploads/?digest={digest}", r.url()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "201");
    let (code, head, _) = call_with_headers(
        &r,
        "GET",
        &format!("/v2/x/manifests/{digest}"),
        &[&bearer(&viewer)],
    );
    assert_eq!(code, 404, "{head}");
    assert!(!head.contains("text/html"), "{head}");
    // Every answer says not to sniff and runs nothing.
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );

    // The sign-in page's stylesheet needs no token (the page asks for one).
    let (code, head, body) = call_with_headers(&r, "GET", "/ui/style.css", &[]);
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("content-type: text/css"), "{head}");
    assert!(!body.is_empty());
    let (code, _, _) = call_with_headers(&r, "GET", "/ui/events", &[]);
    assert_eq!(code, 303, "the rest of /ui/ still needs a token");

    // Basic credentials (what a browser saves at the registry's prompt)
    // count on /v2/ only.
    let basic = {
        use base64::Engine as _;
        format!(
            "authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("x:{deployer}"))
        )
    };
    assert_eq!(r.call("GET", "/v2/", &[&basic], None).0, 200);
    let (code, text) = r.call("GET", "/v1/status", &[&basic], None);
    assert_eq!(code, 401, "{text}");
    let plan = r#"{"services":[],"dry_run":true}"#;
    assert_eq!(r.call("POST", "/v1/apply", &[&basic], Some(plan)).0, 401);

    // A change from another site, whatever it carries.
    let auth = bearer(&deployer);
    let (code, text) = r.call(
        "POST",
        "/v1/apply",
        &[&auth, "origin: https://evil.example"],
        Some(plan),
    );
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("another origin"), "{text}");
    let (code, text) = r.call(
        "POST",
        "/v1/apply",
        &[&auth, "sec-fetch-site: cross-site"],
        Some(plan),
    );
    assert_eq!(code, 403, "{text}");
    let own = format!("origin: {}", r.url());
    assert_eq!(
        r.call("POST", "/v1/apply", &[&auth, &own], Some(plan)).0,
        200
    );
    assert_eq!(r.call("POST", "/v1/apply", &[&auth], Some(plan)).0, 200);

    // An upload session is its opener's.
    let (code, head, _) =
        call_with_headers(&r, "POST", "/v2/x/blobs/uploads/", &[&bearer(&deployer)]);
    assert_eq!(code, 202, "{head}");
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap()
        .trim()
        .to_owned();
    let (code, _) = r.call("PATCH", &location, &[&bearer(&other)], Some("abc"));
    assert_eq!(code, 404, "another token cannot write into it");
    let (code, _) = r.call("PATCH", &location, &[&bearer(&deployer)], Some("abc"));
    assert_eq!(code, 202, "its opener can");
}

/// A token revoked while its `logs -f` stream is open gets nothing more:
/// the stream ends.
#[test]
fn a_revoked_tokens_log_stream_ends() {
    let r = Remote::start();
    let spec = hello_app(
        &r.env.path("app"),
        "[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/start.sh\"]\n[services.web]\nimage = \"app\"\n",
    );
    r.env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let viewer = r.token("watcher", "viewer");
    let mut follow = Command::new("curl")
        .args(["-sNk", "-H", &bearer(&viewer)])
        .arg(format!("{}/v1/logs?service=web&follow=true", r.url()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The stream is open once it has delivered the instance's first line
    // (a refused request would end with no line); the rest is drained.
    let mut out = std::io::BufReader::new(follow.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(!first.is_empty(), "the stream delivered nothing");
    let drain = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    assert!(follow.try_wait().unwrap().is_none(), "the stream is open");
    r.env.ok(&["token", "revoke", "watcher"]);
    // The next chunk finds the token revoked: make one (a new release
    // starts a new instance, which logs).
    let text = std::fs::read_to_string(&spec).unwrap();
    write(&spec, format!("{text}env = {{ V = \"2\" }}\n").as_bytes());
    r.env.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let ended = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        follow.try_wait().unwrap().is_some()
    });
    if !ended {
        let _ = follow.kill();
    }
    let _ = drain.join();
    assert!(ended, "the revoked token's stream still runs");
}

/// A token may deploy, but never make the agent read its host's files or
/// run a command outside an instance: `tls` keys that name them are the
/// local caller's only, refused by the agent whatever the client sends.
#[test]
fn a_token_cannot_name_the_agents_files_or_commands_in_tls() {
    let r = Remote::start();
    let deployer = r.token("ci", "deployer");
    let laptop = Env::new();
    let mut login = laptop.cmd();
    login.args(["login", &r.url()]).env("KILN_TOKEN", &deployer);
    succeed(&mut login);
    let port = free_port();
    hello_app(&laptop.path("app"), "");
    let spec = laptop.path("kiln.toml");
    for (tls, key) in [
        (
            "cert = \"/etc/kiln/api/cert.pem\"\nkey = \"/etc/kiln/api/key.pem\"\n",
            "tls.cert",
        ),
        (
            "acme = \"https://ca.test/dir\"\nacme_root = \"/etc/ssl/x.pem\"\nredirect_from = \"127.0.0.1:1\"\n",
            "tls.acme_root",
        ),
        (
            "acme = \"https://ca.test/dir\"\ndns_hook = [\"/bin/sh\", \"-c\", \"id > /tmp/owned\"]\n",
            "tls.dns_hook",
        ),
    ] {
        let text = remote_spec(port, "v1").replace(
            "[services.web.health.readiness]",
            "hosts = [\"a.test\"]\n[services.web.tls]\nTLS[services.web.health.readiness]",
        );
        write(&spec, text.replace("TLS", tls).as_bytes());
        let out = laptop.run(&["--agent", &r.url(), "apply", "-f", spec.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tls}: {err}");
        assert!(
            err.contains(&format!(
                "service web: {key} names a file or command on the agent's host: only a caller on the agent's socket may set it, not token ci"
            )),
            "{err}"
        );
    }
    // Nothing was recorded.
    assert!(
        r.env
            .fails(&["history", "web"])
            .contains("no service named web")
    );
}

//! Black-box tests of `kiln push`, `kiln pull` and `kiln login` against a
//! real registry (Debian's `docker-registry`, distribution 2.8) that each
//! test starts on a free loopback port with its own config and storage,
//! and against small lying registries written here.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::{Env, free_port, have, sha256_hex, succeed, write};

/// A `docker-registry` on 127.0.0.1, stopped (by its pid) when dropped.
struct Registry {
    child: Child,
    host: String,
    _dir: tempfile::TempDir,
}

/// How a test registry authenticates.
enum RegAuth<'a> {
    None,
    /// htpasswd basic auth for (user, password).
    Basic(&'a str, &'a str),
    /// The distribution token flow: tokens from `TokenServer`, whose
    /// certificate the registry trusts.
    Token(&'a TokenServer),
}

impl Registry {
    /// Anonymous, or with htpasswd basic auth for `user`:`password`.
    fn start(user: Option<(&str, &str)>) -> Self {
        match user {
            Some((u, p)) => Self::start_with(RegAuth::Basic(u, p)),
            None => Self::start_with(RegAuth::None),
        }
    }

    fn start_with(auth: RegAuth<'_>) -> Self {
        assert!(
            have("docker-registry"),
            "docker-registry is not installed (scripts/test installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let RegAuth::Token(t) = &auth {
            std::fs::write(dir.path().join("token.crt"), &t.cert_pem).unwrap();
            config.push_str(&format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: kiln-test-registry\n    issuer: kiln-test-issuer\n    rootcertbundle: {}\n",
                t.port,
                dir.path().join("token.crt").display()
            ));
        }
        if let RegAuth::Basic(u, p) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd (apache2-utils) is needed");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            host,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image baked from a tiny app: its digest.
fn bake(env: &Env, content: &str) -> String {
    let app = env.path("app");
    write(&app.join("bin/app"), content.as_bytes());
    write(
        &app.join("kiln.toml"),
        b"[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/app\"]\n",
    );
    let v = env.bake(&app.join("kiln.toml"), &["--tag", "v1"]);
    v["digest"].as_str().unwrap().to_owned()
}

fn kiln(env: &Env, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    env.json(&all)
}

#[test]
fn push_then_pull_round_trips_the_digest_and_a_second_push_uploads_nothing() {
    let reg = Registry::start(None);
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho one\n");
    let dest = format!("{}/team/app:v1", reg.host);
    let r = kiln(&a, &["push", "app:v1", &dest, "--insecure"]);
    assert_eq!(r["digest"], digest.as_str());
    assert_eq!(
        (r["uploaded"].as_u64(), r["skipped"].as_u64()),
        (Some(2), Some(0))
    );
    // Another repository of the same registry: mounted, not uploaded.
    let other = kiln(
        &a,
        &[
            "push",
            "app:v1",
            &format!("{}/elsewhere/app:v1", reg.host),
            "--insecure",
        ],
    );
    assert_eq!(
        (other["uploaded"].as_u64(), other["mounted"].as_u64()),
        (Some(0), Some(2)),
        "{other}"
    );
    let again = kiln(&a, &["push", "app:v1", &dest, "--insecure"]);
    assert_eq!(
        (again["uploaded"].as_u64(), again["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    // Another machine: the same digest, by tag and by digest.
    let b = Env::new();
    let p = kiln(&b, &["pull", &dest, "--insecure"]);
    assert_eq!(p["digest"], digest.as_str());
    assert_eq!(p["resolved"], digest.as_str());
    assert_eq!(p["name"], "app");
    let by_digest = format!("{}/team/app@{digest}", reg.host);
    let p = kiln(&b, &["pull", &by_digest, "--insecure"]);
    assert_eq!(
        (p["downloaded"].as_u64(), p["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    assert!(
        b.ok(&["verify", "app:v1"]).starts_with("ok"),
        "the pulled image is whole"
    );
    // Plain HTTP only when asked: without --insecure it is TLS, and says why it failed.
    let out = b.run(&["pull", &dest]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("does not speak TLS") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn skopeo_reads_what_kiln_pushed_and_kiln_pulls_what_skopeo_pushed() {
    assert!(have("skopeo"), "skopeo is not installed");
    let reg = Registry::start(None);
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho two\n");
    kiln(
        &a,
        &[
            "push",
            "app:v1",
            &format!("{}/app:v1", reg.host),
            "--insecure",
        ],
    );
    let layout = a.path("from-registry");
    succeed(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
            .arg(format!("docker://{}/app:v1", reg.host))
            .arg(format!("oci:{}:v1", layout.display())),
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    // skopeo pushes an OCI layout (kiln's export) to another repository;
    // kiln pulls it with the same digest.
    let exported = a.path("exported");
    a.ok(&["export", "app:v1", "--oci", exported.to_str().unwrap()]);
    succeed(
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--preserve-digests"])
            .arg(format!("oci:{}:v1", exported.display()))
            .arg(format!("docker://{}/other/app:v2", reg.host)),
    );
    let b = Env::new();
    let p = kiln(
        &b,
        &["pull", &format!("{}/other/app:v2", reg.host), "--insecure"],
    );
    assert_eq!(p["digest"], digest.as_str());
    // Images other tools made: Docker schema 2, and zstd layers. Pulled,
    // and they unpack to the same files (the digests are theirs).
    let skopeo = |args: &[&str]| {
        succeed(Command::new("skopeo").args(args));
    };
    let oci = format!("oci:{}:v1", exported.display());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &oci,
        &format!("docker://{}/docker/app:v1", reg.host),
    ]);
    let dir = a.path("decompressed");
    // Another registry for zstd: skopeo would reuse this one's gzip blobs.
    let reg2 = Registry::start(None);
    skopeo(&[
        "copy",
        "--dest-decompress",
        &oci,
        &format!("dir:{}", dir.display()),
    ]);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd",
        "--format",
        "oci",
        &format!("dir:{}", dir.display()),
        &format!("docker://{}/zstd/app:v1", reg2.host),
    ]);
    for (repo, host, media) in [
        (
            "docker",
            &reg.host,
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
        ("zstd", &reg2.host, "tar+zstd"),
    ] {
        let p = kiln(
            &b,
            &["pull", &format!("{host}/{repo}/app:v1"), "--insecure"],
        );
        let got = p["digest"].as_str().unwrap().to_owned();
        let raw = std::fs::read_to_string(blob_path(&b.home, &got)).unwrap();
        assert!(raw.contains(media), "{repo}: {raw}");
        let out = b.path(&format!("unpacked-{repo}"));
        b.ok(&["unpack", &format!("app@{got}"), out.to_str().unwrap()]);
        assert_eq!(
            std::fs::read_to_string(out.join("bin/app")).unwrap(),
            "#!/bin/sh\necho two\n",
            "{repo}"
        );
    }
}

#[test]
fn basic_auth_from_kiln_login_or_dockers_config_and_a_clear_refusal_without() {
    let reg = Registry::start(Some(("ci", "s3cret")));
    let a = Env::new();
    bake(&a, "#!/bin/sh\necho three\n");
    let dest = format!("{}/app:v1", reg.host);
    let err = a.fails(&["push", "app:v1", &dest, "--insecure"]);
    assert!(
        err.contains(&format!("login required for {}", reg.host)),
        "{err}"
    );
    // A password is never taken on the command line.
    let err = a.fails(&["login", &reg.host, "-u", "ci"]);
    assert!(err.contains("--password-stdin"), "{err}");
    // A wrong password is refused at once, as `docker login` does, and
    // nothing is kept.
    let (ok, err) = try_login(&a, &reg.host, "wrong");
    assert!(!ok, "a wrong password was accepted");
    assert!(
        err.contains("not logged in (nothing kept)") && err.contains("denied"),
        "{err}"
    );
    assert!(!a.home.join("registries.json").exists());
    let err = a.fails(&["push", "app:v1", &dest, "--insecure"]);
    assert!(
        err.contains(&format!("login required for {}", reg.host)),
        "{err}"
    );
    login(&a, &reg.host, "s3cret");
    // Remembered as insecure: no flag needed now.
    kiln(&a, &["push", "app:v1", &dest]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a.home.join("registries.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Docker's config.json is read too.
    let b = Env::new();
    let docker = b.path("docker");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret");
    write(
        &docker.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host).as_bytes(),
    );
    succeed(
        b.cmd()
            .env("DOCKER_CONFIG", &docker)
            .args(["pull", &dest, "--insecure", "--json"]),
    );
}

/// A registry that answers `/v2/` and serves fixed manifests and blobs by
/// digest, as told: a liar when its bytes do not match. With `redirect`, a
/// blob is a `307` to that port instead (blob storage elsewhere). It keeps
/// every request's `authorization` header (empty when none).
struct Liar {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Liar {
    /// `manifests`: (reference, media type, bytes); `blobs`: (digest, bytes).
    fn start(manifests: Vec<(String, String, Vec<u8>)>, blobs: Vec<(String, Vec<u8>)>) -> Self {
        Self::serve(manifests, blobs, None)
    }

    fn serve(
        manifests: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<(String, Vec<u8>)>,
        redirect: Option<u16>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let Some((line, auth)) = read_head(&conn) else {
                    continue;
                };
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push((path.clone(), auth));
                let head = line.starts_with("HEAD");
                // A registry with a storage elsewhere wants basic auth.
                if redirect.is_some()
                    && log
                        .lock()
                        .unwrap()
                        .last()
                        .is_some_and(|(_, a)| a.is_empty())
                {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"liar\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    continue;
                }
                let blob = blobs
                    .iter()
                    .find(|(d, _)| path.ends_with(&format!("/blobs/{d}")));
                if let (Some((d, _)), Some(to)) = (blob, redirect) {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{to}/storage/{d}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    continue;
                }
                let found = manifests
                    .iter()
                    .find(|(r, _, _)| path.ends_with(&format!("/manifests/{r}")))
                    .map(|(_, t, b)| (t.clone(), b.clone()))
                    .or_else(|| {
                        blobs
                            .iter()
                            .find(|(d, _)| path.ends_with(&format!("/{d}")))
                            .map(|(_, b)| ("application/octet-stream".to_owned(), b.clone()))
                    });
                let (status, ctype, body) = match found {
                    _ if path == "/v2/" => {
                        ("200 OK", "application/json".to_owned(), b"{}".to_vec())
                    }
                    Some((t, b)) => ("200 OK", t, b),
                    None => (
                        "404 Not Found",
                        "application/json".to_owned(),
                        br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#.to_vec(),
                    ),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                if !head {
                    let _ = conn.write_all(&body);
                }
            }
        });
        Self {
            port,
            seen,
            _thread: thread,
        }
    }
}

/// The store's manifest, config and layer of `digest`: (bytes, config
/// digest, config bytes, layer digest, layer bytes).
fn parts(env: &Env, digest: &str) -> (Vec<u8>, String, Vec<u8>, String, Vec<u8>) {
    let blob = |d: &str| -> Vec<u8> {
        let mut v = Vec::new();
        std::fs::File::open(blob_path(&env.home, d))
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    let manifest = blob(digest);
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_owned();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_owned();
    let (cb, lb) = (blob(&config), blob(&layer));
    (manifest, config, cb, layer, lb)
}

fn blob_path(home: &Path, digest: &str) -> PathBuf {
    home.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn a_registry_that_lies_is_caught_and_nothing_is_kept() {
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho four\n");
    let (manifest, config, config_bytes, layer, mut layer_bytes) = parts(&a, &digest);
    let mt = "application/vnd.oci.image.manifest.v1+json".to_owned();
    // One byte of the layer changed.
    let mid = layer_bytes.len() / 2;
    layer_bytes[mid] ^= 0x20;
    let liar = Liar::start(
        vec![("v1".into(), mt.clone(), manifest.clone())],
        vec![
            (config.clone(), config_bytes.clone()),
            (layer.clone(), layer_bytes),
        ],
    );
    let b = Env::new();
    b.ok(&["images"]);
    let before = b.store_state();
    let err = b.fails(&[
        "pull",
        &format!("127.0.0.1:{}/app:v1", liar.port),
        "--insecure",
    ]);
    assert!(
        err.contains(&format!("blob {layer}")) && err.contains("nothing was kept"),
        "{err}"
    );
    assert_eq!(b.store_state(), before, "nothing partial in the store");
    // A manifest that is not the one its digest names.
    let mut other = manifest.clone();
    other.extend_from_slice(b" ");
    let liar = Liar::start(
        vec![(digest.clone(), mt.clone(), other)],
        vec![(config.clone(), config_bytes.clone())],
    );
    let err = b.fails(&[
        "pull",
        &format!("127.0.0.1:{}/app@{digest}", liar.port),
        "--insecure",
    ]);
    assert!(err.contains("hashes to") && err.contains(&digest), "{err}");
    // A manifest over 4 MiB.
    let mut huge = manifest.clone();
    huge.extend(std::iter::repeat_n(b' ', 5 << 20));
    let liar = Liar::start(vec![("v1".into(), mt, huge)], vec![]);
    let err = b.fails(&[
        "pull",
        &format!("127.0.0.1:{}/app:v1", liar.port),
        "--insecure",
    ]);
    assert!(err.contains("over the 4 MiB limit"), "{err}");
    assert_eq!(b.store_state(), before);
    // A tag that is not there, and a host that is not there: bounded, clear.
    let reg = Registry::start(None);
    let err = b.fails(&["pull", &format!("{}/app:nope", reg.host), "--insecure"]);
    assert!(err.contains("not found in the registry"), "{err}");
    let started = Instant::now();
    let err = b.fails(&[
        "pull",
        &format!("127.0.0.1:{}/app:v1", free_port()),
        "--insecure",
    ]);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = b.fails(&["push", "app:v1", "not a destination"]);
    assert!(err.contains("invalid registry reference"), "{err}");
}

/// Issue 14: a service's image may be a registry reference; `apply` pulls
/// what the store lacks and the release records the digest, so a tag that
/// moves later never changes a release, and `plan` says the tag moved.
#[test]
fn apply_from_a_registry_records_the_digest_and_a_moved_tag_changes_no_release() {
    let reg = Registry::start(None);
    let a = Env::new();
    let app = util::hello_app(
        &a.path("app"),
        "[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/start.sh\"]\n",
    );
    let d1 = a.bake(&app, &["--tag", "v1"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let tag = format!("{}/team/app:v1", reg.host);
    kiln(&a, &["push", "app:v1", &tag, "--insecure"]);
    // The deploying machine names the registry insecure once.
    let b = Env::new();
    b.ok(&["login", &reg.host, "--insecure"]);
    let spec = b.path("kiln.toml");
    write(
        &spec,
        format!(
            "[services.web]\nimage = \"{tag}\"\nreplicas = 1\n[services.web.health.readiness]\nhttp = \"/healthz\"\n"
        )
        .as_bytes(),
    );
    let _agent = util::Agent::start(&b);
    b.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let r = util::releases(&b, "web");
    assert_eq!(
        r[0]["config"]["image"],
        d1.as_str(),
        "the release records the digest"
    );
    assert_eq!(r[0]["outcome"], "active");
    // The tag moves to another image.
    write(&a.path("app/bin/extra"), b"v2\n");
    let d2 = a.bake(&app, &["--tag", "v2"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(d1, d2);
    kiln(&a, &["push", "app:v2", &tag, "--insecure"]);
    // Nothing running changed; plan names the move.
    let r = util::releases(&b, "web");
    assert_eq!(
        (r.len(), r[0]["config"]["image"].as_str()),
        (1, Some(d1.as_str()))
    );
    let plan = b.ok(&["plan", "-f", spec.to_str().unwrap()]);
    let short = |d: &str| d.trim_start_matches("sha256:")[..12].to_owned();
    assert!(
        plan.contains(&format!(
            "image {tag}@{} -> {tag}@{}",
            short(&d1),
            short(&d2)
        )),
        "{plan}"
    );
    // Pinned by digest: no registry round trip needed, and no change.
    write(
        &spec,
        format!(
            "[services.web]\nimage = \"{}/team/app@{d1}\"\nreplicas = 1\n[services.web.health.readiness]\nhttp = \"/healthz\"\n",
            reg.host
        )
        .as_bytes(),
    );
    let plan = b.ok(&["plan", "-f", spec.to_str().unwrap()]);
    assert!(
        plan.contains(&format!("(the same image, {})", short(&d1))),
        "{plan}"
    );
    // Applied, its history names it once, not followed by its digest again.
    b.ok(&["apply", "-f", spec.to_str().unwrap()]);
    let history = b.ok(&["history", "web"]);
    assert!(history.contains(&format!("/team/app@{d1}")), "{history}");
    assert!(
        !history.contains(&format!("{d1}@")),
        "the digest twice: {history}"
    );
}

/// An index (a multi-platform image) is narrowed to this host's platform;
/// a truncated blob is refused naming its size, with nothing kept.
#[test]
fn an_index_is_narrowed_to_this_platform_and_a_truncated_blob_is_refused() {
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho seven\n");
    let (manifest, config, config_bytes, layer, layer_bytes) = parts(&a, &digest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let elsewhere = if arch == "amd64" { "s390x" } else { "amd64" };
    let other = "sha256:".to_owned() + &"0".repeat(64);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": mt, "digest": other, "size": 10,
              "platform": { "os": "linux", "architecture": elsewhere } },
            { "mediaType": mt, "digest": digest, "size": manifest.len(),
              "platform": { "os": "linux", "architecture": arch } },
        ],
    })
    .to_string()
    .into_bytes();
    let index_digest = format!("sha256:{}", sha256_hex(&index));
    let liar = Liar::start(
        vec![
            (
                "v1".into(),
                "application/vnd.oci.image.index.v1+json".into(),
                index,
            ),
            (digest.clone(), mt.into(), manifest.clone()),
        ],
        vec![
            (config.clone(), config_bytes.clone()),
            (layer.clone(), layer_bytes.clone()),
        ],
    );
    let b = Env::new();
    let p = kiln(
        &b,
        &[
            "pull",
            &format!("127.0.0.1:{}/app:v1", liar.port),
            "--insecure",
        ],
    );
    assert_eq!(p["resolved"], index_digest.as_str());
    assert_eq!(p["digest"], digest.as_str(), "this platform's image");
    // The same image with its layer cut short.
    let c = Env::new();
    c.ok(&["images"]);
    let before = c.store_state();
    let short = layer_bytes[..layer_bytes.len() - 10].to_vec();
    let liar = Liar::start(
        vec![("v1".into(), mt.into(), manifest)],
        vec![(config, config_bytes), (layer.clone(), short)],
    );
    let err = c.fails(&[
        "pull",
        &format!("127.0.0.1:{}/app:v1", liar.port),
        "--insecure",
    ]);
    assert!(
        err.contains(&format!("blob {layer}"))
            && err.contains(&format!("has {} bytes", layer_bytes.len() - 10)),
        "{err}"
    );
    assert_eq!(c.store_state(), before, "nothing kept");
}

/// Write `bytes` as a blob of the store at `home`; its digest.
fn put_blob(home: &Path, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    std::fs::write(blob_path(home, &digest), bytes).unwrap();
    digest
}

/// An image's referrers (a signature, as `kiln sign` will make) travel
/// with it: pushed with their blobs and the referrers tag, pulled back,
/// and kept by a collection as long as their image is.
#[test]
fn referrers_travel_with_their_image() {
    let reg = Registry::start(None);
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho eight\n");
    let manifest_size = std::fs::metadata(blob_path(&a.home, &digest))
        .unwrap()
        .len();
    // A signature artifact whose subject is the image, put in the store as
    // any OCI 1.1 tool would: its blobs, and an index entry without a tag.
    let empty = put_blob(&a.home, b"{}");
    let sig_bytes = b"-----BEGIN SSH SIGNATURE-----\nkiln test\n";
    let sig = put_blob(&a.home, sig_bytes);
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.kiln.signature.test",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": [{ "mediaType": "application/octet-stream", "digest": sig, "size": sig_bytes.len() }],
        "subject": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest_size },
    });
    let artifact_bytes = serde_json::to_vec(&artifact).unwrap();
    let artifact_digest = put_blob(&a.home, &artifact_bytes);
    let index_path = a.home.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": artifact_digest,
            "size": artifact_bytes.len(),
        }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let dest = format!("{}/team/app:v1", reg.host);
    let r = kiln(&a, &["push", "app:v1", &dest, "--insecure"]);
    // The signature made here, and the bake's provenance statement.
    assert_eq!(r["referrers"], 2, "{r}");
    // distribution 2.8 has no referrers API: the fallback tag lists it.
    let out = succeed(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!(
                "docker://{}/team/app:sha256-{}",
                reg.host,
                digest.trim_start_matches("sha256:")
            )),
    );
    assert!(String::from_utf8_lossy(&out).contains(&artifact_digest));
    // Another machine pulls the image and its referrer.
    let b = Env::new();
    let p = kiln(&b, &["pull", &dest, "--insecure"]);
    assert_eq!(p["referrers"], 2, "{p}");
    let index = std::fs::read_to_string(b.home.join("index.json")).unwrap();
    assert!(index.contains(&artifact_digest), "{index}");
    for d in [&artifact_digest, &sig, &empty] {
        assert!(blob_path(&b.home, d).is_file(), "{d}");
    }
    // A collection keeps it with its (tagged) image.
    b.ok(&["gc", "--grace", "0s"]);
    assert!(
        blob_path(&b.home, &sig).is_file(),
        "the signature stays with its image"
    );
    assert!(b.ok(&["verify"]).starts_with("ok"));
}

/// Blob storage redirects are normal; credentials must not follow them to
/// another host.
#[test]
fn credentials_are_not_sent_to_another_host_on_a_redirect() {
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho five\n");
    let (manifest, config, config_bytes, layer, layer_bytes) = parts(&a, &digest);
    let blobs = vec![(config, config_bytes), (layer, layer_bytes)];
    // Storage: serves the blobs (any path ending in the digest).
    let storage = Liar::start(vec![], blobs.clone());
    let registry = Liar::serve(
        vec![(
            "v1".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
            manifest,
        )],
        blobs,
        Some(storage.port),
    );
    let b = Env::new();
    let host = format!("127.0.0.1:{}", registry.port);
    login(&b, &host, "s3cret");
    let p = kiln(&b, &["pull", &format!("{host}/app:v1")]);
    assert_eq!(p["digest"], digest.as_str());
    let to_registry = registry.seen.lock().unwrap().clone();
    assert!(
        to_registry
            .iter()
            .any(|(_, auth)| auth.starts_with("Basic ")),
        "the registry got the credentials: {to_registry:?}"
    );
    let to_storage = storage.seen.lock().unwrap().clone();
    assert!(!to_storage.is_empty(), "the blobs came from storage");
    assert!(
        to_storage.iter().all(|(_, auth)| auth.is_empty()),
        "storage got no credentials: {to_storage:?}"
    );
}

/// A token server of the distribution token flow: `GET /token?service=…
/// &scope=repository:NAME:ACTIONS` with basic auth `ci`:`s3cret` answers a
/// JWT (ES256, its certificate in `x5c`) granting the scopes asked; wrong
/// or missing credentials: 401. It counts the tokens it gave.
struct TokenServer {
    port: u16,
    cert_pem: String,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _thread: std::thread::JoinHandle<()>,
}

impl TokenServer {
    fn start() -> Self {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["kiln-test-issuer".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_pem = cert.pem();
        let cert_der = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = issued.clone();
        let thread = std::thread::spawn(move || {
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("ci:s3cret")
            );
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let Some((line, auth)) = read_head(&conn) else {
                    continue;
                };
                let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let query = target.split_once('?').map_or("", |(_, q)| q).to_owned();
                if auth != basic {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    continue;
                }
                // Every scope asked is granted (the user may do anything).
                let access: Vec<Value> = query
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .map(|s| {
                        s.replace("%3A", ":")
                            .replace("%2C", ",")
                            .replace("%2F", "/")
                    })
                    .filter_map(|s| {
                        let mut parts = s.splitn(3, ':');
                        let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                        Some(serde_json::json!({
                            "type": kind, "name": name,
                            "actions": actions.split(',').collect::<Vec<_>>(),
                        }))
                    })
                    .collect();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "x5c": [cert_der] });
                let claims = serde_json::json!({
                    "iss": "kiln-test-issuer", "sub": "ci", "aud": "kiln-test-registry",
                    "exp": now + 300, "nbf": now - 10, "iat": now,
                    "jti": format!("t{}", count.load(std::sync::atomic::Ordering::SeqCst)),
                    "access": access,
                });
                let input = format!(
                    "{}.{}",
                    b64.encode(header.to_string()),
                    b64.encode(claims.to_string())
                );
                let sig = signer.sign(&rng, input.as_bytes()).unwrap();
                let token = format!("{input}.{}", b64.encode(sig.as_ref()));
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body =
                    serde_json::json!({ "token": token, "access_token": token, "expires_in": 300 })
                        .to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            port,
            cert_pem,
            issued,
            _thread: thread,
        }
    }
}

/// The distribution token flow against the real registry: a challenge,
/// a token for the scope asked (from credentials), then the request with
/// the token; without credentials: "login required".
#[test]
fn bearer_tokens_from_a_token_server_for_a_real_registry() {
    let tokens = TokenServer::start();
    let reg = Registry::start_with(RegAuth::Token(&tokens));
    let a = Env::new();
    let digest = bake(&a, "#!/bin/sh\necho six\n");
    let dest = format!("{}/team/app:v1", reg.host);
    let err = a.fails(&["push", "app:v1", &dest, "--insecure"]);
    assert!(
        err.contains(&format!("login required for {}", reg.host)),
        "{err}"
    );
    login(&a, &reg.host, "s3cret");
    let r = kiln(&a, &["push", "app:v1", &dest]);
    assert_eq!(r["digest"], digest.as_str());
    assert!(tokens.issued.load(std::sync::atomic::Ordering::SeqCst) > 0);
    // Another machine with the same login pulls it back.
    let b = Env::new();
    std::fs::create_dir_all(&b.home).unwrap();
    std::fs::copy(
        a.home.join("registries.json"),
        b.home.join("registries.json"),
    )
    .unwrap();
    let p = kiln(&b, &["pull", &dest]);
    assert_eq!(p["digest"], digest.as_str());
}

/// A request's first line and its `authorization` header (empty when
/// none), its head read to the blank line.
fn read_head(conn: &std::net::TcpStream) -> Option<(String, String)> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            auth = v.trim().to_owned();
        }
    }
    Some((line, auth))
}

/// `kiln login HOST -u ci --password-stdin --insecure` with `password`,
/// which must be accepted.
fn login(env: &Env, host: &str, password: &str) {
    let (ok, err) = try_login(env, host, password);
    assert!(ok, "{err}");
}

/// The same; whether it succeeded, and what it said on stderr.
fn try_login(env: &Env, host: &str, password: &str) -> (bool, String) {
    let mut c = env
        .cmd()
        .args(["login", host, "-u", "ci", "--password-stdin", "--insecure"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A registry that answers `/v2/` and then trickles a manifest one byte
/// every 100 ms, never ending it (until the client goes, or 60 s).
fn trickling_registry() -> u16 {
    use std::io::{BufRead, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16) {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    // The rest of the head.
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    if path == "/v2/" {
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                        );
                        continue;
                    }
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\n\r\n",
                    );
                    for _ in 0..600 {
                        if s.write_all(b"1\r\n \r\n").is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    return;
                }
            });
        }
    });
    port
}

#[test]
fn a_pull_from_a_registry_that_never_finishes_ends_at_its_deadline() {
    let env = Env::new();
    env.ok(&["images"]);
    let port = trickling_registry();
    let before = env.store_state();
    let err = env.fails(&[
        "pull",
        &format!("127.0.0.1:{port}/team/slow:v1"),
        "--insecure",
        "--timeout",
        "2s",
    ]);
    assert!(err.contains("took longer than 2s"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(env.store_state(), before, "nothing kept");
}

/// What a flooding registry sends without end.
#[derive(Clone, Copy)]
enum Flood {
    /// A manifest (200).
    Manifest,
    /// The token its bearer challenge points to.
    Token,
    /// An error body (404) for the manifest.
    ErrorBody,
}

/// A registry that answers one part of a pull with an endless body, as
/// fast as the client reads it (each connection ends when the client
/// goes, or after 8 GiB).
fn flooding_registry(flood: Flood) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let Some((line, auth)) = read_head(&conn) else {
                    return;
                };
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let endless = |conn: &mut std::net::TcpStream, status: &str| {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    );
                    let chunk = vec![b' '; 64 << 10];
                    for _ in 0..(8u64 << 30) / (64 << 10) {
                        if write!(conn, "{:x}\r\n", chunk.len()).is_err()
                            || conn.write_all(&chunk).is_err()
                            || conn.write_all(b"\r\n").is_err()
                        {
                            return;
                        }
                    }
                };
                match flood {
                    Flood::Token if path.starts_with("/token") => endless(&mut conn, "200 OK"),
                    Flood::Token if auth.is_empty() => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"flood\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                    }
                    Flood::Manifest if path.contains("/manifests/") => endless(&mut conn, "200 OK"),
                    Flood::ErrorBody if path.contains("/manifests/") => {
                        endless(&mut conn, "404 Not Found")
                    }
                    _ => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                        );
                    }
                }
            });
        }
    });
    port
}

/// Issue 22: an endless manifest (1 GiB in 4 s) or token answer (4.1 GiB)
/// was read whole into memory until the pull's deadline. Each answer read
/// whole has a cap, reached long before any deadline: the pull ends at
/// once naming it, and nothing is kept.
#[test]
fn endless_registry_answers_end_at_their_cap_not_in_memory() {
    let env = Env::new();
    env.ok(&["images"]);
    let before = env.store_state();
    for (flood, says) in [
        (Flood::Manifest, "is over the 4 MiB limit"),
        (Flood::Token, "its token answer is over the 64 KiB limit"),
        (Flood::ErrorBody, "not found in the registry"),
    ] {
        let port = flooding_registry(flood);
        let err = env.fails(&[
            "pull",
            &format!("127.0.0.1:{port}/team/flood:v1"),
            "--insecure",
            "--timeout",
            "10m",
        ]);
        assert!(err.contains(says), "{says}: {err}");
        assert!(!err.contains("took longer"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(env.store_state(), before, "nothing kept");
    }
}

/// `base = "HOST/REPO:TAG"`: the bake pulls the base into the store the
/// first time, verified; from then on the store's copy is the base (the
/// registry gone, the bake gives the same digest).
#[test]
fn a_base_from_a_registry_is_pulled_once_into_the_store() {
    let reg = Registry::start(None);
    let a = Env::new();
    bake(&a, "#!/bin/sh\necho base\n");
    let base = format!("{}/lib/base:1", reg.host);
    kiln(&a, &["push", "app:v1", &base, "--insecure"]);
    let b = Env::new();
    b.ok(&["login", &reg.host, "--insecure"]);
    let app = b.path("app");
    write(&app.join("etc/app.conf"), b"x = 1\n");
    write(
        &app.join("kiln.toml"),
        format!("[images.web]\nbase = \"{base}\"\ninclude = [\"etc\"]\ncmd = [\"--serve\"]\n")
            .as_bytes(),
    );
    let first = b.bake(&app.join("kiln.toml"), &[]);
    assert!(
        first["base"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{base}@sha256:")),
        "{first}"
    );
    // The base's entrypoint, the spec's cmd, both layers.
    let inspect = b.json(&["inspect", "web", "--json"]);
    let text = inspect.to_string();
    assert!(
        text.contains("/bin/app") && text.contains("--serve"),
        "{inspect}"
    );
    drop(reg);
    let again = b.bake(&app.join("kiln.toml"), &[]);
    assert_eq!(
        again["digest"], first["digest"],
        "the store's base, no registry"
    );
}

//! Signed images, black-box: `kiln sign` makes SSH signatures that
//! `ssh-keygen -Y verify` checks, kept with the image; `[trust]
//! require_signed` makes apply refuse what no allowed signer signed.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

fn ssh_keygen_verify(allowed: &std::path::Path, sig: &std::path::Path, message: &str) -> bool {
    let mut child = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "kiln", "-I", "release@example"])
        .arg("-f")
        .arg(allowed)
        .arg("-s")
        .arg(sig)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

#[test]
fn ssh_keygen_accepts_a_kiln_signature_and_refuses_it_for_another_digest() {
    require("ssh-keygen");
    let env = Env::new();
    let app = env.path("app");
    write(&app.join("kiln.toml"), b"[images.app]\n");
    write(&app.join("file"), b"one\n");
    let digest = env.bake(&app.join("kiln.toml"), &["--tag", "v1"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = env.json(&["key", "generate", "release", "--json"]);
    let sig = env.path("app.sig");
    env.ok(&[
        "sign",
        "app:v1",
        "--key",
        "release",
        "--output",
        sig.to_str().unwrap(),
    ]);
    let allowed = env.path("allowed_signers");
    write(
        &allowed,
        format!("release@example {}\n", key["public_key"].as_str().unwrap()).as_bytes(),
    );
    assert!(
        ssh_keygen_verify(&allowed, &sig, &digest),
        "ssh-keygen accepts it"
    );
    write(&app.join("file"), b"two\n");
    let other = env.bake(&app.join("kiln.toml"), &[])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !ssh_keygen_verify(&allowed, &sig, &other),
        "not for another digest"
    );

    // Kept with the image, and checked when listed.
    let found = env.json(&["signatures", "app:v1", "--json"]);
    assert_eq!(found[0]["valid"], true, "{found}");
    assert_eq!(found[0]["signer"], key["fingerprint"]);
    assert_eq!(
        env.json(&["signatures", &other[7..19], "--json"]),
        serde_json::json!([])
    );

    // A key the user already has (made by ssh-keygen) signs too.
    let mine = env.path("id_ed25519");
    succeed(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "me", "-f"])
            .arg(&mine),
    );
    env.ok(&["sign", "app:v1", "--key", mine.to_str().unwrap()]);
    assert_eq!(
        env.json(&["signatures", "app:v1", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A key only the SSH agent holds (its private file gone, as with an
    // encrypted or hardware key): signed with its public key, through
    // `ssh-keygen -Y sign`, as git does.
    let held = env.path("agentkey");
    succeed(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "agent", "-f"])
            .arg(&held),
    );
    let sock = env.path("agent.sock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(
        Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(
        "the SSH agent's socket",
        std::time::Duration::from_secs(10),
        || sock.exists(),
    );
    succeed(
        Command::new("ssh-add")
            .arg("-q")
            .arg(&held)
            .env("SSH_AUTH_SOCK", &sock),
    );
    std::fs::remove_file(&held).unwrap();
    let public = env.path("agentkey.pub");
    let err = env.fails(&["sign", "app:v1", "--key", public.to_str().unwrap()]);
    assert!(err.contains("needs an SSH agent"), "{err}");
    succeed(
        env.cmd()
            .args([
                "sign",
                "app:v1",
                "--key",
                public.to_str().unwrap(),
                "--json",
            ])
            .env("SSH_AUTH_SOCK", &sock),
    );
    let listed = env.json(&["signatures", "app:v1", "--json"]);
    let from_agent = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["key"].as_str().is_some_and(|k| {
                k.contains(
                    std::fs::read_to_string(&public)
                        .unwrap()
                        .split_whitespace()
                        .nth(1)
                        .unwrap(),
                )
            })
        })
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(from_agent["valid"], true, "{from_agent}");

    // Bad input: a file that is not a key; a corrupt signature blob.
    let err = env.fails(&["sign", "app:v1", "--key", allowed.to_str().unwrap()]);
    assert!(err.contains("not an OpenSSH private key"), "{err}");
    let pem = std::fs::read(&sig).unwrap();
    let blob = env.home.join("blobs/sha256").join(sha256_hex(&pem));
    assert!(blob.exists(), "the signature is a blob of the store");
    std::fs::write(
        &blob,
        b"-----BEGIN SSH SIGNATURE-----\ngarbage\n-----END SSH SIGNATURE-----\n",
    )
    .unwrap();
    let listed = env.ok(&["signatures", "app:v1"]);
    assert!(listed.contains("INVALID"), "{listed}");
}

fn spec(port: u16, allowed: &str) -> String {
    format!(
        r#"
[trust]
allowed_signers = ["{allowed}"]
require_signed = true

[images.app]
context = "app"
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 1
listen = "127.0.0.1:{port}"

[services.tools]
image = "app"
replicas = 1
require_signed = false
"#
    )
}

#[test]
fn require_signed_refuses_an_unsigned_image_and_deploys_a_signed_one() {
    let env = Env::new();
    let _agent = Agent::start(&env);
    hello_app(&env.path("app"), "");
    let trusted = env.json(&["key", "generate", "release", "--json"]);
    env.ok(&["key", "generate", "stranger"]);
    let port = free_port();
    let path = env.path("kiln.toml");
    let allowed = format!(
        "release@example {}",
        trusted["public_key"].as_str().unwrap()
    );
    write(&path, spec(port, &allowed).as_bytes());
    let apply = || env.run(&["apply", "-f", path.to_str().unwrap()]);

    let out = apply();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("service web: image app@") && err.contains("no signature"),
        "{err}"
    );
    assert!(
        env.fails(&["history", "web"]).contains("web"),
        "nothing recorded"
    );

    // Signed, but by a key the spec does not allow.
    env.ok(&["sign", "app", "--key", "stranger"]);
    let out = apply();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not an allowed signer"), "{err}");

    env.ok(&["sign", "app", "--key", "release"]);
    let out = apply();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(http_get(port.into(), "/").unwrap().contains("hello"));
    // The ledger says who signed what was deployed.
    let created: Vec<serde_json::Value> = env
        .ok(&["audit", "web", "--kind", "release-created", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let detail: serde_json::Value =
        serde_json::from_str(created[0]["detail"].as_str().unwrap()).unwrap();
    assert_eq!(
        detail["signed_by"],
        serde_json::json!([trusted["fingerprint"]])
    );

    // A malformed allowed signer is an error before anything is baked.
    write(&path, spec(port, "ssh-ed25519 not-base64").as_bytes());
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains("is not an SSH public key"), "{err}");
}

/// The ledger's `release-created` details of `web`, oldest first.
fn created(env: &Env) -> Vec<serde_json::Value> {
    env.ok(&["audit", "web", "--kind", "release-created", "--json"])
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_str(e["detail"].as_str().unwrap()).unwrap()
        })
        .collect()
}

/// A spec with no `[trust]` of its own: the agent's policy is all there is.
fn plain_spec(port: u16) -> String {
    format!(
        r#"
[images.app]
context = "app"
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 1
listen = "127.0.0.1:{port}"
"#
    )
}

/// A raw `POST /v1/apply` over the agent's socket; the status line and body.
fn post_apply(env: &Env, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(env.home.join("kiln.sock")).unwrap();
    write!(
        s,
        "POST /v1/apply HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// What the CLI would send for `web`, made by hand: release 1's config
/// with another image (and name), claiming `signed_by`.
fn forged(env: &Env, image: &str, image_name: &str, signed_by: &str) -> String {
    let mut config = releases(env, "web")[0]["config"].clone();
    config["image"] = serde_json::json!(image);
    config["image_name"] = serde_json::json!(image_name);
    serde_json::json!({
        "services": [{
            "name": "web",
            "settings": {"replicas": 1, "listen": null, "rollout": {}, "timeout": "30s"},
            "config": config,
            "signed_by": [signed_by],
        }],
    })
    .to_string()
}

#[test]
fn the_agents_trust_policy_is_enforced_whatever_the_client_sends() {
    require("ssh-keygen");
    let env = Env::new();
    hello_app(&env.path("app"), "");
    let trusted = env.json(&["key", "generate", "release", "--json"]);
    let fingerprint = trusted["fingerprint"].as_str().unwrap().to_owned();
    let policy = env.path("trust.toml");
    write(
        &policy,
        format!(
            "[trust]\nallowed_signers = [\"release@example {}\"]\nrequire_signed = true\n",
            trusted["public_key"].as_str().unwrap()
        )
        .as_bytes(),
    );
    let api = free_port();
    let with_policy = |env: &Env| {
        let policy = policy.clone();
        let agent = Agent::start_with(env, move |c| {
            c.arg("--trust").arg(&policy);
            c.args(["--api", &format!("127.0.0.1:{api}")]);
        });
        wait_for("the API port", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", api)).is_ok()
        });
        agent
    };
    let mut agent = with_policy(&env);
    let port = free_port();
    let path = env.path("kiln.toml");
    write(&path, plain_spec(port).as_bytes());
    let apply = || env.run(&["apply", "-f", path.to_str().unwrap()]);

    // Unsigned: the spec asks nothing, the agent refuses, nothing recorded.
    let out = apply();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("service web: image app@")
            && err.contains("refused by this agent's trust policy")
            && err.contains("no signature"),
        "{err}"
    );
    // One line says it (the others are the bake's report).
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("kiln: error"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("no signature") && said[0].contains("service web"),
        "{err}"
    );
    env.fails(&["history", "web"]);

    // Signed by the allowed key: deployed, and the ledger names the signer
    // the agent verified.
    env.ok(&["sign", "app", "--key", "release"]);
    let out = apply();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        created(&env)[0]["signed_by"],
        serde_json::json!([fingerprint])
    );
    let v1 = releases(&env, "web")[0]["config"]["image"]
        .as_str()
        .unwrap()
        .to_owned();

    // A new, unsigned bake, sent raw with a forged `signed_by`: refused.
    write(&env.path("app/static/page.html"), b"v2\n");
    let baked = env.json(&["bake", "-f", path.to_str().unwrap(), "--json"]);
    let v2 = baked[0]["digest"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    let out = post_apply(&env, &forged(&env, &v2, "app", &fingerprint));
    assert!(out.starts_with("HTTP/1.1 422"), "{out}");
    assert!(out.contains("no signature"), "{out}");
    // The name must name the digest: a signed image shown as another.
    let out = post_apply(&env, &forged(&env, &v1, "nginx", &fingerprint));
    assert!(out.starts_with("HTTP/1.1 422"), "{out}");
    assert!(out.contains("does not name"), "{out}");
    assert_eq!(releases(&env, "web").len(), 1, "nothing recorded");

    // Without a policy the unsigned image deploys, and a claimed signer
    // that signed nothing is not recorded.
    agent.stop();
    let mut agent = Agent::start(&env);
    let out = post_apply(&env, &forged(&env, &v2, "app", &fingerprint));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    wait_for("release 2 active", Duration::from_secs(20), || {
        releases(&env, "web").len() == 2
    });
    let details = created(&env);
    assert_eq!(
        details[1]["signed_by"],
        serde_json::Value::Null,
        "{details:?}"
    );
    let revision = service_status(&env, "web")["revision"].as_u64().unwrap();
    assert_eq!(revision, 2);
    agent.stop();

    // The policy again: recorded; the forged request over TLS with a
    // deployer's token is refused too; and a hand rollback to the unsigned
    // release is refused (the policy in force decides).
    let _agent = with_policy(&env);
    let token = env.ok(&["token", "create", "ci", "--role", "deployer"]);
    let out = Command::new("curl")
        .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", &format!("authorization: Bearer {}", token.trim())])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(forged(&env, &v2, "app", &fingerprint))
        .arg(format!("https://127.0.0.1:{api}/v1/apply"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n422") && text.contains("no signature"),
        "{text}"
    );
    env.ok(&["rollback", "web", "--to", "1"]);
    wait_for("release 3 active", Duration::from_secs(20), || {
        service_status(&env, "web")["revision"] == 3
    });
    let err = env.fails(&["rollback", "web", "--to", "2"]);
    assert!(
        err.contains("refused by this agent's trust policy") && err.contains("no signature"),
        "{err}"
    );
    assert_eq!(service_status(&env, "web")["revision"], 3);
    let policies = env.ok(&["audit", "--kind", "trust-policy", "--json"]);
    assert_eq!(
        policies.lines().count(),
        3,
        "set, lifted, set again: {policies}"
    );
}

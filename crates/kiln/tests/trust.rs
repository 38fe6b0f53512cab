//! Signed images, black-box: `kiln sign` makes SSH signatures that
//! `ssh-keygen -Y verify` checks, kept with the image; `[trust]
//! require_signed` makes apply refuse what no allowed signer signed.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::process::{Command, Stdio};

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
    if !have("ssh-keygen") {
        eprintln!("ssh-keygen is not installed: skipped");
        return;
    }
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

//! Black-box tests of automatic certificates: the real agent against
//! Debian's `pebble` (Let's Encrypt's test CA) on loopback, its names
//! resolved by `pebble-challtestsrv`.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::{Agent, Env, free_port, hello_app};

/// pebble and its DNS server, stopped when dropped.
struct Ca {
    children: Vec<Child>,
    /// The directory URL.
    directory: String,
    /// The root pebble's own HTTPS is signed by (for `tls.acme_root`).
    root: PathBuf,
    /// pebble's management address (its issuing root is there).
    management: u16,
    /// challtestsrv's management address (mock DNS answers).
    dns_management: u16,
    /// Where pebble's validator sends HTTP-01 requests.
    http_port: u16,
    /// Where it makes its TLS-ALPN-01 handshakes.
    tls_port: u16,
}

impl Drop for Ca {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Ca {
    /// A CA whose certificates live `validity` seconds.
    fn start(dir: &Path, validity: u64) -> Self {
        let made = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        let (root, key) = (dir.join("pebble.pem"), dir.join("pebble.key"));
        std::fs::write(&root, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let (dns, dns_management) = (free_port(), free_port());
        let (acme, management, http_port, tls_port) =
            (free_port(), free_port(), free_port(), free_port());
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": root,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }})
            .to_string(),
        )
        .unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // No sleeps before validating, no nonces refused at random.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ca = Self {
            children: vec![dns_server, pebble],
            directory: format!("https://127.0.0.1:{acme}/dir"),
            root,
            management,
            dns_management,
            http_port,
            tls_port,
        };
        util::wait_for("pebble", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", acme)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", dns_management)).is_ok()
        });
        ca
    }

    /// pebble's issuing root (it makes a new one each start).
    fn issuer(&self, to: &Path) {
        let out = Command::new("curl")
            .args(["-sS", "-k", "-o"])
            .arg(to)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .status()
            .unwrap();
        assert!(out.success());
    }

    /// Make `host` resolve to `ip` for the CA.
    fn resolve(&self, host: &str, ip: &str) {
        let out = Command::new("curl")
            .args(["-sS", "-X", "POST", "-d"])
            .arg(serde_json::json!({"host": format!("{host}."), "addresses": [ip]}).to_string())
            .arg(format!("http://127.0.0.1:{}/add-a", self.dns_management))
            .status()
            .unwrap();
        assert!(out.success());
    }
}

/// Whether a handshake for `host` on `port` that trusts only `ca`
/// succeeds, and the app answers behind it.
fn serves(port: u16, host: &str, ca: &Path) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("hello from v1")
}

/// Until `host` on `port` is served with a certificate `ca` trusts (a
/// minute at most: the agent's log is the failure's message).
fn wait_served(env: &Env, port: u16, host: &str, ca: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serves(port, host, ca) {
        assert!(
            Instant::now() < deadline,
            "{host} never served: {}",
            std::fs::read_to_string(env.path("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn spec(port: u16, name: &str, host: &str, ca: &Ca, plain: u16) -> String {
    format!(
        r#"
[services.{name}]
image = "app"
listen = "127.0.0.1:{port}"
hosts = ["{host}"]
env = {{ HELLO_VERSION = "v1" }}
[services.{name}.health.readiness]
http = "/healthz"
[services.{name}.tls]
acme = "{directory}"
acme_root = "{root}"
acme_email = "ops@example.test"
redirect_from = "127.0.0.1:{plain}"
"#,
        directory = ca.directory,
        root = ca.root.display()
    )
}

const IMAGE: &str = "[images.app]\ninclude = [\"bin\"]\nentrypoint = [\"/bin/start.sh\"]\n";

fn cert_of(env: &Env, service: &str) -> PathBuf {
    env.home.join(format!("certs/acme/{service}.pem"))
}

#[test]
fn a_certificate_is_issued_by_http01_renewed_before_it_ends_and_a_failed_challenge_backs_off() {
    let env = Env::new();
    let dir = env.path("ca");
    std::fs::create_dir_all(&dir).unwrap();
    // Certificates of 12 s: renewed after 8 (a third of the life left).
    let ca = Ca::start(&dir, 12);
    ca.resolve("bad.example.test", "127.0.0.2");
    let (port, bad_port) = (free_port(), free_port());
    let text = [
        IMAGE.to_owned(),
        spec(port, "web", "web.example.test", &ca, ca.http_port),
        // Its challenge is answered where the CA never looks (the name
        // resolves to 127.0.0.2 for it): the order fails.
        spec(bad_port, "bad", "bad.example.test", &ca, free_port()),
    ]
    .concat();
    let path = hello_app(&env.path("app"), &text);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let issuer = dir.join("issuer.pem");
    ca.issuer(&issuer);

    // Issued over HTTP-01 answered by the router, then served.
    wait_served(&env, port, "web.example.test", &issuer);
    let first = std::fs::read(cert_of(&env, "web")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["web.pem", "web.key"] {
        let mode = std::fs::metadata(env.home.join("certs/acme").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // Renewed before it ends, and the new one served.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = std::fs::read(cert_of(&env, "web")).unwrap();
        if now != first && serves(port, "web.example.test", &issuer) {
            break;
        }
        assert!(Instant::now() < deadline, "never renewed");
        std::thread::sleep(Duration::from_millis(250));
    }

    // The failed challenge: no certificate, the CA's refusal in the log,
    // and one order only (the next waits a minute, then doubling).
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap();
    assert!(!cert_of(&env, "bad").exists());
    // Refused for the challenge itself (pebble could not connect to the
    // address the name resolves to), not for anything else.
    let refusal = log
        .lines()
        .find(|l| l.contains("service bad: the CA"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        refusal.contains("urn:ietf:params:acme:error:connection")
            && refusal.contains("bad.example.test")
            && refusal.contains("127.0.0.2"),
        "{refusal}"
    );
    assert!(log.contains("trying again in 1m"), "{log}");
    assert_eq!(
        log.matches("service bad: ordering a certificate").count(),
        1,
        "{log}"
    );
    assert!(!serves(bad_port, "bad.example.test", &issuer));
    // Status says both: when web renews, why bad has none and when it
    // tries again.
    let web = util::service_status(&env, "web")["certificate"].clone();
    assert!(
        web.as_str().unwrap().starts_with("issued; renewal due at "),
        "{web}"
    );
    let bad = util::service_status(&env, "bad")["certificate"].clone();
    let bad = bad.as_str().unwrap();
    assert!(
        bad.starts_with("ordering failed (1 in a row): the CA"),
        "{bad}"
    );
    assert!(
        bad.contains("urn:ietf:params:acme:error:connection"),
        "{bad}"
    );
    assert!(bad.contains("; next try at 20"), "{bad}");
    let text = env.ok(&["status", "bad"]);
    assert!(text.contains("  certificate: ordering failed"), "{text}");
}

#[test]
fn a_wildcard_certificate_is_issued_by_dns01_through_the_hook() {
    let env = Env::new();
    let dir = env.path("ca");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::start(&dir, 3600);
    // The hook sets and clears the TXT record in the CA's DNS, and says
    // what it was asked.
    let hook = dir.join("dns-hook.sh");
    let asked = dir.join("asked");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\necho \"$1 $2\" >> {asked}\nif [ \"$1\" = present ]; then\n  curl -sSf -X POST -d \"{{\\\"host\\\":\\\"$2.\\\",\\\"value\\\":\\\"$3\\\"}}\" http://127.0.0.1:{m}/set-txt\nelse\n  curl -sSf -X POST -d \"{{\\\"host\\\":\\\"$2.\\\"}}\" http://127.0.0.1:{m}/clear-txt\nfi\n",
            asked = asked.display(),
            m = ca.dns_management
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let text = format!(
        r#"{IMAGE}
[services.tenants]
image = "app"
listen = "127.0.0.1:{port}"
hosts = ["*.t.example.test"]
env = {{ HELLO_VERSION = "v1" }}
[services.tenants.health.readiness]
http = "/healthz"
[services.tenants.tls]
acme = "{directory}"
acme_root = "{root}"
dns_hook = ["{hook}"]
"#,
        directory = ca.directory,
        root = ca.root.display(),
        hook = hook.display()
    );
    let path = hello_app(&env.path("app"), &text);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let issuer = dir.join("issuer.pem");
    ca.issuer(&issuer);
    wait_served(&env, port, "a.t.example.test", &issuer);
    // Any name below it, by the same certificate.
    assert!(serves(port, "b.t.example.test", &issuer));
    let asked = std::fs::read_to_string(&asked).unwrap();
    assert_eq!(
        asked,
        "present _acme-challenge.t.example.test\ncleanup _acme-challenge.t.example.test\n"
    );
}

#[test]
fn without_a_plain_address_the_certificate_is_issued_by_tls_alpn01_on_the_https_one() {
    let env = Env::new();
    let dir = env.path("ca");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::start(&dir, 3600);
    ca.resolve("alpn.example.test", "127.0.0.1");
    // The service listens where pebble makes its TLS-ALPN-01 handshakes,
    // and has no plain address: no HTTP-01 is possible.
    let port = ca.tls_port;
    let text = spec(port, "alpn", "alpn.example.test", &ca, 0)
        .replace("redirect_from = \"127.0.0.1:0\"\n", "");
    assert!(!text.contains("redirect_from"), "{text}");
    let path = hello_app(&env.path("app"), &format!("{IMAGE}{text}"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let issuer = dir.join("issuer.pem");
    ca.issuer(&issuer);
    wait_served(&env, port, "alpn.example.test", &issuer);
    // Proved over TLS-ALPN-01 (no other way was open: no plain address,
    // no DNS hook).
    let log = std::fs::read_to_string(env.path("agent.log")).unwrap();
    assert!(log.contains("proving alpn.example.test to"), "{log}");
    assert!(log.contains("by TLS-ALPN-01"), "{log}");
}

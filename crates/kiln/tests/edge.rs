//! Black-box tests of the edge: many services on one address, told apart
//! by host and path prefix, through the real router.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use util::{Agent, Env, Load, free_port, hello_app, request_to, service_status, write};

/// A service of the hello app on `port`, answering as `version`, with the
/// route keys in `route`.
fn service(name: &str, port: u16, version: &str, route: &str) -> String {
    format!(
        r#"
[services.{name}]
image = "app"
listen = "127.0.0.1:{port}"
{route}
env = {{ HELLO_VERSION = "{version}" }}
[services.{name}.health.readiness]
http = "/healthz"
interval = "200ms"
[services.{name}.rollout]
watch = "0s"
[services.{name}.stop]
drain_timeout = "2s"
kill_timeout = "2s"
"#
    )
}

const IMAGE: &str = r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]
"#;

/// Four services on one port: a site, its API under `/api` (stripped),
/// every tenant below it, and whatever else comes.
fn shared(port: u16, api_version: &str) -> String {
    [
        IMAGE.to_owned(),
        service("site", port, "site", r#"hosts = ["example.test"]"#),
        service(
            "api",
            port,
            api_version,
            "hosts = [\"example.test\"]\npath_prefix = \"/api\"\nstrip_prefix = true",
        ),
        service("tenants", port, "tenants", r#"hosts = ["*.example.test"]"#),
        service("rest", port, "rest", ""),
    ]
    .concat()
}

/// One request for `path` with `host`, on a new connection.
fn get(port: u16, host: &str, path: &str) -> (u16, String) {
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    c.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (status, body, _) = request_to(&mut c, host, path).unwrap();
    (status, body)
}

/// Who answered: `hello from NAME (instance …)` → `NAME`.
fn who(port: u16, host: &str, path: &str) -> String {
    let (status, body) = get(port, host, path);
    assert_eq!(status, 200, "{host}{path}: {body}");
    body.trim_start_matches("hello from ")
        .split(" (")
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn services_share_an_address_by_host_and_path_and_the_most_specific_route_wins() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &shared(port, "api"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    assert_eq!(who(port, "example.test", "/"), "site");
    assert_eq!(
        service_status(&env, "api")["serves"],
        format!("http://127.0.0.1:{port} example.test/api (stripped)")
    );
    assert_eq!(
        service_status(&env, "rest")["serves"],
        format!("http://127.0.0.1:{port} */")
    );
    // Any case, a trailing dot and a port are the same host.
    assert_eq!(who(port, &format!("Example.TEST.:{port}"), "/"), "site");
    // The prefix is stripped: the instance gets `/` for `/api`.
    assert_eq!(who(port, "example.test", "/api"), "api");
    assert_eq!(who(port, "example.test", "/api?x=1"), "api");
    // ... and `/headers` for `/api/headers`, told the prefix it lost.
    let (status, headers) = get(port, "example.test", "/api/headers");
    assert_eq!(status, 200, "{headers}");
    assert!(headers.contains("x-forwarded-prefix: /api"), "{headers}");
    // On a segment boundary only: `/apix` is the site's (its own 404).
    assert_eq!(
        get(port, "example.test", "/apix"),
        (404, "not found\n".to_owned())
    );
    // A wildcard covers the names below it, not the name itself.
    assert_eq!(who(port, "a.example.test", "/"), "tenants");
    assert_eq!(who(port, "b.a.example.test", "/"), "tenants");
    // The API's prefix is the API's on its own host only: the tenants' app
    // gets `/api` as it is (and has no such page).
    assert_eq!(
        get(port, "a.example.test", "/api"),
        (404, "not found\n".to_owned())
    );
    assert_eq!(who(port, "other.test", "/"), "rest");
    assert_eq!(who(port, "127.0.0.1", "/"), "rest");
    // A path that could be read as another service's is refused.
    let (status, body) = get(port, "example.test", "/x/../api");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(". or .. segment"), "{body}");
    // The client cannot claim a prefix was stripped.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"GET /headers HTTP/1.1\r\nhost: example.test\r\nx-forwarded-prefix: /evil\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(!out.contains("/evil"), "{out}");

    // Without the catch-all, a request no route answers is the router's 404.
    let without_rest = shared(port, "api");
    let cut = without_rest.find("\n[services.rest]").unwrap();
    write(&path, &without_rest.as_bytes()[..cut]);
    let out = env.ok(&["apply", "--prune", "-f", path.to_str().unwrap()]);
    assert!(out.contains("rest"), "{out}");
    let (status, body) = get(port, "other.test", "/");
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("no service answers host other.test"),
        "{body}"
    );
    assert_eq!(who(port, "example.test", "/"), "site", "the others stay");

    // A route is a setting: moved at once, with no new release.
    let moved = without_rest[..cut].replace("path_prefix = \"/api\"", "path_prefix = \"/v2\"");
    write(&path, moved.as_bytes());
    let plan = env.ok(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        plan.contains("route example.test/api (stripped) -> example.test/v2 (stripped)"),
        "{plan}"
    );
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(who(port, "example.test", "/v2"), "api");
    assert_eq!(get(port, "example.test", "/api").0, 404, "the site's now");
    assert_eq!(service_status(&env, "api")["revision"], 1);
}

#[test]
fn a_route_two_services_claim_is_refused_naming_both_with_nothing_changed() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &shared(port, "api"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // In one spec: refused before anything is sent.
    let twice = shared(port, "api")
        + &service(
            "dup",
            port,
            "dup",
            "hosts = [\"EXAMPLE.test\"]\npath_prefix = \"/api/\"",
        );
    write(&path, twice.as_bytes());
    let err = env.fails(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "service api and service dup both route host example.test /api on 127.0.0.1:{port}"
        )),
        "{err}"
    );

    // Across specs: the agent checks every service it runs.
    let other = hello_app(
        &env.path("other"),
        &(IMAGE.to_owned() + &service("intruder", port, "intruder", "")),
    );
    let err = env.fails(&["apply", "-f", other.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "service intruder and service rest both route any host / on 127.0.0.1:{port}"
        )) || err.contains(&format!(
            "service rest and service intruder both route any host / on 127.0.0.1:{port}"
        )),
        "{err}"
    );
    let err = env.fails(&["history", "intruder"]);
    assert!(err.contains("no service named intruder"), "{err}");
    assert_eq!(who(port, "other.test", "/"), "rest");

    // A route without an address to attach it to.
    write(
        &other,
        (IMAGE.to_owned() + "[services.lost]\nimage = \"app\"\nhosts = [\"a.test\"]\n").as_bytes(),
    );
    let err = env.fails(&["plan", "-f", other.to_str().unwrap()]);
    assert!(
        err.contains("hosts, path_prefix, strip_prefix, trusted_proxies and proxy_protocol need a listen address"),
        "{err}"
    );
}

#[test]
fn a_rollout_of_one_host_loses_no_request_and_leaves_the_others_connections_alone() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &shared(port, "v1"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // A keep-alive client of the site, and load on the API and the rest.
    let mut site = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    site.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (status, body, close) = request_to(&mut site, "example.test", "/").unwrap();
    assert_eq!((status, close), (200, false), "{body}");
    let addr = ([127, 0, 0, 1], port).into();
    let api = Load::start_to(addr, 2, "example.test", "/api");
    let rest = Load::start_to(addr, 2, "kiln-test", "/");
    std::thread::sleep(Duration::from_millis(300));
    write(&path, shared(port, "v2").as_bytes());
    let out = env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("api: new release 2"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (api, rest) = (api.finish(), rest.finish());
    api.assert_none_failed();
    rest.assert_none_failed();
    assert!(
        api.bodies.contains_key("hello from v1") && api.bodies.contains_key("hello from v2"),
        "{api:?}"
    );
    assert_eq!(rest.bodies.keys().collect::<Vec<_>>(), ["hello from rest"]);
    // The site's connection is the one it was: still open, still the site.
    let (status, body, _) = request_to(&mut site, "example.test", "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from site"), "{body}");
    for other in ["site", "tenants", "rest"] {
        assert_eq!(service_status(&env, other)["revision"], 1, "{other}");
    }
}

/// A self-signed certificate for `host` (its own trust anchor) and its
/// key, written to `DIR/NAME.pem` and `DIR/NAME.key`.
fn certificate(dir: &std::path::Path, name: &str, host: &str) {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    // The key first: a reload that sees the new certificate sees its key.
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, made.signing_key.serialize_pem()).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    std::fs::write(&tmp, made.cert.pem()).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
}

/// `curl` for `https://HOST:PORT/PATH`, resolved to loopback and trusting
/// only `ca`: (exit status, headers and body).
fn curl_https(port: u16, host: &str, path: &str, ca: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn https_service(name: &str, port: u16, host: &str, tls: &str) -> String {
    service(name, port, name, &format!("hosts = [\"{host}\"]"))
        + &format!(
            "[services.{name}.tls]\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n{tls}\n"
        )
}

#[test]
fn https_picks_each_hosts_certificate_by_sni_reloads_it_and_redirects_plain_http() {
    let env = Env::new();
    let (port, plain) = (free_port(), free_port());
    let certs = env.path("app/certs");
    std::fs::create_dir_all(&certs).unwrap();
    certificate(&certs, "a", "a.example.test");
    certificate(&certs, "b", "b.example.test");
    let spec = [
        IMAGE.to_owned(),
        https_service(
            "a",
            port,
            "a.example.test",
            &format!("hsts = \"1d\"\nredirect_from = \"127.0.0.1:{plain}\""),
        ),
        https_service("b", port, "b.example.test", ""),
    ]
    .concat();
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    let status = env.ok(&["status"]);
    assert!(
        status.contains(&format!(
            "serves https://127.0.0.1:{port} a.example.test/ (files certificate), redirected from http://127.0.0.1:{plain}"
        )),
        "{status}"
    );
    // Each host gets its own certificate (curl trusts only that one).
    let (code, out) = curl_https(port, "a.example.test", "/", &certs.join("a.pem"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello from a "), "{out}");
    assert!(
        out.contains("strict-transport-security: max-age=86400"),
        "{out}"
    );
    let (code, out) = curl_https(port, "b.example.test", "/headers", &certs.join("b.pem"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    assert!(
        !out.contains("strict-transport-security"),
        "b asked for none: {out}"
    );
    // a's certificate is not b's: the client refuses it.
    let (code, out) = curl_https(port, "b.example.test", "/", &certs.join("a.pem"));
    assert_ne!(code, 0, "{out}");
    // No certificate for a host no service names: no handshake.
    let (code, out) = curl_https(port, "c.example.test", "/", &certs.join("a.pem"));
    assert_ne!(code, 0, "{out}");

    // Plain HTTP on redirect_from: a 308 to the same place over HTTPS.
    let mut c = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /x?y=1 HTTP/1.1\r\nhost: a.example.test:80\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.contains(&format!(
            "location: https://a.example.test:{port}/x?y=1\r\n"
        )),
        "{out}"
    );

    // A renewed certificate is served without an apply.
    let old = std::fs::read(certs.join("a.pem")).unwrap();
    certificate(&certs, "a", "a.example.test");
    assert_ne!(old, std::fs::read(certs.join("a.pem")).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = curl_https(port, "a.example.test", "/", &certs.join("a.pem"));
        if code == 0 {
            assert!(out.contains("hello from a "), "{out}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reloaded: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A key that is not the certificate's: refused, naming both files,
    // with nothing changed.
    let wrong = spec.replace("certs/b.key", "certs/a.key");
    write(&path, wrong.as_bytes());
    let err = env.fails(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains("is not the key of the certificate"), "{err}");
    assert!(err.contains("b.pem"), "{err}");
    let (code, out) = curl_https(port, "b.example.test", "/", &certs.join("b.pem"));
    assert_eq!(code, 0, "b still served: {out}");

    // HTTPS and plain HTTP on one address: refused before anything is sent.
    let mixed = spec.clone() + &service("plainly", port, "plainly", "hosts = [\"p.example.test\"]");
    write(&path, mixed.as_bytes());
    let err = env.fails(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "serves HTTPS on 127.0.0.1:{port} and service plainly plain HTTP"
        )),
        "{err}"
    );
}

/// Send `bytes` on a new connection and read until the router closes it.
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_request_body_over_the_services_limit_is_answered_413() {
    let env = Env::new();
    let port = free_port();
    let spec = IMAGE.to_owned()
        + &service("web", port, "v1", "")
        + "[services.web.router]\nmax_body = \"1K\"\n";
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let post = |len: usize, extra: &str| {
        let mut req = format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\nconnection: close\r\n{extra}\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'a', len));
        req
    };
    // At the limit: the instance gets it all.
    let out = exchange(port, &post(1024, ""));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("\r\n\r\n1024\n"), "{out}");
    // One byte over, declared: 413 before anything is sent on.
    let out = exchange(port, &post(1025, ""));
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.contains("a request body of 1025 bytes is larger than the service's limit of 1 KiB"),
        "{out}"
    );
    // Expecting 100-continue: refused without the go-ahead.
    let out = exchange(
        port,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\nexpect: 100-continue\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(!out.contains("100 Continue"), "{out}");
    // Chunked, growing past it: cut there, 413.
    let chunk = format!("320\r\n{}\r\n", "b".repeat(800));
    let out = exchange(
        port,
        format!("POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n")
            .as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.contains("larger than the service's limit of 1 KiB"),
        "{out}"
    );
    // Under it, chunked: through, whole.
    let out = exchange(
        port,
        format!("POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunk}0\r\n\r\n")
            .as_bytes(),
    );
    assert!(out.ends_with("\r\n\r\n800\n"), "{out}");
    // A bad value names itself.
    write(&path, spec.replace("\"1K\"", "\"1Q\"").as_bytes());
    let err = env.fails(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("router.max_body: unknown size unit in `1Q`"),
        "{err}"
    );
}

/// A request for `/` on a new connection, in a thread: its answer comes
/// on the channel.
fn waiting_get(port: u16) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    rx
}

#[test]
fn a_paused_service_holds_its_requests_until_resumed_even_across_a_restart() {
    let env = Env::new();
    let port = free_port();
    let spec = IMAGE.to_owned() + &service("web", port, "v1", "");
    let path = hello_app(&env.path("app"), &spec);
    let mut agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    let out = env.ok(&["pause", "web", "--timeout", "30s"]);
    assert!(out.contains("web: paused"), "{out}");
    let status = env.ok(&["status"]);
    assert!(
        status.contains("paused: new requests wait at most 30s (kiln resume web)"),
        "{status}"
    );
    assert_eq!(service_status(&env, "web")["paused_ms"], 30_000);
    // A request waits (it is not refused), and goes on when resumed.
    let held = waiting_get(port);
    std::thread::sleep(Duration::from_millis(700));
    assert!(held.try_recv().is_err(), "answered while paused");
    let out = env.ok(&["resume", "web"]);
    assert!(out.contains("web: resumed"), "{out}");
    let answer = held.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello from v1"), "{answer}");
    assert!(service_status(&env, "web").get("paused_ms").is_none());

    // Past the pause's timeout: 503, saying why.
    env.ok(&["pause", "web", "--timeout", "1s"]);
    let answer = waiting_get(port)
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("service web is paused (kiln resume): not resumed within 1s"),
        "{answer}"
    );

    // The pause is in the state store: a restarted agent holds requests too.
    env.ok(&["pause", "web", "--timeout", "30s"]);
    agent.stop();
    let _agent = Agent::start(&env);
    let held = waiting_get(port);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        held.try_recv().is_err(),
        "answered while paused after a restart"
    );
    env.ok(&["resume", "web"]);
    let answer = held.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Each is in the ledger; an unknown service is refused by name.
    let audit = env.ok(&["audit"]);
    assert!(
        audit.contains("service-paused") && audit.contains("service-resumed"),
        "{audit}"
    );
    let err = env.fails(&["pause", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = env.fails(&["pause", "web", "--timeout", "2days"]);
    assert!(err.contains("timeout must be at most 1day"), "{err}");
}

#[test]
fn a_recreate_rollout_holds_requests_while_no_instance_is_ready_and_fails_none() {
    let env = Env::new();
    let port = free_port();
    let spec = |version: &str| {
        IMAGE.to_owned()
            + &service("web", port, version, "")
                .replace("watch = \"0s\"", "watch = \"0s\"\nstrategy = \"recreate\"")
    };
    let path = hello_app(&env.path("app"), &spec("v1"));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let load = Load::start(port, 2);
    std::thread::sleep(Duration::from_millis(300));
    write(&path, spec("v2").as_bytes());
    let out = env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("web: new release 2"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let count = load.finish();
    // Every old instance stopped before a new one started, yet no request
    // failed: they waited at the router for the new fleet.
    count.assert_none_failed();
    assert!(
        count.bodies.contains_key("hello from v1") && count.bodies.contains_key("hello from v2"),
        "{count:?}"
    );
}

#[test]
fn each_request_gets_its_own_id_and_a_json_access_log_line_when_asked() {
    let env = Env::new();
    let (port, quiet) = (free_port(), free_port());
    let spec = IMAGE.to_owned()
        + &service("web", port, "v1", "")
        + "[services.web.router]\naccess_log = true\n"
        + &service("quiet", quiet, "v1", "");
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // The client's own id is not the router's to pass on.
    let out = exchange(
        port,
        b"GET /headers?x=1 HTTP/1.1\r\nhost: example.test\r\nx-request-id: forged\r\nuser-agent: probe/1\r\nconnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(!out.contains("forged"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no x-request-id: {out}"))
        .trim()
        .to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let (_, again) = get(port, "example.test", "/headers");
    assert!(!again.contains(&id), "two requests, one id: {again}");

    let log = env.home.join("logs/access/web.log");
    util::wait_for("the access log line", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 2)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["request_id"], id.as_str(), "{line}");
    assert_eq!(line["service"], "web");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["host"], "example.test");
    assert_eq!(line["path"], "/headers?x=1");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["release"], 1);
    assert_eq!(line["user_agent"], "probe/1");
    assert!(
        line["instance"].as_str().is_some_and(|i| !i.is_empty()),
        "{line}"
    );
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert!(
        line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    // The router's own answer is logged too, without an instance.
    env.ok(&["pause", "web", "--maintenance"]);
    let (status, _) = get(port, "example.test", "/");
    assert_eq!(status, 503);
    util::wait_for("the 503's line", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 3)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
    assert_eq!(line["status"], 503, "{line}");
    assert!(
        line.get("instance").is_none() && line.get("release").is_none(),
        "{line}"
    );
    env.ok(&["resume", "web"]);
    // A service that did not ask keeps none.
    let (status, _) = get(quiet, "x", "/");
    assert_eq!(status, 200);
    assert!(!env.home.join("logs/access/quiet.log").exists());
}

#[test]
fn a_trusted_load_balancers_proxy_header_names_the_client_and_no_one_else_can() {
    let env = Env::new();
    let (behind, open) = (free_port(), free_port());
    let spec = IMAGE.to_owned()
        + &service(
            "behind",
            behind,
            "v1",
            "trusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true",
        )
        + &service(
            "open",
            open,
            "v1",
            "trusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol = true",
        );
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    let status = env.ok(&["status"]);
    assert!(
        status.contains(&format!(
            "serves http://127.0.0.1:{behind} */ (PROXY protocol from 127.0.0.0/8)"
        )),
        "{status}"
    );
    let headers = b"GET /headers HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    // Version 1, from a trusted peer: the header's source is the client.
    let mut v1 = format!("PROXY TCP4 203.0.113.7 127.0.0.1 51234 {behind}\r\n").into_bytes();
    v1.extend_from_slice(headers);
    let out = exchange(behind, &v1);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\nx-forwarded-for: 203.0.113.7\n"), "{out}");
    // Version 2 (binary), IPv6.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\0\x24".to_vec();
    let src: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    v2.extend_from_slice(&src.octets());
    v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&51234u16.to_be_bytes());
    v2.extend_from_slice(&behind.to_be_bytes());
    v2.extend_from_slice(headers);
    let out = exchange(behind, &v2);
    assert!(out.contains("\nx-forwarded-for: 2001:db8::7\n"), "{out}");
    // A trusted peer that sends no header: closed, nothing answered.
    assert_eq!(exchange(behind, headers), "");
    // An untrusted peer's header is not believed: it is not HTTP either.
    let mut forged = format!("PROXY TCP4 203.0.113.7 127.0.0.1 51234 {open}\r\n").into_bytes();
    forged.extend_from_slice(headers);
    let out = exchange(open, &forged);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(!out.contains("203.0.113.7"), "{out}");
    // …and it is served as the client it is.
    let out = exchange(open, headers);
    assert!(out.contains("\nx-forwarded-for: 127.0.0.1\n"), "{out}");
    // proxy_protocol without anyone to trust: refused at plan.
    let bad = IMAGE.to_owned() + &service("x", free_port(), "v1", "proxy_protocol = true");
    write(&path, bad.as_bytes());
    let err = env.fails(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("proxy_protocol needs trusted_proxies"),
        "{err}"
    );
}

/// `curl` for `path` on `port`, decoding what it gets: (headers, body).
fn curl_decoded(port: u16, path: &str, extra: &[&str]) -> (String, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--compressed",
            "-D",
            "/dev/stderr",
        ])
        .args(extra)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stderr).to_lowercase(),
        out.stdout,
    )
}

#[test]
fn text_responses_are_compressed_as_the_client_accepts_when_the_service_asks() {
    let env = Env::new();
    let (port, plain) = (free_port(), free_port());
    let app = env.path("app");
    let page: String = (0..400)
        .map(|i| format!("<p>line {i} of a page that says much the same thing</p>\n"))
        .collect();
    write(&app.join("static/page.html"), page.as_bytes());
    let image = IMAGE.replace("include = [\"bin\"]", "include = [\"bin\", \"static\"]");
    let spec = image
        + &service("web", port, "v1", "")
        + "[services.web.router]\ncompress = true\nh2c = true\n"
        + &service("plain", plain, "v1", "");
    let path = hello_app(&app, &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    for coding in ["gzip", "br", "zstd"] {
        let accept = format!("accept-encoding: {coding}");
        let (headers, body) = curl_decoded(port, "/static/page.html", &["-H", &accept]);
        assert!(
            headers.contains(&format!("content-encoding: {coding}\r\n")),
            "{coding}: {headers}"
        );
        assert!(headers.contains("vary: accept-encoding"), "{headers}");
        assert!(!headers.contains("content-length"), "{headers}");
        assert_eq!(String::from_utf8_lossy(&body), page, "{coding}");
    }
    // Over HTTP/2 too.
    let (headers, body) = curl_decoded(
        port,
        "/static/page.html",
        &["--http2-prior-knowledge", "-H", "accept-encoding: gzip"],
    );
    assert!(headers.starts_with("http/2 200"), "{headers}");
    assert!(headers.contains("content-encoding: gzip"), "{headers}");
    assert_eq!(String::from_utf8_lossy(&body), page);
    // What it saves, seen raw.
    let raw = exchange(
        port,
        b"GET /static/page.html HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\nconnection: close\r\n\r\n",
    );
    assert!(
        raw.len() < page.len() / 4,
        "{} of {}",
        raw.len(),
        page.len()
    );
    // Not asked for, too small, or a service that does not compress: as is.
    let (headers, _) = curl_decoded(
        port,
        "/static/page.html",
        &["-H", "accept-encoding: identity"],
    );
    assert!(!headers.contains("content-encoding"), "{headers}");
    let (headers, _) = curl_decoded(port, "/healthz", &["-H", "accept-encoding: gzip"]);
    assert!(!headers.contains("content-encoding"), "{headers}");
    let (headers, body) =
        curl_decoded(plain, "/static/page.html", &["-H", "accept-encoding: gzip"]);
    assert!(!headers.contains("content-encoding"), "{headers}");
    assert_eq!(String::from_utf8_lossy(&body), page);
}

#[test]
fn error_pages_answer_for_the_router_and_maintenance_answers_at_once() {
    let env = Env::new();
    let port = free_port();
    let app = env.path("app");
    let maintenance = "<!doctype html><h1>Back soon</h1>\n";
    write(&app.join("errors/503.html"), maintenance.as_bytes());
    write(&app.join("errors/413.html"), b"<p>Too big for us</p>\n");
    let spec = IMAGE.to_owned()
        + &service("web", port, "v1", "error_pages = \"errors\"")
        + "[services.web.router]\nmax_body = \"1K\"\n";
    let path = hello_app(&app, &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // Maintenance: 503 at once, with the service's page.
    let out = env.ok(&["pause", "web", "--maintenance"]);
    assert!(out.contains("web: in maintenance"), "{out}");
    let started = std::time::Instant::now();
    let out = exchange(
        port,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.contains("content-type: text/html; charset=utf-8\r\n"),
        "{out}"
    );
    assert!(out.ends_with(maintenance), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5), "it waited");
    assert!(env.ok(&["status"]).contains("paused: in maintenance"));
    env.ok(&["resume", "web"]);
    let (status, body) = get(port, "x", "/");
    assert_eq!(status, 200, "{body}");
    // The router's 413 uses the page too; a status with none is text.
    let mut big =
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\nconnection: close\r\n\r\n"
            .to_vec();
    big.extend(std::iter::repeat_n(b'a', 2000));
    let out = exchange(port, &big);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.ends_with("<p>Too big for us</p>\n"), "{out}");
    // A page is part of the service's settings: plan shows a change.
    write(&app.join("errors/502.html"), b"<p>bad gateway</p>");
    let plan = env.ok(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        plan.contains("error pages 413,503 -> 413,502,503"),
        "{plan}"
    );
    // Anything but NNN.html is refused, naming it.
    write(&app.join("errors/notes.txt"), b"x");
    let err = env.fails(&["plan", "-f", path.to_str().unwrap()]);
    assert!(err.contains("notes.txt is not NNN.html"), "{err}");
}

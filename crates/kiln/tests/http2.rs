//! Black-box tests of HTTP/2 through the real router: ALPN `h2` over TLS
//! (with curl), h2c with prior knowledge, and the canary split, the sticky
//! cookie and a rollout under load over h2 streams as over h1 requests.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use util::{
    Agent, Env, LoadCount, free_port, hello_app, http_get, service_status, wait_for, write,
};

/// Service `web` of the hello app on `port`, answering as `version`, its
/// plain listener taking h2c, with `rollout` keys.
fn spec(port: u16, version: &str, rollout: &str) -> String {
    format!(
        r#"
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 2
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.web.router]
h2c = true
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.rollout]
watch = "0s"
{rollout}
[services.web.stop]
drain_timeout = "2s"
kill_timeout = "2s"
"#
    )
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection with prior knowledge to `port`.
async fn connect(port: u16) -> Sender {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// One request on `send`: (status, body, set-cookie).
async fn get(
    send: &mut Sender,
    cookie: Option<&str>,
) -> Result<(u16, String, Option<String>), String> {
    let mut req = hyper::Request::get("http://kiln-test/");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        cookie,
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` requests as concurrent streams of one connection: the version of
/// each answer (`v1`, `v2`).
fn versions(port: u16, n: usize) -> Vec<String> {
    runtime().block_on(async {
        let send = connect(port).await;
        let all = (0..n).map(|_| {
            let mut send = send.clone();
            async move { get(&mut send, None).await.unwrap() }
        });
        futures_util::future::join_all(all)
            .await
            .into_iter()
            .map(|(status, body, _)| {
                assert_eq!(status, 200, "{body}");
                body.trim_start_matches("hello from ")
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    })
}

#[test]
fn https_offers_http2_to_curl_and_the_instance_still_gets_http11() {
    let env = Env::new();
    let port = free_port();
    let certs = env.path("app/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["h2.example.test".to_owned()]).unwrap();
    write(
        &certs.join("web.key"),
        made.signing_key.serialize_pem().as_bytes(),
    );
    write(&certs.join("web.pem"), made.cert.pem().as_bytes());
    let spec = spec(port, "v1", "").replace("[services.web.router]\nh2c = true\n", "")
        + "[services.web.tls]\ncert = \"certs/web.pem\"\nkey = \"certs/web.key\"\n";
    let path = hello_app(&env.path("app"), &spec);
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    let curl = |version: &str, path: &str, extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                version,
                "-w",
                "\n%{http_version}",
            ])
            .args(extra)
            .arg("--cacert")
            .arg(certs.join("web.pem"))
            .arg("--resolve")
            .arg(format!("h2.example.test:{port}:127.0.0.1"))
            .arg(format!("https://h2.example.test:{port}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = curl("--http2", "/", &[]);
    assert!(out.starts_with("hello from v1"), "{out}");
    assert!(out.ends_with("\n2"), "not HTTP/2: {out}");
    // The instance sees HTTP/1.1 with the router's forwarding fields.
    let out = curl("--http2", "/headers", &[]);
    assert!(out.ends_with("\n2"), "{out}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    assert!(
        out.contains(&format!("host: h2.example.test:{port}")),
        "{out}"
    );
    // A client that offers only HTTP/1.1 gets it.
    let out = curl("--http1.1", "/", &[]);
    assert!(out.ends_with("\n1.1"), "{out}");
    // A large upload goes whole through h2's flow control to the
    // instance, which counts it.
    let upload = env.path("upload");
    write(&upload, &vec![b'k'; 300_000]);
    let data = format!("@{}", upload.display());
    let out = curl("--http2", "/upload", &["--data-binary", &data]);
    assert_eq!(out, "300000\n\n2", "{out}");
}

#[test]
fn the_canary_split_and_the_sticky_cookie_hold_for_h2_streams() {
    let env = Env::new();
    let port = free_port();
    let rollout = "strategy = \"canary\"\nsticky = true\nsteps = [{ weight = 30, pause = \"manual\" }, { weight = 100 }]";
    let path = hello_app(&env.path("app"), &spec(port, "v1", rollout));
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);
    write(&path, spec(port, "v2", rollout).as_bytes());
    env.ok(&["apply", "-f", path.to_str().unwrap(), "--detach"]);
    wait_for("the canary at 30%", Duration::from_secs(30), || {
        service_status(&env, "web")["canary"]["weight"] == 30
    });

    // 2000 streams on one connection, each drawn on its own (no cookie):
    // about 30% on the canary (the standard deviation is about 0.01).
    let seen = versions(port, 2000);
    let v2 = seen.iter().filter(|v| *v == "v2").count();
    assert_eq!(seen.iter().filter(|v| *v == "v1").count() + v2, 2000);
    let share = v2 as f64 / 2000.0;
    assert!((share - 0.3).abs() < 0.05, "canary share over h2 {share}");

    // Each client gets its cookie on its first answer and keeps its side
    // on every later stream that carries it.
    runtime().block_on(async {
        let mut on_canary = 0;
        for _ in 0..100 {
            let mut send = connect(port).await;
            let (status, body, cookie) = get(&mut send, None).await.unwrap();
            assert_eq!(status, 200);
            let cookie = cookie.expect("a sticky cookie");
            let pair = cookie.split(';').next().unwrap().to_owned();
            let side = body.starts_with("hello from v2");
            on_canary += usize::from(side);
            for _ in 0..5 {
                let (_, again, _) = get(&mut send, Some(&pair)).await.unwrap();
                assert_eq!(again.starts_with("hello from v2"), side, "{pair}: {again}");
            }
        }
        assert!(
            (10..60).contains(&on_canary),
            "sticky canary clients {on_canary}/100"
        );
    });
}

/// Requests as streams of `conns` connections, `streams` at once on each,
/// until stopped.
struct H2Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<LoadCount>,
}

impl H2Load {
    fn start(port: u16, conns: usize, streams: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..conns {
                    let send = connect(port).await;
                    for _ in 0..streams {
                        let (mut send, flag) = (send.clone(), flag.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut count = LoadCount::default();
                            while !flag.load(Ordering::Relaxed) {
                                match get(&mut send, None).await {
                                    Ok((200, body, _)) => {
                                        count.ok += 1;
                                        let v = body.split(" (").next().unwrap().to_owned();
                                        *count.bodies.entry(v).or_default() += 1;
                                    }
                                    Ok((status, body, _)) => {
                                        count.failed += 1;
                                        count.errors.push(format!("{status}: {body}"));
                                    }
                                    Err(e) => {
                                        count.failed += 1;
                                        count.errors.push(e);
                                    }
                                }
                            }
                            count
                        }));
                    }
                }
                let mut total = LoadCount::default();
                for t in tasks {
                    total.add(t.await.unwrap());
                }
                total
            })
        });
        Self { stop, thread }
    }

    fn finish(self) -> LoadCount {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_rollout_under_h2_load_fails_no_stream_and_drains_the_old_instances() {
    let env = Env::new();
    let port = free_port();
    let path = hello_app(&env.path("app"), &spec(port, "v1", ""));
    let metrics = free_port();
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
    });
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    // Two connections, eight streams at once on each, for the whole
    // rollout: old instances are drained while their streams finish.
    let load = H2Load::start(port, 2, 8);
    std::thread::sleep(Duration::from_millis(500));
    write(&path, spec(port, "v2", "").as_bytes());
    let out = env.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("web: new release 2"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let count = load.finish();
    count.assert_none_failed();
    assert!(
        count.bodies.contains_key("hello from v1") && count.bodies.contains_key("hello from v2"),
        "{count:?}"
    );
    assert!(count.ok > 100, "{count:?}");
    // The router counted them per release, as it counts HTTP/1.1 requests.
    let m = http_get(u64::from(metrics), "/metrics").unwrap();
    assert!(
        m.contains("kiln_router_requests_total{service=\"web\",release=\"2\",class=\"2xx\"}"),
        "{m}"
    );
}

/// A gRPC server in Python (Debian's `python3-grpcio`), bytes in and out
/// (no generated code): `Echo` answers `echo:REQUEST` with a trailer
/// naming its version, `Fail` ends with PERMISSION_DENIED, `Count` counts
/// the bytes of a client stream.
const GRPC_SERVER: &str = r#"
import os
from concurrent import futures
import grpc

def echo(request, context):
    context.set_trailing_metadata((("x-served-by", os.environ.get("HELLO_VERSION", "v1")),))
    return b"echo:" + request

def fail(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")

def count(requests, context):
    return str(sum(len(r) for r in requests)).encode()

handlers = {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Count": grpc.stream_unary_rpc_method_handler(count),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kiln.Test", handlers),))
server.add_insecure_port("%s:%s" % (os.environ.get("HOST", "127.0.0.1"), os.environ["PORT"]))
server.start()
server.wait_for_termination()
"#;

/// Its client, through the router on the port it is given (an insecure
/// channel: h2c with prior knowledge).
const GRPC_CLIENT: &str = r#"
import sys
import grpc

channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
response, call = channel.unary_unary("/kiln.Test/Echo").with_call(b"hi", timeout=10)
print("echo", response.decode(), dict(call.trailing_metadata()).get("x-served-by"))
try:
    channel.unary_unary("/kiln.Test/Fail")(b"x", timeout=10)
    print("fail none")
except grpc.RpcError as e:
    print("fail", e.code().name, e.details())
stream = iter([b"a" * 1000] * 50)
print("count", channel.stream_unary("/kiln.Test/Count")(stream, timeout=10).decode())
"#;

#[test]
fn grpc_goes_through_with_its_status_and_trailers_to_an_h2c_instance() {
    let env = Env::new();
    let port = free_port();
    let app = env.path("app");
    write(&app.join("bin/grpc_server.py"), GRPC_SERVER.as_bytes());
    let spec = format!(
        r#"
[images.grpc]
include = ["bin/grpc_server.py"]
entrypoint = ["/usr/bin/python3", "./bin/grpc_server.py"]

[services.rpc]
image = "grpc"
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "v7" }}
[services.rpc.router]
h2c = true
backend_protocol = "h2c"
[services.rpc.health.readiness]
tcp = true
interval = "200ms"
"#
    );
    let path = app.join("kiln.toml");
    write(&path, spec.as_bytes());
    let _agent = Agent::start(&env);
    env.ok(&["apply", "-f", path.to_str().unwrap()]);

    let client = env.path("grpc_client.py");
    write(&client, GRPC_CLIENT.as_bytes());
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&client)
        .arg(port.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The answer, and the trailer the server set after it.
    assert!(stdout.contains("echo echo:hi v7\n"), "{stdout}");
    // The status travels in trailers (here a trailers-only answer).
    assert!(
        stdout.contains("fail PERMISSION_DENIED not for you\n"),
        "{stdout}"
    );
    // A client stream: 50 messages of 1000 bytes.
    assert!(stdout.contains("count 50000\n"), "{stdout}");
}

//! The differential harness: hostile request and response shapes (the
//! smuggling classics, their obfuscations, framing and header edge cases)
//! sent through kiln's router, nginx and HAProxy, each in front of its own
//! copy of one recording backend.
//!
//! For every request shape, kiln either refuses it (the backend receives
//! nothing) or the backend receives from kiln the same requests (count,
//! methods, targets, bodies) that it receives from the stricter of the two
//! peers. kiln refuses a shape both peers forward only for a reason listed
//! in `STRICTER`. To every hostile response kiln answers as one of the
//! peers does (but for the reasons in `RESPONSE_DIFFERS`). For every
//! shape, request or response, a victim's request sent
//! right after it on another connection gets its own answer: nothing an
//! attacker sent is ever glued to another client's request, and no
//! response reaches the wrong client.
//!
//! nginx and HAProxy come from Debian (`nginx-light`, `haproxy`; `scripts/test`
//! installs them). Run alone with `cargo test -p kiln-agent --test
//! differential -- --nocapture` to see the table of outcomes.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent::router::{Backend, RouteKey, Router, ServiceRoutes};
use kiln_core::spec::ServiceName;

/// One request as the backend decoded it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    body: Vec<u8>,
}

/// What a proxy did with one shape.
#[derive(Debug)]
struct Outcome {
    /// What reached the backend.
    seen: Vec<Seen>,
    /// The status codes the attacker's connection got back, in order.
    statuses: Vec<u16>,
    /// Whether the victim's request, right after, got its own answer.
    victim_ok: bool,
}

/// A backend that records each request it can parse (a strict HTTP/1.1
/// reader: Content-Length, or chunked as the last coding) and answers
/// with the request's target, so that a client can tell its own answer.
/// A target `/r/N` gets the raw response shape `N` instead.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let record = record.clone();
                std::thread::spawn(move || serve_backend(conn, &record));
            }
        });
        Self { port, seen }
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn serve_backend(mut conn: TcpStream, record: &Mutex<Vec<Seen>>) {
    let mut buf = Vec::new();
    loop {
        let Some((seen, used)) = parse_request(&mut conn, &mut buf) else {
            return;
        };
        buf.drain(..used);
        let answer = match seen.target.strip_prefix("/r/") {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .and_then(|n| RESPONSES.get(n))
                .map_or_else(|| ok(b"no such shape"), |(_, r)| r.to_vec()),
            None => ok(seen.target.as_bytes()),
        };
        record.lock().unwrap().push(seen);
        if conn.write_all(&answer).is_err() {
            return;
        }
    }
}

fn ok(body: &[u8]) -> Vec<u8> {
    let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    v.extend_from_slice(body);
    v
}

/// Read one whole request from `buf` and `conn`; the request and how many
/// bytes it took. `None` at the end of the stream or on anything the
/// backend cannot frame (it then closes, as a strict server would).
fn parse_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Seen, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = req.method?.to_owned();
                let target = req.path?.to_owned();
                let te = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                    .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(",");
                let cl = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_owned());
                let chunked = te.rsplit(',').next().map(str::trim) == Some("chunked");
                let mut at = len;
                let body = if chunked {
                    decode_chunked(conn, buf, &mut at)?
                } else if !te.is_empty() {
                    return None;
                } else if let Some(cl) = cl {
                    let n: usize = cl.parse().ok()?;
                    fill(conn, buf, at + n)?;
                    at += n;
                    buf[len..at].to_vec()
                } else {
                    Vec::new()
                };
                return Some((
                    Seen {
                        method,
                        target,
                        body,
                    },
                    at,
                ));
            }
            Ok(httparse::Status::Partial) => {
                if !read_more(conn, buf) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16384];
    match conn.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> Option<()> {
    while buf.len() < len {
        if !read_more(conn, buf) {
            return None;
        }
    }
    Some(())
}

fn line(conn: &mut TcpStream, buf: &mut Vec<u8>, at: &mut usize) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf[*at..].windows(2).position(|w| w == b"\r\n") {
            let l = buf[*at..*at + i].to_vec();
            *at += i + 2;
            return Some(l);
        }
        if !read_more(conn, buf) {
            return None;
        }
    }
}

fn decode_chunked(conn: &mut TcpStream, buf: &mut Vec<u8>, at: &mut usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size = line(conn, buf, at)?;
        let size = String::from_utf8(size).ok()?;
        let size = size.split(';').next()?.trim();
        let n = usize::from_str_radix(size, 16).ok()?;
        if n == 0 {
            // Trailers up to the empty line.
            while !line(conn, buf, at)?.is_empty() {}
            return Some(body);
        }
        fill(conn, buf, *at + n + 2)?;
        body.extend_from_slice(&buf[*at..*at + n]);
        if &buf[*at + n..*at + n + 2] != b"\r\n" {
            return None;
        }
        *at += n + 2;
    }
}

/// A proxy under test, and what stops it.
struct Proxy {
    name: &'static str,
    port: u16,
    backend: Recorder,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    // Kept alive for kiln's router (its listener threads are its own).
    _router: Option<Arc<Router>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops and reaps its workers, and
        // HAProxy exits. Each peer runs in a process group of its own, so
        // if that takes over 5 s the whole group is killed (killing the
        // master alone would orphan the workers).
        use rustix::process::{Pid, Signal, kill_process, kill_process_group};
        if let Some(c) = &mut self.child {
            let Some(pid) = Pid::from_raw(c.id() as i32) else {
                return;
            };
            let _ = kill_process(pid, Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = kill_process_group(pid, Signal::KILL);
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(name: &str, port: u16, child: &mut Child, dir: &Path) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            panic!("{name} exited ({status}) before listening: {log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name} did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn need(tool: &str, package: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = format!("{dir}/{tool}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{tool} is needed: apt-get install {package} (scripts/test installs it)");
}

fn nginx() -> Proxy {
    let bin = need("nginx", "nginx-light");
    let backend = Recorder::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         upstream backend {{ server 127.0.0.1:{}; keepalive 16; }}\n\
         server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   proxy_pass http://backend;\n\
         proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_set_header Host $host;\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n  }}\n }}\n}}\n",
        backend.port
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening("nginx", port, &mut child, dir.path());
    Proxy {
        name: "nginx",
        port,
        backend,
        child: Some(child),
        _dir: dir,
        _router: None,
    }
}

fn haproxy() -> Proxy {
    let bin = need("haproxy", "haproxy");
    let backend = Recorder::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = format!(
        "global\n    maxconn 1000\ndefaults\n    mode http\n    option http-keep-alive\n    option forwardfor\n\
         http-reuse always\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n\
         frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\
         backend be\n    server app 127.0.0.1:{}\n",
        backend.port
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let mut child = Command::new(bin)
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening("haproxy", port, &mut child, dir.path());
    Proxy {
        name: "haproxy",
        port,
        backend,
        child: Some(child),
        _dir: dir,
        _router: None,
    }
}

fn kiln(rt: &tokio::runtime::Runtime) -> Proxy {
    let backend = Recorder::start();
    let port = free_port();
    let router = Router::new(std::sync::Arc::new(kiln_agent::keeper::Keeper::none()));
    let svc = RouteKey::Service(ServiceName::try_from("web").unwrap());
    rt.block_on(router.attach(
        &svc,
        kiln_agent::router::Attachment::plain(([127, 0, 0, 1], port).into()),
    ))
    .unwrap();
    let b = Backend::new(
        "i1".into(),
        1,
        ([127, 0, 0, 1], backend.port).into(),
        Arc::default(),
        Arc::default(),
    );
    router.set_routes(
        &svc,
        ServiceRoutes::new(vec![Arc::new(b)], Duration::from_secs(5)),
    );
    Proxy {
        name: "kiln",
        port,
        backend,
        child: None,
        _dir: tempfile::tempdir().unwrap(),
        _router: Some(router),
    }
}

/// Read what comes back until the proxy closes, or nothing more comes for
/// `idle` (a kept-alive connection), or 5 s pass.
fn read_answers(s: &mut TcpStream, idle: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let start = Instant::now();
    let mut chunk = [0u8; 65536];
    s.set_read_timeout(Some(idle)).unwrap();
    while start.elapsed() < Duration::from_secs(5) {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    out
}

/// The status codes of the responses in `bytes` (`HTTP/1.x NNN` at the start
/// of a line: enough to tell answers apart in a table).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.split("\r\n")
        .filter_map(|l| {
            let rest = l
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))?;
            rest.get(..3)?.parse().ok()
        })
        .collect()
}

static VICTIMS: AtomicUsize = AtomicUsize::new(0);

/// Send `shape` on one connection, then a victim's request on another;
/// what the backend saw of the shape, what came back, and whether the
/// victim got its own answer.
fn run(proxy: &Proxy, shape: &[u8]) -> Outcome {
    let _ = proxy.backend.take();
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let _ = s.write_all(shape);
    let answers = read_answers(&mut s, Duration::from_millis(200));
    let _ = s.shutdown(Shutdown::Both);
    drop(s);
    // What the proxy may still be sending on.
    std::thread::sleep(Duration::from_millis(30));
    let seen = proxy.backend.take();
    let n = VICTIMS.fetch_add(1, Ordering::Relaxed);
    let target = format!("/victim-{n}");
    let mut v = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    v.write_all(
        format!(
            "GET {target} HTTP/1.1\r\nHost: victim\r\nCookie: secret={n}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = read_answers(&mut v, Duration::from_millis(1000));
    let victim_seen = proxy.backend.take();
    // Its own answer, and its request reached the backend alone and whole.
    let own = ok(target.as_bytes());
    let victim_ok = answer.starts_with(&own[..12])
        && answer.ends_with(target.as_bytes())
        && statuses(&answer) == [200]
        && victim_seen
            == vec![Seen {
                method: "GET".into(),
                target: target.clone(),
                body: Vec::new(),
            }];
    Outcome {
        seen,
        statuses: statuses(&answers),
        victim_ok,
    }
}

/// Request shapes: (name, bytes). Each is sent as is on a new connection.
fn requests() -> Vec<(&'static str, Vec<u8>)> {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n";
    let big = "a".repeat(70 * 1024);
    let mut v: Vec<(&'static str, String)> = vec![
        ("plain GET", "GET /a HTTP/1.1\r\nHost: h\r\n\r\n".into()),
        (
            "two pipelined GETs",
            "GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n".into(),
        ),
        (
            "POST with a length, then a GET",
            "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /2 HTTP/1.1\r\nHost: h\r\n\r\n".into(),
        ),
        (
            "chunked POST",
            "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(),
        ),
        (
            "chunk extensions and trailers",
            "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n".into(),
        ),
        (
            "CL.TE",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".into(),
        ),
        (
            "TE.CL",
            format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()),
        ),
        (
            "Connection: content-length",
            format!("POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        ),
        (
            "Connection: content-length, incomplete prefix",
            "POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 34\r\n\r\nPOST /store HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        ),
        (
            "Connection: transfer-encoding",
            format!("POST / HTTP/1.1\r\nHost: h\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "Connection: host",
            "GET /h HTTP/1.1\r\nHost: public\r\nConnection: host\r\n\r\n".into(),
        ),
        ("TE xchunked", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".into()),
        ("TE space before colon", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".into()),
        ("TE tab", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n".into()),
        ("TE twice, second bogus", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-encoding: x\r\n\r\n0\r\n\r\n".into()),
        ("TE obs-fold", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n".into()),
        ("TE leading space line", "POST / HTTP/1.1\r\nHost: h\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into()),
        ("TE chunked, identity", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into()),
        ("TE gzip, chunked", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into()),
        ("TE chunked, chunked", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n0\r\n\r\n".into()),
        ("TE CHUNKED", "POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n2\r\nhi\r\n0\r\n\r\n".into()),
        ("TE quoted", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n".into()),
        ("TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into()),
        ("bare LF before TE", "POST / HTTP/1.1\r\nHost: h\r\nX: y\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into()),
        ("bare CR before TE", "POST / HTTP/1.1\r\nHost: h\r\nX: y\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into()),
        ("CL 5, 5", "POST /l HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello".into()),
        ("CL twice, different", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into()),
        ("CL +5", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello".into()),
        ("CL 0x5", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello".into()),
        ("CL -1", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n".into()),
        ("CL huge", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n".into()),
        ("CL with spaces", "POST /s HTTP/1.1\r\nHost: h\r\nContent-Length:  5 \r\n\r\nhello".into()),
        ("CL leading zero", "POST /z HTTP/1.1\r\nHost: h\r\nContent-Length: 005\r\n\r\nhello".into()),
        ("CL on GET", "GET /g HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello".into()),
        ("chunk size with spaces", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n".into()),
        ("chunk size overflow", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n".into()),
        ("chunk size negative", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".into()),
        ("chunk without CRLF", format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n{smuggled}")),
        ("chunk with LF only", "POST /lf HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n".into()),
        ("no Host", "GET / HTTP/1.1\r\n\r\n".into()),
        ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into()),
        ("Host with userinfo", "GET / HTTP/1.1\r\nHost: user@h\r\n\r\n".into()),
        ("Host with a path", "GET / HTTP/1.1\r\nHost: h/evil\r\n\r\n".into()),
        ("absolute-form", "GET http://other/abs?q=1 HTTP/1.1\r\nHost: h\r\n\r\n".into()),
        ("HTTP/1.0 without Host", "GET /old HTTP/1.0\r\n\r\n".into()),
        ("double space in the request line", "GET  / HTTP/1.1\r\nHost: h\r\n\r\n".into()),
        ("space in the target", "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n".into()),
        ("HTTP/1.2", "GET / HTTP/1.2\r\nHost: h\r\n\r\n".into()),
        ("HTTP/0.9", "GET /\r\n\r\n".into()),
        ("header name with a space", "GET / HTTP/1.1\r\nHost: h\r\nX Y: z\r\n\r\n".into()),
        ("header without a colon", "GET / HTTP/1.1\r\nHost: h\r\nnocolon\r\n\r\n".into()),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n".into()),
        ("NUL in a value", "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n".into()),
        ("70 KiB header", format!("GET / HTTP/1.1\r\nHost: h\r\nX: {big}\r\n\r\n")),
        ("Expect 100-continue", "POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi".into()),
        ("HEAD", "HEAD /head HTTP/1.1\r\nHost: h\r\n\r\n".into()),
        ("h2c upgrade", "GET /up HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n".into()),
        ("CONNECT", "CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n".into()),
        ("X-Forwarded spoofing", "GET /xf HTTP/1.1\r\nHost: h\r\nX-Forwarded-Host: evil\r\nX_Forwarded_For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\r\n".into()),
    ];
    v.drain(..).map(|(n, s)| (n, s.into_bytes())).collect()
}

/// Shapes kiln forwards although one peer refuses them, and why: kiln must
/// then forward exactly what the other peer does.
const LENIENT: &[(&str, &str)] = &[
    (
        "TE tab",
        "a tab before the value is optional whitespace (RFC 9110 §5.6.3), stripped by the \
         parser as HAProxy does; nginx refuses it. A tab between codings is refused",
    ),
    (
        "CL 5, 5",
        "one length written twice: RFC 9110 §8.6 allows forwarding the one value \
         (HAProxy does; nginx refuses); the router writes `content-length: 5` itself",
    ),
    (
        "absolute-form",
        "RFC 9112 §3.2.2: the target's authority replaces Host (nginx does; HAProxy 2.6 \
         refuses an authority that differs from Host)",
    ),
];

/// Shapes kiln refuses although both peers forward them, and why: any
/// other shape both forward, kiln must forward too (a router that refuses
/// what the field accepts breaks clients), and each of these it must keep
/// refusing (the list is not a stale excuse).
const STRICTER: &[(&str, &str)] = &[
    (
        "Host with userinfo",
        "RFC 9110 §7.2: Host is uri-host [ \":\" port ], no userinfo; `user@host` in a \
         Host is how authority confusion starts",
    ),
    (
        "double space in the request line",
        "RFC 9112 §3: exactly one SP between the three parts; lenient splitting of the \
         request line is a known desync vector (RFC 9112 §3 allows refusing it with 400)",
    ),
    (
        "HTTP/1.2",
        "no HTTP/1.2 exists: RFC 9110 §6.2 says to treat a higher minor version as 1.1, \
         but a client that sends it is not one a router in front of apps has to serve",
    ),
];

/// Response shapes where kiln answers neither as nginx nor as HAProxy
/// does, and why; for every other shape kiln's answer (its statuses) is
/// one of the peers'.
const RESPONSE_DIFFERS: &[(&str, &str)] = &[(
    "100 then 200",
    "an interim 100 the client never asked for (no Expect) is dropped and the final \
     answer passed on (RFC 9110 §15.2: a proxy MAY drop interim responses the client \
     did not ask for); nginx closes without an answer, HAProxy passes both",
)];

/// Response shapes the backend sends to `GET /r/N`.
const RESPONSES: &[(&str, &[u8])] = &[
    (
        "Connection: content-length",
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "CL and TE",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "TE gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip",
    ),
    (
        "CL twice, different",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "more bytes than CL: a second response",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!",
    ),
    (
        "204 with a body",
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!",
    ),
    (
        "100 then 200",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ),
    (
        "obs-fold",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    ),
    (
        "Connection: transfer-encoding",
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
];

#[test]
fn hostile_shapes_through_kiln_nginx_and_haproxy() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxies = [kiln(&rt), nginx(), haproxy()];
    let shapes = requests();
    let mut failures = Vec::new();
    let mut table = String::new();
    // Each proxy runs the corpus on its own thread (its own backend).
    let results: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = proxies
            .iter()
            .map(|p| {
                let shapes = &shapes;
                scope.spawn(move || {
                    let mut out: Vec<Outcome> = shapes.iter().map(|(_, s)| run(p, s)).collect();
                    for i in 0..RESPONSES.len() {
                        let req = format!("GET /r/{i} HTTP/1.1\r\nHost: h\r\n\r\n");
                        out.push(run(p, req.as_bytes()));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let names: Vec<String> = shapes
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .chain(RESPONSES.iter().map(|(n, _)| format!("response: {n}")))
        .collect();
    let describe = |o: &Outcome| {
        let seen = if o.seen.is_empty() {
            "refused".to_owned()
        } else {
            format!("{} forwarded", o.seen.len())
        };
        format!(
            "{seen} {:?}{}",
            o.statuses,
            if o.victim_ok { "" } else { " VICTIM HIT" }
        )
    };
    for (i, name) in names.iter().enumerate() {
        let (k, n, h) = (&results[0][i], &results[1][i], &results[2][i]);
        table.push_str(&format!("{name:<46}"));
        for (p, o) in proxies.iter().zip([k, n, h]) {
            table.push_str(&format!(" {}: {:<30}", p.name, describe(o)));
        }
        table.push('\n');
        if !k.victim_ok {
            failures.push(format!(
                "{name}: the victim's request through kiln did not get its own answer"
            ));
        }
        if i >= shapes.len() {
            // A hostile response: kiln answers as one of the peers does.
            let response = name.trim_start_matches("response: ");
            let allowed = RESPONSE_DIFFERS.iter().any(|(r, _)| *r == response);
            if k.statuses != n.statuses && k.statuses != h.statuses && !allowed {
                failures.push(format!(
                    "{name}: kiln answered {:?}; nginx {:?}; haproxy {:?}",
                    k.statuses, n.statuses, h.statuses
                ));
            }
            continue;
        }
        let stricter = STRICTER.iter().any(|(s, _)| s == name);
        if k.seen.is_empty() {
            // Refused: fine when a peer refuses too, or for a reason named.
            if !n.seen.is_empty() && !h.seen.is_empty() && !stricter {
                failures.push(format!(
                    "{name}: kiln refused what both nginx and HAProxy forward"
                ));
            }
            continue;
        }
        if stricter {
            failures.push(format!(
                "{name}: listed as refused on purpose (STRICTER), but kiln forwarded it"
            ));
        }
        // Forwarded: the same requests as the stricter peer (fewer
        // requests), targets compared in origin-form.
        let norm = |s: &[Seen]| -> Vec<Seen> {
            s.iter()
                .map(|r| Seen {
                    target: origin_form(&r.target),
                    ..r.clone()
                })
                .collect()
        };
        let (kn, nn, hn) = (norm(&k.seen), norm(&n.seen), norm(&h.seen));
        let fewest = nn.len().min(hn.len());
        let matches = if LENIENT.iter().any(|(l, _)| l == name) {
            // kiln follows the RFC where one peer is stricter than it:
            // still exactly what the other peer forwards.
            kn == nn || kn == hn
        } else {
            (nn.len() == fewest && kn == nn) || (hn.len() == fewest && kn == hn)
        };
        if !matches {
            failures.push(format!(
                "{name}: kiln forwarded {kn:?}; nginx {nn:?}; haproxy {hn:?}"
            ));
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{}\n\n{table}", failures.join("\n"));
    drop(proxies);
}

/// `http://authority/path` → `/path`; anything else as it is.
fn origin_form(target: &str) -> String {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return match rest.find(['/', '?']) {
                Some(i) if rest[i..].starts_with('/') => rest[i..].to_owned(),
                Some(i) => format!("/{}", &rest[i..]),
                None => "/".to_owned(),
            };
        }
    }
    target.to_owned()
}

//! The example app's knobs, through its real binary.
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct App {
    child: Child,
    port: u16,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port no other test of this binary was given: the kernel may hand a
/// port just let go of to the next caller, and two apps on one port make
/// one test talk to the other's app (and see it killed under it).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn start(env: &[(&str, &str)]) -> App {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("PORT", port.to_string())
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let app = App { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "hello did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    app
}

/// (status, body) of one request on a fresh connection.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[test]
fn answers_with_version_instance_health_and_static_files() {
    let app = start(&[("HELLO_VERSION", "v7"), ("KILN_INSTANCE", "i-1")]);
    assert_eq!(
        get(app.port, "/"),
        (200, "hello from v7 (instance i-1)\n".into())
    );
    assert_eq!(get(app.port, "/healthz"), (200, "ok\n".into()));
    let (status, body) = get(app.port, "/static/index.html");
    assert_eq!(status, 200);
    assert!(body.contains("hello from kiln"));
    assert_eq!(get(app.port, "/static/../Cargo.toml").0, 404);
}

#[test]
fn keeps_connections_alive() {
    let app = start(&[]);
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
}

#[test]
fn fails_health_when_told() {
    let app = start(&[("HELLO_FAIL_HEALTH", "1")]);
    assert_eq!(get(app.port, "/healthz").0, 503);
}

#[test]
fn injects_errors_at_the_given_rate() {
    let app = start(&[("HELLO_ERROR_RATE", "0.2")]);
    let errors = (0..50).filter(|_| get(app.port, "/").0 == 500).count();
    assert_eq!(errors, 10);
}

#[test]
fn crashes_after_the_given_time() {
    let mut app = start(&[("HELLO_CRASH_AFTER", "0.3")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1));
            break;
        }
        assert!(Instant::now() < deadline, "did not crash");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn starts_slowly_when_told() {
    let started = Instant::now();
    let app = start(&[("HELLO_START_DELAY", "0.5")]);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(get(app.port, "/healthz").0, 200);
}

#[test]
fn rejects_bad_knobs() {
    let out = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("HELLO_ERROR_RATE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HELLO_ERROR_RATE=2"));
}

//! kiln's example app: a small HTTP/1.1 server (std only, one thread per
//! connection, keep-alive) that kiln bakes and deploys in its demo and tests.
//!
//! - `GET /` → `hello from VERSION (instance ID)`
//! - `GET /healthz` → 200 `ok` (or 503 when told to fail)
//! - `GET /static/NAME` → a file from `$HELLO_STATIC_DIR` (default `static`)
//! - `POST /upload` → the number of body bytes received (streamed, not
//!   kept; with a length or chunked)
//! - `GET /ws` → a WebSocket that echoes text messages
//! - `GET /headers` → the request's headers, one per line
//! - `GET /sleep/MS` → `slept` after MS milliseconds (an in-flight request)
//!
//! Knobs (environment), to misbehave on purpose:
//! - `PORT` — the port to listen on (default 8080)
//! - `HOST` — the address to listen on (default 127.0.0.1; kiln sets its
//!   node's address, which in a cluster the other nodes reach)
//! - `HELLO_VERSION` — the version it reports (default `v1`)
//! - `KILN_INSTANCE` — the instance id it reports (default `pid-<pid>`)
//! - `HELLO_FAIL_HEALTH=1` — `/healthz` answers 503
//! - `HELLO_CRASH_AFTER=SECS` — exit with status 1 after that long
//! - `HELLO_ERROR_RATE=0.2` — that fraction of `/` requests answer 500,
//!   spread evenly (deterministic, so tests can count)
//! - `HELLO_START_DELAY=SECS` — wait that long before listening
//! - `HELLO_HANG=1` — accept connections but never answer

use std::env;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

struct Config {
    version: String,
    instance: String,
    fail_health: bool,
    error_rate: f64,
    hang: bool,
    static_dir: PathBuf,
    requests: AtomicU64,
}

fn env_secs(name: &str) -> Result<Option<Duration>, String> {
    match env::var(name) {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Some(Duration::from_secs_f64(s)))
            .ok_or_else(|| format!("{name}={v} is not a number of seconds")),
        Err(_) => Ok(None),
    }
}

fn run() -> Result<(), String> {
    let port: u16 = match env::var("PORT") {
        Ok(p) => p.parse().map_err(|_| format!("PORT={p} is not a port"))?,
        Err(_) => 8080,
    };
    let error_rate = match env::var("HELLO_ERROR_RATE") {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| format!("HELLO_ERROR_RATE={v} is not between 0 and 1"))?,
        Err(_) => 0.0,
    };
    let config = Arc::new(Config {
        version: env::var("HELLO_VERSION").unwrap_or_else(|_| "v1".to_owned()),
        instance: env::var("KILN_INSTANCE")
            .unwrap_or_else(|_| format!("pid-{}", std::process::id())),
        fail_health: env::var("HELLO_FAIL_HEALTH").is_ok_and(|v| v == "1"),
        error_rate,
        hang: env::var("HELLO_HANG").is_ok_and(|v| v == "1"),
        static_dir: env::var_os("HELLO_STATIC_DIR")
            .map_or_else(|| PathBuf::from("static"), PathBuf::from),
        requests: AtomicU64::new(0),
    });
    if let Some(delay) = env_secs("HELLO_START_DELAY")? {
        thread::sleep(delay);
    }
    if let Some(after) = env_secs("HELLO_CRASH_AFTER")? {
        thread::spawn(move || {
            thread::sleep(after);
            eprintln!("hello: crashing on purpose (HELLO_CRASH_AFTER)");
            std::process::exit(1);
        });
    }
    let host: std::net::IpAddr = match env::var("HOST") {
        Ok(h) => h
            .parse()
            .map_err(|_| format!("HOST={h} is not an IP address"))?,
        Err(_) => std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let addr = std::net::SocketAddr::from((host, port));
    let listener = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    eprintln!(
        "hello {} (instance {}) listening on {addr}",
        config.version, config.instance
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let config = Arc::clone(&config);
        thread::spawn(move || {
            let _ = serve(stream, &config);
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, config: &Config) -> io::Result<()> {
    if config.hang {
        // Keep the connection open and say nothing.
        let mut sink = [0u8; 1024];
        let mut s = stream;
        while s.read(&mut sink)? > 0 {}
        return Ok(());
    }
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target), Some(proto)) = (parts.next(), parts.next(), parts.next())
        else {
            respond(&mut out, 400, "text/plain", b"bad request\n", false)?;
            return Ok(());
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut keep_alive = proto == "HTTP/1.1";
        let mut content_length = 0u64;
        let mut chunked = false;
        let mut ws_key = None;
        let mut headers = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            headers.push_str(h);
            headers.push('\n');
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "sec-websocket-key" {
                    ws_key = Some(v.to_owned());
                } else if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "transfer-encoding" {
                    chunked = v.eq_ignore_ascii_case("chunked");
                } else if k == "connection" {
                    keep_alive = !v.eq_ignore_ascii_case("close")
                        && (keep_alive || v.eq_ignore_ascii_case("keep-alive"));
                }
            }
        }
        let path = target.split('?').next().unwrap_or("/");
        if path == "/ws" {
            return websocket(reader, out, ws_key.as_deref());
        }
        let received = if chunked {
            read_chunked(&mut reader)?
        } else {
            io::copy(&mut (&mut reader).take(content_length), &mut io::sink())?
        };
        if let Some(ms) = path
            .strip_prefix("/sleep/")
            .and_then(|m| m.parse::<u64>().ok())
        {
            thread::sleep(Duration::from_millis(ms.min(60_000)));
            respond(&mut out, 200, "text/plain", b"slept\n", keep_alive)?;
            if !keep_alive {
                return Ok(());
            }
            continue;
        }
        if path == "/headers" {
            respond(&mut out, 200, "text/plain", headers.as_bytes(), keep_alive)?;
            if !keep_alive {
                return Ok(());
            }
            continue;
        }
        if path == "/upload" {
            respond(
                &mut out,
                200,
                "text/plain",
                format!("{received}\n").as_bytes(),
                keep_alive,
            )?;
            if !keep_alive {
                return Ok(());
            }
            continue;
        }
        match (method.as_str(), path) {
            (_, "/healthz") if config.fail_health => {
                respond(&mut out, 503, "text/plain", b"unhealthy\n", keep_alive)?
            }
            (_, "/healthz") => respond(&mut out, 200, "text/plain", b"ok\n", keep_alive)?,
            (_, "/") => {
                let n = config.requests.fetch_add(1, Ordering::Relaxed);
                // Fail exactly when the running count of failures should grow:
                // `rate` of any window of requests, evenly spread.
                let fail = ((n + 1) as f64 * config.error_rate).floor()
                    > (n as f64 * config.error_rate).floor();
                if fail {
                    respond(
                        &mut out,
                        500,
                        "text/plain",
                        b"injected failure\n",
                        keep_alive,
                    )?;
                } else {
                    let body = format!(
                        "hello from {} (instance {})\n",
                        config.version, config.instance
                    );
                    respond(&mut out, 200, "text/plain", body.as_bytes(), keep_alive)?;
                }
            }
            ("GET", p) if p.starts_with("/static/") => {
                match static_file(&config.static_dir, &p["/static/".len()..]) {
                    Some(body) => respond(&mut out, 200, content_type(p), &body, keep_alive)?,
                    None => respond(&mut out, 404, "text/plain", b"not found\n", keep_alive)?,
                }
            }
            _ => respond(&mut out, 404, "text/plain", b"not found\n", keep_alive)?,
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

/// RFC 6455: answer the handshake, then echo each text frame (the client
/// masks its frames; the server's are unmasked).
fn websocket(
    mut reader: BufReader<TcpStream>,
    mut out: TcpStream,
    key: Option<&str>,
) -> io::Result<()> {
    let Some(key) = key else {
        return respond(
            &mut out,
            400,
            "text/plain",
            b"missing sec-websocket-key\n",
            false,
        );
    };
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64(&sha.digest().bytes());
    write!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    )?;
    loop {
        let mut head = [0u8; 2];
        if reader.read_exact(&mut head).is_err() {
            return Ok(());
        }
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            reader.read_exact(&mut b)?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            reader.read_exact(&mut b)?;
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if masked {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0).min(1 << 20)];
        reader.read_exact(&mut payload)?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        if opcode == 8 {
            return out.write_all(&[0x88, 0]);
        }
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        out.write_all(&frame)?;
    }
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn static_file(dir: &Path, name: &str) -> Option<Vec<u8>> {
    let rel = Path::new(name);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    std::fs::read(dir.join(rel)).ok()
}

/// Read a chunked body to its end (trailers included); its length.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = line.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, to the empty line.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += io::copy(&mut reader.take(size), &mut io::sink())?;
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}

fn content_type(path: &str) -> &'static str {
    if path.ends_with(".html") {
        "text/html; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let mut msg = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: {conn}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    msg.extend_from_slice(body);
    out.write_all(&msg)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::from(2)
        }
    }
}

//! Test helpers shared by the agent's unit tests (the router's most).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `router` listening on a free port (taking HTTP/2 with prior knowledge
/// too when `h2c`) with `limits`, routing service `web` to the instance on
/// `to`: its port, and the backend whose counts tests read.
pub async fn router_to_instance(
    to: u16,
    limits: kiln_core::service::RouterSpec,
    router: Arc<crate::router::Router>,
    h2c: bool,
) -> (Arc<crate::router::Router>, u16, Arc<crate::router::Backend>) {
    use crate::router::{Attachment, Backend, RouteKey, ServiceRoutes};
    let svc = RouteKey::Service(kiln_core::spec::ServiceName::try_from("web").unwrap());
    let port = free_port();
    let backend = Arc::new(Backend::new(
        "i1".into(),
        1,
        (std::net::Ipv4Addr::LOCALHOST, to).into(),
        Arc::default(),
        Arc::default(),
    ));
    router.set_routes(
        &svc,
        ServiceRoutes::new(vec![backend.clone()], std::time::Duration::from_secs(5))
            .with_limits(limits),
    );
    let on = Attachment {
        h2c,
        ..Attachment::plain(([127, 0, 0, 1], port).into())
    };
    router.attach(&svc, on).await.unwrap();
    (router, port, backend)
}

/// What the scripted instance does with the next request it reads.
#[derive(Clone, Copy)]
pub enum Act {
    Answer(&'static [u8]),
    /// Answer, then close the connection.
    AnswerClose(&'static [u8]),
    /// Close the connection without answering.
    Drop,
    /// Answer, then hold the connection open, silent (an instance that
    /// stops mid-body).
    AnswerHold(&'static [u8]),
}

/// An instance that answers the requests it reads, across all its
/// connections, with `script` in order. It counts its connections and
/// keeps every request's bytes.
pub async fn scripted(script: Vec<Act>) -> (u16, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter()));
    let (count, seen) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let (script, seen) = (script.clone(), seen.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let Some(req) = read_request(&mut s, &mut got).await else {
                        return;
                    };
                    seen.lock().unwrap().push(req);
                    let Some(act) = script.lock().unwrap().next() else {
                        return;
                    };
                    match act {
                        Act::Answer(a) => s.write_all(a).await.unwrap(),
                        Act::AnswerClose(a) => {
                            s.write_all(a).await.unwrap();
                            return;
                        }
                        Act::Drop => return,
                        Act::AnswerHold(a) => {
                            s.write_all(a).await.unwrap();
                            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, accepted, requests)
}

/// One request (head, and a body by content-length or up to the last
/// chunk) from `got` and the socket.
async fn read_request(s: &mut TcpStream, got: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
        let len = if head.contains("transfer-encoding: chunked") {
            got.windows(5).position(|w| w == b"0\r\n\r\n")? + 5
        } else {
            let n = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            (got.len() >= end + n).then_some(end + n)?
        };
        Some(len)
    };
    loop {
        if let Some(len) = complete(got) {
            return Some(got.drain(..len).collect());
        }
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// An instance that reads one request head, answers `response` at once and
/// keeps the connection open without reading the body that follows.
pub async fn answers_early(response: &'static [u8]) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(response).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    });
    port
}

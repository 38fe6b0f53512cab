//! The pull side of the distribution API, read with caps: every answer of
//! a registry that is read whole has a limit (a manifest or a referrers
//! list 4 MiB, a token 64 KiB, an error body 64 KiB, of which the first
//! 4 KiB is kept to name the error), and a blob streams, stopped at the
//! size its descriptor says. A registry is hostile input: an endless
//! answer costs at most its cap in memory, never the host's memory.
//! (oci-client, which kiln still pushes with, reads each answer whole.)
//!
//! Authentication follows the registry's challenge: `Basic` credentials
//! are sent as they are; a `Bearer` challenge is answered with a token from
//! its realm for the scope asked (`repository:NAME:pull`), cached per scope.

use std::collections::HashMap;

use futures_util::Stream;
use kiln_core::registry::RegistryRef;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderMap, WWW_AUTHENTICATE};

use super::{CONNECT_TIMEOUT, READ_TIMEOUT, RegistryError, describe};

/// A token answer larger than this is refused (real ones are a few KiB).
pub const MAX_TOKEN: usize = 64 << 10;
/// An error answer is read up to this much (the rest is dropped).
pub const MAX_ERROR: usize = 64 << 10;
/// What of an error answer is shown.
const SHOWN_ERROR: usize = 4 << 10;

/// One registry's pull side, for the credentials it was made with.
pub struct Reader {
    http: reqwest::Client,
    /// `https://HOST` (or `http://` for a host named insecure).
    base: String,
    host: String,
    basic: Option<(String, String)>,
    /// Where the credentials came from (named when they are refused).
    from: &'static str,
    /// Bearer tokens by scope.
    tokens: tokio::sync::Mutex<HashMap<String, String>>,
}

/// A `WWW-Authenticate: Bearer …` challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
}

/// The `Bearer` challenge of a `WWW-Authenticate` value, if it is one with
/// a realm: `Bearer realm="…",service="…",scope="…"` (parameters quoted or
/// not, in any order, commas inside quotes kept).
pub fn bearer_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim_start();
    let (scheme, rest) = value.split_at(value.find(' ')?);
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = Challenge::default();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => val.extend(chars.next()),
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
            val.truncate(val.trim_end().len());
        }
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => out.realm = val,
            "service" => out.service = Some(val),
            _ => {}
        }
    }
    (!out.realm.is_empty()).then_some(out)
}

/// Read `resp`'s body whole, refusing it past `limit` bytes (by its
/// `Content-Length` at once, else as it comes).
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Capped> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Capped::Over);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Capped::Request)? {
        if out.len() + chunk.len() > limit {
            return Err(Capped::Over);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Why a capped read ended.
#[derive(Debug)]
pub enum Capped {
    Over,
    Request(reqwest::Error),
}

/// The first `limit` bytes of `resp`'s body (an error's: the rest is not
/// worth reading).
async fn read_prefix(mut resp: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match resp.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk[..chunk.len().min(limit - out.len())]),
            _ => break,
        }
    }
    out
}

impl Reader {
    pub fn new(
        host: &str,
        scheme: &str,
        basic: Option<(String, String)>,
        from: &'static str,
    ) -> Result<Self, RegistryError> {
        Self::with_tls(host, scheme, basic, from, None)
    }

    /// [`Self::new`], with the TLS configuration given (a pinned
    /// certificate) rather than the system's roots.
    pub fn with_tls(
        host: &str,
        scheme: &str,
        basic: Option<(String, String)>,
        from: &'static str,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = builder.build().map_err(|e| RegistryError::Registry {
            host: host.to_owned(),
            detail: describe(&e),
        })?;
        Ok(Self {
            http,
            base: format!("{scheme}://{host}"),
            host: host.to_owned(),
            basic,
            from,
            tokens: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// `GET /v2/REPOSITORY/PATH` with `accept`, answering an auth challenge
    /// once; any answer but a success is the registry's error, named.
    pub async fn get(
        &self,
        at: &RegistryRef,
        path: &str,
        accept: &[&str],
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/v2/{}/{path}", self.base, at.repository);
        let scope = format!("repository:{}:pull", at.repository);
        let mut answered = false;
        loop {
            let mut req = self.http.get(&url);
            if !accept.is_empty() {
                req = req.header(ACCEPT, accept.join(", "));
            }
            let token = self.tokens.lock().await.get(&scope).cloned();
            req = match (token, &self.basic) {
                (Some(t), _) => req.bearer_auth(t),
                (None, Some((user, password))) => req.basic_auth(user, Some(password)),
                (None, None) => req,
            };
            let resp = req.send().await.map_err(|e| self.request_error(&e))?;
            if resp.status() == StatusCode::UNAUTHORIZED
                && !answered
                && let Some(challenge) = challenge_of(resp.headers())
            {
                answered = true;
                let token = self.token(&challenge, &scope, at).await?;
                self.tokens.lock().await.insert(scope.clone(), token);
                continue;
            }
            if resp.status().is_success() {
                return Ok(resp);
            }
            return Err(self.status_error(resp, at).await);
        }
    }

    /// A body read whole, at most `limit` bytes; `what` names it.
    pub async fn body(
        &self,
        resp: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        read_capped(resp, limit).await.map_err(|e| match e {
            Capped::Over => RegistryError::TooBig {
                host: self.host.clone(),
                what: what.to_owned(),
                limit: humansize(limit),
            },
            Capped::Request(e) => self.request_error(&e),
        })
    }

    /// A body as a stream of chunks (a blob's).
    pub fn stream(
        &self,
        resp: reqwest::Response,
    ) -> impl Stream<Item = Result<bytes::Bytes, RegistryError>> + '_ {
        futures_util::StreamExt::map(resp.bytes_stream(), move |c| {
            c.map_err(|e| self.request_error(&e))
        })
    }

    /// A token for `scope` from the challenge's realm (with the basic
    /// credentials, if any).
    async fn token(
        &self,
        challenge: &Challenge,
        scope: &str,
        at: &RegistryRef,
    ) -> Result<String, RegistryError> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = &challenge.service {
            query.push(("service", s));
        }
        let mut req = self.http.get(&challenge.realm).query(&query);
        if let Some((user, password)) = &self.basic {
            req = req.basic_auth(user, Some(password));
        }
        let resp = req.send().await.map_err(|e| self.request_error(&e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, at).await);
        }
        let body = self.body(resp, MAX_TOKEN, "token answer").await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| RegistryError::Registry {
            host: self.host.clone(),
            detail: format!("its token answer is not valid: {e}"),
        })?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Registry {
                host: self.host.clone(),
                detail: "its token answer has no token".to_owned(),
            })
    }

    /// A failed answer, named: its error codes (the OCI error envelope),
    /// else its status.
    async fn status_error(&self, resp: reqwest::Response, at: &RegistryRef) -> RegistryError {
        let status = resp.status();
        let body = read_prefix(resp, MAX_ERROR).await;
        #[derive(serde::Deserialize)]
        struct Envelope {
            errors: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            code: String,
            #[serde(default)]
            message: String,
        }
        let codes = serde_json::from_slice::<Envelope>(&body)
            .map(|e| e.errors)
            .unwrap_or_default();
        let has = |names: &[&str]| codes.iter().any(|c| names.contains(&c.code.as_str()));
        let login = || {
            if self.basic.is_none() {
                RegistryError::LoginRequired {
                    host: self.host.clone(),
                }
            } else {
                self.denied(at)
            }
        };
        if has(&["UNAUTHORIZED"]) || status == StatusCode::UNAUTHORIZED {
            login()
        } else if has(&["DENIED"]) || status == StatusCode::FORBIDDEN {
            self.denied(at)
        } else if has(&[
            "MANIFEST_UNKNOWN",
            "NAME_UNKNOWN",
            "NOT_FOUND",
            "BLOB_UNKNOWN",
        ]) || status == StatusCode::NOT_FOUND
        {
            RegistryError::NotFound {
                reference: at.to_string(),
            }
        } else {
            let detail = if codes.is_empty() {
                let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN_ERROR)]);
                format!("HTTP {}: {}", status.as_u16(), text.trim())
            } else {
                codes
                    .iter()
                    .map(|c| format!("{}: {}", c.code, c.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            RegistryError::Registry {
                host: self.host.clone(),
                detail: detail.chars().take(SHOWN_ERROR).collect(),
            }
        }
    }

    fn denied(&self, at: &RegistryRef) -> RegistryError {
        RegistryError::Denied {
            host: self.host.clone(),
            repository: at.repository.clone(),
            from: self.from,
        }
    }

    fn request_error(&self, e: &reqwest::Error) -> RegistryError {
        super::request_error(&self.host, e)
    }
}

fn challenge_of(headers: &HeaderMap) -> Option<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(bearer_challenge)
}

fn humansize(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_challenge_is_read_in_any_order_with_quotes_and_commas() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        let c = bearer_challenge(r#"bearer service=reg , realm="http://x/t?a=1,2""#).unwrap();
        assert_eq!(
            (c.realm.as_str(), c.service.as_deref()),
            ("http://x/t?a=1,2", Some("reg"))
        );
        let c = bearer_challenge(r#"Bearer realm="a\"b""#).unwrap();
        assert_eq!(c.realm, "a\"b");
    }

    #[test]
    fn anything_else_is_no_bearer_challenge() {
        for v in [
            r#"Basic realm="registry""#,
            "Bearer",
            "Bearer ",
            r#"Bearer service="x""#,
            r#"Bearer realm="""#,
            "Bearer realm",
            "",
        ] {
            assert_eq!(bearer_challenge(v), None, "{v}");
        }
    }

    #[test]
    fn sizes_are_named_in_binary_units() {
        assert_eq!(humansize(64 << 10), "64 KiB");
        assert_eq!(humansize(4 << 20), "4 MiB");
    }
}

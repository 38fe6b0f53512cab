//! The door of the TLS port: every request passes [`gate`] before any
//! handler (which role the endpoint needs, whether the token checks out,
//! the anti-forgery value of a cookie-borne change, how long an address
//! that keeps failing waits). The decisions are [`kiln_core::auth`]'s.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_core::api::ErrorBody;
use kiln_core::auth::{self, Refusal, Role, Route, TokenName};
use kiln_core::event::Actor;

use crate::agent::Agent;
use crate::api::{Caller, Presented, unix_now};

/// The cookie the dashboard keeps its token in (HttpOnly, Secure,
/// SameSite=Strict).
pub const COOKIE: &str = "kiln_token";
/// The header a dashboard request that changes something carries: the
/// anti-forgery value of its cookie's token ([`auth::csrf_value`]).
pub const CSRF_HEADER: &str = "x-kiln-csrf";

/// What the edge remembers between requests: failures by address.
pub struct Gate {
    agent: Arc<Agent>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Gate {
    pub fn new(agent: Arc<Agent>) -> Arc<Self> {
        Arc::new(Self {
            agent,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        // A counter map has no invariant a panic could break.
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a failure from `ip`; how long to wait before answering it.
    fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut map = self.failures();
        // Bounded: an address flood cannot grow the map without end.
        if map.len() > 10_000 {
            map.retain(|_, (_, last)| now.duration_since(*last) <= auth::FAILURE_MEMORY);
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) > auth::FAILURE_MEMORY {
            e.0 = 0;
        }
        let delay = auth::failure_delay(e.0);
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        delay
    }

    /// A valid token from `ip`: its failures are forgotten.
    fn succeeded(&self, ip: IpAddr) {
        self.failures().remove(&ip);
    }

    /// Check a token from `ip` (a request's, or the sign-in form's): a
    /// valid one forgets the address's failures; a refusal is answered
    /// only after the address's delay.
    pub(crate) async fn check(
        &self,
        ip: IpAddr,
        token: &str,
    ) -> Result<(TokenName, Role), Refusal> {
        let checked = self.agent.authenticate(token, unix_now()).await;
        match checked {
            Ok(_) => self.succeeded(ip),
            Err(_) => tokio::time::sleep(self.failed(ip, Instant::now())).await,
        }
        checked
    }

    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }
}

/// The token a request presents, and whether it came as the dashboard's
/// cookie: `Authorization: Bearer T`, `Authorization: Basic` with T as the
/// password (what registry clients send: on `/v2/` only, for a browser
/// that saved them at the registry's prompt would send them, unasked and
/// without any anti-forgery value, with every request to the origin), or
/// the cookie.
pub(crate) fn presented(headers: &HeaderMap, registry: bool) -> Option<(String, bool)> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some((t.trim().to_owned(), false));
        }
        if let Some(b) = v.strip_prefix("Basic ") {
            use base64::Engine as _;
            if !registry {
                return None;
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()?;
            let pair = String::from_utf8(raw).ok()?;
            let (_, t) = pair.split_once(':')?;
            return Some((t.to_owned(), false));
        }
        return None;
    }
    cookie(headers, COOKIE).map(|t| (t, true))
}

/// Why a request that changes something came from another site, if it
/// did: `Sec-Fetch-Site` other than `same-origin` or `none`, or an
/// `Origin` other than this server's own (`https://` + its `Host`).
pub(crate) fn cross_site(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!(
            "refused a change from another site (Sec-Fetch-Site: {site})"
        ));
    }
    if let Some(origin) = text("origin") {
        let own = text("host").map(|h| format!("https://{h}"));
        if own.as_deref() != Some(origin) {
            let shown: String = origin.chars().take(80).collect();
            return Some(format!("refused a change from another origin ({shown})"));
        }
    }
    None
}

/// Headers every answer of the TLS port carries: nothing is sniffed into
/// another type, and nothing but the dashboard's own pages (which set
/// their own policy) may run anything.
pub async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; sandbox"),
        );
    }
    response
}

/// A cookie's value from the `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub(crate) fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            error: error.into(),
        }),
    )
        .into_response()
}

/// Every request on the TLS port passes here: 404 for what is not an
/// endpoint, 401 for a missing, wrong, revoked or expired token, 403 for a
/// role too low or a cookie-borne change without its anti-forgery value.
/// A refused request reaches no handler: it changes nothing. No token is
/// ever logged.
pub async fn gate(
    State(gate): State<Arc<Gate>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let shown: String = path.chars().take(80).collect();
    let needs = match auth::route(&method, &path) {
        Route::Unknown => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {shown}"),
            );
        }
        Route::Open => return next.run(req).await,
        Route::Needs(role) => role,
    };
    let ui = path == "/" || path.starts_with("/ui/");
    let registry = path.starts_with("/v2/");
    let unauthorized = |error: &str| {
        if ui && method == "GET" {
            return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
        }
        let mut r = refuse(StatusCode::UNAUTHORIZED, error);
        if registry {
            // Registry clients (docker, skopeo) send credentials only when
            // challenged.
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kiln\""),
            );
        }
        r
    };
    let Some((token, by_cookie)) = presented(req.headers(), registry) else {
        return unauthorized(
            "login required: no API token (kiln login https://HOST:PORT, or KILN_TOKEN; Basic credentials only on /v2/)",
        );
    };
    // A change a browser sends from another site is refused whatever it
    // carries (a cookie, or credentials it saved): browsers say where a
    // request comes from; kiln's own clients send neither header.
    if !matches!(method.as_str(), "GET" | "HEAD")
        && let Some(why) = cross_site(req.headers())
    {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    let ip = addr.ip();
    let (name, role) = match gate.check(ip, &token).await {
        Ok(ok) => ok,
        Err(refusal) => {
            tracing::warn!("{ip}: refused an API token ({method} {shown})");
            return unauthorized(match refusal {
                Refusal::Invalid => "invalid or revoked API token",
                Refusal::Expired => "expired API token",
            });
        }
    };
    if role < needs {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("token {name} is a {role}: {method} {shown} needs {needs}"),
        );
    }
    if by_cookie && !matches!(method.as_str(), "GET" | "HEAD") {
        let want = auth::csrf_value(gate.agent.key(), &token);
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !auth::constant_time_eq(given, want.as_bytes()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "missing or wrong anti-forgery value: the dashboard's own buttons send it",
            );
        }
    }
    req.extensions_mut().insert(Caller {
        actor: Actor::Token { name },
        role,
    });
    req.extensions_mut().insert(Presented(token));
    next.run(req).await
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn changes_from_another_site_are_named() {
        assert_eq!(cross_site(&headers(&[])), None, "kiln's own clients");
        let same = [
            ("host", "127.0.0.1:7443"),
            ("origin", "https://127.0.0.1:7443"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(cross_site(&headers(&same)), None);
        assert_eq!(cross_site(&headers(&[("sec-fetch-site", "none")])), None);
        for site in ["cross-site", "same-site"] {
            let h = headers(&[("sec-fetch-site", site)]);
            assert!(cross_site(&h).is_some_and(|w| w.contains(site)), "{site}");
        }
        let evil = headers(&[
            ("host", "127.0.0.1:7443"),
            ("origin", "https://evil.example"),
        ]);
        assert!(cross_site(&evil).is_some_and(|w| w.contains("evil.example")));
        let plain = headers(&[
            ("host", "127.0.0.1:7443"),
            ("origin", "http://127.0.0.1:7443"),
        ]);
        assert!(
            cross_site(&plain).is_some(),
            "another scheme is another origin"
        );
        let null = headers(&[("host", "h"), ("origin", "null")]);
        assert!(cross_site(&null).is_some());
    }

    #[test]
    fn basic_credentials_count_on_the_registry_only() {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode("user:tok");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {b}")).unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(presented(&h, true), Some(("tok".to_owned(), false)));
        assert_eq!(presented(&h, false), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert_eq!(presented(&h, false), Some(("tok".to_owned(), false)));
        assert_eq!(presented(&h, true), Some(("tok".to_owned(), false)));
    }
}

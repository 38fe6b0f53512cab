//! The dashboard: plain HTML rendered here, one stylesheet, a few lines of
//! script, no build step. `/` shows every service (its releases as a
//! timeline, its instances, the rollout in progress) and the latest events;
//! `/ui/events` streams the same view again whenever it changes
//! (server-sent events), so the page follows without a reload.
//!
//! It is behind the API's tokens ([`crate::gate::gate`]): a browser signs
//! in at `/login` with a token, kept in an HttpOnly, Secure, SameSite=Strict
//! cookie. Buttons (rollback, promote, abort) are rendered only for roles
//! that may use them, and call the JSON API with the anti-forgery value of
//! that token in a header, which a page of another site cannot read.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Form, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use kiln_core::api::{HistoryResponse, ServiceStatus};
use kiln_core::auth::{self, Role};
use kiln_core::release::Outcome;
use serde::Deserialize;

use crate::api::Caller;
use crate::api::Presented;
use crate::gate::{COOKIE, Gate};

/// How often the live view looks for a change.
const POLL: Duration = Duration::from_millis(500);
/// Events the page lists.
const EVENTS_SHOWN: usize = 25;

const STYLE: &str = include_str!("ui/style.css");
const SCRIPT: &str = include_str!("ui/app.js");

pub fn router(gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ui/events", get(live))
        .route(
            "/ui/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT) }),
        )
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .with_state(gate)
}

/// Escape text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Never framed by another site (clickjacking), no inline
            // script but ours.
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn shell(title: &str, main: &str, head_extra: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><link rel=\"stylesheet\" href=\"/ui/style.css\">{head_extra}</head>\
<body>{main}</body></html>",
        esc(title)
    )
}

async fn login_page() -> Response {
    html(StatusCode::OK, login_form(None))
}

fn login_form(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    shell(
        "kiln: sign in",
        &format!(
            "<main class=\"login\"><h1>kiln</h1>{error}\
<form method=\"post\" action=\"/login\">\
<label for=\"token\">API token</label>\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
<button type=\"submit\">Sign in</button></form>\
<p class=\"hint\">Make one with <code>kiln token create NAME --role viewer</code>.</p></main>"
        ),
        "",
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: a token that checks out becomes the session's cookie.
async fn login(
    State(gate): State<Arc<Gate>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return html(StatusCode::BAD_REQUEST, login_form(Some("no token given")));
    };
    let token = form.token.trim();
    match gate.check(addr.ip(), token).await {
        Ok(_) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_owned()),
                (
                    header::SET_COOKIE,
                    format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict"),
                ),
            ],
        )
            .into_response(),
        Err(_) => html(
            StatusCode::UNAUTHORIZED,
            login_form(Some("invalid, revoked or expired token")),
        ),
    }
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_owned()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

/// `GET /`: the whole view, then kept current by `/ui/events`.
async fn page(
    State(gate): State<Arc<Gate>>,
    Extension(caller): Extension<Caller>,
    Extension(Presented(token)): Extension<Presented>,
) -> Response {
    let view = match view(&gate, caller.role, &mut Feed::default()).await {
        Ok(v) => v,
        Err(e) => return html(StatusCode::INTERNAL_SERVER_ERROR, esc(&e)),
    };
    let csrf = auth::csrf_value(gate.agent().key(), &token);
    let main = format!(
        "<header><h1>kiln</h1><p>Signed in as <strong>{}</strong> ({})</p>\
<form method=\"post\" action=\"/logout\"><button type=\"submit\" class=\"quiet\">Sign out</button></form></header>\
<main id=\"view\" aria-live=\"polite\">{view}</main>\
<script src=\"/ui/app.js\" defer></script>",
        esc(&caller.actor.to_string()),
        caller.role,
    );
    html(
        StatusCode::OK,
        shell(
            "kiln",
            &main,
            &format!("<meta name=\"kiln-csrf\" content=\"{}\">", esc(&csrf)),
        ),
    )
}

/// What the page has seen of the event log.
#[derive(Default)]
struct Feed {
    after: u64,
    recent: std::collections::VecDeque<String>,
}

/// `GET /ui/events`: the view again each time it changes.
async fn live(
    State(gate): State<Arc<Gate>>,
    Extension(caller): Extension<Caller>,
    Extension(Presented(token)): Extension<Presented>,
) -> Response {
    let stream = futures_util::stream::unfold(
        (gate, Feed::default(), String::new()),
        move |(gate, mut feed, mut last)| {
            let token = token.clone();
            async move {
                loop {
                    // A token revoked (or expired) while the page is open gets
                    // nothing more: the stream ends.
                    if gate
                        .agent()
                        .authenticate(&token, crate::api::unix_now())
                        .await
                        .is_err()
                    {
                        return None;
                    }
                    let now = match view(&gate, caller.role, &mut feed).await {
                        Ok(v) => v,
                        Err(e) => format!("<p class=\"error\">{}</p>", esc(&e)),
                    };
                    if now != last {
                        let mut msg = String::from("event: view\n");
                        for line in now.lines() {
                            let _ = writeln!(msg, "data: {line}");
                        }
                        msg.push('\n');
                        last = now;
                        return Some((Ok::<_, Infallible>(msg), (gate, feed, last)));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Every service, then the latest events.
async fn view(gate: &Gate, role: Role, feed: &mut Feed) -> Result<String, String> {
    let agent = gate.agent();
    let status = agent.status().await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("<p>No service yet: <code>kiln apply</code> one.</p>");
    }
    for s in &status.services {
        let history = agent.history(&s.name).await.map_err(|e| e.to_string())?;
        service(&mut out, s, &history, role);
    }
    for e in agent.events(feed.after).await.map_err(|e| e.to_string())? {
        feed.after = e.seq;
        let subject = match (&e.service, e.revision) {
            (Some(s), Some(r)) => format!("{s} release {r}"),
            (Some(s), None) => s.clone(),
            _ => String::new(),
        };
        feed.recent.push_front(format!(
            "<li><time>{}</time> <span class=\"kind\">{}</span> {} <span class=\"actor\">{}</span></li>",
            esc(&e.time),
            esc(e.change.kind()),
            esc(&subject),
            esc(&e.actor.map(|a| a.to_string()).unwrap_or_default()),
        ));
        feed.recent.truncate(EVENTS_SHOWN);
    }
    out.push_str("<section aria-labelledby=\"events-h\"><h2 id=\"events-h\">Latest events</h2><ol class=\"events\">");
    for line in &feed.recent {
        out.push_str(line);
    }
    out.push_str("</ol></section>");
    Ok(out)
}

fn outcome(o: Option<Outcome>) -> String {
    o.map(|o| o.to_string()).unwrap_or_else(|| "-".into())
}

fn button(service: &str, action: &str, to: Option<u64>, label: &str) -> String {
    let to = to.map(|t| format!(" data-to=\"{t}\"")).unwrap_or_default();
    format!(
        "<button type=\"button\" data-service=\"{}\" data-action=\"{action}\"{to}>{}</button>",
        esc(service),
        esc(label)
    )
}

fn service(out: &mut String, s: &ServiceStatus, h: &HistoryResponse, role: Role) {
    let name = s.name.as_str();
    let deployer = role >= Role::Deployer;
    let _ = write!(
        out,
        "<section class=\"service\" id=\"service-{n}\" aria-labelledby=\"h-{n}\">\
<h2 id=\"h-{n}\">{n}</h2><p class=\"summary\">release <strong class=\"current\">{r}</strong> \
<span class=\"outcome\">{o}</span>, {ready}/{want} ready{conv}</p>",
        n = esc(name),
        r = s
            .revision
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into()),
        o = esc(&outcome(s.outcome)),
        ready = s.ready,
        want = s.replicas,
        conv = if s.converged { "" } else { ", converging" },
    );
    if let Some(m) = &s.message {
        let _ = write!(out, "<p class=\"message\">{}</p>", esc(m));
    }
    if let Some(f) = &s.failed_release {
        let _ = write!(
            out,
            "<p class=\"error\">release {} failed: {}</p>",
            f.revision,
            esc(&f.reason)
        );
    }
    // The rollout in progress.
    let mut rollout = false;
    if let Some(c) = &s.canary {
        rollout = true;
        let p99 = |w: &kiln_core::api::Window| {
            w.p99_ms
                .map(|p| format!("{p:.0} ms"))
                .unwrap_or_else(|| "-".into())
        };
        let _ = write!(
            out,
            "<div class=\"rollout\"><h3>Canary: release {} against {}</h3>\
<p>step {}/{}, weight <strong class=\"weight\">{}%</strong>, {}</p>\
<table><caption>This step's window</caption><thead><tr><th scope=\"col\"></th><th scope=\"col\">requests</th><th scope=\"col\">error rate</th><th scope=\"col\">p99</th></tr></thead><tbody>\
<tr><th scope=\"row\">canary</th><td>{}</td><td>{:.2}%</td><td>{}</td></tr>\
<tr><th scope=\"row\">stable</th><td>{}</td><td>{:.2}%</td><td>{}</td></tr></tbody></table></div>",
            c.revision,
            c.stable,
            c.step,
            c.steps,
            c.weight,
            esc(&c.waiting),
            c.canary_window.requests,
            c.canary_window.error_rate * 100.0,
            p99(&c.canary_window),
            c.stable_window.requests,
            c.stable_window.error_rate * 100.0,
            p99(&c.stable_window),
        );
    } else if let (Some(routed), Some(rev)) = (s.routed, s.revision)
        && routed != rev
    {
        rollout = true;
        let _ = write!(
            out,
            "<div class=\"rollout\"><h3>Blue-green</h3><p>release {routed} gets the traffic; \
release {rev} is the preview, waiting for promotion</p></div>"
        );
    } else if s.warm
        && let Some(rev) = s.revision
    {
        // After the switch: which fleet has the traffic, which is warm.
        let others: std::collections::BTreeSet<u64> = s
            .instances
            .iter()
            .map(|i| i.revision)
            .filter(|r| *r != rev)
            .collect();
        let others = if others.is_empty() {
            "the fleet before it".to_owned()
        } else {
            let list: Vec<String> = others.iter().map(u64::to_string).collect();
            format!("release {}", list.join(", "))
        };
        let _ = write!(
            out,
            "<div class=\"rollout\"><h3>Kept warm</h3><p>release {rev} gets the traffic; \
{others} is kept warm (a rollback is a route swap)</p></div>"
        );
    }
    if rollout && deployer {
        out.push_str("<p class=\"actions\">");
        out.push_str(&button(name, "promote", None, "Promote"));
        out.push_str(&button(name, "abort", None, "Abort"));
        out.push_str("</p>");
    }
    // Instances.
    let _ = write!(
        out,
        "<table class=\"instances\"><caption>Instances</caption><thead><tr>\
<th scope=\"col\">instance</th><th scope=\"col\">node</th><th scope=\"col\">release</th><th scope=\"col\">state</th>\
<th scope=\"col\">health</th><th scope=\"col\">uptime</th><th scope=\"col\">root</th></tr></thead><tbody>"
    );
    for i in &s.instances {
        let health = match (i.ready, i.live) {
            (true, true) => "ready",
            (false, true) => "live, not ready",
            _ => "unhealthy",
        };
        let _ = write!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}s</td><td>{}</td></tr>",
            esc(&i.id),
            esc(&i.node),
            i.revision,
            i.state,
            health,
            i.uptime_secs.round(),
            match (i.read_only_root, i.borrows_host) {
                (true, false) => "read-only, self-contained",
                (true, true) => "read-only, host /usr",
                (false, _) => "writable, host /usr",
            },
        );
    }
    out.push_str("</tbody></table>");
    // Releases, newest first.
    out.push_str("<ol class=\"timeline\" aria-label=\"Releases\">");
    for r in h.releases.iter().rev() {
        let current = s.revision == Some(r.revision);
        let _ = write!(
            out,
            "<li class=\"release{}\" data-revision=\"{}\"><strong>release {}</strong> \
<time>{}</time> <span class=\"cause\">{}</span> <span class=\"outcome\">{}</span>{}",
            if current { " current" } else { "" },
            r.revision,
            r.revision,
            esc(&r.created),
            esc(&r.cause),
            esc(&r.outcome.to_string()),
            r.reason
                .as_deref()
                .map(|x| format!(" <span class=\"reason\">{}</span>", esc(x)))
                .unwrap_or_default(),
        );
        if deployer && !current && !rollout && !h.removed {
            out.push(' ');
            out.push_str(&button(
                name,
                "rollback",
                Some(r.revision),
                &format!("Roll back to {}", r.revision),
            ));
        }
        out.push_str("</li>");
    }
    out.push_str("</ol></section>");
}

#[cfg(test)]
mod tests {
    use super::{esc, service};
    use kiln_core::api::{HistoryResponse, ServiceStatus};
    use kiln_core::auth::Role;
    use serde_json::json;

    fn status(extra: serde_json::Value) -> ServiceStatus {
        let mut v = json!({
            "name": "web", "replicas": 2, "revision": 3, "outcome": "pending",
            "ready": 1, "converged": false, "instances": [], "backoff": [],
            "message": null, "stalled": false
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn history() -> HistoryResponse {
        serde_json::from_value(json!({"releases": [], "target": 3, "removed": false})).unwrap()
    }

    fn window(requests: u64, errors: u64, p99: f64) -> serde_json::Value {
        json!({"requests": requests, "errors": errors,
               "error_rate": errors as f64 / requests as f64, "p99_ms": p99})
    }

    #[test]
    fn a_canary_shows_its_weight_and_both_windows_and_buttons_only_to_deployers() {
        let s = status(json!({"canary": {
            "revision": 3, "stable": 2, "step": 2, "steps": 4, "weight": 25,
            "waiting": "its pause", "canary_window": window(200, 10, 42.0),
            "stable_window": window(600, 0, 12.0)
        }}));
        let mut out = String::new();
        service(&mut out, &s, &history(), Role::Deployer);
        for want in [
            "Canary: release 3 against 2",
            "step 2/4",
            "25%",
            "5.00%",
            "42 ms",
            "0.00%",
            "12 ms",
            "data-action=\"promote\"",
            "data-action=\"abort\"",
        ] {
            assert!(out.contains(want), "{want} in {out}");
        }
        let mut viewer = String::new();
        service(&mut viewer, &s, &history(), Role::Viewer);
        assert!(
            viewer.contains("25%") && !viewer.contains("<button"),
            "{viewer}"
        );
    }

    #[test]
    fn a_blue_green_preview_is_shown_while_the_old_fleet_is_routed() {
        let s = status(json!({"routed": 2}));
        let mut out = String::new();
        service(&mut out, &s, &history(), Role::Viewer);
        assert!(
            out.contains("release 2 gets the traffic") && out.contains("release 3 is the preview"),
            "{out}"
        );
    }

    #[test]
    fn after_a_blue_green_switch_the_page_says_which_fleet_has_the_traffic() {
        let s = status(json!({"warm": true}));
        let mut out = String::new();
        service(&mut out, &s, &history(), Role::Viewer);
        assert!(
            out.contains("release 3 gets the traffic")
                && out.contains("is kept warm (a rollback is a route swap)"),
            "{out}"
        );
        let s = status(json!({}));
        let mut out = String::new();
        service(&mut out, &s, &history(), Role::Viewer);
        assert!(!out.contains("kept warm"), "{out}");
    }

    #[test]
    fn values_from_the_state_are_escaped() {
        let s = status(json!({"message": "<img src=x onerror=alert(1)>"}));
        let mut out = String::new();
        service(&mut out, &s, &history(), Role::Admin);
        assert!(!out.contains("<img") && out.contains("&lt;img"), "{out}");
    }

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}

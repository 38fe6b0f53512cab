//! The dashboard in a real headless Chromium (Debian's `chromium`, driven
//! through `chromedriver` over WebDriver with fantoccini), against a real
//! agent serving its API over TLS on loopback.
//!
//! With `KILN_SCREENSHOTS=DIR`, the main pages are saved there as PNG (the
//! README's pictures come from `docs/`).
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use util::*;

/// A chromedriver this test started, stopped by its PID when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let port = free_port();
        // Its own process group: the browsers it starts are ended with it,
        // even when a failed test never closed its session.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        wait_for("chromedriver", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1200,900"]
        }),
    );
    // The agent's certificate is self-signed: kiln pins it, a browser would
    // ask; the test accepts it.
    caps.insert("acceptInsecureCerts".into(), json!(true));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

fn spec(port: u16, version: &str) -> String {
    format!(
        r#"
[images.app]
context = "app"
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 2
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
# Unwatched: no fleet kept warm, so the instances shown are the release's.
[services.web.rollout]
watch = "0s"
"#
    )
}

async fn screenshot(c: &Client, name: &str) {
    if let Ok(dir) = std::env::var("KILN_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
    }
}

/// The text of the element `selector` finds, read in one script (the live
/// view may replace the element between a find and a read).
async fn inner_text(c: &Client, selector: &str) -> String {
    c.execute(
        &format!("return document.querySelector({selector:?}).innerText"),
        vec![],
    )
    .await
    .unwrap()
    .as_str()
    .unwrap()
    .to_owned()
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    // No cookie yet: the page sends the browser to sign in.
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#service-web"))
        .await
        .unwrap();
}

/// What `fetch` answers for a POST from the page, without the page's
/// anti-forgery value.
async fn forged_fetch(c: &Client) -> u64 {
    c.execute(
        "return fetch('/v1/services/web/rollback', {method: 'POST', \
         headers: {'content-type': 'application/json'}, body: '{\"to\":1}'}).then(r => r.status)",
        vec![],
    )
    .await
    .unwrap()
    .as_u64()
    .unwrap()
}

/// A rollback sent as the page's own buttons send it (its anti-forgery
/// value from the page): the status and the body.
async fn own_fetch(c: &Client) -> (u64, String) {
    let v = c
        .execute(
            "const t = document.querySelector('meta[name=kiln-csrf]').content; \
             return fetch('/v1/services/web/rollback', {method: 'POST', \
             headers: {'content-type': 'application/json', 'x-kiln-csrf': t}, body: '{\"to\":1}'}) \
             .then(async r => [r.status, await r.text()])",
            vec![],
        )
        .await
        .unwrap();
    (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_owned())
}

#[test]
fn the_dashboard_shows_releases_and_rolls_back_live_for_a_deployer_only() {
    require("chromedriver");
    require("chromium");
    let env = Env::new();
    let api = free_port();
    let _agent = Agent::start_with(&env, |c| {
        c.args(["--api", &format!("127.0.0.1:{api}")]);
    });
    wait_for("the API port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", api)).is_ok()
    });
    let port = free_port();
    hello_app(&env.path("app"), "");
    let spec_path = env.path("kiln.toml");
    for v in ["v1", "v2"] {
        write(&spec_path, spec(port, v).as_bytes());
        env.ok(&["apply", "-f", spec_path.to_str().unwrap()]);
    }
    let viewer = env.ok(&["token", "create", "ops-viewer", "--role", "viewer"]);
    let deployer = env.ok(&["token", "create", "ops-deployer", "--role", "deployer"]);
    let base = format!("https://127.0.0.1:{api}");
    let driver = Driver::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;

        // A viewer sees the service, its releases and instances, no button.
        sign_in(&c, &base, viewer.trim()).await;
        // Read in one script: the live view may replace the elements
        // between a find and a read (a stale element).
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("#service-web"))
            .await
            .unwrap();
        let text = inner_text(&c, "#service-web").await;
        assert!(
            text.contains("release 2") && text.contains("release 1"),
            "{text}"
        );
        let releases = c
            .find_all(Locator::Css("#service-web .timeline li"))
            .await
            .unwrap();
        assert_eq!(releases.len(), 2);
        let instances = c
            .find_all(Locator::Css("#service-web table.instances tbody tr"))
            .await
            .unwrap();
        assert_eq!(instances.len(), 2);
        assert!(
            c.find_all(Locator::Css("button[data-action]"))
                .await
                .unwrap()
                .is_empty(),
            "a viewer sees no button"
        );
        screenshot(&c, "dashboard-viewer.png").await;
        assert_eq!(forged_fetch(&c).await, 403, "without the page's value");
        // With it, the role decides: a viewer cannot roll back.
        let (status, body) = own_fetch(&c).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("is a viewer") && body.contains("needs deployer"),
            "{body}"
        );
        c.find(Locator::Css("header form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        // Signed out once the browser is on the sign-in page (the cookie
        // cleared): a navigation before that would race it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while c.current_url().await.unwrap().path() != "/login" {
            assert!(std::time::Instant::now() < deadline, "signed out");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A deployer gets the buttons.
        sign_in(&c, &base, deployer.trim()).await;
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("button[data-action=rollback][data-to='1']"))
            .await
            .unwrap();
        // A POST from the page without the anti-forgery value: refused,
        // nothing changed.
        assert_eq!(forged_fetch(&c).await, 403);
        assert_eq!(releases_count(&env), 2);
        // A marker that a reload would lose.
        c.execute("window.kilnMarker = 42; return null", vec![])
            .await
            .unwrap();
        // Clicked by a script that finds it then (the live view may have
        // replaced the element found before).
        c.execute(
            "document.querySelector(\"button[data-action=rollback][data-to='1']\").click(); return null",
            vec![],
        )
        .await
        .unwrap();
        // The rollback is release 3 with release 1's content; the page
        // shows it as current without a reload.
        c.wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(".timeline li.current[data-revision='3']"))
            .await
            .unwrap();
        let marker = c.execute("return window.kilnMarker", vec![]).await.unwrap();
        assert_eq!(marker, json!(42), "the page updated without a reload");
        let current = inner_text(&c, ".timeline li.current").await;
        assert!(current.contains("rollback"), "{current}");
        screenshot(&c, "dashboard-deployer.png").await;

        // A page of another site posting to the agent: the cookie stays
        // home (SameSite=Strict), so the agent sees no token.
        let forged = format!(
            "data:text/html,<form id=f method=post action='{base}/v1/services/web/rollback'>\
             <input name=to value=1></form><script>document.getElementById('f').submit()</script>"
        );
        c.goto(&forged).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let page = c.source().await.unwrap();
        assert!(page.contains("login required"), "{page}");
        c.close().await.unwrap();
    });
    assert_eq!(
        releases_count(&env),
        3,
        "only the button's rollback was made"
    );
    let actors = actors_of(&env, &["rollback"]);
    assert_eq!(actors, ["token:ops-deployer"]);
}

fn releases_count(env: &Env) -> usize {
    releases(env, "web").len()
}

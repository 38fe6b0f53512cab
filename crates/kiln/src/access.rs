//! The remote-use commands: `kiln login` / `logout` of an agent (the
//! certificate pinned on first use), `kiln token`, and `kiln --agent URL
//! push`. The transport is [`crate::remote`]'s.

use std::io::BufRead as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kiln_core::api::{
    TokenCreateRequest, TokenCreateResponse, TokenListResponse, TokenRevokeResponse, WhoAmIResponse,
};
use kiln_core::auth::{Role, TokenName};

use crate::client::{Client, runtime};
use crate::remote::{AgentUrl, Agents, Known, Remote, agents_path, chosen, upload};

/// `kiln --agent URL push REF`: the image to the agent's store, through
/// its API (only the blobs it lacks).
pub fn push(home: &Path, reference: &str, json: bool) -> Result<ExitCode> {
    let remote = chosen().ok_or_else(|| anyhow!("kiln push REF needs a DEST, or --agent URL"))?;
    let store = crate::commands::open_store(home)?;
    let image = crate::commands::resolve(&store, reference)?;
    let started = std::time::Instant::now();
    let up = runtime()?.block_on(upload(
        &remote,
        &store,
        &[(image.name.to_string(), image.digest.clone())],
        &|m| {
            if !json {
                eprintln!("  {m}");
            }
        },
    ))?;
    if json {
        crate::commands::print_json(&serde_json::json!({
            "digest": image.digest,
            "uploaded": up.uploaded,
            "uploaded_bytes": up.uploaded_bytes,
            "present": up.present,
        }))?;
    } else {
        println!("{}", image.digest);
        eprintln!(
            "uploaded {} blob{} ({}) to {}; {} it had; {:.1}s",
            up.uploaded,
            crate::commands::plural(up.uploaded),
            crate::progress::human_bytes(up.uploaded_bytes),
            remote.url,
            up.present,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_token(token_stdin: bool) -> Result<String> {
    if token_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the token from stdin")?;
        return Ok(line.trim().to_owned());
    }
    std::env::var("KILN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("give the token on stdin (--token-stdin) or in KILN_TOKEN: never on the command line"))
}

/// `kiln login https://HOST:PORT`: pin the certificate the agent presents
/// now (or check it against the pin kept), check the token, keep both.
pub fn login(home: &Path, url: &str, token_stdin: bool, json: bool) -> Result<ExitCode> {
    let url = AgentUrl::parse(url)?;
    let token = read_token(token_stdin)?;
    let agents = Agents::open(home)?;
    // The pin kept, else the one given (KILN_AGENT_FINGERPRINT): checked in
    // the handshake, before the token goes anywhere.
    let kept = agents
        .agents
        .get(&url.to_string())
        .map(|k| k.fingerprint.clone());
    let given = std::env::var("KILN_AGENT_FINGERPRINT")
        .ok()
        .filter(|f| !f.is_empty());
    let pinned = kept.clone().or(given);
    let rt = runtime()?;
    if pinned.is_none() {
        // First use: see the certificate first, with nothing sent; a person
        // at a terminal confirms it, a script accepts it as SSH's
        // `accept-new` does (pin it with KILN_AGENT_FINGERPRINT instead).
        let probe = Remote::new(url.clone(), None, String::new());
        let seen = rt.block_on(probe.certificate())?;
        eprintln!("{url} presents certificate {seen} (the agent's log names its own)");
        let interactive = !token_stdin && std::io::IsTerminal::is_terminal(&std::io::stdin());
        if interactive {
            eprint!("trust it and send the token? [y/N] ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                bail!("{url}: not logged in (certificate not trusted; nothing was sent)");
            }
        }
        let remote = Arc::new(Remote::new(url.clone(), Some(seen), token.clone()));
        return finish_login(home, &url, agents, remote, token, None, json, &rt);
    }
    let remote = Arc::new(Remote::new(url.clone(), pinned.clone(), token.clone()));
    rt.block_on(remote.certificate())?;
    finish_login(home, &url, agents, remote, token, pinned, json, &rt)
}

/// Check the token over a connection to the certificate pinned, and keep
/// both.
#[allow(clippy::too_many_arguments)]
fn finish_login(
    home: &Path,
    url: &crate::remote::AgentUrl,
    mut agents: Agents,
    remote: Arc<Remote>,
    token: String,
    pinned: Option<String>,
    json: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<ExitCode> {
    let who: WhoAmIResponse = rt.block_on(Client::remote(remote.clone()).get("/v1/whoami"))?;
    let fingerprint = remote
        .seen()
        .ok_or_else(|| anyhow!("the agent at {url} presented no certificate"))?;
    agents.agents.insert(
        url.to_string(),
        Known {
            fingerprint: fingerprint.clone(),
            token,
        },
    );
    agents.save(home)?;
    if json {
        crate::commands::print_json(&serde_json::json!({
            "agent": url.to_string(),
            "actor": who.actor,
            "role": who.role,
            "fingerprint": fingerprint,
        }))?;
    } else {
        println!(
            "{url}: logged in as {} ({}); certificate {fingerprint} {} (kept in {}, owner-only)",
            who.actor,
            who.role,
            if pinned.is_some() {
                "as pinned"
            } else {
                "pinned on first use: check it against the agent's log"
            },
            agents_path(home).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln logout https://HOST:PORT`: forget its token and pin.
pub fn logout(home: &Path, url: &str) -> Result<ExitCode> {
    let url = AgentUrl::parse(url)?;
    let mut agents = Agents::open(home)?;
    if agents.agents.remove(&url.to_string()).is_none() {
        bail!("{url}: not logged in");
    }
    agents.save(home)?;
    println!("{url}: token and certificate pin forgotten");
    Ok(ExitCode::SUCCESS)
}

pub fn token_create(
    home: &Path,
    name: &str,
    role: Role,
    expires: Option<Duration>,
    json: bool,
) -> Result<ExitCode> {
    let name = TokenName::try_from(name).map_err(|e| anyhow!(e))?;
    let req = TokenCreateRequest {
        name,
        role,
        expires_in: expires.map(|d| d.as_secs().max(1)),
    };
    let rt = runtime()?;
    let resp: TokenCreateResponse = rt.block_on(Client::new(home).post("/v1/tokens", &req))?;
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!("{}", resp.token);
        eprintln!(
            "token {name} ({role}{}): shown this once; only its hash is kept",
            resp.record
                .expires
                .map(|e| format!(", expires {}", rfc3339(e)))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

pub fn token_list(home: &Path, json: bool) -> Result<ExitCode> {
    let rt = runtime()?;
    let resp: TokenListResponse = rt.block_on(Client::new(home).get("/v1/tokens"))?;
    if json {
        crate::commands::print_json(&resp)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<32} {:<8} {:<20} EXPIRES", "NAME", "ROLE", "CREATED");
    for t in &resp.tokens {
        println!(
            "{:<32} {:<8} {:<20} {}",
            t.name.as_str(),
            t.role.as_str(),
            rfc3339(t.created),
            t.expires.map(rfc3339).unwrap_or_else(|| "never".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn token_revoke(home: &Path, name: &str, json: bool) -> Result<ExitCode> {
    let name = TokenName::try_from(name).map_err(|e| anyhow!(e))?;
    let rt = runtime()?;
    let resp: TokenRevokeResponse = rt.block_on(
        Client::new(home).post(&format!("/v1/tokens/{name}/revoke"), &serde_json::json!({})),
    )?;
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!("token {} revoked", resp.name);
    }
    Ok(ExitCode::SUCCESS)
}

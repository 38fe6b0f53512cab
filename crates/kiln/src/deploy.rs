//! Commands that talk to the agent: `serve` (and `--upgrade`), `plan`,
//! `apply` and the wait that follows it, `rollback`, `promote`, `abort`,
//! `remove`, `gc`, `rollout status`, `status`, `history`, `drift`, `logs`.

use kiln_core::api::{RollbackRequest, RollbackResponse};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_core::api::{ApplyRequest, ApplyResponse, HistoryResponse, InstanceState, StatusResponse};
use kiln_core::plan::Action;
use kiln_core::release::{DesiredService, Outcome, ReleaseConfig, ServiceSettings};
use kiln_core::secret::{SecretSource, SecretValue};
use kiln_core::service::{ImageSource, RuntimeKind};
use kiln_core::spec::Spec;
use kiln_store::Store;

use crate::client::{Client, runtime};
use crate::commands::{bake_summary, load_spec, open_store, plural};

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `kiln serve`: the supervisor, which runs the agent as its child.
pub fn serve(
    home: &Path,
    metrics: Option<std::net::SocketAddr>,
    mode: kiln_agent::AgentMode,
) -> Result<ExitCode> {
    let kiln_agent::AgentMode {
        gc,
        api,
        checkpoint_every,
        drift,
        allow_process,
        trust,
        cluster,
        offer,
        ..
    } = mode;
    // A policy that does not load stops the start here, in one line,
    // rather than in every agent the supervisor would start. Its path is
    // made absolute: agents started later (an upgrade) read the same file.
    let trust = match trust {
        Some(path) => {
            kiln_agent::trust::TrustPolicy::load(&path)?;
            Some(std::path::absolute(&path).with_context(|| format!("{}", path.display()))?)
        }
        None => None,
    };
    let checkpoint_every = checkpoint_every.unwrap_or(kiln_agent::ledger::EVERY);
    init_logging();
    let exe = std::env::current_exe().context("cannot find the kiln binary")?;
    // An upgrade replaces the file: start agents from its path, not from
    // /proc/self/exe (which stays the old, deleted one).
    let exe = std::path::PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
    let mut args = Vec::new();
    if let Some(m) = metrics {
        args.push("--metrics".into());
        args.push(m.to_string().into());
    }
    if let Some(g) = gc {
        args.push("--gc-above".into());
        args.push(g.above.to_string().into());
        args.push("--keep-releases".into());
        args.push(g.keep_releases.to_string().into());
        args.push("--gc-grace".into());
        args.push(humantime::format_duration(g.grace).to_string().into());
    }
    args.push("--checkpoint-every".into());
    args.push(
        humantime::format_duration(checkpoint_every)
            .to_string()
            .into(),
    );
    args.push("--verify-every".into());
    args.push(
        humantime::format_duration(drift.verify_every)
            .to_string()
            .into(),
    );
    args.push("--verify-rate".into());
    args.push(drift.verify_rate.to_string().into());
    if allow_process {
        args.push("--allow-runtime".into());
        args.push("process".into());
    }
    if let Some(t) = trust {
        args.push("--trust".into());
        args.push(t.into());
    }
    if let Some(a) = api {
        args.push("--api".into());
        args.push(a.addr.to_string().into());
        if let Some(c) = a.cert {
            args.push("--tls-cert".into());
            args.push(c.cert.into());
            args.push("--tls-key".into());
            args.push(c.key.into());
        }
    }
    if let Some(cpus) = offer.cpus {
        args.push("--cpus".into());
        args.push(cpus.to_string().into());
    }
    if let Some(mib) = offer.memory_mib {
        args.push("--memory".into());
        args.push(format!("{mib}M").into());
    }
    if let Some(c) = cluster {
        for url in c.etcd {
            args.push("--etcd".into());
            args.push(url.into());
        }
        args.push("--etcd-prefix".into());
        args.push(c.prefix.into());
        if let Some(node) = c.node {
            args.push("--node".into());
            args.push(node.into());
        }
        args.push("--advertise".into());
        args.push(c.advertise.to_string().into());
        for (k, v) in c.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}").into());
        }
        if let Some(tls) = c.tls {
            args.push("--etcd-ca".into());
            args.push(tls.ca.into());
            if let Some((cert, key)) = tls.cert {
                args.push("--etcd-cert".into());
                args.push(cert.into());
                args.push("--etcd-key".into());
                args.push(key.into());
            }
        }
    }
    let code =
        kiln_agent::supervisor::supervise(home, exe, args).context("the supervisor cannot run")?;
    Ok(ExitCode::from(code))
}

/// `kiln serve --agent`: the agent process itself.
pub fn agent(
    home: &Path,
    metrics: Option<std::net::SocketAddr>,
    mode: kiln_agent::AgentMode,
) -> Result<ExitCode> {
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let exit = rt
        .block_on(kiln_agent::serve(home, metrics, mode, |sock: &Path| {
            eprintln!("kiln agent ready on {}", sock.display())
        }))
        .context("the agent cannot run")?;
    Ok(match exit {
        kiln_agent::Exit::Graceful | kiln_agent::Exit::HandedOver => ExitCode::SUCCESS,
        kiln_agent::Exit::Forced => ExitCode::from(130),
    })
}

/// `kiln serve --upgrade`: the running supervisor starts a new agent from
/// the binary now on disk, which takes over; returns once it serves.
pub fn upgrade(home: &Path) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let before: StatusResponse = rt
        .block_on(client.get("/v1/status"))
        .context("no agent serves this home")?;
    let supervisor = kiln_agent::supervisor::request_upgrade(home)
        .context("cannot reach the supervisor (is this agent run by `kiln serve`?)")?;
    eprintln!(
        "asked kiln serve (pid {supervisor}) to hand over from agent {}",
        before.agent.pid
    );
    let started = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(now) = rt.block_on(client.get::<StatusResponse>("/v1/status"))
            && now.agent.pid != before.agent.pid
        {
            eprintln!(
                "agent {} (kiln {}) serves, in {:.1}s",
                now.agent.pid,
                now.agent.version,
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("no new agent took over within 120 s (see kiln serve's log)");
        }
    }
}

/// Bake what the services need and resolve every service to a release config.
pub fn desired(
    home: &Path,
    file: &Path,
    verbose: bool,
) -> Result<(Vec<DesiredService>, Vec<kiln_core::spec::ServiceName>)> {
    let (spec, _) = load_spec(file)?;
    if spec.services.is_empty() {
        bail!("{} has no [services.NAME] table to apply", file.display());
    }
    // Secrets first: a missing file fails before anything is baked.
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut secrets = BTreeMap::new();
    for (name, svc) in &spec.services {
        secrets.insert(name.clone(), read_secrets(dir, name, svc)?);
    }
    // The trust policy parses before anything is baked.
    let allowed = kiln_store::sign::allowed(&spec.trust.allowed_signers)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let store = open_store(home)?;
    let mut baked = BTreeMap::new();
    for svc in spec.services.values() {
        if let ImageSource::Spec(name) = &svc.image
            && !baked.contains_key(name)
        {
            let reports =
                crate::commands::bake_reports(home, file, &[name.to_string()], &[], true)?;
            for (r, secs) in reports {
                if verbose {
                    eprintln!(
                        "baked {}@{}\n{}",
                        r.image,
                        r.digest.short(),
                        bake_summary(&r, secs)
                    );
                }
                baked.insert(r.image.clone(), r.digest);
            }
        }
    }
    let mut out = Vec::new();
    let mut explicit = Vec::new();
    for (name, svc) in &spec.services {
        let (image_name, digest) = match &svc.image {
            ImageSource::Spec(n) => (n.to_string(), baked[n].clone()),
            ImageSource::Registry(r) => {
                let digest = match &r.target {
                    // A digest the store has: nothing to ask the registry.
                    Some(kiln_core::registry::Target::Digest(d)) if store.has_blob(d) => d.clone(),
                    // A tag is resolved at every apply: where it points now.
                    _ => {
                        let report = crate::pull::pull_into(
                            home,
                            &store,
                            r,
                            false,
                            !verbose,
                            kiln_store::registry::PULL_DEADLINE,
                        )
                        .with_context(|| format!("service {name}: image {r}"))?;
                        if verbose && report.downloaded > 0 {
                            eprintln!(
                                "pulled {r}@{} ({} blobs, {} bytes)",
                                report.digest.short(),
                                report.downloaded,
                                report.downloaded_bytes
                            );
                        }
                        report.digest
                    }
                };
                (r.to_string(), digest)
            }
            ImageSource::Store(r) => {
                let rec = store
                    .resolve(r)
                    .with_context(|| format!("service {name}: image {r}"))?;
                (rec.name.to_string(), rec.digest)
            }
        };
        let signed_by = trusted(
            &store,
            &spec.trust,
            &allowed,
            name,
            svc,
            &image_name,
            &digest,
        )?;
        let mut d = resolve_service(&store, &spec, name, svc, image_name, digest)?;
        // The agent reads the certificate files: named absolutely.
        let base = if dir.as_os_str().is_empty() {
            std::env::current_dir()
        } else {
            std::path::absolute(dir)
        }
        .with_context(|| format!("service {name}: tls: where is {}", dir.display()))?;
        d.settings.tls = svc.tls.as_ref().map(|t| t.under(&base));
        if let Some(pages) = &svc.error_pages {
            d.settings.error_pages = read_error_pages(&base.join(pages))
                .with_context(|| format!("service {name}: error_pages {pages}"))?;
        }
        d.secret_values = secrets.remove(name).unwrap_or_default();
        d.signed_by = signed_by;
        out.push(d);
        if svc.runtime.is_some() {
            explicit.push(name.clone());
        }
    }
    Ok((out, explicit))
}

/// The allowed signers of a service's image; an error (and nothing
/// applied) when the service requires a signature and none is valid by an
/// allowed signer.
fn trusted(
    store: &Store,
    trust: &kiln_core::spec::TrustSpec,
    allowed: &[String],
    name: &kiln_core::spec::ServiceName,
    svc: &kiln_core::service::ServiceSpec,
    image_name: &str,
    digest: &kiln_core::Digest,
) -> Result<Vec<String>> {
    let found: Vec<(String, bool)> = kiln_store::sign::signatures(store, digest)?
        .into_iter()
        .map(|f| (f.signer, f.valid))
        .collect();
    match kiln_core::spec::trusted_signers(allowed, &found) {
        Ok(signers) => Ok(signers),
        Err(_) if !trust.required(svc) => Ok(Vec::new()),
        Err(why) => bail!(
            "service {name}: image {image_name}@{} must be signed by an allowed signer ([trust]): {why}",
            digest.short()
        ),
    }
}

/// A service's secrets, read from where the spec says: its `env_file`,
/// then its `[secrets]` table (which wins). Errors name the secret and its
/// source, never a value.
fn read_secrets(
    dir: &Path,
    name: &kiln_core::spec::ServiceName,
    svc: &kiln_core::service::ServiceSpec,
) -> Result<BTreeMap<kiln_core::spec::EnvName, SecretValue>> {
    let mut out = BTreeMap::new();
    if let Some(f) = &svc.env_file {
        let path = dir.join(f);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("service {name}: env_file: cannot read {}", path.display()))?;
        let entries = kiln_core::secret::parse_env_file(&text)
            .map_err(|e| anyhow::anyhow!("service {name}: env_file {}: {e}", path.display()))?;
        out.extend(entries);
    }
    for (key, source) in &svc.secrets {
        let value = match source {
            SecretSource::Value(v) => v.clone(),
            SecretSource::File { file } => {
                let path = dir.join(file);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "service {name}: secret {key}: cannot read {}",
                        path.display()
                    )
                })?;
                kiln_core::secret::from_file_contents(&text)
            }
            SecretSource::Env { env } => match std::env::var(env) {
                Ok(v) => SecretValue::new(v),
                Err(_) => {
                    bail!("service {name}: secret {key}: the environment variable {env} is not set")
                }
            },
        };
        out.insert(key.clone(), value);
    }
    for key in out.keys() {
        if svc.env.contains_key(key) {
            bail!("service {name}: {key} is both in env and a secret; keep one");
        }
    }
    Ok(out)
}

fn resolve_service(
    store: &Store,
    _spec: &Spec,
    name: &kiln_core::spec::ServiceName,
    svc: &kiln_core::service::ServiceSpec,
    image_name: String,
    digest: kiln_core::Digest,
) -> Result<DesiredService> {
    let manifest = store.manifest(&digest)?;
    let image = store.config(&manifest)?.config;
    let command = if svc.command.is_empty() {
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    } else {
        svc.command.clone()
    };
    let mut env = BTreeMap::new();
    for (k, v) in image.env.iter().filter_map(|kv| kv.split_once('=')) {
        let k = kiln_core::spec::EnvName::try_from(k)
            .map_err(|e| anyhow::anyhow!("image {image_name} of service {name}: {e}"))?;
        env.insert(k, v.to_owned());
    }
    env.extend(svc.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let workdir =
        kiln_core::spec::AbsolutePath::try_from(image.working_dir.as_deref().unwrap_or("/"))
            .map_err(|e| {
                anyhow::anyhow!("image {image_name} of service {name}: working directory: {e}")
            })?;
    Ok(DesiredService {
        name: name.clone(),
        settings: ServiceSettings {
            replicas: svc.replicas,
            listen: svc.listen,
            route: svc.route(),
            tls: None,
            rollout: svc.rollout.clone(),
            timeout: svc.timeout,
            router: svc.router,
            node_labels: svc.node_labels.clone(),
            error_pages: BTreeMap::new(),
        },
        secret_values: BTreeMap::new(),
        signed_by: Vec::new(),
        config: ReleaseConfig {
            image: digest,
            image_name,
            command,
            workdir,
            env,
            // Sealed by the agent from `secret_values`.
            secrets: BTreeMap::new(),
            volumes: svc.volumes.clone(),
            // The agent decides when the spec does not say (it knows whether
            // bubblewrap is installed on its node).
            runtime: svc.runtime.unwrap_or(RuntimeKind::Sandbox),
            // The agent resolves it against the image's /etc/passwd.
            user: match svc
                .user
                .clone()
                .or(image.user.clone())
                .filter(|u| !u.is_empty())
            {
                Some(u) => {
                    kiln_core::user::check(&u)
                        .map_err(|e| anyhow::anyhow!("service {name}: {e}"))?;
                    Some(u)
                }
                None => None,
            },
            health: svc.health.clone(),
            stop: svc.stop.clone(),
            resources: kiln_core::resources::Resources {
                cpu_millis: svc.cpu.unwrap_or(0),
                memory_bytes: svc.memory.unwrap_or(0),
                pids: svc.pids.unwrap_or(0),
            },
            hooks: svc.hooks.clone(),
        },
    })
}

/// Resolve the spec, send it to the agent (`dry_run`: only plan) and print
/// the plan.
fn send_spec(
    home: &Path,
    file: &Path,
    dry_run: bool,
    prune: bool,
    json: bool,
) -> Result<(Client, tokio::runtime::Runtime, ApplyResponse)> {
    let client = Client::new(home);
    let rt = runtime()?;
    // The agent first: without one, nothing is baked into the store.
    rt.block_on(client.get::<StatusResponse>("/v1/status"))?;
    let (services, explicit_runtime) = desired(home, file, true)?;
    // A remote agent gets the images it lacks first (only those blobs).
    if let Some(remote) = crate::remote::chosen() {
        let mut images: Vec<(String, kiln_core::Digest)> = services
            .iter()
            .map(|s| (s.config.image_name.clone(), s.config.image.clone()))
            .collect();
        images.sort();
        images.dedup();
        let store = open_store(home)?;
        let up = rt.block_on(crate::remote::upload(&remote, &store, &images, &|m| {
            if !json {
                eprintln!("  {m}");
            }
        }))?;
        if !json {
            eprintln!(
                "uploaded {} blob{} ({}) to the agent; {} it had",
                up.uploaded,
                plural(up.uploaded),
                crate::progress::human_bytes(up.uploaded_bytes),
                up.present
            );
        }
    }
    // Workers whose readiness is only "still running": said, once.
    let workers: Vec<(String, std::time::Duration)> = services
        .iter()
        .filter_map(|d| {
            let held = kiln_core::service::effective_min_ready(
                d.settings.rollout.min_ready.0,
                d.settings.listen.is_some(),
                &d.config.health,
                kiln_core::service::WORKER_MIN_READY,
            );
            (held != d.settings.rollout.min_ready.0).then(|| (d.name.to_string(), held))
        })
        .collect();
    let request = ApplyRequest {
        services,
        dry_run,
        explicit_runtime,
        prune,
    };
    let resp: ApplyResponse = rt.block_on(client.post("/v1/apply", &request))?;
    if json {
        crate::commands::print_json(&resp.plan)?;
    } else {
        print!("{}", resp.plan);
        for (name, held) in &workers {
            let changed = resp
                .plan
                .services
                .iter()
                .any(|p| p.service.as_str() == name && p.action != Action::Unchanged);
            if changed {
                eprintln!(
                    "note: {name} has no listen and no readiness probe: its instances count as ready once they have run {} (rollout.min_ready; a readiness probe says better)",
                    humantime::format_duration(*held)
                );
            }
        }
    }
    Ok((client, rt, resp))
}

pub fn plan(
    home: &Path,
    file: &Path,
    prune: bool,
    exit_code: bool,
    json: bool,
) -> Result<ExitCode> {
    let (_, _, resp) = send_spec(home, file, true, prune, json)?;
    let differs = !resp.plan.is_empty() || resp.plan.left_running().next().is_some();
    Ok(if exit_code && differs {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn apply(
    home: &Path,
    file: &Path,
    detach: bool,
    wait: bool,
    prune: bool,
    json: bool,
) -> Result<ExitCode> {
    let (client, rt, resp) = send_spec(home, file, false, prune, json)?;
    if resp.plan.is_empty() || detach {
        return Ok(ExitCode::SUCCESS);
    }
    // Removed services are gone when apply answers; the rest are followed.
    let waiting: Vec<(String, u64, Action)> = resp
        .plan
        .services
        .iter()
        .filter(|s| {
            matches!(
                s.action,
                Action::Create | Action::Release | Action::Settings
            )
        })
        .map(|s| (s.service.to_string(), s.revision.unwrap_or(1), s.action))
        .collect();
    rt.block_on(wait_for(&client, &waiting, !json, wait))
}

/// A rollout that waits for a person (`kiln promote`), in words, if it
/// does: a canary's manual pause, or a blue-green switch.
fn paused_for_promote(s: &kiln_core::api::ServiceStatus, revision: u64) -> Option<String> {
    if let Some(c) = &s.canary
        && c.revision == revision
        && c.waiting.starts_with("manual pause")
    {
        return Some(format!("step {}/{} ({}%)", c.step, c.steps, c.weight));
    }
    s.message
        .as_deref()
        .filter(|m| {
            m.contains(&format!(
                "release {revision} is ready: waiting for `kiln promote"
            ))
        })
        .map(|_| "the blue-green switch".to_owned())
}

/// Follow the services until each is whole on its planned release, or its
/// release failed. A rollout that waits for `kiln promote` ends the wait
/// there (exit 0, saying which command goes on), so a CI job does not hang
/// on it, unless `through` (`--wait`): then the wait goes on through every
/// pause and through the release's watch (`rollout.watch`), until it is
/// settled.
pub async fn wait_for(
    client: &Client,
    waiting: &[(String, u64, Action)],
    show: bool,
    through: bool,
) -> Result<ExitCode> {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    let mut paused: BTreeMap<String, String> = BTreeMap::new();
    let mut watched_until: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let status: StatusResponse = client.get("/v1/status").await?;
        let mut done = 0;
        for (name, revision, action) in waiting {
            let Some(s) = status.services.iter().find(|s| s.name.as_str() == name) else {
                continue;
            };
            if !through && let Some(at) = paused_for_promote(s, *revision) {
                paused.insert(name.clone(), at);
                done += 1;
                continue;
            }
            let old = s
                .instances
                .iter()
                .filter(|i| i.revision != *revision)
                .count();
            let starting = s
                .instances
                .iter()
                .filter(|i| {
                    i.revision == *revision && !i.ready && i.state != InstanceState::Stopping
                })
                .count();
            // Counted from the instances, not `s.ready`: a snapshot taken
            // before the agent picked up this release counts the old fleet.
            let ready = s
                .instances
                .iter()
                .filter(|i| i.revision == *revision && i.ready)
                .count();
            let line = match &s.canary {
                Some(c) if c.revision == *revision => format!("{name}: {}", canary_step(c)),
                _ => format!(
                    "{name}: release {revision}: {ready}/{} ready, {starting} starting, {old} old",
                    s.replicas
                ),
            };
            if show && last.get(name) != Some(&line) {
                eprintln!("  {line}");
                last.insert(name.clone(), line);
            }
            // Status says whether the release failed (the target's outcome,
            // or the newest release failed past the target); only then is
            // the history read, for its reason: polling the whole history
            // would cost the agent more with every release.
            let failed = (s.revision == Some(*revision) && s.outcome == Some(Outcome::Failed))
                || s.failed_release
                    .as_ref()
                    .is_some_and(|f| f.revision == *revision);
            let history: Option<HistoryResponse> = if failed {
                Some(client.get(&format!("/v1/services/{name}/history")).await?)
            } else {
                None
            };
            if let Some(history) = &history
                && let Some(r) = history.releases.iter().find(|r| r.revision == *revision)
                && r.outcome == Outcome::Failed
            {
                bail!(
                    "{name}: release {revision} failed: {}{}",
                    r.reason.as_deref().unwrap_or("unknown reason"),
                    if history.target != *revision {
                        format!("; the service is back on release {}", history.target)
                    } else {
                        String::new()
                    }
                );
            }
            if s.stalled && s.revision == Some(*revision) {
                bail!(
                    "{name}: release {revision} did not become ready: {}",
                    s.message.as_deref().unwrap_or("past its progress deadline")
                );
            }
            // A release counts once it is active (its instances stayed ready
            // for `min_ready`); a settings change once the service converged.
            let active = *action == Action::Settings
                || (s.revision == Some(*revision) && s.outcome == Some(Outcome::Active));
            // `--wait`: a watched release is settled once its watch ends.
            let watched = through && s.watched_until.is_some();
            if s.converged && s.revision == Some(*revision) && active && !watched {
                done += 1;
                if let Some(until) = &s.watched_until {
                    watched_until.insert(name.clone(), until.clone());
                }
            }
        }
        if done == waiting.len() {
            for (name, at) in &paused {
                // Said whatever the output: a script reads the exit code,
                // a person this line.
                eprintln!(
                    "{name}: the rollout waits at {at} for `kiln promote {name}` (`kiln rollout status {name} --wait` follows it to the end)"
                );
            }
            for (name, until) in watched_until.iter().filter(|_| show) {
                eprintln!(
                    "{name}: live and watched until {until} (rollout.watch): a crash loop before then returns to the release before, kept warm meanwhile (`--wait` waits through the watch)"
                );
            }
            if show {
                eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
            }
            return Ok(ExitCode::SUCCESS);
        }
        // Status is an in-memory snapshot on the agent: polling it is cheap.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn rollback(
    home: &Path,
    service: &str,
    to: Option<u64>,
    detach: bool,
    json: bool,
) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let started = Instant::now();
    let resp: RollbackResponse = rt.block_on(client.post(
        &format!("/v1/services/{service}/rollback"),
        &RollbackRequest { to },
    ))?;
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!(
            "{service}: release {} rolls back from release {} to the content of release {}",
            resp.revision, resp.from, resp.to
        );
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let code = rt.block_on(wait_for(
        &client,
        &[(service.to_owned(), resp.revision, Action::Release)],
        !json,
        false,
    ))?;
    if !json {
        eprintln!(
            "rolled back in {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(code)
}

/// One line on a canary in progress: where it is and what it measured.
fn canary_line(c: &kiln_core::api::CanaryStatus) -> String {
    let w = |w: &kiln_core::api::Window| {
        format!(
            "{} req, {:.1}% errors, p99 {}",
            w.requests,
            w.error_rate * 100.0,
            w.p99_ms.map_or("-".to_owned(), |p| format!("{p}ms"))
        )
    };
    format!(
        "{}; canary {}; stable (release {}) {}",
        canary_step(c),
        w(&c.canary_window),
        c.stable,
        w(&c.stable_window)
    )
}

/// Where a canary is: its release, step, weight and what the step waits for.
fn canary_step(c: &kiln_core::api::CanaryStatus) -> String {
    let waiting = if c.waiting.is_empty() {
        String::new()
    } else {
        format!(" ({})", c.waiting)
    };
    format!(
        "canary release {} at step {}/{}, {}% of traffic{waiting}",
        c.revision, c.step, c.steps, c.weight
    )
}

/// `kiln promote`: switch a blue-green rollout that waits for it, or pass
/// a canary's current step.
/// `kiln pause SERVICE` (`timeout`) or `kiln resume SERVICE` (`None`).
pub fn pause(
    home: &Path,
    service: &str,
    timeout: Option<Duration>,
    json: bool,
) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let resp: kiln_core::api::PauseResponse = match timeout {
        Some(t) => rt.block_on(client.post(
            &format!("/v1/services/{service}/pause"),
            &kiln_core::api::PauseRequest {
                timeout_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
            },
        ))?,
        None => rt.block_on(client.post(
            &format!("/v1/services/{service}/resume"),
            &serde_json::json!({}),
        ))?,
    };
    if json {
        crate::commands::print_json(&resp)?;
        return Ok(ExitCode::SUCCESS);
    }
    match (resp.timeout_ms, resp.changed) {
        (Some(0), _) => println!(
            "{service}: in maintenance: every request is answered 503 (kiln resume {service})"
        ),
        (Some(ms), _) => println!(
            "{service}: paused: new requests wait at the router, at most {} (kiln resume {service})",
            humantime::format_duration(Duration::from_millis(ms))
        ),
        (None, true) => println!("{service}: resumed"),
        (None, false) => println!("{service}: was not paused"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn promote(home: &Path, service: &str, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let started = Instant::now();
    let resp: kiln_core::api::PromoteResponse = rt.block_on(client.post(
        &format!("/v1/services/{service}/promote"),
        &serde_json::json!({}),
    ))?;
    if json {
        crate::commands::print_json(&resp)?;
    }
    if let Some(step) = resp.canary_step {
        // The canary goes on through its steps: follow it with
        // `kiln rollout status`.
        if !json {
            println!(
                "{service}: canary release {} passes step {step}",
                resp.revision
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let code = rt.block_on(wait_for(
        &client,
        &[(service.to_owned(), resp.revision, Action::Release)],
        !json,
        false,
    ))?;
    eprintln!(
        "{service}: release {} promoted in {:.0} ms",
        resp.revision,
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(code)
}

/// `kiln abort`: stop the rollout in progress; the service returns to the
/// release before it. Waits until no instance of the aborted release runs.
pub fn abort(home: &Path, service: &str, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let started = Instant::now();
    let resp: kiln_core::api::AbortResponse = rt.block_on(client.post(
        &format!("/v1/services/{service}/abort"),
        &serde_json::json!({}),
    ))?;
    let switched = started.elapsed();
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!(
            "{service}: release {} aborted; the service is back on release {} ({:.1} ms)",
            resp.revision,
            resp.back_to,
            switched.as_secs_f64() * 1000.0
        );
    }
    let code = rt.block_on(wait_for(
        &client,
        &[(service.to_owned(), resp.back_to, Action::Release)],
        !json,
        false,
    ))?;
    Ok(code)
}

/// `kiln remove SERVICE`: answers once every instance has stopped.
pub fn remove(home: &Path, service: &str, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let resp: kiln_core::api::RemoveResponse = rt.block_on(client.post(
        &format!("/v1/services/{service}/remove"),
        &serde_json::json!({}),
    ))?;
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!(
            "{service}: removed (it was on release {}; {} instance{} stopped); its history is kept: kiln history {service}",
            resp.revision,
            resp.stopped,
            plural(resp.stopped)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln gc`: collect the store, keeping every image a kept release names.
pub fn gc(
    home: &Path,
    keep_releases: usize,
    grace: Duration,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    // A remote agent collects its own store; here, the home's.
    let r: kiln_store::gc::GcReport = match crate::remote::chosen() {
        Some(remote) => runtime()?.block_on(Client::remote(remote).post(
            "/v1/gc",
            &kiln_core::api::GcRequest {
                keep_releases,
                grace_secs: grace.as_secs(),
                dry_run,
            },
        ))?,
        None => runtime()?
            .block_on(kiln_agent::gc::collect_home(
                home,
                keep_releases,
                grace,
                dry_run,
            ))
            .context("cannot collect the store")?,
    };
    if json {
        crate::commands::print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for image in &r.images {
        println!("{verb} {image}");
    }
    println!(
        "{verb} {} image{}, {} blob{}, {} tree{}, {} tmp leftover{}, {} log file{}: {} freed; {} image{} kept",
        r.images.len(),
        plural(r.images.len()),
        r.blobs,
        plural(r.blobs),
        r.trees,
        plural(r.trees),
        r.tmp,
        plural(r.tmp),
        r.logs,
        plural(r.logs),
        crate::progress::human_bytes(r.freed_bytes),
        r.kept_images,
        plural(r.kept_images)
    );
    Ok(ExitCode::SUCCESS)
}

/// `kiln rollout status`: follow the service's current rollout to its end.
pub fn rollout_status(home: &Path, service: &str, wait: bool, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let find = |status: StatusResponse| {
        status
            .services
            .into_iter()
            .find(|s| s.name.as_str() == service)
            .ok_or_else(|| anyhow::anyhow!("no service named {service}"))
    };
    let s = find(rt.block_on(client.get("/v1/status"))?)?;
    let revision = s.revision.unwrap_or(1);
    let code = rt.block_on(wait_for(
        &client,
        &[(service.to_owned(), revision, Action::Release)],
        !json,
        wait,
    ));
    if json {
        // The outcome as scripts read it: the service's status at the end
        // (its `outcome` and `failed_release` say how it went).
        crate::commands::print_json(&find(rt.block_on(client.get("/v1/status"))?)?)?;
    }
    code
}

/// An instance's uptime as people read it: `42s`, `10m58s`, `3h07m`,
/// `2d04h`.
fn uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{:.1}s", secs.max(0.0)),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn status(home: &Path, service: Option<&str>, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let mut status: StatusResponse = runtime()?.block_on(client.get("/v1/status"))?;
    if let Some(name) = service {
        status.services.retain(|s| s.name.as_str() == name);
        if status.services.is_empty() {
            bail!("no service named {name}");
        }
    }
    if json {
        crate::commands::print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !status.agent.sandbox_available && !status.agent.oci_available {
        println!(
            "note: bubblewrap is not installed: instances run as plain processes, their root is not enforced read-only"
        );
    }
    if status.services.is_empty() {
        println!(
            "no services on this agent ({}): kiln apply -f kiln.toml deploys some",
            status.agent.home
        );
    }
    for s in &status.services {
        println!(
            "{}  release {}  {}  {}/{} ready{}",
            s.name,
            s.revision.map_or("-".to_owned(), |r| r.to_string()),
            s.outcome.map_or("-".to_owned(), |o| o.to_string()),
            s.ready,
            s.replicas,
            if s.converged { "" } else { "  (converging)" }
        );
        if let Some(serves) = &s.serves {
            println!("  serves {serves}");
        }
        if s.paused_ms == Some(0) {
            println!(
                "  paused: in maintenance, requests answered 503 (kiln resume {})",
                s.name
            );
        } else if let Some(ms) = s.paused_ms {
            println!(
                "  paused: new requests wait at most {} (kiln resume {})",
                humantime::format_duration(Duration::from_millis(ms)),
                s.name
            );
        }
        if let Some(c) = &s.certificate {
            println!("  certificate: {c}");
        }
        if let Some(m) = &s.message {
            println!("  ! {m}");
        }
        if let Some(c) = &s.canary {
            println!("  {}", canary_line(c));
        }
        // Blue-green: which fleet has the traffic, which one waits or is warm.
        if let Some(r) = s.routed
            && s.instances.iter().any(|i| i.revision != r)
        {
            let others: std::collections::BTreeSet<u64> = s
                .instances
                .iter()
                .map(|i| i.revision)
                .filter(|rev| *rev != r)
                .collect();
            let others = others
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "  traffic on release {r}; release {others} {}",
                if s.warm {
                    "kept warm (a rollback is a route swap)"
                } else {
                    "beside it, without traffic"
                }
            );
        }
        if let Some(until) = &s.watched_until {
            println!(
                "  live, watched until {until}: a crash loop before then returns to the release before (rollout.watch)"
            );
        }
        if let Some(f) = &s.failed_release
            && s.message.is_none()
        {
            println!("  ! release {} failed: {}", f.revision, f.reason);
        }
        for b in &s.backoff {
            println!(
                "  slot {} of release {}: {} failures, retry in {} ms",
                b.slot, b.revision, b.failures, b.retry_in_ms
            );
        }
        println!(
            "  {:<22} {:>3} {:>4} {:>8} {:>6} {:<9} {:<7} {:>5} {:>9} {:<8} {:<12} ROOT",
            "INSTANCE",
            "REL",
            "SLOT",
            "PID",
            "PORT",
            "STATE",
            "HEALTH",
            "REPL",
            "UPTIME",
            "RUNTIME",
            "NODE"
        );
        for i in &s.instances {
            let state = match i.state {
                InstanceState::Starting => "starting",
                InstanceState::Running => "running",
                InstanceState::Stopping => "stopping",
            };
            let health = match (i.ready, i.live) {
                (_, false) => "dead",
                (true, true) => "ready",
                (false, true) => "unready",
            };
            println!(
                "  {:<22} {:>3} {:>4} {:>8} {:>6} {:<9} {:<7} {:>5} {:>9} {:<8} {:<12} {}",
                i.id,
                i.revision,
                i.slot,
                i.pid.map_or("-".to_owned(), |p| p.to_string()),
                i.port,
                state,
                health,
                i.replacements,
                uptime(i.uptime_secs),
                i.runtime.to_string(),
                i.node,
                match (i.read_only_root, i.borrows_host) {
                    (true, false) => "read-only (enforced), self-contained",
                    (true, true) => "read-only (enforced), host /usr",
                    (false, _) => "not enforced, host /usr",
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln run SERVICE [--release N] -- CMD…`: the command's output as it
/// comes (stdout to stdout, stderr to stderr), then its exit code as
/// kiln's (128 + the signal for one a signal ended).
pub fn run_command(
    home: &Path,
    service: &str,
    release: Option<u64>,
    argv: Vec<String>,
    stdin: bool,
) -> Result<ExitCode> {
    run_frames(
        home,
        &format!("/v1/services/{service}/run"),
        &kiln_core::api::RunRequest {
            release,
            argv,
            stdin,
        },
        stdin,
    )
}

/// `kiln exec INSTANCE [--keep] -- CMD…`: as `kiln run`, inside a running
/// instance (which is replaced afterwards unless `--keep`).
pub fn exec_command(
    home: &Path,
    instance: &str,
    keep: bool,
    argv: Vec<String>,
    stdin: bool,
) -> Result<ExitCode> {
    run_frames(
        home,
        &format!("/v1/instances/{instance}/exec"),
        &kiln_core::api::ExecRequest { argv, keep, stdin },
        stdin,
    )
}

/// A command's frames from the agent: its output to ours, its exit code
/// as kiln's.
fn run_frames<B: serde::Serialize>(
    home: &Path,
    path: &str,
    body: &B,
    stdin: bool,
) -> Result<ExitCode> {
    use base64::Engine;
    use kiln_core::api::RunFrame;
    use std::io::Write;
    let client = Client::new(home);
    let mut code = None;
    runtime()?.block_on(client.post_lines(path, body, stdin, |line| {
        match serde_json::from_slice::<RunFrame>(line)
            .context("unexpected answer from the agent")?
        {
            RunFrame::Started { .. } => {}
            RunFrame::Output { stream, data } => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .context("unexpected output from the agent")?;
                if stream == 2 {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&bytes)?;
                    e.flush()?;
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&bytes)?;
                    o.flush()?;
                }
            }
            RunFrame::Exited { code: c, .. } => code = Some(c),
        }
        Ok(())
    }))?;
    let code = code.context("the agent ended the command's stream before it said how it ended")?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

pub fn history(home: &Path, service: &str, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let h: HistoryResponse =
        runtime()?.block_on(client.get(&format!("/v1/services/{service}/history")))?;
    if json {
        crate::commands::print_json(&h)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>4}  {:<22} {:<20} {:<14} {:<11} REASON",
        "REL", "IMAGE", "CREATED", "CAUSE", "OUTCOME"
    );
    for r in &h.releases {
        println!(
            "{:>4}  {:<22} {:<20} {:<14} {:<11} {}",
            r.revision,
            r.config.image_label(),
            r.created,
            r.cause,
            r.outcome.to_string(),
            r.reason.as_deref().unwrap_or("")
        );
    }
    if h.removed {
        println!(
            "{service} was removed while on release {}; applying it again makes a new release",
            h.target
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln drift [SERVICE]`.
/// `kiln nodes [--json]`.
pub fn nodes(home: &Path, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let n: kiln_core::api::NodesResponse = runtime()?.block_on(client.get("/v1/nodes"))?;
    if json {
        crate::commands::print_json(&n)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<16} {:<7} {:<8} {:>6} {:>9} {:>9} {:>15}  {:<10} {:<24} JOINED",
        "NODE",
        "ADDRESS",
        "LEADER",
        "DRAINED",
        "LEASE",
        "INSTANCES",
        "CPUS",
        "MEMORY",
        "VERSION",
        "LABELS"
    );
    for node in &n.nodes {
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<20} {:<16} {:<7} {:<8} {:>6} {:>9} {:>9} {:>15}  {:<10} {:<24} {}{}",
            node.name,
            node.address,
            if node.leader { "yes" } else { "" },
            if node.drained { "yes" } else { "" },
            node.lease
                .map_or("-".to_owned(), |(left, ttl)| format!("{left}/{ttl}s")),
            node.instances,
            // Reserved of what it offers.
            format!(
                "{}/{}",
                kiln_core::resources::show_cpu(u64::from(node.reserved.cpu_millis)),
                node.cpus
            ),
            format!(
                "{}/{} MiB",
                node.reserved.memory_bytes.div_ceil(1 << 20),
                node.memory_mib
            ),
            node.version,
            if labels.is_empty() {
                "-".to_owned()
            } else {
                labels.join(",")
            },
            node.joined,
            if node.name == n.this {
                "  (this node)"
            } else {
                ""
            }
        );
    }
    if !n.cluster {
        println!("(on its own: `kiln serve --etcd URL` makes a cluster)");
    } else if n.leader.is_none() {
        println!("no leader now: one is elected within the lease's TTL (5 s)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln drain NODE`: recorded by the agent; then, unless `wait` is
/// `None`, the node's instances counted until none is left (each is
/// replaced on another node before it stops).
pub fn drain(home: &Path, node: &str, wait: Option<Duration>, json: bool) -> Result<ExitCode> {
    kiln_core::cluster::check_node_name(node).map_err(|e| anyhow::anyhow!("node {e}"))?;
    let client = Client::new(home);
    let rt = runtime()?;
    let mut resp: kiln_core::api::DrainResponse =
        rt.block_on(client.post(&format!("/v1/nodes/{node}/drain"), &serde_json::json!({})))?;
    if let Some(limit) = wait {
        let deadline = std::time::Instant::now() + limit;
        let mut said = None;
        while resp.instances > 0 {
            if !json && said != Some(resp.instances) {
                eprintln!(
                    "node {node}: {} instance(s) to move to the other nodes…",
                    resp.instances
                );
                said = Some(resp.instances);
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "node {node} still runs {} instance(s) after {} (it stays drained; `kiln status` says why they have not moved)",
                    resp.instances,
                    humantime::format_duration(limit)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            let n: kiln_core::api::NodesResponse = rt.block_on(client.get("/v1/nodes"))?;
            resp.instances = n
                .nodes
                .iter()
                .find(|n| n.name == node)
                .map_or(0, |n| n.instances);
        }
    }
    if json {
        crate::commands::print_json(&resp)?;
    } else if wait.is_some() {
        println!(
            "node {node} drained: it runs no instance and takes no new one (`kiln undrain {node}` ends that)"
        );
    } else {
        println!(
            "node {node} drained: its {} instance(s) move to the other nodes",
            resp.instances
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln undrain NODE`.
pub fn undrain(home: &Path, node: &str, json: bool) -> Result<ExitCode> {
    kiln_core::cluster::check_node_name(node).map_err(|e| anyhow::anyhow!("node {e}"))?;
    let client = Client::new(home);
    let resp: kiln_core::api::DrainResponse = runtime()?
        .block_on(client.post(&format!("/v1/nodes/{node}/undrain"), &serde_json::json!({})))?;
    if json {
        crate::commands::print_json(&resp)?;
    } else {
        println!("node {node} takes new instances again");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn drift(home: &Path, service: Option<&str>, json: bool) -> Result<ExitCode> {
    let path = match service {
        Some(s) => {
            let name = kiln_core::spec::ServiceName::try_from(s)
                .map_err(|e| anyhow::anyhow!("service {s:?}: {e}"))?;
            format!("/v1/drift?service={name}")
        }
        None => "/v1/drift".to_owned(),
    };
    let client = Client::new(home);
    let d: kiln_core::api::DriftResponse = runtime()?.block_on(client.get(&path))?;
    if json {
        crate::commands::print_json(&d)?;
        return Ok(ExitCode::SUCCESS);
    }
    let w = &d.watching;
    println!(
        "watching {} tree{} ({} directories, {} files){}",
        w.trees,
        plural(w.trees as usize),
        w.directories,
        w.files,
        if w.unwatched > 0 {
            format!(
                "; {} directories unwatched (left to the verification)",
                w.unwatched
            )
        } else {
            String::new()
        }
    );
    match &d.verification {
        Some(v) => println!(
            "last full verification {}: {} tree{}, {} files, {} in {:.1}s, {} (every {}, at most {}/s)",
            v.finished,
            v.trees,
            plural(v.trees as usize),
            v.files,
            crate::progress::human_bytes(v.bytes),
            v.seconds,
            match v.drifted {
                0 => "no drift".to_owned(),
                n => format!("{n} drifted"),
            },
            v.every,
            if v.rate == 0 {
                "any speed".to_owned()
            } else {
                crate::progress::human_bytes(v.rate)
            }
        ),
        None => println!("first full verification running"),
    }
    if d.findings.is_empty() {
        println!("no drift found");
        return Ok(ExitCode::SUCCESS);
    }
    for f in &d.findings {
        let what = if f.kind == "tree" {
            let files: Vec<String> = f
                .files
                .iter()
                .map(|x| format!("{} {}", x.path, x.how))
                .collect();
            let more = f.count.saturating_sub(f.files.len());
            format!(
                "tree of {} ({} file{}, found by {}): {}{}; {}",
                f.image
                    .as_ref()
                    .map_or_else(String::new, |i| i.short().to_owned()),
                f.count,
                plural(f.count),
                f.found_by.as_deref().unwrap_or("?"),
                files.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
                match (&f.quarantine, &f.error) {
                    (_, Some(e)) => format!("NOT repaired: {e}"),
                    (Some(q), None) => format!(
                        "fresh tree made, old one kept in {q}; instances of {} replaced",
                        if f.services.is_empty() {
                            "no service".to_owned()
                        } else {
                            f.services.join(", ")
                        }
                    ),
                    (None, None) => "fresh tree made".to_owned(),
                }
            )
        } else {
            format!(
                "instance {} of {} (release {}): {} differ from its launch; replaced",
                f.instance.as_deref().unwrap_or("?"),
                f.services.join(", "),
                f.release.map_or_else(|| "?".to_owned(), |r| r.to_string()),
                f.differs.join(", ")
            )
        };
        println!("{}  {what}", f.time);
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
pub fn logs(
    home: &Path,
    service: &str,
    (release, instance, hook): (Option<u64>, Option<&str>, bool),
    follow: bool,
    since: Option<&str>,
    tail: Option<usize>,
    json: bool,
) -> Result<ExitCode> {
    let mut path = format!("/v1/logs?service={service}");
    if let Some(r) = release {
        path.push_str(&format!("&release={r}"));
    }
    if let Some(i) = instance {
        path.push_str(&format!("&instance={i}"));
    }
    if hook {
        path.push_str("&hook=true");
    }
    if follow {
        path.push_str("&follow=true");
    }
    if let Some(s) = since {
        let t = crate::audit::parse_since(s)?;
        path.push_str(&format!("&since={t}"));
    }
    // Following starts from the last lines, not from all that was kept.
    let tail = tail.or((follow && since.is_none()).then_some(100));
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    let client = Client::new(home);
    if json {
        // JSON Lines: {"instance": ID, "time": STAMP, "line": TEXT} per
        // line of output (`time` null for lines kept before logs were
        // stamped).
        runtime()?.block_on(client.stream_lines(&path, |out, line| {
            let text = String::from_utf8_lossy(line);
            let (id, rest) = text.split_once(" | ").unwrap_or(("", &text));
            let time = kiln_core::logs::stamp_of(rest.as_bytes()).map(str::to_owned);
            let line = match &time {
                Some(t) => &rest[t.len() + 1..],
                None => rest,
            };
            let v = serde_json::json!({ "instance": id, "time": time, "line": line });
            writeln!(out, "{v}")
        }))?;
    } else {
        runtime()?.block_on(client.stream(&path))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The pages of an `error_pages` directory: `NNN.html` files, by status.
fn read_error_pages(dir: &Path) -> Result<BTreeMap<u16, String>> {
    let mut pages = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let status = name
            .strip_suffix(".html")
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (400..=599).contains(s))
            .ok_or_else(|| {
                anyhow::anyhow!("{name} is not NNN.html for an error status (400 to 599)")
            })?;
        let path = entry.path();
        let len = std::fs::metadata(&path)?.len();
        if len > kiln_core::release::MAX_ERROR_PAGE as u64 {
            anyhow::bail!(
                "{name} is {len} bytes, at most {}",
                kiln_core::release::MAX_ERROR_PAGE
            );
        }
        let page =
            std::fs::read_to_string(&path).with_context(|| format!("{name} is not UTF-8 text"))?;
        pages.insert(status, page);
    }
    kiln_core::release::check_error_pages(&pages).map_err(|e| anyhow::anyhow!(e))?;
    Ok(pages)
}

#[cfg(test)]
mod uptime_tests {
    #[test]
    fn uptimes_read_as_people_say_them() {
        assert_eq!(super::uptime(0.25), "0.2s");
        assert_eq!(super::uptime(59.9), "59.9s");
        assert_eq!(super::uptime(658.3), "10m58s");
        assert_eq!(super::uptime(3600.0), "1h00m");
        assert_eq!(super::uptime(11_220.0), "3h07m");
        assert_eq!(super::uptime(187_200.0), "2d04h");
        assert_eq!(super::uptime(-1.0), "0.0s");
    }
}

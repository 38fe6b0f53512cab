//! `kiln audit`: the ledger read (who changed what, when), exported, and
//! verified with nothing but the entries, the checkpoints and the node's
//! public key (`kiln_core::ledger::verify`).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kiln_core::api::AuditResponse;
use kiln_core::ledger::{self, Checkpoint, Entry};
use serde::{Deserialize, Serialize};

use crate::client::{Client, runtime};

/// What `kiln audit` shows.
pub struct Filter {
    pub service: Option<String>,
    pub kind: Option<String>,
    /// Entries at or after this time (RFC 3339, compared as text: every
    /// entry's time is UTC with milliseconds).
    pub since: Option<String>,
}

impl Filter {
    fn keeps(&self, e: &Entry) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| e.service.as_ref() == Some(s))
            && self.kind.as_ref().is_none_or(|k| &e.kind == k)
            && self
                .since
                .as_ref()
                .is_none_or(|t| e.time.as_str() >= t.as_str())
    }
}

/// `--since`: a duration back from now (`1h`, `2d`) or a time (RFC 3339).
pub fn parse_since(s: &str) -> Result<String> {
    if let Ok(d) = humantime::parse_duration(s) {
        let t = std::time::SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| anyhow!("--since {s}: before the epoch"))?;
        return Ok(humantime::format_rfc3339_millis(t).to_string());
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow!("--since {s}: neither a duration (1h, 2d) nor a time (2026-12-01T10:00:00Z)")
    })?;
    Ok(humantime::format_rfc3339_millis(t).to_string())
}

fn print_entry(e: &Entry, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, e)?;
        writeln!(out)?;
        return Ok(());
    }
    let subject = match (&e.service, e.revision, &e.instance) {
        (Some(s), _, Some(i)) => format!("{s} {i}"),
        (Some(s), Some(r), None) => format!("{s} release {r}"),
        (Some(s), None, None) => s.clone(),
        _ => "-".into(),
    };
    let detail = if e.detail == "{}" { "" } else { &e.detail };
    writeln!(
        out,
        "{:>6}  {}  {:<18} {:<24} {:<22} {}",
        e.seq,
        e.time,
        e.actor.as_deref().unwrap_or("?"),
        e.kind,
        subject,
        detail
    )?;
    Ok(())
}

/// `kiln audit [SERVICE] [--kind K] [--since T] [--json] [-f]`.
pub fn show(home: &Path, filter: &Filter, json: bool, follow: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let mut after = 0;
    // A break comes first, before any entry (and before the header, which
    // a reader skims past).
    let whole: AuditResponse = rt.block_on(client.get("/v1/audit?after=0"))?;
    if let Some(bad) = break_in(&whole) {
        if json {
            eprintln!("kiln: the ledger is broken: {bad}");
        } else {
            println!("LEDGER BROKEN: {bad} (kiln audit verify says more)");
        }
    }
    if !json {
        println!(
            "{:>6}  {:<24}  {:<18} {:<24} {:<22} DETAIL",
            "SEQ", "TIME", "ACTOR", "KIND", "SUBJECT"
        );
    }
    loop {
        let r: AuditResponse = rt.block_on(client.get(&format!("/v1/audit?after={after}")))?;
        for e in &r.entries {
            after = after.max(e.seq);
            if filter.keeps(e) {
                print_entry(e, json)?;
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The keys whose checkpoints count in the agent's ledger: its own and
/// every node key its state store lists (a cluster's nodes each sign).
pub(crate) fn agent_keys(r: &AuditResponse) -> Result<Vec<[u8; 32]>, String> {
    let mut keys =
        vec![ledger::parse_public_key(&r.key).map_err(|e| format!("the agent's key: {e}"))?];
    for k in &r.keys {
        let k =
            ledger::parse_public_key(k).map_err(|e| format!("a node key the agent lists: {e}"))?;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    Ok(keys)
}

/// [`ledger::verify_by`] with owned keys.
pub(crate) fn verify_with(
    entries: &[Entry],
    checkpoints: &[Checkpoint],
    keys: &[[u8; 32]],
) -> Result<ledger::Verified, ledger::Bad> {
    let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    ledger::verify_by(entries, checkpoints, &keys)
}

/// What is wrong with the agent's whole ledger, if anything: the chain,
/// the checkpoints (by the key the agent gives), the unsigned end and any
/// break the agent recorded.
fn break_in(r: &AuditResponse) -> Option<ledger::Bad> {
    let keys = match agent_keys(r) {
        Ok(k) => k,
        Err(reason) => return Some(ledger::Bad { seq: None, reason }),
    };
    verify_with(&r.entries, &r.checkpoints, &keys)
        .and_then(|v| {
            ledger::check_tail(
                &r.entries,
                &v,
                ledger::TailLimit::default(),
                std::time::SystemTime::now(),
            )
        })
        .err()
}

/// One line of an export.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    kiln_ledger: u32,
    key: String,
    /// The other nodes' keys the cluster listed (each signs what it
    /// checkpoints): as the header's `key`, proof of nothing on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<String>,
    /// When it was exported (RFC 3339): the end of the ledger is judged
    /// against it, not against when it is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exported: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Entry(Entry),
    Checkpoint(Checkpoint),
}

/// `kiln audit export FILE`: the ledger as JSON Lines (a header with the
/// node's public key, the entries, then the checkpoints), written whole
/// or not at all.
pub fn export(home: &Path, file: &Path, json: bool) -> Result<ExitCode> {
    let rt = runtime()?;
    let client = Client::new(home);
    // An export is judged strictly (every entry under a checkpoint), so
    // it waits for the agent to sign its head: within its
    // --checkpoint-every (10 s by default).
    let signed = |r: &AuditResponse| {
        agent_keys(r)
            .ok()
            .and_then(|k| verify_with(&r.entries, &r.checkpoints, &k).ok())
            .is_some_and(|v| v.signed_through >= v.entries)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut r: AuditResponse = rt.block_on(client.get("/v1/audit?after=0"))?;
    while !signed(&r) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        r = rt.block_on(client.get("/v1/audit?after=0"))?;
    }
    if !signed(&r) {
        eprintln!(
            "note: the ledger's last entries are not signed yet (is the ledger broken? kiln audit verify says): verifying this export needs --allow-unsigned-tail"
        );
    }
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        serde_json::to_writer(
            &mut w,
            &Header {
                kiln_ledger: 1,
                key: r.key.clone(),
                keys: r.keys.iter().filter(|k| **k != r.key).cloned().collect(),
                exported: Some(
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                ),
            },
        )?;
        writeln!(w)?;
        for e in &r.entries {
            serde_json::to_writer(&mut w, &Line::Entry(e.clone()))?;
            writeln!(w)?;
        }
        for c in &r.checkpoints {
            serde_json::to_writer(&mut w, &Line::Checkpoint(c.clone()))?;
            writeln!(w)?;
        }
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(file)
        .map_err(|e| anyhow!("{}: {}", file.display(), e.error))?;
    if json {
        crate::commands::print_json(&serde_json::json!({
            "file": file, "entries": r.entries.len(), "checkpoints": r.checkpoints.len(), "key": r.key
        }))?;
    } else {
        println!(
            "{}: {} entries, {} checkpoints (key {})",
            file.display(),
            r.entries.len(),
            r.checkpoints.len(),
            r.key
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// An export read back: every line must be one of the three kinds.
fn read_export(file: &Path) -> Result<(Header, Vec<Entry>, Vec<Checkpoint>)> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines
        .next()
        .ok_or_else(|| anyhow!("{}: empty, not a ledger export", file.display()))?;
    let header: Header = serde_json::from_str(first)
        .map_err(|_| anyhow!("{}:1: not a kiln ledger export (no header)", file.display()))?;
    if header.kiln_ledger != 1 {
        bail!(
            "{}: ledger export version {} (this kiln reads 1)",
            file.display(),
            header.kiln_ledger
        );
    }
    let (mut entries, mut checkpoints) = (Vec::new(), Vec::new());
    for (i, l) in lines {
        match serde_json::from_str::<Line>(l) {
            Ok(Line::Entry(e)) => entries.push(e),
            Ok(Line::Checkpoint(c)) => checkpoints.push(c),
            Err(e) => bail!("{}:{}: not a ledger line: {e}", file.display(), i + 1),
        }
    }
    Ok((header, entries, checkpoints))
}

fn read_key(path: &Path) -> Result<[u8; 32]> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let text = String::from_utf8(bytes).unwrap_or_default();
    ledger::parse_public_key(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// `kiln audit verify [FILE] [--key PUB]... [--since-checkpoint OLD]`.
pub fn verify(
    home: &Path,
    file: Option<&Path>,
    key: &[std::path::PathBuf],
    since_checkpoint: Option<&Path>,
    allow_unsigned_tail: bool,
    json: bool,
) -> Result<ExitCode> {
    // The keys: those named (a cluster's ledger: one per node), else this
    // home's; for the agent's own ledger, those the agent gives over the
    // (pinned) connection.
    let named: Vec<[u8; 32]> = key.iter().map(|k| read_key(k)).collect::<Result<_>>()?;
    let named = (!named.is_empty()).then_some(named);
    let home_key = || -> Option<[u8; 32]> {
        std::fs::read_to_string(home.join("node.pub"))
            .ok()
            .and_then(|t| ledger::parse_public_key(&t).ok())
    };
    let now = std::time::SystemTime::now();
    let (source, keys, entries, checkpoints, strict) = match file {
        Some(f) => {
            let (header, entries, checkpoints) = read_export(f)?;
            let keys = named
                .or_else(|| home_key().map(|k| vec![k]))
                .ok_or_else(|| {
                    anyhow!("give the node's public key: --key NODE.PUB (an export's own header proves nothing)")
                })?;
            // The header proves nothing, but one that names another key
            // than those given says the file is not what it claims.
            if !ledger::parse_public_key(&header.key).is_ok_and(|k| keys.contains(&k)) {
                bail!(
                    "{}: its header names the key `{}`, not one given: the export was made by another node or rewritten",
                    f.display(),
                    header.key
                );
            }
            // An export waited for its head to be signed: every entry must
            // be under a checkpoint (stripping them is what a rewrite does).
            (f.display().to_string(), keys, entries, checkpoints, true)
        }
        None => {
            let rt = runtime()?;
            let r: AuditResponse = rt.block_on(Client::new(home).get("/v1/audit?after=0"))?;
            let keys = match named {
                Some(k) => k,
                None => agent_keys(&r).map_err(|e| anyhow!(e))?,
            };
            (
                "the agent's ledger".to_owned(),
                keys,
                r.entries,
                r.checkpoints,
                false,
            )
        }
    };
    let v = verify_with(&entries, &checkpoints, &keys).map_err(|bad| anyhow!("{source}: {bad}"))?;
    let limit = if allow_unsigned_tail {
        ledger::TailLimit {
            entries: u64::MAX,
            age: Duration::MAX,
        }
    } else if strict {
        ledger::TailLimit {
            entries: 0,
            age: Duration::ZERO,
        }
    } else {
        ledger::TailLimit::default()
    };
    ledger::check_tail(&entries, &v, limit, now).map_err(|bad| anyhow!("{source}: {bad}"))?;
    if let Some(old) = since_checkpoint {
        let (_, old_entries, old_checkpoints) = read_export(old)?;
        verify_with(&old_entries, &old_checkpoints, &keys)
            .map_err(|bad| anyhow!("{}: {bad}", old.display()))?;
        ledger::is_prefix(&old_entries, &entries)
            .map_err(|bad| anyhow!("{} is not a prefix of {source}: {bad}", old.display()))?;
    }
    if json {
        crate::commands::print_json(&v)?;
    } else {
        println!(
            "{source}: verified: {} entries chained, {} checkpoints, signed through entry {}{}",
            v.entries,
            v.checkpoints,
            v.signed_through,
            if since_checkpoint.is_some() {
                "; the older export is a prefix of it"
            } else {
                ""
            }
        );
        if v.signed_through < v.entries {
            eprintln!(
                "note: entries after {} are chained but not signed yet (the agent signs every 10 s and when it stops)",
                v.signed_through
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `kiln why TARGET`: provenance on demand. From an instance id, the PID of
//! any process inside an instance, or a service: the instance → its
//! release (number, cause, when, by whom) → the image digest → its bake
//! (who, when) → its source (git commit, dirty flag, remote, kiln version)
//! → its signatures → the ledger entries that made it so. Everything shown
//! is checked, not just read: the image's blobs and tree against the
//! image, each signature against the digest, the ledger's chain and
//! checkpoints against the node's key.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use kiln_core::api::{AuditResponse, HistoryResponse, InstanceStatus, StatusResponse};
use kiln_core::ledger::Entry;
use serde::Serialize;

use crate::client::{Client, runtime};
use crate::commands::{open_store, print_json};

#[derive(Serialize)]
struct Why {
    service: String,
    instance: Option<InstanceStatus>,
    release: serde_json::Value,
    image: String,
    image_name: String,
    /// The image's blobs and tree checked against it: the problems found.
    image_problems: Vec<String>,
    baked: Vec<Entry>,
    provenance: Vec<kiln_store::provenance::Provenance>,
    signatures: Vec<kiln_store::sign::Found>,
    /// The ledger entries about this release, and whether the ledger
    /// verified (chain and checkpoints).
    ledger: Vec<Entry>,
    ledger_verified: Result<String, String>,
}

/// The PIDs from `pid` up to init: an instance's process is one of them
/// when `pid` runs inside it.
fn ancestors(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut cur = pid;
    for _ in 0..64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{cur}/stat")) else {
            break;
        };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            break;
        };
        if ppid <= 1 {
            break;
        }
        out.push(ppid);
        cur = ppid;
    }
    out
}

pub fn why(home: &Path, target: &str, json: bool) -> Result<ExitCode> {
    let client = Client::new(home);
    let rt = runtime()?;
    let status: StatusResponse = rt.block_on(client.get("/v1/status"))?;
    let instances = status
        .services
        .iter()
        .flat_map(|s| s.instances.iter().map(move |i| (s, i)));
    let (service, instance) = if let Ok(pid) = target.parse::<u32>() {
        let chain = ancestors(pid);
        let found = instances
            .clone()
            .find(|(_, i)| i.pid.is_some_and(|p| chain.contains(&p)))
            .ok_or_else(|| anyhow!("pid {pid} is not a process of any instance kiln runs"))?;
        (found.0, Some(found.1.clone()))
    } else if let Some((s, i)) = instances.clone().find(|(_, i)| i.id == target) {
        (s, Some(i.clone()))
    } else if let Some(s) = status.services.iter().find(|s| s.name.as_str() == target) {
        let current = s
            .instances
            .iter()
            .find(|i| Some(i.revision) == s.revision)
            .cloned();
        (s, current)
    } else {
        bail!("`{target}` is no instance, process of an instance, or service kiln runs");
    };
    let name = service.name.to_string();
    let revision = instance
        .as_ref()
        .map(|i| i.revision)
        .or(service.revision)
        .ok_or_else(|| anyhow!("service {name} has no release"))?;
    let history: HistoryResponse =
        rt.block_on(client.get(&format!("/v1/services/{name}/history")))?;
    let release = history
        .releases
        .iter()
        .find(|r| r.revision == revision)
        .ok_or_else(|| anyhow!("release {revision} of {name} is not recorded"))?;
    let audit: AuditResponse = rt.block_on(client.get("/v1/audit?after=0"))?;
    let ledger_verified = crate::audit::agent_keys(&audit)
        .and_then(|k| {
            crate::audit::verify_with(&audit.entries, &audit.checkpoints, &k)
                .map_err(|e| e.to_string())
        })
        .map(|v| {
            format!(
                "{} entries chained, signed through entry {}",
                v.entries, v.signed_through
            )
        });
    let digest = release.config.image.clone();
    let about_release: Vec<Entry> = audit
        .entries
        .iter()
        .filter(|e| e.service.as_deref() == Some(name.as_str()) && e.revision == Some(revision))
        .filter(|e| {
            instance.is_none()
                || e.instance.is_none()
                || e.instance.as_deref() == instance.as_ref().map(|i| i.id.as_str())
        })
        .cloned()
        .collect();
    let baked: Vec<Entry> = audit
        .entries
        .iter()
        .filter(|e| {
            e.kind == "image-baked"
                && serde_json::from_str::<serde_json::Value>(&e.detail)
                    .ok()
                    .and_then(|d| d.get("digest").and_then(|x| x.as_str()).map(str::to_owned))
                    .as_deref()
                    == Some(digest.to_string().as_str())
        })
        .cloned()
        .collect();
    // The image, from this home's store (the agent's, when local).
    let store = open_store(home)?;
    let record = store
        .images()?
        .into_iter()
        .find(|r| r.digest == digest)
        .ok_or_else(|| anyhow!("image {digest} is not in the store of {}", home.display()))?;
    let image_problems = kiln_store::verify::verify_image(&store, &record)?
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    let why = Why {
        service: name.clone(),
        instance,
        release: serde_json::to_value(release)?,
        image: digest.to_string(),
        image_name: release.config.image_name.clone(),
        image_problems,
        baked,
        provenance: kiln_store::provenance::statements(&store, &digest)?,
        signatures: kiln_store::sign::signatures(&store, &digest)?,
        ledger: about_release,
        ledger_verified,
    };
    if json {
        print_json(&why)?;
    } else {
        print_why(&why, release);
    }
    Ok(
        if why.image_problems.is_empty() && why.ledger_verified.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn print_why(w: &Why, release: &kiln_core::release::Release) {
    if let Some(i) = &w.instance {
        println!(
            "instance   {} (pid {}, started {}, {:?})",
            i.id,
            i.pid.map_or("-".into(), |p| p.to_string()),
            i.started,
            i.state
        );
    }
    let by = w
        .ledger
        .iter()
        .find(|e| e.kind == "release-created" || e.kind == "rollback")
        .and_then(|e| e.actor.clone())
        .unwrap_or_else(|| "?".into());
    println!(
        "release    {} {}: {} by {by} at {} ({})",
        w.service, release.revision, release.cause, release.created, release.outcome
    );
    println!(
        "image      {}: {}",
        if w.image_name.contains("@sha256:") {
            w.image_name.clone()
        } else {
            format!("{}@{}", w.image_name, w.image)
        },
        if w.image_problems.is_empty() {
            "blobs and tree verified".to_owned()
        } else {
            format!("CORRUPT: {}", w.image_problems.join("; "))
        }
    );
    for b in &w.baked {
        println!(
            "baked      by {} at {} (ledger entry {})",
            b.actor.as_deref().unwrap_or("?"),
            b.time,
            b.seq
        );
    }
    if w.provenance.is_empty() {
        println!("source     unknown (no provenance statement)");
    }
    for p in &w.provenance {
        println!(
            "source     {}git {}{}{}; built by {}",
            if p.verified {
                ""
            } else {
                "UNVERIFIED (not made by a bake of this store; someone claims): "
            },
            p.commit.as_deref().unwrap_or("?"),
            match p.dirty {
                Some(true) => " (dirty)",
                Some(false) => " (clean)",
                None => "",
            },
            p.source
                .as_deref()
                .map(|s| format!(" from {s}"))
                .unwrap_or_default(),
            p.builder.as_deref().unwrap_or("?")
        );
    }
    if w.signatures.is_empty() {
        println!("signed     no");
    }
    for s in &w.signatures {
        println!(
            "signed     by {}: {}",
            s.signer,
            s.problem.as_deref().unwrap_or("valid")
        );
    }
    let seqs: Vec<String> = w
        .ledger
        .iter()
        .map(|e| format!("{} {}", e.seq, e.kind))
        .collect();
    println!("ledger     {}", seqs.join(", "));
    match &w.ledger_verified {
        Ok(v) => println!("           verified: {v}"),
        Err(e) => println!("           NOT VERIFIED: {e}"),
    }
}

//! `kiln push`, `kiln pull`, `kiln login`, `kiln logout`: images to and
//! from OCI registries (see `kiln_store::registry`).

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kiln_core::reference::{ImageRef, Tag};
use kiln_core::registry::{RegistryRef, Target};
use kiln_store::registry::{Credentials, Login, Registry};

use crate::commands::{open_store, plural, print_json, resolve};

use crate::pull::{progress, runtime};

pub fn push(
    home: &Path,
    reference: &str,
    dest: &str,
    insecure: bool,
    json: bool,
) -> Result<ExitCode> {
    // The destination first: a typo costs nothing.
    let mut dest = RegistryRef::parse(dest)?;
    let store = open_store(home)?;
    let img = resolve(&store, reference)?;
    if dest.target.is_none() {
        // The tag in REF, else `latest` (as `docker push` does).
        let tag = match ImageRef::parse(reference)? {
            ImageRef::Tagged(_, t) => t,
            _ => Tag::try_from("latest")?,
        };
        dest.target = Some(Target::Tag(tag));
    }
    if let Some(Target::Digest(_)) = dest.target {
        bail!("{dest}: push to a tag (HOST/REPO:TAG); the digest is the image's own");
    }
    let credentials = Credentials::open(home)?;
    let registry = Registry::new(&dest.host, &credentials, insecure)?;
    let descriptor = kiln_core::oci::Descriptor::new(
        kiln_core::oci::MEDIA_TYPE_MANIFEST,
        img.digest.clone(),
        img.manifest_size,
    );
    let show = progress(json);
    let report = runtime()?
        .block_on(kiln_store::registry::push(
            &store,
            &registry,
            &descriptor,
            &dest,
            &show,
        ))
        .with_context(|| format!("cannot push {} to {dest}", img.pinned()))?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "pushed {} to {} ({} blob{} uploaded, {} bytes; {} mounted from another repository; {} already there; {} referrer{})\n{}",
            img.pinned(),
            report.destination,
            report.uploaded,
            plural(report.uploaded),
            report.uploaded_bytes,
            report.mounted,
            report.skipped,
            report.referrers,
            plural(report.referrers),
            report.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(
    home: &Path,
    src: &str,
    insecure: bool,
    timeout: std::time::Duration,
    json: bool,
) -> Result<ExitCode> {
    let src = RegistryRef::parse(src)?;
    let store = open_store(home)?;
    let report = crate::pull::pull_into(home, &store, &src, insecure, json, timeout)?;
    if json {
        print_json(&report)?;
    } else {
        if report.resolved != report.digest {
            println!(
                "{} is an index ({}); this platform's image:",
                report.source, report.resolved
            );
        }
        println!(
            "pulled {} as {}:{} ({} blob{} downloaded, {} bytes; {} already in the store; {} referrer{})\n{}",
            report.source,
            report.name,
            report.tags.last().map_or("", String::as_str),
            report.downloaded,
            plural(report.downloaded),
            report.downloaded_bytes,
            report.skipped,
            report.referrers,
            plural(report.referrers),
            report.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn login(
    home: &Path,
    host: &str,
    username: Option<&str>,
    password_stdin: bool,
    insecure: bool,
) -> Result<ExitCode> {
    // The host as a registry reference's first component.
    RegistryRef::parse(&format!("{host}/x"))
        .with_context(|| format!("invalid registry host {host}"))?;
    let password = match (username, password_stdin) {
        (Some(_), true) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from stdin")?;
            Some(line.trim_end_matches(['\n', '\r']).to_owned())
        }
        (Some(_), false) => {
            bail!("give the password on stdin (--password-stdin): never on the command line")
        }
        (None, true) => bail!("--password-stdin needs --username"),
        (None, false) => None,
    };
    let mut credentials = Credentials::open(home)?;
    let login = Login {
        username: username.map(str::to_owned),
        password,
        insecure,
    };
    // Checked at once, as `docker login` does: a wrong password is said
    // now, not at the first push, and nothing is kept.
    if username.is_some() {
        let trial = credentials.with(host, login.clone());
        let registry = Registry::new(host, &trial, insecure)?;
        runtime()?
            .block_on(registry.check_login())
            .with_context(|| format!("{host}: not logged in (nothing kept)"))?;
    }
    credentials.save(host, login)?;
    println!(
        "{host}: {}{} (kept in {}, owner-only)",
        match username {
            Some(u) => format!("logged in as {u}"),
            None => "anonymous".to_owned(),
        },
        if insecure { ", plain HTTP" } else { "" },
        home.join("registries.json").display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn logout(home: &Path, host: &str) -> Result<ExitCode> {
    let mut credentials = Credentials::open(home)?;
    if !credentials.forget(host)? {
        bail!("not logged in to {host}");
    }
    println!("{host}: logged out");
    Ok(ExitCode::SUCCESS)
}

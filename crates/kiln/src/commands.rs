//! The store's commands (bake, images, inspect, verify, export, unpack), one
//! function each, and the helpers the agent's commands (`deploy`) share:
//! each resolves its inputs, calls the library, and prints human text by
//! default, JSON with `--json`. `main.rs` dispatches.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln_core::oci::{self, LayerCompression};
use kiln_core::reference::{ImageName, ImageRef, Tag};
use kiln_core::spec::Spec;
use kiln_store::bake::{BakeOptions, BakeReport};
use kiln_store::export::{export_docker_archive, export_oci};
use kiln_store::unpack::{UnpackOptions, unpack_image};
use kiln_store::verify::{verify_image, verify_store};
use kiln_store::{ImageRecord, Store};
use serde::Serialize;

use crate::progress::BakeProgress;

/// `--home`, else `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`.
pub fn resolve_home(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(h) = flag {
        return Ok(h);
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = var("KILN_HOME") {
        return Ok(h);
    }
    if let Some(x) = var("XDG_DATA_HOME") {
        return Ok(x.join("kiln"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".local/share/kiln")),
        None => bail!("cannot find a home for the store: set KILN_HOME or pass --home"),
    }
}

pub fn open_store(home: &Path) -> Result<Store> {
    Store::open(home).with_context(|| format!("cannot open the store at {}", home.display()))
}

pub fn load_spec(file: &Path) -> Result<(Spec, PathBuf)> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read spec {}", file.display()))?;
    let spec = Spec::parse(&text, &file.display().to_string())?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok((spec, dir))
}

/// `kiln check`: what can be known of a spec without an agent or a bake.
pub fn check(file: &Path, json: bool) -> Result<ExitCode> {
    let (spec, dir) = load_spec(file)?;
    for (name, image) in &spec.images {
        let context = dir.join(image.context.as_str());
        if !context.is_dir() {
            bail!(
                "{}: image {name}: context {} is not a directory",
                file.display(),
                context.display()
            );
        }
    }
    kiln_store::sign::allowed(&spec.trust.allowed_signers)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if json {
        print_json(&serde_json::json!({
            "file": file,
            "images": spec.images.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            "services": spec.services.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        }))?;
    } else {
        println!(
            "{}: ok ({} image{}, {} service{})",
            file.display(),
            spec.images.len(),
            plural(spec.images.len()),
            spec.services.len(),
            plural(spec.services.len())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map(Some)
            .with_context(|| format!("SOURCE_DATE_EPOCH={v} is not a number of seconds")),
        _ => Ok(None),
    }
}

pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The base `base` of an image of the spec in `spec_dir`, read and
/// verified: from the store; from a registry, pulled into the store the
/// first time (a tag is then the store's: `kiln pull` moves it); from an
/// OCI layout or a docker archive, read at each bake.
fn resolve_base(
    home: &Path,
    store: &kiln_store::store::Store,
    spec_dir: &Path,
    base: &kiln_core::base::BaseRef,
    baked: &std::collections::BTreeMap<ImageName, kiln_core::Digest>,
    quiet: bool,
) -> Result<Option<kiln_store::base::Base>> {
    use kiln_core::base::BaseRef;
    use kiln_core::registry::Target;
    let name = base.to_string();
    let local = |p: &str| spec_dir.join(p);
    let base = match base {
        BaseRef::Spec(image) => {
            let digest = baked.get(image).with_context(|| {
                format!("base {image}: bake it too (kiln bake {image}), or name it NAME:TAG")
            })?;
            kiln_store::base::Base::from_store(store, &name, digest)?
        }
        BaseRef::Store(r) => {
            let record = store.resolve(r)?;
            kiln_store::base::Base::from_store(store, &name, &record.digest)?
        }
        BaseRef::Registry(r) => {
            let have = match &r.target {
                Some(Target::Digest(d)) => store.has_blob(d).then(|| d.clone()),
                Some(Target::Tag(t)) => {
                    kiln_core::ImageRef::parse(&format!("{}:{t}", r.image_name()))
                        .ok()
                        .and_then(|local| store.resolve(&local).ok())
                        .map(|rec| rec.digest)
                }
                None => None,
            };
            let digest = match have {
                Some(d) => d,
                None => {
                    crate::pull::pull_into(
                        home,
                        store,
                        r,
                        false,
                        quiet,
                        kiln_store::registry::PULL_DEADLINE,
                    )
                    .with_context(|| format!("base {r}"))?
                    .digest
                }
            };
            kiln_store::base::Base::from_store(store, &name, &digest)?
        }
        BaseRef::OciLayout { dir, tag } => {
            kiln_store::base::Base::from_oci_layout(store, &name, &local(dir), tag.as_deref())?
        }
        BaseRef::DockerArchive(file) => {
            kiln_store::base::Base::from_docker_archive(store, &name, &local(file))?
        }
    };
    Ok(Some(base))
}

/// Bake the images of a spec. The spec is read and validated before the
/// store is opened, so a bad spec never creates or touches a store.
pub fn bake_reports(
    home: &Path,
    file: &Path,
    only: &[String],
    tags: &[String],
    quiet: bool,
) -> Result<Vec<(BakeReport, f64)>> {
    let (spec, spec_dir) = load_spec(file)?;
    let tags = tags
        .iter()
        .map(|t| Tag::try_from(t.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let wanted: Vec<ImageName> = if only.is_empty() {
        spec.images.keys().cloned().collect()
    } else {
        only.iter()
            .map(|n| {
                let name = ImageName::try_from(n.as_str())?;
                if !spec.images.contains_key(&name) {
                    bail!(
                        "image `{n}` is not in {} (it has: {})",
                        file.display(),
                        names(&spec)
                    );
                }
                Ok(name)
            })
            .collect::<Result<_>>()?
    };
    if wanted.is_empty() {
        bail!("{} has no [images.NAME] table to bake", file.display());
    }
    // An image whose base is another of the spec's is baked after it (its
    // base too when only it was asked for); the spec has no loop of bases.
    let mut wanted = wanted;
    let mut i = 0;
    while i < wanted.len() {
        if let Some(kiln_core::base::BaseRef::Spec(b)) = &spec.images[&wanted[i]].base
            && !wanted.contains(b)
        {
            wanted.push(b.clone());
        }
        i += 1;
    }
    let depth = |n: &ImageName| {
        let mut n = n.clone();
        let mut d = 0;
        while let Some(kiln_core::base::BaseRef::Spec(b)) = &spec.images[&n].base {
            n = b.clone();
            d += 1;
        }
        d
    };
    wanted.sort_by_key(depth);
    let mut baked: std::collections::BTreeMap<ImageName, kiln_core::Digest> =
        std::collections::BTreeMap::new();
    let options = BakeOptions {
        source_date_epoch: source_date_epoch()?,
        tags,
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let store = open_store(home)?;
    let store = &store;
    let mut out = Vec::new();
    for name in wanted {
        let started = Instant::now();
        let progress = BakeProgress::new(name.as_str());
        let observer: &dyn kiln_store::bake::BakeObserver = if quiet {
            &kiln_store::bake::Quiet
        } else {
            &progress
        };
        let image = &spec.images[&name];
        let report = match &image.base {
            Some(base) => resolve_base(home, store, &spec_dir, base, &baked, quiet),
            None => Ok(None),
        }
        .and_then(|base| {
            Ok(kiln_store::bake::bake_image_on(
                store, &spec_dir, &name, image, base, &options, observer,
            )?)
        })
        .with_context(|| format!("cannot bake image {name}"));
        progress.finish();
        let report = report?;
        // A bake that wrote something is a change: the ledger says who
        // baked what, from which source.
        if report.bytes_written > 0 {
            // The source this bake came from: its statement is the newest.
            let provenance =
                kiln_store::provenance::source(&spec_dir.join(spec.images[&name].context.as_str()));
            let provenance: std::collections::BTreeMap<String, String> = [
                ("commit", provenance.commit),
                ("dirty", provenance.dirty.map(|d| d.to_string())),
                ("source", provenance.origin),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
            record(
                home,
                kiln_core::event::Change::ImageBaked {
                    image: report.image.to_string(),
                    digest: report.digest.clone(),
                    tags: report.tags.iter().map(ToString::to_string).collect(),
                    provenance,
                },
            );
        }
        baked.insert(name.clone(), report.digest.clone());
        out.push((report, started.elapsed().as_secs_f64()));
    }
    Ok(out)
}

fn names(spec: &Spec) -> String {
    spec.images
        .keys()
        .map(ImageName::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sign one image of the store: the signature kept as its referrer.
pub fn sign_one(
    home: &Path,
    store: &kiln_store::Store,
    digest: &kiln_core::Digest,
    key_name: &str,
) -> Result<(String, String)> {
    let path = kiln_store::sign::key_path(home, key_name);
    let manifest = kiln_core::oci::Descriptor::new(
        kiln_core::oci::MEDIA_TYPE_MANIFEST,
        digest.clone(),
        store.read_blob(digest)?.len() as u64,
    );
    // A public key: the SSH agent holds its private half (an encrypted key,
    // a hardware one), and `ssh-keygen -Y sign` asks it, as git does.
    if let Some(signer) = kiln_store::sign::public_key_fingerprint(&path) {
        let pem = sign_with_agent(&path, digest)?;
        kiln_store::sign::keep_signature(store, &manifest, &pem)?;
        return Ok((pem, signer));
    }
    let key = kiln_store::sign::load(&path)?;
    let (pem, _) = kiln_store::sign::sign_image(store, &manifest, &key)?;
    Ok((pem, kiln_store::sign::fingerprint(key.public_key())))
}

/// `ssh-keygen -Y sign -n kiln -f PUBLIC` over the digest: the agent
/// (`SSH_AUTH_SOCK`) signs with the private key of `public`.
fn sign_with_agent(public: &Path, digest: &kiln_core::Digest) -> Result<String> {
    use std::io::Write as _;
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        bail!(
            "{} is a public key: signing with it needs an SSH agent holding its private key (SSH_AUTH_SOCK is not set)",
            public.display()
        );
    }
    let mut child = std::process::Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "kiln", "-q", "-f"])
        .arg(public)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run ssh-keygen (openssh-client) to sign with the agent")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(digest.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -Y sign with the agent's key for {}: {}",
            public.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub use crate::client::record;

pub fn bake(
    home: &Path,
    file: &Path,
    only: &[String],
    tags: &[String],
    sign: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    // A key that cannot sign fails before anything is baked.
    if let Some(k) = sign {
        kiln_store::sign::load(&kiln_store::sign::key_path(home, k))?;
    }
    let reports = bake_reports(home, file, only, tags, false)?;
    if let Some(k) = sign {
        let store = open_store(home)?;
        for (r, _) in &reports {
            let (_, signer) = sign_one(home, &store, &r.digest, k)?;
            if !json {
                eprintln!("  signed {}@{} by {signer}", r.image, r.digest.short());
            }
        }
    }
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a BakeReport,
            seconds: f64,
        }
        let list: Vec<Out> = reports
            .iter()
            .map(|(r, s)| Out {
                report: r,
                seconds: *s,
            })
            .collect();
        print_json(&list)?;
    } else {
        for (r, secs) in &reports {
            print_bake(r, *secs);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_bake(r: &BakeReport, secs: f64) {
    println!("{}@{}", r.image, r.digest);
    eprintln!("{}", bake_summary(r, secs));
}

/// One line on what a bake did: layers written and reused, files read.
pub fn bake_summary(r: &BakeReport, secs: f64) -> String {
    let reused = r.layers.iter().filter(|l| l.reused).count();
    format!(
        "  {} layer{} ({} written, {} reused), {} files ({} read), {} written, {:.2}s; tags: {}",
        r.layers.len(),
        plural(r.layers.len()),
        r.layers.len() - reused,
        reused,
        r.files,
        r.files_hashed,
        crate::progress::human_bytes(r.bytes_written),
        secs,
        r.tags
            .iter()
            .map(|t| format!("{}:{t}", r.image))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// "s" unless `n` is one: `{n} blob{}`.
pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn resolve(store: &Store, reference: &str) -> Result<ImageRecord> {
    let r = ImageRef::parse(reference)?;
    Ok(store.resolve(&r)?)
}

#[derive(Serialize)]
struct ImageRow {
    name: String,
    digest: String,
    tags: Vec<String>,
    layers: usize,
    size: u64,
}

pub fn images(store: &Store, json: bool) -> Result<ExitCode> {
    let mut rows = Vec::new();
    for img in store.images()?.into_iter().rev() {
        let manifest = match store.manifest(&img.digest) {
            Ok(m) => m,
            // Collected since the index was read (a `kiln gc`, or the
            // agent's, runs beside this without the store's lock): it is
            // no longer an image. Still listed, its blob is missing.
            Err(kiln_store::StoreError::MissingBlob(_))
                if !store.images()?.iter().any(|i| i.digest == img.digest) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        rows.push(ImageRow {
            name: img.name.to_string(),
            digest: img.digest.to_string(),
            tags: img.tags.iter().map(ToString::to_string).collect(),
            layers: manifest.layers.len(),
            size: manifest.layers.iter().map(|l| l.size).sum::<u64>() + manifest.config.size,
        });
    }
    if json {
        print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<14} {:<28} {:>6} {:>10}",
        "NAME", "DIGEST", "TAGS", "LAYERS", "SIZE"
    );
    for r in rows {
        println!(
            "{:<20} {:<14} {:<28} {:>6} {:>10}",
            r.name,
            &r.digest["sha256:".len().."sha256:".len() + 12],
            r.tags.join(","),
            r.layers,
            crate::progress::human_bytes(r.size)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct LayerInfo {
    digest: String,
    media_type: String,
    size: u64,
    name: Option<String>,
    /// `N/COUNT` when the declared layer was stored in parts.
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<String>,
    files: usize,
}

pub fn inspect(store: &Store, reference: &str, json: bool) -> Result<ExitCode> {
    let img = resolve(store, reference)?;
    let manifest = store.manifest(&img.digest)?;
    let config = store.config(&manifest)?;
    let mut layers = Vec::new();
    for l in &manifest.layers {
        layers.push(LayerInfo {
            digest: l.digest.to_string(),
            media_type: l.media_type.clone(),
            size: l.size,
            name: l.annotations.get(oci::ANNOTATION_LAYER_NAME).cloned(),
            part: l.annotations.get(oci::ANNOTATION_LAYER_PART).cloned(),
            files: count_layer_files(store, l)?,
        });
    }
    let files = match store.tree(&img.digest)? {
        Some(tree) => tree.manifest.file_count(),
        None => layers.iter().map(|l| l.files).sum(),
    };
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            name: String,
            digest: String,
            tags: Vec<String>,
            files: usize,
            layers: Vec<LayerInfo>,
            manifest: &'a oci::Manifest,
            config: &'a oci::ImageConfig,
            /// Where it was baked from (its provenance statements).
            provenance: Vec<kiln_store::provenance::Provenance>,
            /// Its signatures, each checked.
            signatures: Vec<kiln_store::sign::Found>,
        }
        print_json(&Out {
            name: img.name.to_string(),
            digest: img.digest.to_string(),
            tags: img.tags.iter().map(ToString::to_string).collect(),
            files,
            layers,
            manifest: &manifest,
            config: &config,
            provenance: kiln_store::provenance::statements(store, &img.digest)?,
            signatures: kiln_store::sign::signatures(store, &img.digest)?,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("image:        {}", img.pinned());
    println!(
        "tags:         {}",
        img.tags
            .iter()
            .map(|t| format!("{}:{t}", img.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("platform:     {}/{}", config.os, config.architecture);
    if let Some(c) = &config.created {
        println!("created:      {c}");
    }
    let c = &config.config;
    if !c.entrypoint.is_empty() {
        println!("entrypoint:   {:?}", c.entrypoint);
    }
    if !c.cmd.is_empty() {
        println!("cmd:          {:?}", c.cmd);
    }
    if let Some(w) = &c.working_dir {
        println!("workdir:      {w}");
    }
    for e in &c.env {
        println!("env:          {e}");
    }
    for p in c.exposed_ports.keys() {
        println!("port:         {p}");
    }
    for (k, v) in &c.labels {
        println!("label:        {k}={v}");
    }
    println!("files:        {files}");
    println!(
        "size:         {}",
        crate::progress::human_bytes(manifest.layers.iter().map(|l| l.size).sum())
    );
    println!("layers:");
    for l in &layers {
        println!(
            "  {}  {:>10}  {:>6} files  {}{}",
            &l.digest[..19],
            crate::progress::human_bytes(l.size),
            l.files,
            l.name.as_deref().unwrap_or(""),
            l.part
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        );
    }
    println!("provenance:");
    for (k, v) in &manifest.annotations {
        println!("  {k}: {v}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Regular files in one layer (streamed; the blob is not trusted for more).
fn count_layer_files(store: &Store, layer: &oci::Descriptor) -> Result<usize> {
    let Some(compression) = LayerCompression::from_media_type(&layer.media_type) else {
        return Ok(0);
    };
    let blob = std::io::BufReader::new(store.open_blob(&layer.digest)?);
    let reader = kiln_store::unpack::decompress(compression, blob)?;
    let mut archive = tar::Archive::new(reader);
    let mut n = 0;
    for e in archive.entries()? {
        let e = e.with_context(|| format!("layer {} is unreadable", layer.digest))?;
        if e.header().entry_type().is_file() {
            n += 1;
        }
    }
    Ok(n)
}

pub fn verify(store: &Store, reference: Option<&str>, json: bool) -> Result<ExitCode> {
    let report = match reference {
        Some(r) => verify_image(store, &resolve(store, r)?)?,
        None => verify_store(store)?,
    };
    if json {
        print_json(&report)?;
    } else {
        for p in &report.problems {
            eprintln!("kiln: corrupt: {p}");
        }
        if report.problems.is_empty() {
            println!(
                "ok: {} blobs and {} trees verified",
                report.blobs_checked, report.trees_checked
            );
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn export(
    store: &Store,
    reference: &str,
    oci: Option<&Path>,
    docker: Option<&Path>,
    tag: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let img = resolve(store, reference)?;
    let tag = match (tag, ImageRef::parse(reference)?) {
        (Some(t), _) => Tag::try_from(t)?,
        (None, ImageRef::Tagged(_, t)) => t,
        (None, _) => Tag::automatic(&img.digest),
    };
    let mut done = Vec::new();
    if let Some(dir) = oci {
        export_oci(store, &img, dir, &tag)
            .with_context(|| format!("cannot export {} to {}", img.pinned(), dir.display()))?;
        done.push(serde_json::json!({
            "format": "oci", "path": dir, "tag": tag.to_string(),
        }));
        if !json {
            println!("exported {} to oci:{}:{tag}", img.pinned(), dir.display());
        }
    }
    if let Some(file) = docker {
        let repo_tag = format!("{}:{tag}", img.name);
        export_docker_archive(store, &img, file, &repo_tag)
            .with_context(|| format!("cannot export {} to {}", img.pinned(), file.display()))?;
        done.push(serde_json::json!({
            "format": "docker-archive", "path": file, "tag": repo_tag,
        }));
        if !json {
            println!(
                "exported {} to docker-archive:{} as {repo_tag}",
                img.pinned(),
                file.display()
            );
        }
    }
    if json {
        print_json(&serde_json::json!({
            "image": img.name.to_string(),
            "digest": img.digest,
            "exported": done,
        }))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unpack(store: &Store, reference: &str, dir: Option<&Path>, json: bool) -> Result<ExitCode> {
    let img = resolve(store, reference)?;
    let (path, files) = match dir {
        None => {
            let tree = store
                .materialize(&img.digest)
                .with_context(|| format!("cannot materialize {}", img.pinned()))?;
            (tree.rootfs, tree.manifest.file_count())
        }
        Some(dir) => {
            let files = unpack_to(store, &img, dir).with_context(|| {
                format!("cannot unpack {} into {}", img.pinned(), dir.display())
            })?;
            (dir.to_path_buf(), files)
        }
    };
    if json {
        print_json(&serde_json::json!({
            "image": img.pinned(),
            "path": path,
            "files": files,
            "read_only": dir.is_none(),
        }))?;
    } else {
        println!("{}", path.display());
        eprintln!("unpacked {} ({files} files)", img.pinned());
    }
    Ok(ExitCode::SUCCESS)
}

/// Unpack into a sibling temp directory, then rename: a refused (hostile)
/// image leaves nothing at `dir`.
fn unpack_to(store: &Store, img: &ImageRecord, dir: &Path) -> Result<usize> {
    if std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_some()) {
        bail!("{} is not empty", dir.display());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".kiln-unpack-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    let manifest = store.manifest(&img.digest)?;
    let config = store.config(&manifest)?;
    unpack_image(
        store,
        &manifest,
        &config,
        staging.path(),
        UnpackOptions::default(),
    )?;
    let files = kiln_store::tree::scan_tree(staging.path())?.file_count();
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e)
            .with_context(|| format!("cannot move the unpacked tree to {}", dir.display()));
    }
    Ok(files)
}

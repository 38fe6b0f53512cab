//! `kiln demo`: kiln at work on the example app, in a temporary home.
//!
//! Until the deploy engine exists, the demo shows the bake half of the loop:
//! a reproducible bake, an incremental re-bake, the read-only tree, a check
//! of the store and an export other tools read.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::commands::{bake_reports, bake_summary, open_store};

const SPEC: &str = include_str!("../../../examples/hello/kiln.toml");
const INDEX_HTML: &str = include_str!("../../../examples/hello/static/index.html");

/// Where the example app's binary is: beside `kiln` (both built by the
/// workspace), or `$KILN_HELLO_BIN`.
pub fn hello_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_HELLO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let candidate = exe.with_file_name("hello");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "the example app `hello` is not beside {} (build the whole workspace: `cargo build --release`)",
            exe.display()
        )
    }
}

/// Write the example app's context (binary, static file, spec) into `dir`.
pub fn stage_example(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(dir.join("static"))?;
    std::fs::copy(hello_binary()?, bin.join("hello")).context("cannot copy the hello binary")?;
    std::fs::write(dir.join("static/index.html"), INDEX_HTML)?;
    let spec = dir.join("kiln.toml");
    std::fs::write(&spec, SPEC)?;
    Ok(spec)
}

pub fn run(home: Option<PathBuf>, keep: bool) -> Result<ExitCode> {
    let work = tempfile::Builder::new().prefix("kiln-demo-").tempdir()?;
    let home = home.unwrap_or_else(|| work.path().join("home"));
    let store = open_store(&home)?;
    let spec = stage_example(&work.path().join("hello"))?;
    // The stat cache does not trust files changed within 100 ms of a bake
    // (their timestamps could hide a further change); let the fresh copies age.
    std::thread::sleep(std::time::Duration::from_millis(150));
    let bold = std::io::stdout().is_terminal();
    let step = |n: u32, text: &str| {
        if bold {
            println!("\n\x1b[1m{n}. {text}\x1b[0m");
        } else {
            println!("\n{n}. {text}");
        }
    };
    let print_bake = |r: &kiln_store::bake::BakeReport, secs: f64| {
        println!("   {}@{}", r.image, r.digest);
        println!(" {}", bake_summary(r, secs));
    };

    step(
        1,
        "bake the example app (examples/hello) into a content-addressed OCI image",
    );
    let (first, secs) = bake_reports(&home, &spec, &[], &[], false)?.remove(0);
    print_bake(&first, secs);

    step(
        2,
        "bake again with nothing changed: no file is read, every layer is reused",
    );
    let (again, secs) = bake_reports(&home, &spec, &[], &[], false)?.remove(0);
    print_bake(&again, secs);
    println!(
        "   same digest: {}",
        if again.digest == first.digest {
            "yes"
        } else {
            "NO"
        }
    );

    step(
        3,
        "change one static file and bake: only its layer is written",
    );
    let index = spec.with_file_name("static/index.html");
    std::fs::write(&index, format!("{INDEX_HTML}<p>changed</p>\n"))?;
    let (changed, secs) = bake_reports(&home, &spec, &[], &[], false)?.remove(0);
    print_bake(&changed, secs);

    step(
        4,
        "materialize the image's read-only tree and verify the store",
    );
    let started = Instant::now();
    let tree = store.materialize(&changed.digest)?;
    println!(
        "   {} files at {} in {:.0} ms, each recorded with its sha256",
        tree.manifest.file_count(),
        tree.rootfs.display(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let report = kiln_store::verify::verify_store(&store)?;
    println!(
        "   {} blobs and {} trees verified, {} problems",
        report.blobs_checked,
        report.trees_checked,
        report.problems.len()
    );

    step(
        5,
        "the store is a plain OCI image layout: other tools read it",
    );
    println!(
        "   skopeo inspect oci:{}:hello:{}",
        home.display(),
        changed.digest.short()
    );
    println!("   kiln --home {} images", home.display());

    if keep {
        let kept = work.keep();
        println!("\nkept {}", kept.display());
    } else {
        println!("\n(run with --keep to keep the demo's home and look around)");
    }
    Ok(ExitCode::SUCCESS)
}

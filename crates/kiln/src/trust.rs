//! Signing keys and image signatures: `kiln key`, `kiln sign`, `kiln
//! signatures` (the format and its storage are `kiln_store::sign`'s).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use kiln_store::sign;

use crate::commands::{open_store, print_json, resolve, sign_one};

/// `kiln key generate [NAME]`.
pub fn key_generate(home: &Path, name: &str, json: bool) -> Result<ExitCode> {
    if name.is_empty() || name.contains(['/', '.']) || name.starts_with('-') {
        return Err(anyhow!(
            "invalid key name `{name}`: a file name, without / or ."
        ));
    }
    let (path, public) = sign::generate(home, name)?;
    let line = public.to_openssh()?;
    if json {
        print_json(&serde_json::json!({
            "name": name, "path": path, "public_key": line, "fingerprint": sign::fingerprint(&public)
        }))?;
    } else {
        println!("{line}");
        eprintln!(
            "key {name}: {} (private, 0600) and {}.pub; fingerprint {}",
            path.display(),
            path.display(),
            sign::fingerprint(&public)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln key list`: the keys in `$KILN_HOME/keys`.
pub fn key_list(home: &Path, json: bool) -> Result<ExitCode> {
    let mut keys = Vec::new();
    if let Ok(rd) = std::fs::read_dir(home.join("keys")) {
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pub") {
                continue;
            }
            if let Ok(k) = sign::load(&path) {
                keys.push((
                    e.file_name().to_string_lossy().into_owned(),
                    sign::fingerprint(k.public_key()),
                ));
            }
        }
    }
    keys.sort();
    if json {
        let v: Vec<_> = keys
            .iter()
            .map(|(n, f)| serde_json::json!({"name": n, "fingerprint": f}))
            .collect();
        print_json(&v)?;
    } else {
        for (n, f) in &keys {
            println!("{n:<24} {f}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln sign REF [--key NAME] [--output FILE]`.
pub fn sign_ref(
    home: &Path,
    reference: &str,
    key: &str,
    output: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    let store = open_store(home)?;
    let image = resolve(&store, reference)?;
    let (pem, signer) = sign_one(home, &store, &image.digest, key)?;
    if let Some(out) = output {
        std::fs::write(out, &pem).map_err(|e| anyhow!("{}: {e}", out.display()))?;
    }
    if json {
        print_json(&serde_json::json!({"image": image.pinned(), "signer": signer}))?;
    } else {
        println!("signed {} by {signer}", image.pinned());
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln signatures REF`: every signature on the image, checked.
pub fn signatures(home: &Path, reference: &str, json: bool) -> Result<ExitCode> {
    let store = open_store(home)?;
    let image = resolve(&store, reference)?;
    let found = sign::signatures(&store, &image.digest)?;
    if json {
        print_json(&found)?;
    } else if found.is_empty() {
        println!("{}: no signature", image.pinned());
    } else {
        for f in &found {
            match &f.problem {
                None => println!("{}: valid ({})", f.signer, f.key),
                Some(p) => println!("{}: INVALID: {p}", f.signer),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

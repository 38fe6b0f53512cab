//! What an instance's root holds besides what its runtime provides (the
//! sandbox's and the OCI runtime's alike): the image's top-level entries,
//! bound read-only, and — for an image without a userland of its own — the
//! host's `/usr` and loader paths and a few `/etc` files.

use std::path::{Path, PathBuf};

use super::Launch;

/// The host's directories an image without them borrows.
pub(super) const HOST_DIRS: [&str; 6] = ["usr", "lib", "lib64", "lib32", "bin", "sbin"];
/// The host's `/etc` files an image without an `/etc` borrows.
pub(super) const HOST_ETC: [&str; 9] = [
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "passwd",
    "group",
    "ld.so.cache",
    "localtime",
    "ssl",
    "ca-certificates",
];

/// One entry of an instance's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Bound read-only from the host path (a directory or a file).
    Bind {
        inside: String,
        host: PathBuf,
        dir: bool,
    },
    /// A symbolic link made in the root.
    Link { inside: String, target: PathBuf },
}

/// The entries of `launch`'s root, read from its tree and the host, but
/// the top-level names the runtime provides itself (`own`: `/proc`,
/// `/dev`, `/tmp` …), in the order they are to be mounted.
pub fn entries(launch: &Launch, own: &[&str]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut image_top = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&launch.rootfs) {
        let mut items: Vec<_> = rd.flatten().collect();
        items.sort_by_key(|e| e.file_name());
        for e in items {
            let name = e.file_name().to_string_lossy().into_owned();
            if own.contains(&name.as_str()) {
                continue;
            }
            let inside = format!("/{name}");
            match std::fs::read_link(e.path()) {
                Ok(target) => out.push(Entry::Link { inside, target }),
                Err(_) => out.push(Entry::Bind {
                    inside,
                    dir: e.path().is_dir(),
                    host: e.path(),
                }),
            }
            image_top.push(name);
        }
    }
    if !launch.self_contained {
        for dir in HOST_DIRS {
            if image_top.iter().any(|t| t == dir) {
                continue;
            }
            let host = Path::new("/").join(dir);
            let inside = format!("/{dir}");
            match std::fs::read_link(&host) {
                Ok(target) => out.push(Entry::Link { inside, target }),
                Err(_) if host.is_dir() => out.push(Entry::Bind {
                    inside,
                    host,
                    dir: true,
                }),
                Err(_) => {}
            }
        }
        if !image_top.iter().any(|t| t == "etc") {
            for f in HOST_ETC {
                let host = Path::new("/etc").join(f);
                if host.exists() {
                    out.push(Entry::Bind {
                        inside: format!("/etc/{f}"),
                        dir: host.is_dir(),
                        host,
                    });
                }
            }
        }
    }
    out
}

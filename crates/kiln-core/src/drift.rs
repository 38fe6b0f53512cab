//! Drift, decided: what differs between what runs and what was released.
//! Two kinds: a **tree** (an image's read-only root filesystem no longer
//! matches the manifest made when it was unpacked: a file edited, added,
//! removed, its mode changed) and a **configuration** (an instance's root
//! process no longer has the command line or environment its release
//! launched). Nothing here reads a file or a clock: the agent's detector
//! reads `/proc` and the trees and passes the bytes and times in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::tree::TreeDrift;

/// At most this many files are named in one finding (the count says how
/// many there were): a ledger entry stays small whatever was changed.
pub const MAX_FILES: usize = 50;

/// What found a tree's drift: the watch (a change as it happened) or the
/// periodic full verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoundBy {
    Watch,
    Verification,
}

impl std::fmt::Display for FoundBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Watch => "watch",
            Self::Verification => "verification",
        })
    }
}

/// One file of a tree that is not what the image says, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftedFile {
    pub path: String,
    /// `content changed`, `mode changed`, `type changed`, `link target
    /// changed`, `missing`, or `not in the image`.
    pub how: String,
}

impl From<&TreeDrift> for DriftedFile {
    fn from(d: &TreeDrift) -> Self {
        let how = match d {
            TreeDrift::Missing { .. } => "missing".to_owned(),
            TreeDrift::Added { .. } => "not in the image".to_owned(),
            TreeDrift::Changed { what, .. } => format!("{what} changed"),
        };
        Self {
            path: d.path().to_owned(),
            how,
        }
    }
}

/// The files a finding names: the first [`MAX_FILES`] by path.
pub fn named_files(drift: &[TreeDrift]) -> Vec<DriftedFile> {
    drift
        .iter()
        .take(MAX_FILES)
        .map(DriftedFile::from)
        .collect()
}

/// What an instance's root process was started as: its command line and
/// its whole environment (the runtimes clear the agent's own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Launched {
    pub argv: Vec<Vec<u8>>,
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Launched {
    /// How a process looks now, from its `/proc/PID/cmdline` and
    /// `/proc/PID/environ`.
    pub fn from_proc(cmdline: &[u8], environ: &[u8]) -> Self {
        Self {
            argv: split_nul(cmdline).map(<[u8]>::to_vec).collect(),
            env: split_nul(environ)
                .map(|var| match var.iter().position(|&b| b == b'=') {
                    Some(i) => (var[..i].to_vec(), var[i + 1..].to_vec()),
                    None => (var.to_vec(), Vec::new()),
                })
                .collect(),
        }
    }
}

/// How the `live` process (as [`Launched::from_proc`] reads it) differs
/// from how it was `launched`. Names only, never a value: an environment
/// holds secrets. Empty when it is as launched.
pub fn config_drift(launched: &Launched, live: &Launched) -> Vec<String> {
    let mut out = Vec::new();
    if live.argv != launched.argv {
        out.push("command line".to_owned());
    }
    let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    for (n, v) in &launched.env {
        match live.env.get(n) {
            None => out.push(format!("environment: {} removed", name(n))),
            Some(got) if got != v => out.push(format!("environment: {} changed", name(n))),
            Some(_) => {}
        }
    }
    for n in live.env.keys() {
        if !launched.env.contains_key(n) {
            out.push(format!("environment: {} added", name(n)));
        }
    }
    out
}

/// The NUL-terminated strings of a `/proc` file (a last one without its
/// NUL counts too).
fn split_nul(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    bytes.split(|&b| b == 0).filter(move |_| !bytes.is_empty())
}

/// The first wait between two repairs of one tree, and the longest.
pub const REPAIR_BACKOFF: Duration = Duration::from_secs(2);
pub const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Whether a tree found drifted at `now` is repaired now, given its last
/// repair (when, and the wait set then). `Ok(wait)`: repair now, and the
/// next repair waits `wait` — doubled (to [`REPAIR_BACKOFF_MAX`]) when it
/// drifted again within twice the last wait, else [`REPAIR_BACKOFF`].
/// `Err(at)`: not before `at`. An instance that writes into its own tree
/// (the `process` runtime cannot stop it) is so replaced ever more rarely
/// instead of in a loop.
pub fn repair_backoff(
    last: Option<(Instant, Duration)>,
    now: Instant,
) -> Result<Duration, Instant> {
    match last {
        Some((at, wait)) if now < at + wait => Err(at + wait),
        Some((at, wait)) if now.saturating_duration_since(at) < wait * 2 => {
            Ok((wait * 2).min(REPAIR_BACKOFF_MAX))
        }
        _ => Ok(REPAIR_BACKOFF),
    }
}

/// Paces a verification to at most `rate` bytes a second, so that it never
/// starves the instances of the disk: after each read, [`Pace::wait`] says
/// how long to sleep before the next.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    rate: u64,
    started: Instant,
    done: u64,
}

impl Pace {
    /// `rate` bytes a second from `started`; 0 means unpaced.
    pub fn new(rate: u64, started: Instant) -> Self {
        Self {
            rate,
            started,
            done: 0,
        }
    }

    /// `n` more bytes were read at `now`: how long to wait before reading on.
    pub fn wait(&mut self, n: u64, now: Instant) -> Duration {
        self.done = self.done.saturating_add(n);
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        due.saturating_sub(now.saturating_duration_since(self.started))
    }

    pub fn bytes(&self) -> u64 {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn launched(argv: &[&str], env: &[(&str, &str)]) -> Launched {
        Launched {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn a_process_as_launched_has_no_drift() {
        let l = launched(&["/bin/app", "-p", "80"], &[("A", "1"), ("B", "x=y")]);
        assert!(
            config_drift(
                &l,
                &Launched::from_proc(b"/bin/app\0-p\080\0", b"B=x=y\0A=1\0")
            )
            .is_empty()
        );
        let empty = launched(&[], &[]);
        assert!(config_drift(&empty, &Launched::from_proc(b"", b"")).is_empty());
    }

    #[test]
    fn each_difference_is_named_without_its_value() {
        let l = launched(&["/bin/app"], &[("TOKEN", "s3cret"), ("GONE", "1")]);
        let found = config_drift(
            &l,
            &Launched::from_proc(b"/bin/sh\0-c\0evil\0", b"TOKEN=stolen\0LD_PRELOAD=/x.so\0"),
        );
        assert_eq!(
            found,
            [
                "command line",
                "environment: GONE removed",
                "environment: TOKEN changed",
                "environment: LD_PRELOAD added",
            ]
        );
        assert!(
            found
                .iter()
                .all(|f| !f.contains("s3cret") && !f.contains("stolen"))
        );
    }

    #[test]
    fn a_tree_drift_names_how_each_file_differs() {
        let d = [
            TreeDrift::Changed {
                path: "app/main.py".into(),
                what: "content",
            },
            TreeDrift::Missing { path: "a".into() },
            TreeDrift::Added { path: "b".into() },
        ];
        let files = named_files(&d);
        assert_eq!(files[0].how, "content changed");
        assert_eq!(files[1].how, "missing");
        assert_eq!(files[2].how, "not in the image");
        let many: Vec<TreeDrift> = (0..200)
            .map(|i| TreeDrift::Added {
                path: format!("f{i}"),
            })
            .collect();
        assert_eq!(named_files(&many).len(), MAX_FILES);
    }

    #[test]
    fn a_tree_that_keeps_drifting_is_repaired_ever_more_rarely() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // The first repair is at once.
        assert_eq!(repair_backoff(None, t0), Ok(REPAIR_BACKOFF));
        // Drifted again inside the wait: not before its end.
        let last = Some((t0, s(2)));
        assert_eq!(repair_backoff(last, t0 + s(1)), Err(t0 + s(2)));
        // Right after it: repaired, and the next wait doubles...
        assert_eq!(repair_backoff(last, t0 + s(3)), Ok(s(4)));
        // ...up to the cap.
        assert_eq!(
            repair_backoff(Some((t0, s(200))), t0 + s(250)),
            Ok(REPAIR_BACKOFF_MAX)
        );
        // Quiet for twice the wait: back to the first wait.
        assert_eq!(
            repair_backoff(Some((t0, s(64))), t0 + s(200)),
            Ok(REPAIR_BACKOFF)
        );
    }

    #[test]
    fn a_pace_holds_its_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(100, t0);
        // 50 bytes at once: they are due at 0.5 s.
        assert_eq!(p.wait(50, t0), Duration::from_millis(500));
        // Later than due: no wait.
        assert_eq!(p.wait(10, t0 + Duration::from_secs(2)), Duration::ZERO);
        let mut free = Pace::new(0, t0);
        assert_eq!(free.wait(1 << 30, t0), Duration::ZERO);
        assert_eq!(free.bytes(), 1 << 30);
    }

    proptest! {
        /// Any environment and command line read back as launched shows no
        /// drift; changing any one value shows exactly that name.
        #[test]
        fn what_was_launched_reads_back_clean(
            argv in prop::collection::vec("[a-z/=-]{1,8}", 0..5),
            env in prop::collection::btree_map("[A-Z_]{1,6}", "[ -~]{0,8}", 0..6),
            pick in any::<prop::sample::Index>(),
        ) {
            let l = Launched {
                argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
                env: env.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
            };
            let cmdline: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
            let environ = |env: &BTreeMap<String, String>| -> Vec<u8> {
                env.iter().flat_map(|(k, v)| format!("{k}={v}\0").into_bytes()).collect()
            };
            prop_assert!(config_drift(&l, &Launched::from_proc(&cmdline, &environ(&env))).is_empty());
            prop_assert_eq!(&Launched::from_proc(&cmdline, &environ(&env)), &l);
            if !env.is_empty() {
                let name = env.keys().nth(pick.index(env.len())).unwrap().clone();
                let mut changed = env.clone();
                changed.get_mut(&name).unwrap().push('!');
                prop_assert_eq!(
                    config_drift(&l, &Launched::from_proc(&cmdline, &environ(&changed))),
                    vec![format!("environment: {name} changed")]
                );
            }
        }
    }
}

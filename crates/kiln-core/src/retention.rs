//! Which images a store collection must keep for the agent: every image a
//! kept release names. Kept, per service: its last `keep_releases`
//! releases (what `kiln rollback --to N` may return to), and whatever it
//! runs or moves to (its target, an active or pending release), however
//! old. Pure: the releases and targets come in, the images go out.

use std::collections::{BTreeMap, BTreeSet};

use crate::digest::Digest;
use crate::release::{Outcome, Release};
use crate::spec::ServiceName;

/// The default of `--keep-releases`.
pub const KEEP_RELEASES: usize = 10;

/// The images to keep, given every release (any order) and each existing
/// service's target release.
pub fn kept_images(
    releases: &[Release],
    targets: &BTreeMap<ServiceName, u64>,
    keep_releases: usize,
) -> BTreeSet<Digest> {
    let mut by_service: BTreeMap<&ServiceName, Vec<&Release>> = BTreeMap::new();
    for r in releases {
        by_service.entry(&r.service).or_default().push(r);
    }
    let mut out = BTreeSet::new();
    for (service, mut rs) in by_service {
        rs.sort_by_key(|r| std::cmp::Reverse(r.revision));
        for (i, r) in rs.iter().enumerate() {
            let runs = matches!(r.outcome, Outcome::Active | Outcome::Pending)
                || targets.get(service) == Some(&r.revision);
            if i < keep_releases || runs {
                out.insert(r.config.image.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::ReleaseConfig;

    fn release(service: &str, revision: u64, image: &[u8], outcome: Outcome) -> Release {
        let config: ReleaseConfig = serde_json::from_value(serde_json::json!({
            "image": Digest::of(image),
            "image_name": "app",
            "command": ["/bin/app"],
            "workdir": "/",
            "env": {},
            "volumes": {},
            "runtime": "process",
            "health": {},
            "stop": { "signal": "TERM", "drain_timeout": "5s", "kill_timeout": "10s" },
        }))
        .unwrap();
        let mut r = Release::pending(
            ServiceName::try_from(service).unwrap(),
            revision,
            config,
            "apply".into(),
            "2026-12-01T00:00:00Z".into(),
        );
        r.outcome = outcome;
        r
    }

    #[test]
    fn the_last_n_releases_and_whatever_runs_are_kept() {
        let mut all: Vec<Release> = (1..=12)
            .map(|i| release("web", i, format!("img{i}").as_bytes(), Outcome::Superseded))
            .collect();
        // Release 1 is what runs (a rollback target far back).
        all[0].outcome = Outcome::Active;
        all.push(release("api", 1, b"api1", Outcome::Failed));
        let targets = BTreeMap::from([(ServiceName::try_from("web").unwrap(), 1)]);
        let kept = kept_images(&all, &targets, 3);
        let want: BTreeSet<Digest> = [b"img12".as_slice(), b"img11", b"img10", b"img1", b"api1"]
            .iter()
            .map(|b| Digest::of(b))
            .collect();
        assert_eq!(kept, want);
        // Zero kept releases still keeps what runs.
        let kept = kept_images(&all, &targets, 0);
        assert_eq!(kept, BTreeSet::from([Digest::of(b"img1")]));
    }
}

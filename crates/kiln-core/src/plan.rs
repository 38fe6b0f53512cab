//! The planner: desired services against what the agent has → a [`Plan`]
//! that `kiln plan` prints and `kiln apply` executes. Pure: same inputs,
//! same plan.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::release::{DesiredService, ReleaseConfig, ServiceSettings};
use crate::spec::ServiceName;

/// What the agent has for one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentService {
    pub settings: ServiceSettings,
    /// The release the service is on (or moving to), if any.
    pub release: Option<(u64, ReleaseConfig)>,
    /// The highest revision recorded: after a failed release the service is
    /// back on an earlier one, and the next release numbers past both.
    pub latest: u64,
    /// Removed (`kiln remove`), its releases kept: applied again, it is
    /// created anew, numbered past them.
    #[serde(default)]
    pub removed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A new service: release 1.
    Create,
    /// A new release (image or config changed).
    Release,
    /// Only settings (replicas, listen, rollout) changed: no new release.
    Settings,
    Unchanged,
    /// Not in the spec, and `--prune` given: removed (its instances
    /// stopped, its history kept).
    Remove,
    /// Not in the spec: left running (no `--prune`).
    LeftRunning,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    pub service: ServiceName,
    pub action: Action,
    /// The revision the service will be on.
    pub revision: Option<u64>,
    /// What differs, one item each (env values are not shown: they may be secrets).
    pub changes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
}

impl Plan {
    /// Nothing would change (a service left running changes nothing).
    pub fn is_empty(&self) -> bool {
        self.services
            .iter()
            .all(|s| matches!(s.action, Action::Unchanged | Action::LeftRunning))
    }

    /// The services not in the spec that stay running.
    pub fn left_running(&self) -> impl Iterator<Item = &ServiceName> {
        self.services
            .iter()
            .filter(|s| s.action == Action::LeftRunning)
            .map(|s| &s.service)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            writeln!(f, "no changes")?;
        }
        for s in &self.services {
            if self.is_empty() && s.action != Action::LeftRunning {
                continue;
            }
            let rev = s
                .revision
                .map(|r| format!(" release {r}"))
                .unwrap_or_default();
            match s.action {
                Action::Unchanged => writeln!(f, "  {}: unchanged{rev}", s.service)?,
                Action::Create => writeln!(f, "+ {}: create{rev}", s.service)?,
                Action::Release => writeln!(f, "~ {}: new{rev}", s.service)?,
                Action::Settings => writeln!(f, "~ {}: settings{rev}", s.service)?,
                Action::Remove => writeln!(
                    f,
                    "- {}: remove (not in the spec: its instances stop, its history is kept)",
                    s.service
                )?,
                Action::LeftRunning => writeln!(
                    f,
                    "  {}: not in the spec: left running (kiln apply --prune, or kiln remove {}, removes it)",
                    s.service, s.service
                )?,
            }
            for c in &s.changes {
                writeln!(f, "      {c}")?;
            }
        }
        Ok(())
    }
}

/// Compare each desired service with the current one; a current service
/// that is not desired is removed when `prune`, else left running.
pub fn plan(
    desired: &[DesiredService],
    current: &BTreeMap<ServiceName, CurrentService>,
    prune: bool,
) -> Plan {
    let mut services = Vec::new();
    for d in desired {
        let cur = current.get(&d.name);
        let Some(cur) = cur.filter(|c| !c.removed) else {
            services.push(ServicePlan {
                service: d.name.clone(),
                action: Action::Create,
                revision: Some(cur.map_or(0, |c| c.latest) + 1),
                changes: vec![
                    format!(
                        "image {}",
                        crate::release::image_label(&d.config.image_name, &d.config.image, false)
                    ),
                    format!("replicas {}", d.settings.replicas),
                ],
            });
            continue;
        };
        let mut changes = Vec::new();
        let (action, revision) = match &cur.release {
            Some((rev, cfg)) if cfg == &d.config => (Action::Unchanged, Some(*rev)),
            Some((rev, cfg)) => {
                changes.extend(config_changes(cfg, &d.config));
                (Action::Release, Some(cur.latest.max(*rev) + 1))
            }
            None => (Action::Release, Some(cur.latest + 1)),
        };
        let settings = settings_changes(&cur.settings, &d.settings);
        let action = if action == Action::Unchanged && !settings.is_empty() {
            Action::Settings
        } else {
            action
        };
        changes.extend(settings);
        services.push(ServicePlan {
            service: d.name.clone(),
            action,
            revision,
            changes,
        });
    }
    for (name, cur) in current {
        if cur.removed || desired.iter().any(|d| d.name == *name) {
            continue;
        }
        services.push(ServicePlan {
            service: name.clone(),
            action: if prune {
                Action::Remove
            } else {
                Action::LeftRunning
            },
            revision: cur.release.as_ref().map(|(r, _)| *r),
            changes: Vec::new(),
        });
    }
    Plan { services }
}

/// The keys added, removed and changed between two maps, by kind, the
/// empty kinds left out.
fn keyed_changes<'a, K: Ord + AsRef<str>, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> Vec<(&'static str, Vec<&'a str>)> {
    let added = new.keys().filter(|k| !old.contains_key(*k));
    let removed = old.keys().filter(|k| !new.contains_key(*k));
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k);
    [
        ("added", added.map(AsRef::as_ref).collect::<Vec<_>>()),
        ("removed", removed.map(AsRef::as_ref).collect()),
        ("changed", changed.map(AsRef::as_ref).collect()),
    ]
    .into_iter()
    .filter(|(_, keys)| !keys.is_empty())
    .collect()
}

fn config_changes(old: &ReleaseConfig, new: &ReleaseConfig) -> Vec<String> {
    let mut out = Vec::new();
    if old.image != new.image {
        out.push(format!(
            "image {} -> {}",
            old.image_label(),
            new.image_label()
        ));
    } else if old.image_name != new.image_name {
        out.push(format!(
            "image named {} -> {} (the same image, {})",
            old.image_name,
            new.image_name,
            new.image.short()
        ));
    }
    for (what, keys) in keyed_changes(&old.env, &new.env) {
        out.push(format!("env {what}: {}", keys.join(", ")));
    }
    for (what, keys) in keyed_changes(&old.secrets, &new.secrets) {
        out.push(format!("secrets {what}: {}", keys.join(", ")));
    }
    if old.command != new.command {
        out.push(format!("command {:?} -> {:?}", old.command, new.command));
    }
    if old.workdir != new.workdir {
        out.push(format!("workdir {} -> {}", old.workdir, new.workdir));
    }
    if old.volumes != new.volumes {
        out.push("volumes changed".to_owned());
    }
    if old.runtime != new.runtime {
        out.push(format!("runtime {} -> {}", old.runtime, new.runtime));
    }
    if old.hooks != new.hooks {
        out.push("hooks changed".to_owned());
    }
    if old.resources != new.resources {
        out.push(format!("resources {} -> {}", old.resources, new.resources));
    }
    for (name, a, b) in [
        ("startup", &old.health.startup, &new.health.startup),
        ("readiness", &old.health.readiness, &new.health.readiness),
        ("liveness", &old.health.liveness, &new.health.liveness),
    ] {
        match (a, b) {
            (None, Some(_)) => out.push(format!("{name} probe added")),
            (Some(_), None) => out.push(format!("{name} probe removed")),
            (Some(x), Some(y)) if x != y => out.push(format!("{name} probe changed")),
            _ => {}
        }
    }
    if old.stop != new.stop {
        out.push("stop settings changed".to_owned());
    }
    out
}

fn settings_changes(old: &ServiceSettings, new: &ServiceSettings) -> Vec<String> {
    let mut out = Vec::new();
    if old.replicas != new.replicas {
        out.push(format!("replicas {} -> {}", old.replicas, new.replicas));
    }
    if old.listen != new.listen {
        let show = |l: &Option<crate::service::ListenAddr>| {
            l.map_or("none".to_owned(), |l| l.0.to_string())
        };
        out.push(format!(
            "listen {} -> {}",
            show(&old.listen),
            show(&new.listen)
        ));
    }
    if old.route != new.route {
        out.push(format!("route {} -> {}", old.route, new.route));
    }
    if old.tls != new.tls {
        let show = |t: &Option<crate::service::TlsSpec>| {
            t.as_ref().map_or("off".to_owned(), |t| {
                t.cert
                    .clone()
                    .or_else(|| t.acme.clone())
                    .unwrap_or_default()
            })
        };
        out.push(format!("tls {} -> {}", show(&old.tls), show(&new.tls)));
    }
    if old.rollout != new.rollout {
        out.push("rollout settings changed".to_owned());
    }
    if old.error_pages != new.error_pages {
        let show = |p: &std::collections::BTreeMap<u16, String>| {
            let codes: Vec<String> = p.keys().map(u16::to_string).collect();
            if codes.is_empty() {
                "none".to_owned()
            } else {
                codes.join(",")
            }
        };
        out.push(format!(
            "error pages {} -> {}",
            show(&old.error_pages),
            show(&new.error_pages)
        ));
    }
    if old.timeout != new.timeout {
        out.push(format!("timeout {} -> {}", old.timeout, new.timeout));
    }
    if old.router != new.router {
        out.push("router settings changed".to_owned());
    }
    if old.node_labels != new.node_labels {
        let show = |l: &std::collections::BTreeMap<String, String>| {
            if l.is_empty() {
                "any node".to_owned()
            } else {
                l.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        out.push(format!(
            "node_labels {} -> {}",
            show(&old.node_labels),
            show(&new.node_labels)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::service::{HealthSpec, RolloutSpec, RuntimeKind, StopSpec};

    fn desired(env: &[(&str, &str)], replicas: u32, image: &[u8]) -> DesiredService {
        DesiredService {
            name: ServiceName::try_from("web").unwrap(),
            settings: ServiceSettings {
                replicas,
                listen: None,
                route: Default::default(),
                tls: None,
                rollout: RolloutSpec::default(),
                timeout: crate::service::Duration::from_secs(30),
                router: Default::default(),
                node_labels: Default::default(),
                error_pages: Default::default(),
            },
            config: ReleaseConfig {
                image: Digest::of(image),
                image_name: "hello".into(),
                command: vec!["/bin/hello".into()],
                workdir: crate::spec::AbsolutePath::try_from("/").unwrap(),
                env: env
                    .iter()
                    .map(|(k, v)| (crate::spec::EnvName::try_from(*k).unwrap(), (*v).to_owned()))
                    .collect(),
                secrets: BTreeMap::new(),
                volumes: BTreeMap::new(),
                runtime: RuntimeKind::Process,
                user: None,
                resources: Default::default(),
                hooks: Default::default(),
                health: HealthSpec::default(),
                stop: StopSpec::default(),
            },
            secret_values: BTreeMap::new(),
            signed_by: Vec::new(),
        }
    }

    fn current(d: &DesiredService, rev: u64) -> BTreeMap<ServiceName, CurrentService> {
        [(
            d.name.clone(),
            CurrentService {
                settings: d.settings.clone(),
                release: Some((rev, d.config.clone())),
                latest: rev,
                removed: false,
            },
        )]
        .into()
    }

    #[test]
    fn a_new_service_is_created_at_release_1() {
        let p = plan(&[desired(&[], 1, b"a")], &BTreeMap::new(), false);
        assert_eq!(p.services[0].action, Action::Create);
        assert_eq!(p.services[0].revision, Some(1));
    }

    #[test]
    fn the_same_spec_plans_no_changes() {
        let d = desired(&[("A", "1")], 2, b"a");
        let p = plan(std::slice::from_ref(&d), &current(&d, 4), false);
        assert!(p.is_empty());
        assert_eq!(p.to_string(), "no changes\n");
    }

    #[test]
    fn one_changed_env_var_is_a_new_release_naming_the_key_not_the_value() {
        let old = desired(&[("A", "1"), ("B", "x")], 2, b"a");
        let new = desired(&[("A", "2"), ("C", "y")], 2, b"a");
        let p = plan(&[new], &current(&old, 4), false);
        let s = &p.services[0];
        assert_eq!((s.action, s.revision), (Action::Release, Some(5)));
        assert_eq!(
            s.changes,
            ["env added: C", "env removed: B", "env changed: A"]
        );
        assert!(!p.to_string().contains('2') || !p.to_string().contains("A=2"));
    }

    #[test]
    fn a_changed_secret_is_a_new_release_naming_only_the_key() {
        use crate::secret::{Sealed, SecretValue};
        let name = crate::spec::EnvName::try_from("DB_PASSWORD").unwrap();
        let seal = |v: &str| Sealed::seal(b"key", &name, &SecretValue::new(v));
        let mut old = desired(&[], 2, b"a");
        old.config.secrets.insert(name.clone(), seal("hunter2"));
        let mut new = old.clone();
        assert!(plan(std::slice::from_ref(&new), &current(&old, 4), false).is_empty());
        new.config.secrets.insert(name.clone(), seal("hunter3"));
        let p = plan(&[new], &current(&old, 4), false);
        let s = &p.services[0];
        assert_eq!((s.action, s.revision), (Action::Release, Some(5)));
        assert_eq!(s.changes, ["secrets changed: DB_PASSWORD"]);
        assert!(!p.to_string().contains("hunter"));
        let none = desired(&[], 2, b"a");
        let p = plan(std::slice::from_ref(&none), &current(&old, 4), false);
        assert_eq!(p.services[0].changes, ["secrets removed: DB_PASSWORD"]);
    }

    #[test]
    fn a_service_not_in_the_spec_is_listed_and_removed_only_with_prune() {
        let web = desired(&[], 2, b"a");
        let mut api = desired(&[], 1, b"b");
        api.name = ServiceName::try_from("api").unwrap();
        let mut cur = current(&web, 3);
        cur.extend(current(&api, 7));
        let p = plan(std::slice::from_ref(&web), &cur, false);
        assert!(p.is_empty(), "leaving a service running changes nothing");
        assert_eq!(p.left_running().collect::<Vec<_>>(), [&api.name]);
        let text = p.to_string();
        assert!(
            text.starts_with("no changes\n")
                && text.contains("api: not in the spec: left running (kiln apply --prune"),
            "{text}"
        );
        let p = plan(std::slice::from_ref(&web), &cur, true);
        assert!(!p.is_empty());
        let api_plan = p.services.iter().find(|s| s.service == api.name).unwrap();
        assert_eq!(
            (api_plan.action, api_plan.revision),
            (Action::Remove, Some(7))
        );
        assert!(p.to_string().contains("- api: remove"), "{p}");
        // Applied again after its removal: created anew, past its releases.
        cur.get_mut(&api.name).unwrap().removed = true;
        let p = plan(std::slice::from_ref(&api), &cur, false);
        assert_eq!(
            (p.services[0].action, p.services[0].revision),
            (Action::Create, Some(8))
        );
        let p = plan(std::slice::from_ref(&web), &cur, true);
        assert!(
            p.services.iter().all(|s| s.service != api.name),
            "a removed service is not listed: {p}"
        );
    }

    #[test]
    fn a_release_after_a_failed_one_numbers_past_it() {
        let old = desired(&[("A", "1")], 2, b"a");
        let new = desired(&[("A", "2")], 2, b"a");
        let mut cur = current(&old, 1);
        // Release 2 failed and the service is back on 1.
        cur.values_mut().for_each(|c| c.latest = 2);
        let s = &plan(&[new], &cur, false).services[0];
        assert_eq!((s.action, s.revision), (Action::Release, Some(3)));
    }

    #[test]
    fn replicas_alone_change_settings_not_the_release() {
        let old = desired(&[], 2, b"a");
        let new = desired(&[], 5, b"a");
        let s = &plan(&[new], &current(&old, 3), false).services[0];
        assert_eq!((s.action, s.revision), (Action::Settings, Some(3)));
        assert_eq!(s.changes, ["replicas 2 -> 5"]);
    }

    #[test]
    fn router_limits_alone_change_settings_not_the_release() {
        let old = desired(&[], 2, b"a");
        let mut new = desired(&[], 2, b"a");
        new.settings.router.max_connections = Some(10);
        let s = &plan(&[new], &current(&old, 3), false).services[0];
        assert_eq!((s.action, s.revision), (Action::Settings, Some(3)));
        assert_eq!(s.changes, ["router settings changed"]);
    }

    #[test]
    fn a_new_image_is_named_in_the_plan() {
        let old = desired(&[], 1, b"a");
        let new = desired(&[], 1, b"b");
        let s = &plan(&[new], &current(&old, 1), false).services[0];
        assert_eq!(s.action, Action::Release);
        assert!(s.changes[0].starts_with("image hello@"), "{:?}", s.changes);
    }
}

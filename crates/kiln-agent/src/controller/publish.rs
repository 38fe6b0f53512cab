//! What a pass shows others: the router's table for the service (and its
//! blue-green preview), and the service's status.

use std::sync::Arc;

use kiln_core::api::{CanaryStatus, InstanceState, InstanceStatus, Reconciled, SlotBackoff};
use kiln_core::rollout::{CanaryPhase, Rollout, Routing};
use kiln_core::service::Strategy;

use super::{Controller, now};
use crate::router::{Backend, RouteKey, ServiceRoutes};

/// What was last published to the router for the service's listener.
#[derive(Default, PartialEq)]
pub(super) struct Routed {
    stable: Vec<String>,
    canary: Vec<String>,
    weight: u32,
    timeout: std::time::Duration,
    limits: kiln_core::service::RouterSpec,
}

impl Controller {
    /// The router backends of the ready, live instances that `pick` selects.
    /// In a cluster, the other nodes' ready instances that `pick` selects
    /// too (by their release).
    pub(super) fn backends(&self, pick: impl Fn(u64) -> bool) -> Vec<Arc<Backend>> {
        let ip = self.shared.membership.address;
        let here = self
            .instances
            .values()
            .filter(|i| i.ready && i.live && !i.stopping && pick(i.revision))
            .map(|i| {
                Arc::new(Backend::new(
                    i.id.clone(),
                    i.revision,
                    super::instances::instance_addr(ip, i.port),
                    i.inflight.clone(),
                    self.shared.router.metrics.release(&self.name, i.revision),
                ))
            });
        let there = self.peers.iter().filter(|r| pick(r.revision)).map(|r| {
            Arc::new(Backend::new(
                r.id.clone(),
                r.revision,
                r.addr,
                r.inflight.clone(),
                self.shared.router.metrics.release(&self.name, r.revision),
            ))
        });
        here.chain(there).collect()
    }

    /// Publish the ready instances to the router, when they changed: of any
    /// release during a rolling update (both serve), of the routed fleet
    /// for blue-green, split by weight between stable and canary.
    pub(super) fn publish_routes(&mut self) {
        let (timeout, sticky, limits) = self.service.as_ref().map_or(
            (
                std::time::Duration::from_secs(30),
                false,
                Default::default(),
            ),
            |s| {
                (
                    s.settings.timeout.0,
                    s.settings.rollout.sticky,
                    s.settings.router,
                )
            },
        );
        let (stable, canary) = match self.routing {
            Routing::Any => (self.backends(|_| true), None),
            Routing::Release(r) => (self.backends(|rev| rev == r), None),
            Routing::Split {
                stable,
                canary,
                weight,
            } => (
                self.backends(|rev| rev == stable),
                Some((self.backends(|rev| rev == canary), canary, weight)),
            ),
        };
        let ids = |b: &[Arc<Backend>]| b.iter().map(|b| b.instance.clone()).collect::<Vec<_>>();
        let routed = Routed {
            stable: ids(&stable),
            canary: canary.as_ref().map_or(Vec::new(), |(b, ..)| ids(b)),
            weight: canary.as_ref().map_or(0, |c| c.2),
            timeout,
            limits,
        };
        // A settings change (the timeout) republishes as much as new
        // instances do; an empty table is always (re)published.
        if routed == self.routed && !(routed.stable.is_empty() && routed.canary.is_empty()) {
            return;
        }
        let access = limits
            .access_log
            .then(|| self.shared.router.access_log(self.name.as_str()))
            .flatten();
        let mut routes = ServiceRoutes::new(stable, timeout)
            .with_limits(limits)
            .with_access(access);
        if let Some(s) = &self.service {
            routes = routes.with_pages(&s.settings.error_pages);
        }
        if let Some((backends, revision, weight)) = canary {
            let cookie = sticky.then(|| format!("kiln-canary-{}", self.name));
            routes = routes.with_canary(backends, revision, weight, cookie);
        }
        let key = RouteKey::Service(self.name.clone());
        // `recreate` has no instance ready between the old fleet's stop
        // and the new one's readiness: its requests wait at the router for
        // the new fleet (at most the service's timeout) instead of 503.
        let recreating = self.service.as_ref().is_some_and(|s| {
            s.settings.rollout.strategy == Strategy::Recreate && s.settings.replicas > 0
        }) && routed.stable.is_empty()
            && routed.canary.is_empty();
        let held = recreating.then(|| u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        if held.is_some() {
            self.shared.router.hold(&key, held);
        }
        self.shared.router.set_routes(&key, routes);
        if held.is_none() {
            self.shared.router.hold(&key, None);
        }
        self.routed = routed;
    }

    /// blue-green's preview: the target's ready instances on `preview_listen`.
    pub(super) fn publish_preview(
        &mut self,
        target: u64,
        timeout: std::time::Duration,
        limits: kiln_core::service::RouterSpec,
    ) {
        let backends = self.backends(|rev| rev == target);
        let ids: Vec<String> = backends.iter().map(|b| b.instance.clone()).collect();
        if ids != self.previewed || ids.is_empty() {
            self.shared.router.set_routes(
                &RouteKey::Preview(self.name.clone()),
                ServiceRoutes::new(backends, timeout).with_limits(limits),
            );
            self.previewed = ids;
        }
    }

    pub(super) fn canary_status(&self) -> Option<CanaryStatus> {
        let Rollout::Canary(run) = &self.rollout else {
            return None;
        };
        let steps = self
            .service
            .as_ref()
            .map_or(0, |s| s.settings.rollout.steps.len());
        let (canary_window, stable_window) = match &run.phase {
            CanaryPhase::Judging { canary, stable, .. } => (
                self.counters(run.target).since(canary).window(),
                self.counters(run.stable).since(stable).window(),
            ),
            CanaryPhase::Starting { .. } => Default::default(),
        };
        Some(CanaryStatus {
            revision: run.target,
            stable: run.stable,
            step: run.step as u32 + 1,
            steps: steps as u32,
            weight: run.weight,
            waiting: run.waiting.clone(),
            canary_window,
            stable_window,
        })
    }

    /// What this pass saw, for `status` (which joins it with what the
    /// state store says now; see [`kiln_core::api::ServiceStatus::of`]).
    pub(super) fn publish(&self) {
        let Some(target) = self.service.as_ref().map(|r| r.target) else {
            return;
        };
        let now = now();
        let instances: Vec<InstanceStatus> = self
            .instances
            .values()
            .map(|i| InstanceStatus {
                id: i.id.clone(),
                node: self.shared.node_name.clone(),
                revision: i.revision,
                slot: i.slot,
                pid: i.pid,
                port: i.port,
                state: if i.stopping {
                    InstanceState::Stopping
                } else if i.pid.is_some() {
                    InstanceState::Running
                } else {
                    InstanceState::Starting
                },
                ready: i.ready,
                live: i.live,
                replacements: self
                    .slots
                    .get(&(i.revision, i.slot))
                    .map_or(0, |s| s.replacements),
                started: humantime::format_rfc3339_millis(i.started_wall).to_string(),
                // (`status` recounts it from `started` when asked.)
                uptime_secs: std::time::SystemTime::now()
                    .duration_since(i.started_wall)
                    .map_or(0.0, |d| d.as_secs_f64()),
                runtime: i.runtime,
                read_only_root: i.read_only,
                borrows_host: i.borrows_host,
            })
            .collect();
        let backoff = self
            .slots
            .iter()
            .filter_map(|((rev, slot), s)| {
                s.retry_at.filter(|t| *t > now).map(|t| SlotBackoff {
                    revision: *rev,
                    slot: *slot,
                    failures: s.failures,
                    retry_in_ms: t.duration_since(now).as_millis() as u64,
                })
            })
            .collect();
        let seen = Reconciled {
            settings: self.service.as_ref().map(|s| s.settings.clone()),
            target,
            fleet: self.counts.filter(|_| !self.shared.membership.is_solo()),
            instances,
            backoff,
            message: self.message.clone(),
            stalled: self.rollout.stalled(),
            canary: self.canary_status(),
            // (No service read yet: no watch keeps anything warm.)
            warm: self.rollout.warm_beside(
                target,
                now,
                self.service
                    .as_ref()
                    .map_or(Strategy::BlueGreen, |s| s.settings.rollout.strategy),
            ),
            watched_until: self
                .rollout
                .watched(now)
                .filter(|(t, _)| *t == target)
                .map(|(_, w)| {
                    let at = std::time::SystemTime::now() + w.until.saturating_duration_since(now);
                    humantime::format_rfc3339_seconds(at).to_string()
                }),
            routed: match self.routing {
                Routing::Release(r) => Some(r),
                Routing::Any | Routing::Split { .. } => None,
            },
        };
        let mut all = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(self.name.clone(), seen);
    }
}

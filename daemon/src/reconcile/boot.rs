//! Boot: every app in the store comes back at its current generation. `start_all` binds each
//! address and makes each cgroup, then returns (READY follows); the pools start in the
//! background a few at a time, and a connection that arrives first starts its app at once.
//! An app that cannot start is marked failed with its reason, and `retry_failed` tries again
//! from the supervisor's loop.

use super::apps::{AppLock, Running, State};
use super::listen::{bind_patiently, wake_on_connection};
use super::{new_counters, ReconcileError, Reconciler};
use crate::spec::AppName;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Pools started at once when the daemon restores its apps.
const START_CONCURRENCY: usize = 8;
/// Restored apps whose addresses are bound at once at start-up.
const BIND_CONCURRENCY: usize = 64;

impl Reconciler {
    /// Brings every app in the store up at its current generation: binds its address and
    /// makes its cgroup, then starts its pool in the background. Returns once every address
    /// is bound (or the app is marked failed with the reason): from then on a connection to an
    /// app waits in its listener's backlog until the pool serves it, and an app whose pool has
    /// not started yet is started at once when a connection arrives, ahead of the rest.
    pub async fn start_all(self: &Arc<Self>) -> Result<(), ReconcileError> {
        let records = self.store.call(|store| store.apps()).await?;
        let mut restored = Vec::with_capacity(records.len());
        for record in records {
            let counters = Arc::new(new_counters(&record.name)?);
            let (spec, state) = match record.spec {
                Ok(spec) => (
                    spec,
                    State::Failed {
                        reason: "not started yet".into(),
                    },
                ),
                Err(unreadable) => {
                    tracing::error!(app = %record.name, reason = %unreadable.reason, "app cannot be restored");
                    self.logs.note(
                        record.name.as_str(),
                        record.generation,
                        &format!("could not start: {}", unreadable.reason),
                    );
                    (
                        unreadable.stand_in,
                        State::Unreadable {
                            reason: unreadable.reason,
                        },
                    )
                }
            };
            let running = Running::new(record.owner, record.generation, spec, state, counters);
            restored.push((record.name, running));
        }
        // Addresses are bound side by side: a pool of the previous daemon may still be closing
        // its copy of a listener, which is waited for (briefly) per app.
        futures_util::stream::iter(
            restored
                .iter_mut()
                .filter(|(_, running)| !matches!(running.state, State::Unreadable { .. })),
        )
        .for_each_concurrent(BIND_CONCURRENCY, |(name, running)| async move {
            match self.prepare_restored(running).await {
                Ok(()) if running.spec.is_command() => running.state = State::Ready,
                Ok(()) => {
                    running.state = State::Starting {
                        _waker: wake_on_connection(
                            self.restarts.clone(),
                            name.clone(),
                            running.generation,
                            running.listener.as_ref(),
                        ),
                    };
                }
                Err(error) => self.mark_failed(running, error),
            }
        })
        .await;
        let pending: Vec<(AppName, u64)> = restored
            .iter()
            .filter(|(_, running)| matches!(running.state, State::Starting { .. }))
            .map(|(name, running)| (name.clone(), running.generation))
            .collect();
        self.apps.restore(restored);
        // Pools start side by side (a pool's start is mostly waiting on exec and loading code),
        // a few at a time so a device with many apps is not swamped at boot.
        let reconciler = Arc::clone(self);
        tokio::spawn(async move {
            futures_util::stream::iter(pending)
                .for_each_concurrent(START_CONCURRENCY, |(app, generation)| {
                    let reconciler = &reconciler;
                    async move { reconciler.start_restored(&app, generation).await }
                })
                .await;
        });
        Ok(())
    }

    /// A restored app's listener (bound now) and cgroup (made now).
    async fn prepare_restored(&self, running: &mut Running) -> Result<(), ReconcileError> {
        if let Some(listen) = running.spec.listen() {
            let listener = bind_patiently(listen, Duration::from_secs(3)).await?;
            running.listener = Some(Arc::new(listener));
        }
        running.cgroup = self.app_cgroup(&running.spec)?;
        Ok(())
    }

    /// Starts the pool of a restored app (see `start_all`), unless a connection started it
    /// first or the app changed meanwhile.
    async fn start_restored(&self, app: &AppName, generation: u64) {
        let Some(lock) = self.apps.lock(app, false).await else {
            return;
        };
        let waiting = lock.running(|running| {
            running.generation == generation && matches!(running.state, State::Starting { .. })
        });
        if waiting != Some(true) {
            return;
        }
        if let Err(error) = self.launch_current(&lock, true).await {
            lock.running(|running| self.mark_failed(running, error));
        }
    }

    /// Marks an app that could not be started as failed, saying why.
    pub(super) fn mark_failed(&self, running: &mut Running, error: ReconcileError) {
        let reason = error.to_string();
        // The retry rounds fail the same way every few seconds: only a new reason is news.
        let again = matches!(&running.state, State::Failed { reason: before } if *before == reason);
        if !again {
            tracing::error!(app = %running.spec.name, %reason, "app could not start");
            self.logs.event(
                running.spec.name.as_str(),
                running.generation,
                "start-failed",
                &format!("could not start: {reason}"),
            );
        }
        running.state = State::Failed { reason };
    }

    /// Tries again, in the background, to start apps that failed (a port that was busy at
    /// boot, say); one round at a time, and the caller never waits for it.
    pub fn retry_failed(self: &Arc<Self>) {
        if self.retrying.swap(true, Ordering::AcqRel) {
            return; // the last round is still going
        }
        let reconciler = Arc::clone(self);
        tokio::spawn(async move {
            for name in reconciler.apps.names() {
                let Some(lock) = reconciler.apps.lock(&name, false).await else {
                    continue;
                };
                let failed = lock.running(|r| matches!(r.state, State::Failed { .. }));
                if failed == Some(true) && reconciler.bring_up(&lock).await {
                    let generation = lock.running(|r| r.generation).unwrap_or_default();
                    reconciler.logs.note(
                        name.as_str(),
                        generation,
                        "started after an earlier failure",
                    );
                }
            }
            reconciler.retrying.store(false, Ordering::Release);
        });
    }

    /// Starts a failed app's pool, binding its address and making its cgroup first if they
    /// are missing; on failure marks it failed again. Returns whether it now runs.
    async fn bring_up(&self, lock: &AppLock) -> bool {
        let result = async {
            let Some((listen, listener, has_cgroup, spec)) = lock.running(|r| {
                (
                    r.spec.listen(),
                    r.listener.clone(),
                    r.cgroup.is_some(),
                    r.spec.clone(),
                )
            }) else {
                return Ok(());
            };
            if let (None, Some(listen)) = (listener, listen) {
                let listener = Arc::new(bind_patiently(listen, Duration::ZERO).await?);
                lock.running(|r| r.listener = Some(listener));
            }
            if !has_cgroup {
                let cgroup = self.app_cgroup(&spec)?;
                lock.running(|r| {
                    r.oom_kills_seen = cgroup.as_ref().map(|c| c.usage().oom_kills).unwrap_or(0);
                    r.cgroup = cgroup;
                });
            }
            if spec.is_command() {
                lock.running(|r| r.state = State::Ready);
                return Ok(());
            }
            self.launch_current(lock, false).await.map(drop)
        }
        .await;
        match result {
            Ok(()) => true,
            Err(error) => {
                lock.running(|running| self.mark_failed(running, error));
                false
            }
        }
    }
}

//! Pool exits and what follows them: an idle exit leaves the app waiting for its next
//! connection; any other exit is a failure, restarted after a backoff, and a pool that keeps
//! failing is a crashloop, which restores the last generation that served well. What to do is
//! decided by `crashloop::after_failure`; this carries it out.

use super::apps::{AppLock, State};
use super::code::Attempt;
use super::crashloop::{after_failure, CRASHLOOP_WINDOW};
use super::listen::wake_on_connection;
use super::{ReconcileError, Reconciler};
use crate::counters::Counter;
use crate::engine::POOLING_ALLOCATOR;
use crate::spawn::{ExitReason, PoolExit, Start};
use crate::spec::AppName;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Reconciler {
    /// Handles a pool's exit. Exits of pools no longer the app's (after `stop`, or an old
    /// generation's drain) are ignored.
    pub(super) async fn pool_exited(&self, exit: PoolExit) {
        let Some(lock) = self.apps.lock(&exit.app, false).await else {
            return;
        };
        let wake = self.restarts.clone();
        let handled = lock.running(|running| {
            let State::Running { pool, since } = &running.state else {
                return None;
            };
            if pool.pid != exit.pid {
                return None; // an old generation's pool finishing its drain
            }
            let served_for = since.elapsed();
            running.counters.set(Counter::InFlight, 0);
            if exit.reason.is_idle() {
                running.state = State::Idle {
                    _waker: wake_on_connection(
                        wake,
                        exit.app.clone(),
                        running.generation,
                        running.listener.as_ref(),
                    ),
                };
                return Some((running.generation, None));
            }
            let mut reason = exit.reason.clone();
            if let Some(cgroup) = &running.cgroup {
                let oom_kills = cgroup.usage().oom_kills;
                if reason == ExitReason::Signal(9) && oom_kills > running.oom_kills_seen {
                    reason = ExitReason::Oom;
                }
                running.oom_kills_seen = oom_kills;
            }
            let kind = if reason == ExitReason::Oom {
                running.oom_kills += 1;
                "oom"
            } else {
                "exit"
            };
            let restore = self.record_failure(
                &exit.app,
                running,
                kind,
                reason.to_string(),
                Some(served_for),
            );
            Some((running.generation, Some((running.owner, restore))))
        });
        let Some(Some((generation, failed))) = handled else {
            return;
        };
        let Some((owner, Some(good))) = failed else {
            if failed.is_none() {
                self.logs.note(
                    exit.app.as_str(),
                    generation,
                    "idle: the pool exited; the next connection starts it again",
                );
            }
            return;
        };
        let app = exit.app.clone();
        let why = format!(
            "crashloop: generation {generation} kept failing; restored generation {good}, which served well"
        );
        let restored = async {
            let generations = self
                .store
                .call(move |store| store.generations(&app))
                .await?;
            let spec = generations
                .into_iter()
                .find(|g| g.generation == good)
                .ok_or_else(|| {
                    crate::store::StoreError::Gone(format!("generation {good} of {}", exit.app))
                })?
                .spec
                .map_err(|unreadable| ReconcileError::Unreadable {
                    app: exit.app.to_string(),
                    reason: unreadable.reason,
                })?;
            self.activate(&lock, spec, owner, Some(good), Some(&why))
                .await
        }
        .await;
        if let Err(error) = restored {
            tracing::error!(app = %exit.app, %error, "could not restore the last good generation");
            self.logs.event(
                exit.app.as_str(),
                generation,
                "restore-failed",
                &format!("crashloop: could not restore generation {good}: {error}"),
            );
        }
    }

    /// Counts a pool failure, schedules the next attempt and returns the generation to
    /// restore, if the failures make a crashloop and one served well.
    fn record_failure(
        &self,
        app: &AppName,
        running: &mut super::apps::Running,
        kind: &'static str,
        reason: String,
        served_for: Option<Duration>,
    ) -> Option<u64> {
        let decision = after_failure(
            &mut running.failures,
            Instant::now(),
            served_for,
            running.generation,
            running.last_good,
        );
        running.restarts.count(kind, &reason);
        running.last_exit = reason.clone();
        let delay = decision.delay;
        let note = if running.failures.crashloop {
            format!(
                "crashloop: the pool ended ({reason}), {} times in {CRASHLOOP_WINDOW:?}; retrying in {delay:?}",
                running.failures.recent.len()
            )
        } else {
            format!("the pool ended ({reason}); restarting in {delay:?}")
        };
        tracing::warn!(app = %app, %note);
        let kind = if running.failures.crashloop {
            "crashloop"
        } else {
            kind
        };
        self.logs
            .event(app.as_str(), running.generation, kind, &note);
        running.state = State::Restarting { reason: note };
        let restarts = self.restarts.clone();
        let (app, generation) = (app.clone(), running.generation);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = restarts.send((app, generation)).await;
        });
        decision.restore
    }

    /// Starts a pool again for an app that is restarting (after a failure), idle or restored
    /// and not yet started (woken by a connection), if the app still wants that generation.
    pub(super) async fn restart(&self, app: &AppName, generation: u64) {
        let Some(lock) = self.apps.lock(app, false).await else {
            return;
        };
        let waking = lock.running(|running| {
            let waking = matches!(running.state, State::Idle { .. } | State::Starting { .. });
            let wanted = running.generation == generation
                && (waking || matches!(running.state, State::Restarting { .. }));
            wanted.then_some(waking)
        });
        let Some(Some(waking)) = waking else {
            return;
        };
        let started = Instant::now();
        let launched = self.launch_current(&lock, waking).await;
        if waking && launched.is_ok() {
            let took = started.elapsed();
            lock.running(|running| {
                running.cold_starts += 1;
                running.cold_start_micros += took.as_micros() as u64;
            });
        }
        match launched {
            Ok(pid) if !waking => self.logs.event(
                app.as_str(),
                generation,
                "restart",
                &format!("pool restarted (pid {pid})"),
            ),
            Ok(_) => {}
            Err(error) => {
                // (A start that fails is not a crashloop's restore: only a pool that ran and
                // ended is.)
                lock.running(|running| {
                    self.record_failure(app, running, "start-failed", error.to_string(), None)
                });
            }
        }
    }

    /// Starts a pool for the app's current generation on its listener and records it as
    /// serving; returns its pid. `waking`: the app had no pool because it went idle or was
    /// just restored, so a pool that went idle proved this code with the pooling allocator
    /// under these limits, and its successor skips the proving instance.
    pub(super) async fn launch_current(
        &self,
        lock: &AppLock,
        waking: bool,
    ) -> Result<u32, ReconcileError> {
        let current = lock.running(|running| {
            (
                running.spec.clone(),
                running.generation,
                running.listener.clone(),
                Arc::clone(&running.counters),
                running.cgroup.clone(),
                waking && running.allocator == POOLING_ALLOCATOR,
            )
        });
        let Some((spec, generation, Some(listener), counters, cgroup, proven)) = current else {
            return Err(ReconcileError::Internal(format!(
                "app `{}` has no listener to start a pool on",
                lock.name
            )));
        };
        let pool = self
            .launch(Attempt {
                spec: &spec,
                generation,
                listener: Some(&listener),
                counters: &counters,
                cgroup: cgroup.as_ref(),
                start: Start::Resume { proven },
                run: None,
                tap: None,
            })
            .await?;
        let pid = pool.pid;
        lock.running(|running| running.serving_with(pool));
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_read_like_status() {
        assert_eq!(ExitReason::Signal(9).to_string(), "signal 9");
        assert_eq!(ExitReason::Code(3).to_string(), "exit 3");
    }
}

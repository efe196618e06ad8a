//! Pool exits and what follows them: an idle exit leaves the app waiting for its next
//! connection; any other exit is a failure, restarted after a backoff, and a pool that keeps
//! failing is a crashloop, which restores the last generation that served well. The decision
//! is `after_failure`, a pure function; the rest carries it out.

use super::apps::{AppLock, State};
use super::code::Attempt;
use super::listen::wake_on_connection;
use super::{ReconcileError, Reconciler};
use crate::pool::protocol::Counter;
use crate::runtime::POOLING_ALLOCATOR;
use crate::spawn::{ExitReason, PoolExit, Start};
use crate::spec::AppName;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First restart delay after a pool dies; doubled for each further failure, up to the cap.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A pool that served this long is healthy again: its next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// This many pool failures within `CRASHLOOP_WINDOW` make a crashloop.
const CRASHLOOP_FAILURES: usize = 5;
const CRASHLOOP_WINDOW: Duration = Duration::from_secs(60);

/// What the reconciler remembers of an app's pool failures (reset by a new generation).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Failures {
    /// Failures since the pool last stayed up for `HEALTHY_AFTER`.
    pub consecutive: u32,
    /// When the pool failed within the last `CRASHLOOP_WINDOW`.
    pub recent: Vec<Instant>,
    /// Failing `CRASHLOOP_FAILURES` times within the window; cleared by a new generation.
    pub crashloop: bool,
}

/// What to do after a failure.
#[derive(Debug, PartialEq)]
pub(super) struct Decision {
    /// When to start the pool again.
    pub delay: Duration,
    /// A generation that served well, to restore instead (a crashloop).
    pub restore: Option<u64>,
}

/// The policy after a pool failed at `now`. `served_for`: how long the pool had run (`None`
/// when it failed to start); `generation` is the failing one.
pub(super) fn after_failure(
    failures: &mut Failures,
    now: Instant,
    served_for: Option<Duration>,
    generation: u64,
    last_good: Option<u64>,
) -> Decision {
    if served_for.is_some_and(|served| served >= HEALTHY_AFTER) {
        failures.consecutive = 0;
    }
    failures.consecutive += 1;
    failures
        .recent
        .retain(|at| now.duration_since(*at) < CRASHLOOP_WINDOW);
    failures.recent.push(now);
    if failures.recent.len() >= CRASHLOOP_FAILURES {
        failures.crashloop = true;
    }
    Decision {
        delay: backoff(failures.consecutive),
        restore: last_good.filter(|good| failures.crashloop && *good != generation),
    }
}

fn backoff(failures: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESTART_BACKOFF_CAP)
}

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
            let restore =
                self.record_failure(&exit.app, running, reason.to_string(), Some(served_for));
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
        let restored = async {
            let generations = self
                .store
                .call(move |store| store.generations(&app))
                .await?;
            let spec = generations
                .into_iter()
                .find(|g| g.generation == good)
                .map(|g| g.spec)
                .ok_or_else(|| ReconcileError::Internal(format!("generation {good} is gone")))?;
            self.activate(&lock, spec, owner, Some(good)).await
        }
        .await;
        match restored {
            Ok(_) => self.logs.note(
                exit.app.as_str(),
                good,
                &format!("crashloop: generation {generation} kept failing; restored generation {good}, which served well"),
            ),
            Err(error) => tracing::error!(app = %exit.app, %error, "could not restore the last good generation"),
        }
    }

    /// Counts a pool failure, schedules the next attempt and returns the generation to
    /// restore, if the failures make a crashloop and one served well.
    fn record_failure(
        &self,
        app: &AppName,
        running: &mut super::apps::Running,
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
        running.restarts += 1;
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
        self.logs.note(app.as_str(), running.generation, &note);
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
        match self.launch_current(&lock, waking).await {
            Ok(pid) if !waking => self.logs.note(
                app.as_str(),
                generation,
                &format!("pool restarted (pid {pid})"),
            ),
            Ok(_) => {}
            Err(error) => {
                // (A start that fails is not a crashloop's restore: only a pool that ran and
                // ended is.)
                lock.running(|running| self.record_failure(app, running, error.to_string(), None));
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
                listener: &listener,
                counters: &counters,
                cgroup: cgroup.as_ref(),
                start: Start::Resume { proven },
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
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(20), RESTART_BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), RESTART_BACKOFF_CAP);
    }

    #[test]
    fn exit_reasons_read_like_status() {
        assert_eq!(ExitReason::Signal(9).to_string(), "signal 9");
        assert_eq!(ExitReason::Code(3).to_string(), "exit 3");
    }

    /// One row: the failures before (seconds before `now`, consecutive count, crashloop), how
    /// long the pool served, the failing and last good generations; then what must follow.
    struct Case {
        name: &'static str,
        earlier: &'static [u64],
        consecutive: u32,
        crashloop: bool,
        served_secs: Option<u64>,
        generation: u64,
        last_good: Option<u64>,
        delay_ms: u64,
        then_consecutive: u32,
        then_crashloop: bool,
        restore: Option<u64>,
    }

    #[test]
    fn failures_back_off_and_a_crashloop_restores_what_served_well() {
        let cases = [
            Case {
                name: "first failure restarts soon",
                earlier: &[],
                consecutive: 0,
                crashloop: false,
                served_secs: Some(1),
                generation: 2,
                last_good: Some(1),
                delay_ms: 100,
                then_consecutive: 1,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "each further failure doubles the delay",
                earlier: &[30, 20, 10],
                consecutive: 3,
                crashloop: false,
                served_secs: Some(1),
                generation: 2,
                last_good: Some(1),
                delay_ms: 800,
                then_consecutive: 4,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a pool that served a minute starts the backoff over",
                earlier: &[100],
                consecutive: 6,
                crashloop: false,
                served_secs: Some(60),
                generation: 2,
                last_good: Some(1),
                delay_ms: 100,
                then_consecutive: 1,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a failed start does not reset the backoff",
                earlier: &[],
                consecutive: 2,
                crashloop: false,
                served_secs: None,
                generation: 2,
                last_good: Some(1),
                delay_ms: 400,
                then_consecutive: 3,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "the fifth failure in a minute is a crashloop: restore the good one",
                earlier: &[50, 40, 30, 20],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: Some(2),
            },
            Case {
                name: "failures spread over more than a minute are no crashloop",
                earlier: &[240, 180, 120, 61],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a crashloop with nothing that served well restarts with backoff",
                earlier: &[4, 3, 2, 1],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(0),
                generation: 1,
                last_good: None,
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: None,
            },
            Case {
                name: "the good generation is the failing one: nothing to restore",
                earlier: &[4, 3, 2, 1],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(0),
                generation: 2,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: None,
            },
            Case {
                name: "a crashloop stays one until a new generation",
                earlier: &[],
                consecutive: 9,
                crashloop: true,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 30_000,
                then_consecutive: 10,
                then_crashloop: true,
                restore: Some(2),
            },
        ];
        let now = Instant::now() + Duration::from_secs(1000);
        for case in cases {
            let mut failures = Failures {
                consecutive: case.consecutive,
                recent: case
                    .earlier
                    .iter()
                    .map(|ago| now - Duration::from_secs(*ago))
                    .collect(),
                crashloop: case.crashloop,
            };
            let decision = after_failure(
                &mut failures,
                now,
                case.served_secs.map(Duration::from_secs),
                case.generation,
                case.last_good,
            );
            assert_eq!(
                decision,
                Decision {
                    delay: Duration::from_millis(case.delay_ms),
                    restore: case.restore
                },
                "{}",
                case.name
            );
            assert_eq!(failures.consecutive, case.then_consecutive, "{}", case.name);
            assert_eq!(failures.crashloop, case.then_crashloop, "{}", case.name);
            assert!(
                failures.recent.len() <= CRASHLOOP_FAILURES.max(case.earlier.len() + 1),
                "{}",
                case.name
            );
        }
    }
}

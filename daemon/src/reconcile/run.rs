//! Runs of command apps (`cairnctl run`, a command app's `[[schedule]]`): each run is a pool
//! of its own, started as any pool is (the app's cgroup, user, seccomp filter, limits,
//! `[env]`, `[config]`, key-value store and outbound grant), told to run the command once with
//! the run's arguments instead of serving. Its output goes to the app's log as it comes, and a
//! copy to whoever watches (`Tap`); the run ends with the command's exit code. A run holds no
//! lock of the app: a deploy meanwhile leaves it running the generation it started with, and
//! `rm` kills it.

use super::apps::State;
use super::code::Attempt;
use super::{ReconcileError, Reconciler};
use crate::spawn::{ExitReason, Start, Tap};
use crate::spec::AppName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs of one app under way at once, at most: each is a pool process with the app's
/// memory, so more wait for none and are refused.
pub const MAX_RUNS_PER_APP: usize = crate::spec::MAX_RUNS as usize;
/// What a run's pool is given, past the app's timeout, to send its output and exit.
const RUN_SLACK: Duration = Duration::from_secs(10);
/// The exit code of a run whose pool ended without saying how the run went (killed by a
/// signal: the OOM killer at the app's memory limit, `rm` of the app).
pub const RUN_KILLED_CODE: i32 = 137;

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub code: i32,
    /// `exit 0`, `stopped at its timeout (…)`, `trapped: …`, or how its pool ended.
    pub outcome: String,
    pub generation: u64,
    pub duration: Duration,
    /// The app was removed during the run (which was killed): nothing of it is recorded.
    pub removed: bool,
}

/// The stream name of the mark a run's tap gets once its pool has started (the run is under
/// way: a caller that loses cairnd after it cannot say the run did not happen).
pub const STARTED: &str = "started";

/// Runs kept per app for `status` (in memory, since cairnd started).
pub const RECENT_RUNS: usize = 20;

/// One run under way: its number, its pool's pid once started, and why cairnd killed it, if it
/// did (its pool is killed as soon as it has one).
type RunUnderWay = (u64, Option<u32>, Option<&'static str>);

/// Why cairnd kills runs: their app is being removed…
pub(super) const KILLED_REMOVED: &str = "the app was removed";
/// …or cairnd is stopping.
pub(super) const KILLED_STOPPING: &str = "cairnd stopped";

/// A run that ended, as `status` shows it.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub started_unix_ms: i64,
    pub duration_ms: u64,
    pub code: i32,
    pub outcome: String,
    /// `cairnctl run`, or `schedule NAME`.
    pub by: String,
}

/// The runs under way and the last runs, by app.
#[derive(Default)]
pub(super) struct Runs {
    under_way: Mutex<HashMap<AppName, Vec<RunUnderWay>>>,
    recent: Mutex<HashMap<AppName, std::collections::VecDeque<RunRecord>>>,
}

/// One run's place in `Runs`, given back when dropped.
struct RunSlot<'a> {
    runs: &'a Runs,
    app: AppName,
    id: u64,
}

impl Runs {
    fn take(&self, app: &AppName) -> Option<RunSlot<'_>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut runs = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        let under_way = runs.entry(app.clone()).or_default();
        if under_way.len() >= MAX_RUNS_PER_APP {
            return None;
        }
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        under_way.push((id, None, None));
        Some(RunSlot {
            runs: self,
            app: app.clone(),
            id,
        })
    }

    /// Kills the pools of the app's runs under way (`why`: it is being removed, or cairnd
    /// stops), and those still starting as soon as they have one.
    pub(super) fn kill(&self, app: &AppName, why: &'static str) {
        let mut runs = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        for (_, pid, killed) in runs.get_mut(app).into_iter().flatten() {
            *killed = Some(why);
            if let Some(pid) = pid {
                kill(*pid);
            }
        }
    }

    fn record(&self, app: &AppName, run: RunRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let kept = recent.entry(app.clone()).or_default();
        if kept.len() == RECENT_RUNS {
            kept.pop_front();
        }
        kept.push_back(run);
    }

    /// The app is gone: so are its runs' records.
    pub(super) fn forget(&self, app: &AppName) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
    }

    pub(super) fn kill_all(&self) {
        let apps: Vec<AppName> = self
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for app in apps {
            self.kill(&app, KILLED_STOPPING);
        }
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

impl RunSlot<'_> {
    /// The run's pool has started (it is killed at once if its app was removed meanwhile).
    fn started(&self, pid: u32) {
        let mut runs = self
            .runs
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs
            .get_mut(&self.app)
            .and_then(|r| r.iter_mut().find(|(id, ..)| *id == self.id))
        {
            run.1 = Some(pid);
            if run.2.is_some() {
                kill(pid);
            }
        }
    }

    /// Why cairnd killed the run, if it did.
    fn killed(&self) -> Option<&'static str> {
        let runs = self
            .runs
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        runs.get(&self.app)
            .and_then(|r| r.iter().find(|(id, ..)| *id == self.id))
            .and_then(|run| run.2)
    }
}

impl Drop for RunSlot<'_> {
    fn drop(&mut self) {
        let mut runs = self
            .runs
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(under_way) = runs.get_mut(&self.app) {
            under_way.retain(|(id, ..)| *id != self.id);
            if under_way.is_empty() {
                runs.remove(&self.app);
            }
        }
    }
}

impl Reconciler {
    /// The app's last runs, oldest first.
    pub fn recent_runs(&self, name: &AppName) -> Vec<RunRecord> {
        self.runs
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|runs| runs.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Runs the command app `name` once with `args` and waits for it to end; `by` says who
    /// asked (kept with the run for `status`). `tap` gets its output as it comes, besides the
    /// app's log. An error: the run could not start.
    pub async fn run(
        &self,
        name: &AppName,
        args: &[String],
        tap: Option<Tap>,
        by: &str,
    ) -> Result<RunResult, ReconcileError> {
        crate::spec::check_run_args(args).map_err(ReconcileError::Run)?;
        let found = self.apps.read(name, |running| {
            let unable = match &running.state {
                _ if !running.spec.is_command() => Some(format!(
                    "app `{name}` serves HTTP; `cairnctl run` runs command apps (deployed without an [http] table)"
                )),
                State::Ready => None,
                State::Failed { reason } | State::Unreadable { reason } => {
                    Some(format!("app `{name}` cannot run: {reason}"))
                }
                _ => Some(format!("app `{name}` is not ready to run")),
            };
            (
                running.spec.clone(),
                running.generation,
                Arc::clone(&running.counters),
                running.cgroup.clone(),
                unable,
            )
        });
        let Some((spec, generation, counters, cgroup, unable)) = found else {
            return Err(ReconcileError::UnknownApp(name.to_string()));
        };
        if let Some(why) = unable {
            return Err(ReconcileError::Run(why));
        }
        let slot = self.runs.take(name).ok_or_else(|| {
            ReconcileError::Run(format!(
                "app `{name}` has {MAX_RUNS_PER_APP} runs under way already, the most at once; try again when one has ended"
            ))
        })?;
        let started = Instant::now();
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let oom_kills = || cgroup.as_ref().map_or(0, |c| c.usage().oom_kills);
        let oom_before = oom_kills();
        let marker = tap.clone();
        // One instance per run: the pool is sized for that, whatever `instances` says.
        let mut one = spec.clone();
        one.limits.instances = 1;
        let launched = self
            .launch(Attempt {
                spec: &one,
                generation,
                listener: None,
                counters: &counters,
                cgroup: cgroup.as_ref(),
                start: Start::Prepare,
                run: Some(args),
                tap,
            })
            .await;
        let pool = match (launched, slot.killed()) {
            (Ok(pool), _) => pool,
            (Err(_), Some(why)) => return Err(ReconcileError::Run(format!("app `{name}`: {why}"))),
            (Err(error), None) => return Err(error),
        };
        slot.started(pool.pid);
        if let Some(tap) = marker {
            let _ = tap.output.try_send(crate::pool::protocol::LogChunk {
                stream: STARTED.to_string(),
                text: String::new(),
            });
        }
        let deadline = spec.limits.timeout.0 + RUN_SLACK;
        let (finished, exit) = pool.run_end(deadline).await;
        let killed = slot.killed();
        drop(slot);
        let (code, outcome) = match (finished, killed, exit) {
            (Some(finished), _, _) => finished,
            (None, Some(why), _) => (RUN_KILLED_CODE, format!("killed: {why}")),
            (None, None, Some(ExitReason::Signal(9))) if started.elapsed() >= deadline => (
                RUN_KILLED_CODE,
                format!(
                    "killed: it did not end within its timeout ({}) and {RUN_SLACK:?} more",
                    spec.limits.timeout
                ),
            ),
            (None, None, Some(ExitReason::Signal(9))) if oom_kills() > oom_before => (
                RUN_KILLED_CODE,
                "killed by the kernel's OOM killer at the app's memory limit ([limits] memory_total)".to_string(),
            ),
            (None, None, Some(ExitReason::Signal(signal))) => {
                (128 + signal, format!("killed by signal {signal}"))
            }
            (None, None, exit) => (
                RUN_KILLED_CODE,
                format!(
                    "its pool ended without finishing the run ({})",
                    exit.map_or("unknown".to_string(), |e| e.to_string())
                ),
            ),
        };
        // A removed app's runs are not its next namesake's.
        let removed = killed == Some(KILLED_REMOVED);
        if removed {
            return Ok(RunResult {
                code,
                outcome,
                generation,
                duration: started.elapsed(),
                removed,
            });
        }
        let duration = started.elapsed();
        self.runs.record(
            name,
            RunRecord {
                started_unix_ms,
                duration_ms: duration.as_millis() as u64,
                code,
                outcome: outcome.clone(),
                by: by.to_string(),
            },
        );
        Ok(RunResult {
            code,
            outcome,
            generation,
            duration,
            removed,
        })
    }
}

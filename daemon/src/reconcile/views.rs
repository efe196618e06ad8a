//! What the operator sees of the apps: `cairnctl ls` (`AppView`) and `cairnctl status APP`
//! (`AppDetailView`). Views read each app under its state lock for a moment, so they never
//! wait for a change under way (a deploy compiling, a pool loading, a health check).

use super::apps::{Running, State};
use super::{ReconcileError, Reconciler};
use crate::counters::Counter;
use crate::digest::Digest;
use crate::limits::{AppCgroup, Usage};
use crate::spec::{AppName, AppSpec};
use std::net::SocketAddr;

/// What `cairnctl ls` shows of an app.
#[derive(Debug, Clone)]
pub struct AppView {
    pub name: String,
    pub owner: &'static str,
    pub generation: u64,
    pub status: &'static str,
    /// `None`: a command app.
    pub listen: Option<SocketAddr>,
    pub digest: Digest,
    pub error: String,
}

/// What `cairnctl status APP` adds.
pub struct AppDetailView {
    pub view: AppView,
    pub spec: AppSpec,
    pub allocator: String,
    pub requests: u64,
    pub in_flight: u64,
    pub traps: u64,
    /// Output lines the app's pool dropped (its log queue was full).
    pub log_lines_dropped: u64,
    /// System calls the pool's seccomp filter refused (each named in the daemon's log).
    pub syscalls_denied: u64,
    pub outbound_denied: u64,
    pub timeouts: u64,
    pub rejected: u64,
    pub started_unix: i64,
    pub pid: u32,
    pub restarts: u64,
    /// By reason, in the order of `RESTART_REASONS`.
    pub restarts_by_reason: [u64; 4],
    pub oom_kills: u64,
    pub cold_starts: u64,
    pub cold_start_seconds: f64,
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    /// The time to the response head: its sum in seconds and each bucket's count, not
    /// cumulative (`counters::LATENCY_BUCKETS`, then past them all).
    pub latency: (f64, Vec<u64>),
    pub last_exit: String,
    /// Where the app's limits live, or why there are none.
    pub cgroup: String,
    pub usage: Usage,
}

pub(super) fn view(name: &AppName, running: &Running) -> AppView {
    let (status, error) = match &running.state {
        State::Running { .. } => ("running", String::new()),
        State::Restarting { reason } if running.failures.crashloop => ("crashloop", reason.clone()),
        State::Restarting { reason } => ("restarting", reason.clone()),
        State::Idle { .. } => ("idle", String::new()),
        State::Starting { .. } => ("starting", String::new()),
        State::Ready => ("ready", String::new()),
        State::Failed { reason } | State::Unreadable { reason } => ("failed", reason.clone()),
    };
    AppView {
        name: name.to_string(),
        owner: running.owner.as_str(),
        generation: running.generation,
        status,
        listen: running.spec.listen(),
        digest: running.spec.component.clone(),
        error,
    }
}

/// One app's `[[schedule]]`s as it runs now, for the scheduler.
pub struct AppSchedules {
    pub app: AppName,
    pub generation: u64,
    /// Where the app listens (the scheduler reaches an unspecified address on loopback);
    /// `None`: a command app, which each run starts.
    pub listen: Option<std::net::SocketAddr>,
    pub timeout: std::time::Duration,
    pub schedules: Vec<crate::spec::ScheduleSpec>,
    /// Not failed nor unreadable: its runs fire (a failed app's schedules wait).
    pub serving: bool,
}

impl Reconciler {
    pub async fn list(&self) -> Vec<AppView> {
        self.apps.each(view)
    }

    /// The schedules of every app, and whether it can serve (not failed, nor unreadable).
    pub fn schedules(&self) -> Vec<AppSchedules> {
        self.apps
            .each(|name, running| {
                let serving = !matches!(
                    running.state,
                    State::Failed { .. } | State::Unreadable { .. }
                );
                (!running.spec.schedules.is_empty()).then(|| AppSchedules {
                    app: name.clone(),
                    generation: running.generation,
                    listen: running.spec.listen(),
                    timeout: running.spec.limits.timeout.0,
                    schedules: running.spec.schedules.clone(),
                    serving,
                })
            })
            .into_iter()
            .flatten()
            .collect()
    }

    pub async fn detail(&self, name: &AppName) -> Result<AppDetailView, ReconcileError> {
        let (detail, cgroup) = self
            .apps
            .read(name, |running| {
                let counters = &running.counters;
                let detail = AppDetailView {
                    view: view(name, running),
                    spec: running.spec.clone(),
                    allocator: running.allocator.clone(),
                    requests: counters.get(Counter::Requests),
                    in_flight: counters.get(Counter::InFlight),
                    traps: counters.get(Counter::Traps),
                    log_lines_dropped: counters.get(Counter::LogLinesDropped),
                    syscalls_denied: counters.get(Counter::SyscallsDenied),
                    outbound_denied: counters.get(Counter::OutboundDenied),
                    timeouts: counters.get(Counter::Timeouts),
                    rejected: counters.get(Counter::Rejected),
                    started_unix: running.started_unix,
                    pid: match &running.state {
                        State::Running { pool, .. } => pool.pid,
                        _ => 0,
                    },
                    restarts: running.restarts.total(),
                    restarts_by_reason: running.restarts.by_reason,
                    oom_kills: running.oom_kills,
                    cold_starts: running.cold_starts,
                    cold_start_seconds: running.cold_start_micros as f64 / 1e6,
                    responses: [
                        counters.get(Counter::Status1xx),
                        counters.get(Counter::Status2xx),
                        counters.get(Counter::Status3xx),
                        counters.get(Counter::Status4xx),
                        counters.get(Counter::Status5xx),
                    ],
                    latency: counters.latency(),
                    last_exit: running.last_exit.clone(),
                    cgroup: String::new(),
                    usage: Usage::default(),
                };
                (detail, running.cgroup.clone())
            })
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
        // cgroupfs is read outside the app's lock.
        Ok(AppDetailView {
            cgroup: match &cgroup {
                Some(cgroup) => cgroup.describe(),
                None => self.cgroups.describe(),
            },
            usage: cgroup.as_ref().map(AppCgroup::usage).unwrap_or_default(),
            ..detail
        })
    }

    /// Log lines the pools had to drop because their queue to the supervisor was full.
    pub async fn pool_log_lines_dropped(&self) -> u64 {
        self.apps
            .each(|_, running| running.counters.get(Counter::LogLinesDropped))
            .into_iter()
            .sum()
    }
}

//! What `cairnctl status` shows: the daemon, or one app in detail with its limits and where
//! each is enforced.

use super::errors::{status_of, store_status};
use super::{summary, ControlService};
use crate::spec::{AppName, AppSpec};
use cairn_core::proto;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::Status;

/// How much of an app's `[env]` and `[config]` a caller sees (of `[secrets]`, every caller
/// sees the keys only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Env {
    Values,
    /// Keys, each with `HIDDEN` for its value.
    KeysOnly,
}

/// What a reader who may not change state sees for an `[env]` or `[config]` value.
pub(super) const HIDDEN: &str = "(hidden: only callers who may change state see values)";

/// `entries` as a caller with `env` sees them.
fn shown(
    entries: &std::collections::BTreeMap<String, String>,
    env: Env,
) -> std::collections::HashMap<String, String> {
    entries
        .iter()
        .map(|(key, value)| match env {
            Env::Values => (key.clone(), value.clone()),
            Env::KeysOnly => (key.clone(), HIDDEN.to_string()),
        })
        .collect()
}

impl ControlService {
    pub(super) async fn daemon_status(&self) -> Result<proto::DaemonStatus, Status> {
        let apps = self.reconciler.list().await;
        let components = self
            .store
            .call(|store| store.components())
            .await
            .map_err(|e| store_status(&e))?;
        let usage = self
            .store
            .call(|store| store.usage())
            .await
            .map_err(|e| store_status(&e))?;
        let distinct: std::collections::BTreeSet<String> =
            components.iter().map(|c| c.digest.to_string()).collect();
        let fingerprint = self
            .compiler
            .fingerprint(&Default::default())
            .unwrap_or_else(|e| format!("unavailable: {e}"));
        Ok(proto::DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            state_dir: self.state_dir.display().to_string(),
            socket: self.socket.display().to_string(),
            apps: apps.len() as u64,
            apps_running: apps.iter().filter(|a| a.status == "running").count() as u64,
            unhealthy: apps
                .iter()
                .filter(|a| matches!(a.status, "failed" | "crashloop"))
                .map(|a| format!("{}: {}: {}", a.name, a.status, a.error))
                .collect(),
            components: distinct.len() as u64,
            uptime_seconds: self.started.elapsed().as_secs(),
            engine_fingerprint: fingerprint,
            compiled: self.compiler.compiled.load(Ordering::Relaxed),
            cache_hits: self.compiler.cache_hits.load(Ordering::Relaxed),
            limits: self.limits_note.clone(),
            pool_user: self.pool_users.describe(),
            isolation_gaps: self.pool_users.gaps(),
            import_dir: self
                .import
                .dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            import_lines: self.import.lines.clone(),
            import_problems: self.import.problems.clone(),
            log_lines_dropped: self.logs.dropped() + self.reconciler.pool_log_lines_dropped().await,
            store_bytes: usage.file_bytes,
            store_used: usage.used_bytes,
            store_budget: usage.budget.unwrap_or(0),
            store_disk_free: usage.disk_free,
        })
    }

    pub(super) async fn app_detail(
        &self,
        name: &AppName,
        env: Env,
    ) -> Result<proto::AppDetail, Status> {
        let detail = self
            .reconciler
            .detail(name)
            .await
            .map_err(|e| status_of(&e))?;
        let (kv_writes, kv_commits) = self.reconciler.kv_stats(name);
        let generations_of = name.clone();
        let generations = self
            .store
            .call(move |store| store.generations(&generations_of))
            .await
            .map_err(|e| store_status(&e))?;
        let limit_rows = limit_rows(&detail.spec, &detail.cgroup);
        let (users, app) = (Arc::clone(&self.pool_users), name.clone());
        let pool_user = self
            .store
            .call(move |store| Ok(users.describe_app(store, &app)))
            .await
            .map_err(|e| store_status(&e))?;
        Ok(proto::AppDetail {
            summary: Some(summary(&detail.view)),
            limits: limit_rows,
            generations: generations
                .iter()
                .map(|g| proto::GenerationInfo {
                    generation: g.generation,
                    digest: g.digest.to_string(),
                    created_unix: g.created_unix,
                    current: g.generation == detail.view.generation,
                })
                .collect(),
            env: shown(&detail.spec.env, env),
            config: shown(&detail.spec.config, env),
            secrets: detail
                .spec
                .secrets
                .keys()
                .cloned()
                .chain(
                    detail
                        .spec
                        .device_secrets
                        .iter()
                        .map(|key| format!("{key} (from the device)")),
                )
                .collect(),
            kv_quota: detail.spec.keyvalue.as_ref().map_or(0, |kv| kv.quota.0),
            kv_used: self.reconciler.kv_usage(name),
            kv_writes,
            kv_commits,
            schedules: self
                .scheduler
                .as_ref()
                .map(|scheduler| scheduler.views(name))
                .unwrap_or_default()
                .into_iter()
                .map(|view| schedule_info(view, env == Env::Values))
                .collect(),
            runs: self
                .reconciler
                .recent_runs(name)
                .into_iter()
                .map(|run| proto::CommandRun {
                    started_unix_ms: run.started_unix_ms,
                    duration_ms: run.duration_ms,
                    exit_code: run.code,
                    outcome: run.outcome,
                    by: run.by,
                })
                .collect(),
            allocator: detail.allocator,
            requests: detail.requests,
            in_flight: detail.in_flight,
            traps: detail.traps,
            log_lines_dropped: detail.log_lines_dropped,
            syscalls_denied: detail.syscalls_denied,
            outbound_denied: detail.outbound_denied,
            timeouts: detail.timeouts,
            rejected: detail.rejected,
            health: String::new(),
            started_unix: detail.started_unix,
            pid: detail.pid,
            restarts: detail.restarts,
            restarts_by_reason: detail.restarts_by_reason.to_vec(),
            oom_kills: detail.oom_kills,
            cold_starts: detail.cold_starts,
            cold_start_seconds: detail.cold_start_seconds,
            responses: detail.responses.to_vec(),
            latency_seconds: detail.latency.0,
            latency_buckets: detail.latency.1.clone(),
            last_exit: detail.last_exit,
            cgroup: detail.cgroup.clone(),
            memory_bytes: detail.usage.memory_bytes,
            cpu_usage_nanos: detail.usage.cpu_nanos,
            pids: detail.usage.pids,
            pool_user,
        })
    }
}

/// Each limit of an app, its value and what enforces it (`cgroup`: where the app's cgroup
/// is, or why limits are not enforced).
fn limit_rows(spec: &AppSpec, cgroup: &str) -> Vec<proto::Limit> {
    let limits = &spec.limits;
    let (instances, instances_mean, timeout_per) = if spec.is_command() {
        (
            crate::spec::MAX_RUNS,
            "runs at once, one instance each; more are refused",
            "per run",
        )
    } else {
        (
            limits.instances,
            "concurrent requests; more are answered 503",
            "per request",
        )
    };
    let mut rows = vec![
        proto::Limit {
            name: "memory".into(),
            value: limits.memory.to_string(),
            enforcement: "per instance, by wasmtime (linear memory cap)".into(),
        },
        proto::Limit {
            name: "instances".into(),
            value: instances.to_string(),
            enforcement: instances_mean.into(),
        },
        proto::Limit {
            name: "timeout".into(),
            value: limits.timeout.to_string(),
            enforcement: format!("{timeout_per}, by epoch interruption"),
        },
    ];
    let enforced = !cgroup.starts_with("not enforced");
    let by_cgroup = |what: &str| {
        if enforced {
            format!("for the whole pool, by its cgroup ({what})")
        } else {
            cgroup.to_string()
        }
    };
    rows.push(proto::Limit {
        name: "memory_total".into(),
        value: spec.pool_memory().to_string(),
        enforcement: by_cgroup("memory limit"),
    });
    rows.push(proto::Limit {
        name: "cpu".into(),
        value: match limits.cpu {
            Some(cores) => format!("{cores} cores"),
            None => "no cap".into(),
        },
        enforcement: by_cgroup("CFS quota"),
    });
    rows.push(proto::Limit {
        name: "pids".into(),
        value: spec.pool_pids().to_string(),
        enforcement: by_cgroup("pids limit"),
    });
    rows
}

/// `full`: the caller may change state, and sees a request's query or a run's arguments (either
/// may carry a token) too.
fn schedule_info(view: crate::schedule::ScheduleView, full: bool) -> proto::ScheduleInfo {
    use crate::schedule::Outcome;
    proto::ScheduleInfo {
        name: view.name,
        when: view.when,
        request: if full {
            view.request
        } else if view.command {
            "run (its arguments are shown to those who may change state)".to_string()
        } else {
            crate::schedule::without_query(&view.request).to_string()
        },
        next_unix_ms: view.next_ms,
        runs: view.runs,
        skipped: view.skipped,
        failed: view.failed,
        recent: view
            .recent
            .into_iter()
            .map(|run| {
                let exit_code = match run.outcome {
                    Outcome::Exited(code, _) => Some(code),
                    _ => None,
                };
                let (status, error) = match run.outcome {
                    Outcome::Answered(status) => (u32::from(status), String::new()),
                    Outcome::Exited(0, _) => (0, String::new()),
                    Outcome::Exited(_, how) => (0, how),
                    Outcome::Failed(why) => (0, why),
                    Outcome::Skipped => (0, "skipped: the run before was still running".into()),
                };
                proto::ScheduleRun {
                    due_unix_ms: run.due_ms,
                    started_unix_ms: run.started_ms,
                    duration_ms: run.duration_ms,
                    status,
                    error,
                    caught_up: run.caught_up,
                    exited: exit_code.is_some(),
                    exit_code: exit_code.unwrap_or(0),
                }
            })
            .collect(),
    }
}

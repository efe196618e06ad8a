//! `cairnctl status`: the daemon, or one app in detail.

use crate::output::{app_json, human_size, print_json, print_table, row, short};
use cairn_core::proto::{self, control_client::ControlClient, status_reply::Detail};
use cairn_core::time::utc;
use cairn_ctl::exit::{self, Failure};
use serde_json::json;
use tonic::transport::Channel;

/// `cairnctl status [APP]`.
pub async fn show(
    client: &mut ControlClient<Channel>,
    app: Option<String>,
    json_output: bool,
) -> Result<(), Failure> {
    let reply = client
        .status(proto::StatusRequest {
            app: app.unwrap_or_default(),
        })
        .await?
        .into_inner();
    // Printed in full either way; then an unhealthy app makes the exit say so, for systemd
    // units and a fleet's own checks.
    let unhealthy = match reply.detail {
        Some(Detail::Daemon(daemon)) => {
            print_daemon(&daemon, json_output);
            daemon.unhealthy.len()
        }
        Some(Detail::App(detail)) => {
            print_app(&detail, json_output);
            let status = detail.summary.map(|s| s.status).unwrap_or_default();
            usize::from(matches!(status.as_str(), "failed" | "crashloop"))
        }
        None => {
            return Err(Failure {
                code: exit::FAILURE,
                message: "the daemon sent an empty status".into(),
            })
        }
    };
    match unhealthy {
        0 => Ok(()),
        1 => Err(Failure {
            code: exit::UNHEALTHY,
            message: "an app is failed or in a crashloop".into(),
        }),
        count => Err(Failure {
            code: exit::UNHEALTHY,
            message: format!("{count} apps are failed or in a crashloop"),
        }),
    }
}

/// The store's size, and its budget: `12.0MiB (9.1MiB used) of a 1.0GiB budget`.
fn store_line(daemon: &proto::DaemonStatus) -> String {
    let size = format!(
        "{} ({} used)",
        human_size(daemon.store_bytes),
        human_size(daemon.store_used)
    );
    let budget = match daemon.store_budget {
        0 => format!("{size}, no budget ([store] budget sets one)"),
        budget => format!("{size} of a {} budget", human_size(budget)),
    };
    match daemon.store_disk_free {
        Some(free) if free < 16 << 20 => {
            format!(
                "{budget}; its disk is FULL ({} free): free some space",
                human_size(free)
            )
        }
        Some(free) => format!("{budget}; {} free on its disk", human_size(free)),
        None => budget,
    }
}

fn print_daemon(daemon: &proto::DaemonStatus, json_output: bool) {
    if json_output {
        print_json(&json!({
            "version": daemon.version, "state_dir": daemon.state_dir, "socket": daemon.socket,
            "apps": daemon.apps, "apps_running": daemon.apps_running, "components": daemon.components,
            "uptime_seconds": daemon.uptime_seconds, "engine_fingerprint": daemon.engine_fingerprint,
            "compiled": daemon.compiled, "cache_hits": daemon.cache_hits, "limits": daemon.limits,
                        "log_lines_dropped": daemon.log_lines_dropped, "pool_user": daemon.pool_user,
            "isolation_gaps": daemon.isolation_gaps,
            "store": {"bytes": daemon.store_bytes, "used": daemon.store_used, "budget": daemon.store_budget, "disk_free": daemon.store_disk_free},
            "import": {"dir": daemon.import_dir, "lines": daemon.import_lines, "problems": daemon.import_problems},
            "unhealthy": daemon.unhealthy,
        }));
        return;
    }
    let mut rows = vec![
        row(["version", &daemon.version]),
        row(["state", &daemon.state_dir]),
        row(["socket", &daemon.socket]),
        row([
            "apps",
            &format!("{} ({} running)", daemon.apps, daemon.apps_running),
        ]),
        row(["components", &daemon.components.to_string()]),
        row(["uptime", &format!("{}s", daemon.uptime_seconds)]),
        row(["engine", &daemon.engine_fingerprint]),
        row([
            "code",
            &format!(
                "{} compiled, {} loaded precompiled since start",
                daemon.compiled, daemon.cache_hits
            ),
        ]),
        row(["limits", &daemon.limits]),
        row(["pools run as", &daemon.pool_user]),
        row(["log lines dropped", &daemon.log_lines_dropped.to_string()]),
        row(["store", &store_line(daemon)]),
    ];
    for app in &daemon.unhealthy {
        rows.push(row(["UNHEALTHY", app]));
    }
    for gap in &daemon.isolation_gaps {
        rows.push(row(["ISOLATION GAP", gap]));
    }
    if !daemon.import_dir.is_empty() {
        rows.push(row(["import from", &daemon.import_dir]));
        for line in &daemon.import_lines {
            rows.push(row(["import", line]));
        }
        for problem in &daemon.import_problems {
            rows.push(row(["IMPORT PROBLEM", problem]));
        }
    }
    print_table(&rows);
}

/// A count, with what a count above zero means.
fn explained(count: u64, meaning: &str) -> String {
    if count == 0 {
        "0".to_string()
    } else {
        format!("{count} ({meaning})")
    }
}

fn print_app(detail: &proto::AppDetail, json_output: bool) {
    let app = detail.summary.clone().unwrap_or_default();
    if json_output {
        let mut value = app_json(&app);
        let object = value.as_object_mut().expect("app_json is an object");
        object.insert(
            "limits".into(),
            json!(detail
                .limits
                .iter()
                .map(|l| json!({"name": l.name, "value": l.value, "enforcement": l.enforcement}))
                .collect::<Vec<_>>()),
        );
        object.insert("generations".into(), json!(detail.generations.iter().map(|g| json!({"generation": g.generation, "digest": g.digest, "created": g.created_unix, "current": g.current})).collect::<Vec<_>>()));
        object.insert("env".into(), json!(detail.env));
        object.insert("config".into(), json!(detail.config));
        object.insert("secrets".into(), json!(detail.secrets));
        object.insert(
            "runs".into(),
            json!(detail
                .runs
                .iter()
                .map(|r| json!({
                    "started_ms": r.started_unix_ms, "duration_ms": r.duration_ms,
                    "exit_code": r.exit_code, "outcome": r.outcome, "by": r.by,
                }))
                .collect::<Vec<_>>()),
        );
        object.insert(
            "schedules".into(),
            json!(detail
                .schedules
                .iter()
                .map(|s| json!({
                    "name": s.name, "when": s.when, "request": s.request,
                    "next_ms": s.next_unix_ms, "runs": s.runs, "skipped": s.skipped, "failed": s.failed,
                    "recent": s.recent.iter().map(|r| json!({
                        "due_ms": r.due_unix_ms, "started_ms": r.started_unix_ms,
                        "duration_ms": r.duration_ms, "status": r.status, "error": r.error,
                        "caught_up": r.caught_up,
                        "exit_code": r.exited.then_some(r.exit_code),
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()),
        );
        object.insert(
            "keyvalue".into(),
            json!({"quota": detail.kv_quota, "used": detail.kv_used, "writes": detail.kv_writes, "commits": detail.kv_commits}),
        );
        object.insert("allocator".into(), json!(detail.allocator));
        object.insert("requests".into(), json!(detail.requests));
        object.insert("in_flight".into(), json!(detail.in_flight));
        object.insert("traps".into(), json!(detail.traps));
        object.insert("timeouts".into(), json!(detail.timeouts));
        object.insert("rejected".into(), json!(detail.rejected));
        object.insert("started".into(), json!(detail.started_unix));
        object.insert("pid".into(), json!(detail.pid));
        object.insert("restarts".into(), json!(detail.restarts));
        object.insert("last_exit".into(), json!(detail.last_exit));
        object.insert("cgroup".into(), json!(detail.cgroup));
        object.insert("memory_bytes".into(), json!(detail.memory_bytes));
        object.insert("cpu_usage_nanos".into(), json!(detail.cpu_usage_nanos));
        object.insert("pids".into(), json!(detail.pids));
        object.insert("pool_user".into(), json!(detail.pool_user));
        object.insert("log_lines_dropped".into(), json!(detail.log_lines_dropped));
        object.insert("syscalls_denied".into(), json!(detail.syscalls_denied));
        object.insert("outbound_denied".into(), json!(detail.outbound_denied));
        print_json(&value);
        return;
    }
    let mut rows = vec![
        row(["name", &app.name]),
        row(["status", &app.status]),
        row(["generation", &app.generation.to_string()]),
        row(["owner", &app.owner]),
        row([
            "listen",
            &if app.listen.is_empty() {
                "none: a command app, run by `cairnctl run` and its schedules".to_string()
            } else {
                format!("http://{}", app.listen)
            },
        ]),
        row(["component", &app.digest]),
        row(["allocator", &detail.allocator]),
        row([
            "pool",
            &format!(
                "pid {}, {} restart(s){}",
                detail.pid,
                detail.restarts,
                if detail.last_exit.is_empty() {
                    String::new()
                } else {
                    format!(", last exit: {}", detail.last_exit)
                }
            ),
        ]),
        row(["pool user", &detail.pool_user]),
        row(["started", &utc(detail.started_unix)]),
        row(["cgroup", &detail.cgroup]),
        row([
            "usage",
            &format!(
                "memory {}, cpu {:.2}s, {} pids",
                human_size(detail.memory_bytes),
                detail.cpu_usage_nanos as f64 / 1e9,
                detail.pids
            ),
        ]),
        row([
            "requests",
            &format!(
                "{} served, {} in flight, {} trapped, {} timed out, {} rejected (503)",
                detail.requests, detail.in_flight, detail.traps, detail.timeouts, detail.rejected
            ),
        ]),
        row(["log lines dropped", &detail.log_lines_dropped.to_string()]),
        row([
            "outgoing HTTP refused",
            &explained(
                detail.outbound_denied,
                "apps are not granted outgoing HTTP; the app's log names the URLs",
            ),
        ]),
        row([
            "system calls denied",
            &explained(
                detail.syscalls_denied,
                "a guest that escaped wasmtime, or a call cairn's filter misses: the names are in cairnd's log",
            ),
        ]),
    ];
    if !app.error.is_empty() {
        rows.push(row(["error", &app.error]));
    }
    for limit in &detail.limits {
        rows.push(row([
            &format!("limit {}", limit.name),
            &format!("{} ({})", limit.value, limit.enforcement),
        ]));
    }
    for (key, value) in &detail.env {
        rows.push(row([&format!("env {key}"), value]));
    }
    let config: std::collections::BTreeMap<_, _> = detail.config.iter().collect();
    for (key, value) in config {
        rows.push(row([&format!("config {key}"), value]));
    }
    for key in &detail.secrets {
        rows.push(row([&format!("secret {key}"), "(never shown)"]));
    }
    if let Some(last) = detail.runs.last() {
        let failed = detail.runs.iter().filter(|r| r.exit_code != 0).count();
        rows.push(row([
            "runs",
            &format!(
                "{} kept ({failed} not exit 0); last {} by {}: {} after {} ms",
                detail.runs.len(),
                crate::output::utc_millis(last.started_unix_ms),
                last.by,
                last.outcome,
                last.duration_ms
            ),
        ]));
    }
    for schedule in &detail.schedules {
        let last = match schedule.recent.last() {
            None => "not run yet".to_string(),
            Some(run) if run.exited => format!(
                "last {} exited {} after {} ms",
                crate::output::utc_millis(run.started_unix_ms),
                run.exit_code,
                run.duration_ms
            ),
            Some(run) if run.status != 0 => format!(
                "last {} answered {} in {} ms",
                crate::output::utc_millis(run.started_unix_ms),
                run.status,
                run.duration_ms
            ),
            Some(run) => format!(
                "last {}: {}",
                crate::output::utc_millis(run.started_unix_ms),
                run.error
            ),
        };
        let next = if schedule.next_unix_ms == 0 {
            "never".to_string()
        } else {
            crate::output::utc_millis(schedule.next_unix_ms)
        };
        rows.push(row([
            &format!("schedule {}", schedule.name),
            &format!(
                "{}, {}; {} runs, {} skipped, {} failed since cairnd started; {last}; next {next}",
                schedule.when, schedule.request, schedule.runs, schedule.skipped, schedule.failed
            ),
        ]));
    }
    match (detail.kv_quota, detail.kv_used) {
        (0, None) => {}
        (0, Some(used)) => rows.push(row([
            "keyvalue",
            &format!(
                "{} kept, no [keyvalue] in this generation",
                human_size(used)
            ),
        ])),
        (quota, used) => rows.push(row([
            "keyvalue",
            &format!(
                "{} of {} quota; {} writes in {} commits since cairnd started",
                human_size(used.unwrap_or(0)),
                human_size(quota),
                detail.kv_writes,
                detail.kv_commits
            ),
        ])),
    }
    for generation in &detail.generations {
        let marker = if generation.current { " (current)" } else { "" };
        rows.push(row([
            &format!("generation {}", generation.generation),
            &format!(
                "{} {}{marker}",
                short(&generation.digest),
                utc(generation.created_unix)
            ),
        ]));
    }
    print_table(&rows);
}

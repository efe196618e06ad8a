//! cairnctl: drives a cairn daemon over its unix socket. Tables for people, `-o json` for
//! scripts; errors say what was wrong and what to do, and the exit code says which kind of
//! failure it was (see `cairn_ctl::exit`).

mod fleet_cli;

use anyhow::Context as _;
use cairn_core::proto::{
    self, control_client::ControlClient, push_chunk::Part, status_reply::Detail,
};
use cairn_core::time::utc;
use cairn_ctl::exit;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

const CHUNK: usize = 256 << 10;

/// Drive a cairn daemon: push components, deploy apps, read status and logs, roll back.
///
/// Works with no network: it talks to cairnd over a unix socket on the same device.
#[derive(Parser)]
#[command(name = "cairnctl", version)]
struct Cli {
    /// The daemon's control socket [default: /run/cairn/cairnd.sock as root, else
    /// $XDG_RUNTIME_DIR/cairn/cairnd.sock]
    #[arg(long, global = true, value_name = "PATH", env = cairn_core::paths::SOCKET_ENV)]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Store a component (.wasm) on the device; prints its digest (sha256:<hex>).
    Push {
        /// The component file.
        file: PathBuf,
        /// A name for the component [default: the file name without .wasm].
        #[arg(long)]
        name: Option<String>,
        /// A tag under that name.
        #[arg(long, default_value = "latest")]
        tag: String,
    },
    /// Deploy a new generation of an app, from a manifest or from flags.
    ///
    /// The new generation replaces the running one only once it is loaded and listening;
    /// if anything fails the app keeps running as it was and the reason is printed.
    Deploy(DeployArgs),
    /// List apps: name, generation, status, listen address, component digest.
    Ls,
    /// List stored components and the apps that use them.
    Components,
    /// Show the daemon's status, or one app's detail (limits, generations, counters).
    Status {
        /// An app name; without it, the daemon.
        app: Option<String>,
    },
    /// Print an app's recorded stdout/stderr and cairn's notes about it.
    Logs {
        app: String,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines [default: all kept lines].
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Make an earlier generation current again (by default, the one before the current).
    Rollback {
        app: String,
        /// The generation to return to.
        #[arg(long, value_name = "GENERATION")]
        to: Option<u64>,
    },
    /// Stop an app and forget its generations and logs (components stay stored).
    Rm { app: String },
    /// This device's link to the upstream lattice.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// Drive a fleet through the upstream lattice (NATS JetStream); needs no local daemon.
    Fleet {
        #[command(subcommand)]
        command: fleet_cli::FleetCommand,
    },
    /// Print a completion script for a shell, e.g. `cairnctl completions bash >
    /// /etc/bash_completion.d/cairnctl` (the package installs them already).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (cairnctl.1 and one per subcommand) into DIR, as the package
    /// installs them.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum SyncCommand {
    /// State of the link, last success, last error, applied versions, backlog, rejections.
    Status,
    /// Try to reach the upstream now instead of waiting for the next retry.
    Now,
}

#[derive(Args)]
struct DeployArgs {
    /// The app's name (with flags; a manifest names its app itself).
    name: Option<String>,
    /// A TOML manifest; a `component` path in it is relative to the manifest and is uploaded.
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["name", "component", "listen"])]
    file: Option<PathBuf>,
    /// A component file to upload, or the digest (sha256:<hex>) of a pushed one.
    #[arg(long, value_name = "FILE|DIGEST")]
    component: Option<String>,
    /// The address to serve HTTP on, such as 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Linear memory per instance, such as 64MiB.
    #[arg(long)]
    memory: Option<String>,
    /// CPU cores the app's pool may use, such as 0.5.
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory the app's whole pool may use, such as 256MiB.
    #[arg(long)]
    memory_total: Option<String>,
    /// Processes and threads the app's pool may have.
    #[arg(long)]
    pids: Option<u32>,
    /// Stop the app's pool after this long without a request, such as 30s; the next
    /// connection starts it again.
    #[arg(long)]
    idle: Option<String>,
    /// A path the app answers 2xx on when healthy, such as /health; a new generation goes live
    /// only once it does.
    #[arg(long)]
    health: Option<String>,
    /// Requests served at once; more get 503.
    #[arg(long)]
    instances: Option<u32>,
    /// Deadline per request, such as 5s.
    #[arg(long)]
    timeout: Option<String>,
    /// An environment variable for the app, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
}

/// A failure with the exit code it deserves.
struct Failure {
    code: i32,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure {
            code: exit::from_code(status.code()),
            message: status.message().to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure {
            code: exit::INVALID,
            message: format!("{error:#}"),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => exit::OK,
        Err(failure) => {
            eprintln!("cairnctl: {}", failure.message);
            failure.code
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json_output = cli.output == Output::Json;
    let command = match cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "cairnctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => {
            return clap_mangen::generate_to(Cli::command(), &dir).map_err(|e| Failure {
                code: exit::FAILURE,
                message: format!("cannot write the man pages into {}: {e}", dir.display()),
            });
        }
        Command::Fleet { command } => {
            return fleet_cli::run(command, json_output)
                .await
                .map_err(|error| Failure {
                    code: exit::FAILURE,
                    message: format!("{error:#}"),
                })
        }
        other => other,
    };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(cairn_core::paths::default_socket);
    let mut client = cairn_ctl::client::connect(&socket)
        .await
        .map_err(|error| Failure {
            code: match error {
                cairn_ctl::client::ConnectError::Permission { .. } => exit::PERMISSION,
                _ => exit::UNREACHABLE,
            },
            message: error.to_string(),
        })?;
    match command {
        Command::Push { file, name, tag } => {
            let reply = push(&mut client, &file, name, &tag).await?;
            if json_output {
                print_json(
                    &json!({"digest": reply.digest, "size": reply.size, "name": reply.name, "tag": reply.tag, "already_present": reply.already_present}),
                );
            } else {
                println!("{}", reply.digest);
            }
        }
        Command::Deploy(args) => {
            let manifest = build_manifest(&mut client, args).await?;
            let reply = client
                .deploy(proto::DeployRequest { manifest })
                .await?
                .into_inner();
            let app = reply.app.unwrap_or_default();
            if json_output {
                print_json(&json!({"app": app_json(&app), "unchanged": reply.unchanged}));
            } else if reply.unchanged {
                println!(
                    "{} is already at generation {} with this manifest; nothing changed",
                    app.name, app.generation
                );
            } else {
                println!(
                    "{} generation {} is {} on http://{}",
                    app.name, app.generation, app.status, app.listen
                );
            }
        }
        Command::Ls => {
            let apps = client
                .list_apps(proto::ListAppsRequest {})
                .await?
                .into_inner()
                .apps;
            if json_output {
                print_json(&json!(apps.iter().map(app_json).collect::<Vec<_>>()));
            } else {
                let mut rows = vec![row(["NAME", "GEN", "STATUS", "LISTEN", "DIGEST", "OWNER"])];
                for app in &apps {
                    rows.push(vec![
                        app.name.clone(),
                        app.generation.to_string(),
                        app.status.clone(),
                        app.listen.clone(),
                        short(&app.digest),
                        app.owner.clone(),
                    ]);
                }
                print_table(&rows);
                for app in apps.iter().filter(|a| !a.error.is_empty()) {
                    println!("\n{}: {}", app.name, app.error);
                }
            }
        }
        Command::Components => {
            let components = client
                .list_components(proto::ListComponentsRequest {})
                .await?
                .into_inner()
                .components;
            if json_output {
                print_json(&json!(components
                    .iter()
                    .map(|c| json!({"digest": c.digest, "size": c.size, "name": c.name, "tag": c.tag, "source": c.source, "created": c.created_unix, "used_by": c.used_by}))
                    .collect::<Vec<_>>()));
            } else {
                let mut rows = vec![row(["DIGEST", "NAME:TAG", "SIZE", "CREATED", "USED BY"])];
                for c in &components {
                    let named = if c.name.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{}:{}", c.name, c.tag)
                    };
                    rows.push(vec![
                        short(&c.digest),
                        named,
                        human_size(c.size),
                        utc(c.created_unix),
                        c.used_by.join(","),
                    ]);
                }
                print_table(&rows);
            }
        }
        Command::Status { app } => {
            let reply = client
                .status(proto::StatusRequest {
                    app: app.unwrap_or_default(),
                })
                .await?
                .into_inner();
            match reply.detail {
                Some(Detail::Daemon(daemon)) => print_daemon(&daemon, json_output),
                Some(Detail::App(detail)) => print_app(&detail, json_output),
                None => {
                    return Err(Failure {
                        code: exit::FAILURE,
                        message: "the daemon sent an empty status".into(),
                    })
                }
            }
        }
        Command::Logs { app, follow, tail } => {
            let mut stream = client
                .logs(proto::LogsRequest {
                    app,
                    follow,
                    tail: tail.unwrap_or(0),
                })
                .await?
                .into_inner();
            let stdout = std::io::stdout();
            while let Some(line) = stream.message().await? {
                let mut out = stdout.lock();
                let written = if json_output {
                    writeln!(
                        out,
                        "{}",
                        json!({"id": line.id, "time_ms": line.unix_millis, "stream": line.stream, "generation": line.generation, "line": line.line})
                    )
                } else {
                    writeln!(
                        out,
                        "{} [{}] {}",
                        utc_millis(line.unix_millis),
                        line.stream,
                        line.line
                    )
                };
                if written.and_then(|_| out.flush()).is_err() {
                    break; // the reader went away (a closed pipe): stop quietly
                }
            }
        }
        Command::Rollback { app, to } => {
            let reply = client
                .rollback(proto::RollbackRequest {
                    app,
                    to_generation: to.unwrap_or(0),
                })
                .await?
                .into_inner();
            let app = reply.app.unwrap_or_default();
            if json_output {
                print_json(&app_json(&app));
            } else {
                println!(
                    "{} is back at generation {} ({}) on http://{}",
                    app.name,
                    app.generation,
                    short(&app.digest),
                    app.listen
                );
            }
        }
        Command::Sync {
            command: SyncCommand::Status,
        } => {
            let status = client
                .sync_status(proto::SyncStatusRequest {})
                .await?
                .into_inner();
            print_sync(&status, json_output);
        }
        Command::Sync {
            command: SyncCommand::Now,
        } => {
            let status = client
                .sync_now(proto::SyncNowRequest {})
                .await?
                .into_inner();
            print_sync(&status, json_output);
        }
        Command::Fleet { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
        Command::Rm { app } => {
            client
                .remove(proto::RemoveRequest { app: app.clone() })
                .await?;
            if json_output {
                print_json(&json!({"removed": app}));
            } else {
                println!("removed {app}");
            }
        }
    }
    Ok(())
}

/// Uploads `file` in chunks, showing progress on a terminal.
async fn push(
    client: &mut ControlClient<Channel>,
    file: &Path,
    name: Option<String>,
    tag: &str,
) -> Result<proto::PushReply, Failure> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let name = name.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "component".into())
    });
    let size = bytes.len() as u64;
    let show_progress = std::io::stderr().is_terminal() && size > 4 * CHUNK as u64;
    let meta = proto::PushChunk {
        part: Some(Part::Meta(proto::PushMeta {
            name,
            tag: tag.to_string(),
            size,
            digest,
        })),
    };
    let chunks: Vec<proto::PushChunk> = bytes
        .chunks(CHUNK)
        .map(|chunk| proto::PushChunk {
            part: Some(Part::Data(chunk.to_vec())),
        })
        .collect();
    let total = chunks.len();
    let stream = tokio_stream::iter(std::iter::once(meta).chain(
        chunks.into_iter().enumerate().map(move |(index, chunk)| {
            if show_progress {
                eprint!(
                    "\rpushing {}: {:>3}%",
                    human_size(size),
                    (index + 1) * 100 / total
                );
                if index + 1 == total {
                    eprintln!();
                }
            }
            chunk
        }),
    ));
    Ok(client.push(stream).await?.into_inner())
}

/// Turns `deploy` arguments into the manifest the daemon parses, uploading a component file
/// named by path first.
async fn build_manifest(
    client: &mut ControlClient<Channel>,
    args: DeployArgs,
) -> Result<String, Failure> {
    let invalid = |message: String| Failure {
        code: exit::INVALID,
        message,
    };
    let (mut table, base) = if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the manifest {}", file.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            invalid(format!(
                "{} is not valid TOML: {}",
                file.display(),
                e.message()
            ))
        })?;
        (
            table,
            file.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    } else {
        let name = args
            .name
            .clone()
            .ok_or_else(|| invalid("give the app a NAME, or a manifest with -f FILE".into()))?;
        let component = args
            .component
            .clone()
            .ok_or_else(|| invalid("give --component FILE|sha256:HEX".into()))?;
        let listen = args
            .listen
            .clone()
            .ok_or_else(|| invalid("give --listen ADDR, such as 127.0.0.1:8080".into()))?;
        let mut table = toml::Table::new();
        table.insert("name".into(), name.into());
        table.insert("component".into(), component.into());
        let mut http = toml::Table::new();
        http.insert("listen".into(), listen.into());
        table.insert("http".into(), http.into());
        (table, PathBuf::from("."))
    };
    // Flags refine a manifest too.
    let mut limits = table
        .get("limits")
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default();
    if let Some(memory) = args.memory {
        limits.insert("memory".into(), memory.into());
    }
    if let Some(cpu) = args.cpu {
        limits.insert("cpu".into(), cpu.into());
    }
    if let Some(memory_total) = args.memory_total {
        limits.insert("memory_total".into(), memory_total.into());
    }
    if let Some(pids) = args.pids {
        limits.insert("pids".into(), i64::from(pids).into());
    }
    if let Some(idle) = args.idle {
        limits.insert("idle".into(), idle.into());
    }
    if let Some(health) = args.health {
        let mut http = table
            .get("http")
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        http.insert("health".into(), health.into());
        table.insert("http".into(), http.into());
    }
    if let Some(instances) = args.instances {
        limits.insert("instances".into(), i64::from(instances).into());
    }
    if let Some(timeout) = args.timeout {
        limits.insert("timeout".into(), timeout.into());
    }
    if !limits.is_empty() {
        table.insert("limits".into(), limits.into());
    }
    if !args.env.is_empty() {
        let mut env = table
            .get("env")
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        for pair in &args.env {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("--env {pair}: write it as KEY=VALUE")))?;
            env.insert(key.into(), value.into());
        }
        table.insert("env".into(), env.into());
    }
    let component = table
        .get("component")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            invalid("the manifest has no `component` (a file path or sha256:<hex>)".into())
        })?
        .to_string();
    if !component.starts_with("sha256:") {
        let path = base.join(&component);
        if !path.is_file() {
            return Err(invalid(format!(
                "component file {} does not exist (paths in a manifest are relative to the manifest)",
                path.display()
            )));
        }
        // Untagged: if the deploy fails, the daemon drops the upload again.
        let reply = push(client, &path, Some(String::new()), "").await?;
        table.insert("component".into(), reply.digest.into());
    }
    toml::to_string(&table).map_err(|e| invalid(e.to_string()))
}

fn app_json(app: &proto::AppSummary) -> serde_json::Value {
    json!({
        "name": app.name,
        "generation": app.generation,
        "status": app.status,
        "listen": app.listen,
        "digest": app.digest,
        "owner": app.owner,
        "error": app.error,
    })
}

fn print_sync(status: &proto::SyncStatusReply, json_output: bool) {
    if json_output {
        print_json(&json!({
            "state": status.state, "upstream": status.upstream, "device": status.device,
            "last_success": status.last_success_unix, "last_error": status.last_error,
            "backlog": status.backlog, "dropped": status.dropped,
            "applied": status.applied.iter().map(|a| json!({"key": a.key, "version": a.version, "applied": a.applied_unix})).collect::<Vec<_>>(),
            "rejections": status.rejections.iter().map(|r| json!({"key": r.key, "reason": r.reason, "at": r.unix})).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut rows = vec![
        row(["state", &status.state]),
        row(["upstream", &status.upstream]),
        row(["device", &status.device]),
        row([
            "last success",
            &if status.last_success_unix == 0 {
                "never".to_string()
            } else {
                utc(status.last_success_unix)
            },
        ]),
        row(["last error", &status.last_error]),
        row([
            "backlog",
            &format!(
                "{} report(s) waiting, {} dropped",
                status.backlog, status.dropped
            ),
        ]),
    ];
    for applied in &status.applied {
        rows.push(row([
            &format!("applied {}", applied.key),
            &format!(
                "version {} at {}",
                applied.version,
                utc(applied.applied_unix)
            ),
        ]));
    }
    for rejection in &status.rejections {
        rows.push(row([
            &format!("rejected {}", rejection.key),
            &format!("{} ({})", rejection.reason, utc(rejection.unix)),
        ]));
    }
    print_table(&rows);
}

fn print_daemon(daemon: &proto::DaemonStatus, json_output: bool) {
    if json_output {
        print_json(&json!({
            "version": daemon.version, "state_dir": daemon.state_dir, "socket": daemon.socket,
            "apps": daemon.apps, "apps_running": daemon.apps_running, "components": daemon.components,
            "uptime_seconds": daemon.uptime_seconds, "engine_fingerprint": daemon.engine_fingerprint,
            "compiled": daemon.compiled, "cache_hits": daemon.cache_hits, "limits": daemon.limits,
                        "log_lines_dropped": daemon.log_lines_dropped, "pool_user": daemon.pool_user,
            "import": {"dir": daemon.import_dir, "lines": daemon.import_lines, "problems": daemon.import_problems},
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
    ];
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
        print_json(&value);
        return;
    }
    let mut rows = vec![
        row(["name", &app.name]),
        row(["status", &app.status]),
        row(["generation", &app.generation.to_string()]),
        row(["owner", &app.owner]),
        row(["listen", &format!("http://{}", app.listen)]),
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

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

fn short(digest: &str) -> String {
    digest.get(..19).unwrap_or(digest).to_string()
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

fn utc_millis(millis: i64) -> String {
    format!(
        "{}.{:03}",
        utc(millis.div_euclid(1000)),
        millis.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_638_118), "2026-11-25 20:21:58");
        assert_eq!(utc_millis(1_795_638_118_042), "2026-11-25 20:21:58.042");
    }
}

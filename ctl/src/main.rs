//! cairnctl: drives a cairn daemon over its unix socket. Tables for people, `-o json` for
//! scripts; errors say what was wrong and what to do, and the exit code says which kind of
//! failure it was (see `cairn_ctl::exit`).

mod apps;
mod components;
mod fleet_cli;
mod kv;
mod logs;
mod output;
mod run;
mod status;
mod sync;

use cairn_ctl::exit::{self, Failure};
use clap::{CommandFactory, Parser, Subcommand};
use output::Output;
use std::path::PathBuf;

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
    Deploy(apps::DeployArgs),
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
        /// Only lines at LEVEL or above. Lines logged through wasi:logging carry their level;
        /// stdout and stderr count as info, cairn's own notes as warn.
        #[arg(long, value_name = "LEVEL", value_parser = cairn_core::levels::LEVELS)]
        level: Option<String>,
        /// Only lines since WHEN: a time ago (`10m`, `2h`, `3d`) or a UTC time
        /// (`2026-12-03 19:00[:00]`, or RFC 3339 with `T` and `Z`).
        #[arg(long, value_name = "WHEN", value_parser = logs::since)]
        since: Option<i64>,
    },
    /// What happened to apps and the device, oldest first: deploys and failed deploys,
    /// rollbacks, restarts, exits, OOM kills, crashloops and restores, removals, imports and
    /// changes of the link to the upstream. With APP, that app's and the device's own.
    Events {
        app: Option<String>,
        /// Keep printing new events as they happen.
        #[arg(short, long)]
        follow: bool,
        /// Only events since WHEN: a time ago (`10m`, `2h`, `3d`) or a UTC time
        /// (`2026-12-03 19:00[:00]`, or RFC 3339 with `T` and `Z`).
        #[arg(long, value_name = "WHEN", value_parser = logs::since)]
        since: Option<i64>,
        /// Only the last N [default: all kept, up to 10,000].
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Run a command app once: one made of a component that exports wasi:cli/run, deployed
    /// without --listen (or a manifest without [http]). It runs on the device as its
    /// schedules do, in a pool of its own with the app's limits, user, [env], [config] and
    /// key-value store. Its output is shown as it comes (its stdout on stdout, the rest on
    /// stderr) and cairnctl exits with its exit code: 124 when it was stopped at its
    /// [limits] timeout, 134 when it trapped, 128+N when its pool was killed by signal N;
    /// 125 when the run could not start. Interrupting cairnctl does not stop the run; its
    /// output stays in `cairnctl logs APP`.
    Run {
        /// The app.
        app: String,
        /// Arguments for the command, after `--` (its argv[0] is the app's name).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Make an earlier generation current again (by default, the one before the current).
    Rollback {
        app: String,
        /// The generation to return to.
        #[arg(long, value_name = "GENERATION")]
        to: Option<u64>,
    },
    /// Stop an app and forget its generations and logs (its components stay while they are
    /// named; the rest are collected after `[store] grace`). Its key-value data is deleted
    /// too, unless `--keep-data`: an app deployed again under the same name then finds it.
    Rm {
        app: String,
        /// Keep the app's key-value data.
        #[arg(long)]
        keep_data: bool,
    },
    /// An app's key-value data (what its guests keep through wasi:keyvalue or Spin's
    /// key-value): list, read, write, delete, export and import. Listing keys needs read
    /// access; values, writes and export need the right to change state.
    Kv {
        app: String,
        #[command(subcommand)]
        command: kv::KvCommand,
    },
    /// Collect now what the store no longer keeps and give the space back: generations past
    /// `[store] keep_generations`, components no generation, name or fleet document uses
    /// (stored longer than `[store] grace` ago), their compiled code, and log text past
    /// `log_bytes_total`. cairnd also does this hourly, and before refusing a component for
    /// the store's budget.
    Gc,
    /// This device's link to the upstream lattice.
    Sync {
        #[command(subcommand)]
        command: sync::SyncCommand,
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

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => exit::OK,
        // A run's exit code, passed on without a word (the run said what it had to).
        Err(failure) if failure.message.is_empty() => failure.code,
        Err(failure) => {
            // A failure can carry guest text (a load error, a failed health check).
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            eprintln!(
                "cairnctl: {}",
                output::for_terminal_if(terminal, &failure.message)
            );
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
    let client = &mut client;
    match command {
        Command::Push { file, name, tag } => {
            components::push_file(client, file, name, tag, json_output).await
        }
        Command::Deploy(args) => apps::deploy(client, args, json_output).await,
        Command::Ls => apps::list(client, json_output).await,
        Command::Components => components::list(client, json_output).await,
        Command::Status { app } => status::show(client, app, json_output).await,
        Command::Logs {
            app,
            follow,
            tail,
            level,
            since,
        } => logs::show(client, app, follow, tail, level, since, json_output).await,
        Command::Events {
            app,
            follow,
            since,
            tail,
        } => logs::events(client, app, follow, since, tail, json_output).await,
        Command::Rollback { app, to } => apps::rollback(client, app, to, json_output).await,
        Command::Run { app, args } => run::run(client, app, args, json_output).await,
        Command::Rm { app, keep_data } => apps::remove(client, app, keep_data, json_output).await,
        Command::Gc => components::collect(client, json_output).await,
        Command::Kv { app, command } => kv::run(client, app, command, json_output).await,
        Command::Sync { command } => sync::run(client, command, json_output).await,
        Command::Fleet { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
    }
}

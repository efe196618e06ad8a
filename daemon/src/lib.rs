//! cairnd: the cairn daemon. It keeps WebAssembly components and all its state in one SQLite
//! database, runs each app's `wasi:http` component in wasmtime behind its own listener, and is
//! driven by `cairnctl` over a unix socket.
//!
//! Layout (each layer uses only those below it):
//! - `supervisor`: wiring, systemd readiness and watchdog, signals, shutdown.
//! - `control`: the gRPC control server and its authorisation.
//! - `import`: the import folder (an image's boot partition): config overlay and preloaded apps.
//! - `sync`: the link to the upstream lattice.
//! - `reconcile`: the only code that changes what runs (deploy, rollback, remove, start-up).
//! - `admission`: the one way in for components (push, import, fleet).
//! - `spawn` (starting pool processes), `logs` (output pipeline), `kv` (apps' key-value stores)
//!   and `outbound` (connections for apps' outgoing requests), which pools reach by socket.
//! - `pool`: the pool process (`cairnd pool`): its protocol, runtime, guest host and HTTP front.
//! - `engine` (wasmtime settings, compiling), `store` (SQLite), `counters` (the shared request
//!   counters), `limits` (cgroups), `config`, `systemd`, `regular_file`, `alloc` (the memory
//!   allocator, per role); `spec` and `digest` come from `cairn-core`.
//!
//! A library so that `fuzz/` can reach the parsers (`fuzzing`); the binary (`main.rs`) only
//! calls [`cli`]. Every module stays private to the crate.

mod admission;
mod alloc;
mod config;
mod control;
mod counters;
mod engine;
pub mod fuzzing;
mod import;
mod kv;
mod limits;
mod logs;
mod outbound;
mod pool;
mod pool_users;
mod reconcile;
mod regular_file;
mod schedule;
mod secrets;
mod spawn;
mod store;
mod supervisor;
mod sync;
mod systemd;

use cairn_core::{digest, spec};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The cairn daemon: runs WebAssembly components from its SQLite store.
///
/// With no options it needs no config file: state goes to /var/lib/cairn as root (else
/// $XDG_DATA_HOME/cairn) and the control socket to /run/cairn/cairnd.sock as root (else
/// $XDG_RUNTIME_DIR/cairn/cairnd.sock). It runs in the foreground; under systemd it reports
/// readiness and feeds the watchdog. SIGTERM drains requests in flight, then exits.
#[derive(Parser)]
#[command(name = "cairnd", version)]
struct Args {
    /// A TOML config file; the packaged /etc/cairn/cairnd.toml lists every key and its default.
    #[arg(long, value_name = "FILE", env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Where the state database lives (overrides the config file).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The control socket's path (overrides the config file).
    #[arg(long, value_name = "PATH", env = cairn_core::paths::SOCKET_ENV)]
    socket: Option<PathBuf>,
    /// A folder to import at start (on images: the boot partition's cairn/): its config.toml
    /// is laid over the config file, and its apps/*.toml manifests (with the components they
    /// name, relative to the manifest) are deployed when new or changed since the last import.
    /// Problems are printed on stdout (the console under the packaged unit), shown by
    /// `cairnctl status` and written to report.txt in the folder; the rest still starts.
    #[arg(long, value_name = "DIR", env = "CAIRN_IMPORT_DIR")]
    import_dir: Option<PathBuf>,
    /// Log filter, such as `info` or `cairnd=debug` (RUST_LOG works too).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Write the cairnd(8) man page into DIR, as the package installs it.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Internal: the process cairnd starts for each app. Not for people to run.
    #[command(hide = true)]
    Pool {
        /// The app's name, so `ps` says whose pool this is.
        #[arg(long)]
        app: String,
    },
}

/// cairnd's command line: the daemon, a pool (`cairnd pool`), or its man page.
pub fn cli() {
    alloc::refuse_huge_pages();
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match args.mode {
        Some(Mode::Pool { app: _ }) => std::process::exit(pool::run()),
        Some(Mode::Man { dir }) => {
            let page = clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
                .section("8")
                .generate_to(&dir);
            if let Err(error) = page {
                eprintln!(
                    "cairnd: cannot write the man page into {}: {error}",
                    dir.display()
                );
                std::process::exit(1);
            }
            return;
        }
        None => {}
    }

    let result = (|| -> anyhow::Result<()> {
        let mut config = match &args.config {
            Some(path) => config::Config::load(path)?,
            None => config::Config::default(),
        };
        let mut overlay = None;
        if let Some(dir) = args.import_dir.clone().or(config.import_dir.clone()) {
            let file = dir.join("config.toml");
            if file.exists() {
                match import::inside_folder(&dir, &file) {
                    Ok(_) => {
                        let (merged, outcome) =
                            config::Config::load_with_overlay(args.config.as_deref(), &file)?;
                        config = merged;
                        overlay = Some(outcome);
                    }
                    Err(reason) => {
                        overlay = Some(Err(config::ConfigError::Refused { path: file, reason }))
                    }
                }
            }
            config.import_dir = Some(dir);
        }
        if let Some(dir) = args.state_dir {
            config.state_dir = dir;
        }
        if let Some(socket) = args.socket {
            config.control.socket = Some(socket);
        }
        let socket = config.socket();
        raise_open_file_limit();
        alloc::return_freed_memory_at_once();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(supervisor::run(config, socket, overlay))
    })();
    if let Err(error) = result {
        eprintln!("cairnd: {error:#}");
        std::process::exit(1);
    }
}

/// Raises the soft open-file limit to the hard one: every app holds a listener and a pool's
/// control socket here, and each pool (which inherits the limit) one descriptor per open
/// connection. A unit without `LimitNOFILE=` starts services at 1024 soft, which a few
/// hundred apps or one busy app would exhaust.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
        Err(error) => {
            tracing::warn!(%error, soft, hard, "cannot raise the open-file limit to its hard limit")
        }
    }
}

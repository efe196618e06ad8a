//! The supervisor: wires the store, compiler, log pipeline, reconciler and control server, tells
//! systemd when it is ready, runs the main loop (watchdog, retries) and shuts down cleanly on
//! SIGTERM or SIGINT, draining requests in flight.

use crate::config::Config;
use crate::control::{self, ControlService};
use crate::engine::Compiler;
use crate::limits::{Cgroups, PoolLimits};
use crate::logs::LogHub;
use crate::pool_users::PoolUsers;
use crate::reconcile::Reconciler;
use crate::store::Store;
use crate::systemd;
use anyhow::Context as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// How often failed apps are retried, and the status line refreshed when there is no watchdog.
const LOOP_PERIOD: Duration = Duration::from_secs(10);
/// How often the store collects what it no longer keeps (`Store::collect`); also once at
/// start, before READY.
const COLLECT_PERIOD: Duration = Duration::from_secs(3600);

/// `overlay`: how laying the import folder's config.toml over the config file went (`None`:
/// there was none).
pub async fn run(
    config: Config,
    socket: PathBuf,
    overlay: Option<Result<(), crate::config::ConfigError>>,
) -> anyhow::Result<()> {
    control::check_socket_free(&socket)?;
    let pool_users = Arc::new(PoolUsers::resolve(
        nix::unistd::geteuid().is_root(),
        config.pool_user.as_deref(),
        config.pool_ids.as_deref(),
    )?);
    tracing::info!("pools run as {}", pool_users.describe());
    for gap in pool_users.gaps() {
        tracing::warn!("{gap}");
    }
    let db = config.state_dir.join("cairn.db");
    let store = open_store(&config.state_dir, &db)?;
    store.set_policy(crate::store::Policy {
        budget: config.store.budget.map(|b| b.0),
        keep_generations: config.store.keep_generations,
        grace_secs: config.store.grace.0.as_secs() as i64,
        log_bytes_total: config.log_bytes_total.0,
    });
    // What is no longer kept goes first: a store made before collection existed may be mostly
    // that, and the conversion below copies what is left.
    log_collection(store.collect());
    match store.convert_to_incremental() {
        Ok(false) => {}
        Ok(true) => tracing::info!("the store was rewritten once so that it can shrink"),
        Err(error) => {
            tracing::warn!(%error, "the store could not be rewritten to shrink; the next start tries again")
        }
    }
    let compiler = Compiler::new();
    let outbox = match config.upstream.as_ref() {
        Some(upstream) => Some((
            crate::sync::device_id(upstream, &store)?,
            crate::store::OutboxBounds {
                max_bytes: upstream.outbox_max_bytes.0,
                max_age_secs: upstream.outbox_max_age.0.as_secs() as i64,
            },
        )),
        None => None,
    };
    let keep = crate::logs::Keep {
        lines: config.log_lines_per_app,
        bytes: config.log_bytes_per_app.0,
        total: config.log_bytes_total.0,
    };
    let logs = LogHub::start(Arc::clone(&store), keep, outbox);
    let cgroups = Arc::new(cgroups(&config));
    // No pool runs yet: ids held for apps the store does not have can be given again.
    match store.release_orphan_pool_ids() {
        Ok(0) => {}
        Ok(freed) => tracing::info!(freed, "freed the pool ids of apps that are gone"),
        Err(error) => tracing::warn!(%error, "cannot free the pool ids of apps that are gone"),
    }
    let reconciler = Reconciler::start(
        Arc::clone(&store),
        Arc::clone(&compiler),
        Arc::clone(&logs),
        Arc::clone(&cgroups),
        Arc::clone(&pool_users),
        crate::kv::Stores::new(&config.state_dir)?,
        config.secrets_dir.clone(),
        config.drain_timeout.0,
    );

    // Bound before any app starts: a taken address stops the start at once, and says which
    // setting, before the device's apps are up and torn down again.
    let metrics_listener =
        match &config.metrics {
            Some(metrics) => Some(control::metrics::bind(metrics.listen).await.map_err(
                |error| anyhow::anyhow!("[metrics] listen = \"{}\": {error}", metrics.listen),
            )?),
            None => None,
        };
    reconciler.start_all().await?;
    // Before sync starts and before READY: preloaded apps serve with no network, and READY
    // means they do.
    let import = match &config.import_dir {
        Some(dir) => {
            crate::import::run(
                dir,
                overlay,
                &store,
                &reconciler,
                config.max_component_size.0,
            )
            .await
        }
        None => crate::import::ImportReport::default(),
    };
    // What changed only: an unchanged file, or a folder with nothing, at every boot is no news.
    for line in import
        .lines
        .iter()
        .filter(|line| !line.contains("unchanged since") && !line.ends_with(": none"))
    {
        logs.record("", 0, "import", line);
    }
    for problem in &import.problems {
        logs.record("", 0, "import-problem", problem);
    }
    let sync = crate::sync::Sync::start(
        config.upstream.clone(),
        Arc::clone(&store),
        Arc::clone(&reconciler),
        Arc::clone(&logs),
    )?;
    drop_unused_compiled_code(&store, &compiler).await;
    let scheduler = crate::schedule::Scheduler::start(
        Arc::clone(&reconciler),
        Arc::clone(&store),
        Arc::clone(&logs),
    );

    let incoming = control::bind_socket(&socket, &config)?;
    let service = ControlService::new(
        Arc::clone(&store),
        Arc::clone(&reconciler),
        Arc::clone(&compiler),
        Arc::clone(&logs),
        &config,
        socket.clone(),
        cgroups.describe(),
        Arc::clone(&pool_users),
        Arc::clone(&sync),
    )
    .with_import(import)
    .with_scheduler(Arc::clone(&scheduler));
    let service = Arc::new(service);
    let metrics = metrics_listener.map(|listener| {
        tracing::info!(listen = ?listener.local_addr().ok(), "metrics endpoint");
        tokio::spawn(control::metrics::serve(listener, Arc::clone(&service)))
    });
    let stop_control = CancellationToken::new();
    let control_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, stop_control.clone().cancelled_owned()),
    );

    let summary = status_line(&reconciler).await;
    tracing::info!(socket = %socket.display(), state = %db.display(), "{summary}");
    systemd::ready(&summary);
    let collector = tokio::spawn(collect_periodically(
        Arc::clone(&store),
        Arc::clone(&compiler),
    ));

    serve_until_signal(&reconciler).await?;

    collector.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!("stopping: draining requests in flight");
    systemd::stopping();
    stop_control.cancel();
    scheduler.shutdown().await;
    reconciler.shutdown().await;
    // The pools' last lines and cairn's notes of the stop, gathered and not yet written.
    logs.flush().await;
    cgroups.remove_parent();
    let _ = tokio::time::timeout(Duration::from_secs(5), control_server).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(())
}

/// The state directory (made, mode 0750) and the store in it, its files readable by cairnd's
/// user alone (apps' `[secrets]` are in it), whatever the umask was when they were made.
fn open_store(state_dir: &Path, db: &Path) -> anyhow::Result<Arc<Store>> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o750))
        .with_context(|| format!("cannot set permissions on {}", state_dir.display()))?;
    let store = Store::open(db)?;
    // SQLite gives the WAL and shared-memory files the database's mode when it makes them.
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", db.display()));
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("cannot set permissions on {}", file.display()));
            }
            _ => {}
        }
    }
    Ok(Arc::new(store))
}

/// How limits are enforced here: the configured (or default) parent cgroup with the caps
/// for all apps together.
fn cgroups(config: &Config) -> Cgroups {
    let parent = config
        .cgroup_parent
        .clone()
        .unwrap_or_else(crate::limits::default_parent);
    let cgroups = Cgroups::detect(
        &parent,
        &PoolLimits {
            memory: config.total_memory.map(|m| m.0),
            cpu: config.total_cpu,
            pids: None,
        },
    );
    tracing::info!("resource limits {}", cgroups.describe());
    cgroups
}

/// The main loop, until SIGTERM or SIGINT: the watchdog and status line on one tick, retries
/// of failed apps on another.
async fn serve_until_signal(reconciler: &Arc<Reconciler>) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // The watchdog is fed from this loop alone: its pings say the supervisor's runtime and
    // main loop are alive, whatever any app is doing (a deploy compiling a big component or
    // waiting on a slow health check holds only that app's lock). Retries run beside it.
    let watchdog = systemd::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(LOOP_PERIOD));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_tick = tokio::time::interval(LOOP_PERIOD);
    retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = watchdog_tick.tick() => {
                if watchdog.is_some() {
                    systemd::watchdog();
                }
                systemd::status(&status_line(reconciler).await);
            }
            _ = retry_tick.tick() => reconciler.retry_failed(),
        }
    }
}

/// The one-line summary systemd shows. Idle apps count as serving (their next connection
/// starts them); apps restored at start-up whose pools are still starting are said apart.
async fn status_line(reconciler: &Reconciler) -> String {
    let apps = reconciler.list().await;
    let count = |statuses: &[&str]| apps.iter().filter(|a| statuses.contains(&a.status)).count();
    let serving = count(&["running", "idle"]);
    let starting = count(&["starting"]);
    let ready = count(&["ready"]);
    let failed = apps.len() - serving - starting - ready;
    let mut line = format!("serving {serving} app(s)");
    if ready > 0 {
        line.push_str(&format!(", {ready} command app(s) ready to run"));
    }
    if starting > 0 {
        line.push_str(&format!(", {starting} starting"));
    }
    if failed > 0 {
        line.push_str(&format!(", {failed} failed (see `cairnctl ls`)"));
    }
    line
}

/// Collects what the store no longer keeps every `COLLECT_PERIOD` (the start collected
/// already); sets space aside again (`Store::keep_reserve`) once a full disk has room,
/// checked every `LOOP_PERIOD`.
async fn collect_periodically(store: Arc<Store>, compiler: Arc<Compiler>) {
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + COLLECT_PERIOD, COLLECT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reserve_tick = tokio::time::interval(LOOP_PERIOD);
    reserve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = reserve_tick.tick() => {
                let _ = store
                    .call(|store| {
                        store.keep_reserve();
                        Ok(())
                    })
                    .await;
                continue;
            }
        }
        log_collection(store.call(|store| store.collect()).await);
        // Code compiled for limits no app has any more (a redeploy with new limits) goes too.
        drop_unused_compiled_code(&store, &compiler).await;
    }
}

/// Says what a collection removed, if anything (a WAL cut back alone is not news).
fn log_collection(result: Result<crate::store::Collected, crate::store::StoreError>) {
    match result {
        Ok(collected)
            if crate::store::Collected {
                file_bytes_freed: 0,
                ..collected
            } == crate::store::Collected::default() => {}
        Ok(collected) => tracing::info!(?collected, "collected what the store no longer keeps"),
        Err(error) => tracing::warn!(%error, "could not collect what the store no longer keeps"),
    }
}

/// Precompiled code for specs no app uses, or from another wasmtime or CPU, is dead weight.
async fn drop_unused_compiled_code(store: &Arc<Store>, compiler: &Arc<Compiler>) {
    let compiler = Arc::clone(compiler);
    let result = store
        .call(move |store| {
            let mut fingerprints: Vec<String> = Vec::new();
            for spec in store.apps()?.into_iter().filter_map(|app| app.spec.ok()) {
                if let Ok(fingerprint) = compiler.fingerprint(&spec.limits) {
                    fingerprints.push(fingerprint);
                }
            }
            if fingerprints.is_empty() {
                return Ok(0);
            }
            store.drop_compiled_except(&fingerprints)
        })
        .await;
    match result {
        Ok(0) => {}
        Ok(dropped) => tracing::info!(dropped, "dropped precompiled code no engine here can use"),
        Err(error) => tracing::warn!(%error, "could not prune precompiled code"),
    }
}

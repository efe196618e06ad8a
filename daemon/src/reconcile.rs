//! The reconciler: the only thing that changes what runs. Deploys, rollbacks and removals from
//! the control API come here, as will fleet state; so does start-up, which brings every app in
//! the store back at its current generation, and so do pool exits. Changes are serialised by
//! one lock.
//!
//! The policy: a new generation is prepared completely (code loaded from the cache or compiled
//! and cached, a pool process started that linked it and made one instance, the address bound)
//! before it is written to the store and told to serve. If any step fails, the store and the
//! running app are left exactly as they were and the caller is told why. A pool that dies is
//! restarted with exponential backoff on the listener the supervisor kept, so connections
//! queue instead of being refused. An app that cannot start from the store (at boot) is marked
//! failed with its reason and retried by `retry_failed`; the others serve regardless.

use crate::digest::Digest;
use crate::limits::{AppCgroup, Cgroups, LimitsError, PoolLimits, Usage};
use crate::logs::LogHub;
use crate::pool::protocol::{Counter, Counters};
use crate::runtime::{CodeFacts, Runtime, RuntimeError, POOLING_ALLOCATOR};
use crate::spawn::{self, Code, ExitReason, Pool, PoolExit, SpawnError, Spawner, Start};
use crate::spec::{AppName, AppSpec, SpecError};
use crate::store::{now_unix, Owner, Store, StoreError};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

/// Pools started at once when the daemon restores its apps.
const START_CONCURRENCY: usize = 8;
/// Restored apps whose addresses are bound at once at start-up.
const BIND_CONCURRENCY: usize = 64;
/// First restart delay after a pool dies; doubled for each further failure, up to the cap.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A pool that served this long is healthy again: its next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// This many pool failures within `CRASHLOOP_WINDOW` make a crashloop.
const CRASHLOOP_FAILURES: usize = 5;
const CRASHLOOP_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no app named `{0}`; `cairnctl ls` lists the apps")]
    UnknownApp(String),
    #[error("no component {0} in the store; push it first with `cairnctl push FILE`")]
    UnknownComponent(Digest),
    #[error("app `{app}` has no generation {generation}; it has {available}")]
    UnknownGeneration {
        app: String,
        generation: u64,
        available: String,
    },
    #[error("app `{0}` has no generation before the current one to roll back to")]
    NoPreviousGeneration(String),
    #[error("address {addr} is already used by app `{app}`; choose another [http] listen address or remove that app")]
    AddressTaken { addr: SocketAddr, app: String },
    #[error("cannot listen on {addr}: {reason}; choose another [http] listen address")]
    AddressUnavailable { addr: SocketAddr, reason: String },
    #[error("component {digest}: {source}")]
    Component {
        digest: Digest,
        source: RuntimeError,
    },
    #[error("component {digest}: {message}")]
    Load { digest: Digest, message: String },
    #[error("the app's pool could not start: {0}")]
    Pool(String),
    #[error("the new generation failed its health check: GET {path} {answer}; the previous generation keeps serving")]
    Unhealthy { path: String, answer: String },
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error("app `{app}` is owned by the {owner}; change it there")]
    OwnedElsewhere { app: String, owner: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What `cairnctl ls` shows of an app.
#[derive(Debug, Clone)]
pub struct AppView {
    pub name: String,
    pub owner: &'static str,
    pub generation: u64,
    pub status: &'static str,
    pub listen: SocketAddr,
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
    pub timeouts: u64,
    pub rejected: u64,
    pub started_unix: i64,
    pub pid: u32,
    pub restarts: u64,
    pub last_exit: String,
    /// Where the app's limits live, or why there are none.
    pub cgroup: String,
    pub usage: Usage,
}

enum State {
    Running {
        pool: Pool,
        since: Instant,
    },
    /// The pool died; a restart is scheduled.
    Restarting {
        reason: String,
    },
    /// No pool: it exited for lack of traffic. The supervisor holds the listener and starts a
    /// pool when a connection arrives.
    Idle {
        _waker: Waker,
    },
    /// Restored at start-up, its pool not started yet: the listener is bound, and the pool is
    /// started in the background, or sooner by the `waker` when a connection arrives (`None`
    /// once the background start has claimed it).
    Starting {
        waker: Option<Waker>,
    },
    /// The app could not be started at all.
    Failed {
        reason: String,
    },
}

struct Running {
    owner: Owner,
    generation: u64,
    spec: AppSpec,
    state: State,
    /// Bound by the supervisor and kept across pool restarts.
    listener: Option<Arc<std::net::TcpListener>>,
    counters: Arc<Counters>,
    allocator: String,
    started_unix: i64,
    restarts: u64,
    /// Failures since the pool last stayed up for `HEALTHY_AFTER`.
    consecutive_failures: u32,
    last_exit: String,
    cgroup: Option<AppCgroup>,
    /// OOM kills in the cgroup already accounted for, to tell an OOM kill from a plain kill.
    oom_kills_seen: u64,
    /// When the pool failed within the last `CRASHLOOP_WINDOW`.
    recent_failures: Vec<Instant>,
    /// Failing `CRASHLOOP_FAILURES` times within the window; cleared by a new generation.
    crashloop: bool,
    /// The last generation that served well, restored on a crashloop.
    last_good: Option<u64>,
}

/// The task waiting for an idle app's next connection; stops waiting when dropped (the app
/// was removed, redeployed or shut down).
struct Waker(tokio::task::JoinHandle<()>);

impl Drop for Waker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How much precompiled code the supervisor keeps in memory for pool starts. The pages are
/// shared with the pools that map the code, so this costs memory only for code no running
/// pool uses (idle or removed apps'): a wake from idle of a recently used app reads no SQLite.
const CODE_CACHE_BYTES: usize = 32 << 20;

/// Code by (component digest, engine fingerprint), least recently used dropped first once
/// the total is over its budget.
struct CodeCache {
    budget: usize,
    entries: std::sync::Mutex<CodeEntries>,
}

/// A use counter, and each entry with the count at its last use.
#[derive(Default)]
struct CodeEntries {
    clock: u64,
    map: HashMap<CodeKey, (Arc<Code>, u64)>,
}

/// Component digest and engine fingerprint.
type CodeKey = (Digest, String);

impl CodeCache {
    fn new(budget: usize) -> CodeCache {
        CodeCache {
            budget,
            entries: std::sync::Mutex::default(),
        }
    }

    fn get(&self, key: &CodeKey) -> Option<Arc<Code>> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let CodeEntries { clock, map } = &mut *guard;
        *clock += 1;
        let (code, used) = map.get_mut(key)?;
        *used = *clock;
        Some(Arc::clone(code))
    }

    fn put(&self, key: CodeKey, code: Arc<Code>) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let CodeEntries {
            clock,
            map: entries,
        } = &mut *guard;
        *clock += 1;
        entries.insert(key.clone(), (code, *clock));
        let mut total: usize = entries.values().map(|(code, _)| code.len).sum();
        while total > self.budget && entries.len() > 1 {
            let oldest = entries
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some((code, _)) = entries.remove(&oldest) {
                total -= code.len;
            }
        }
    }
}

/// One pool start's arguments (kept together for the retry with recompiled code).
#[derive(Clone, Copy)]
struct Attempt<'a> {
    spec: &'a AppSpec,
    generation: u64,
    listener: &'a std::net::TcpListener,
    counters: &'a Counters,
    cgroup: Option<&'a AppCgroup>,
    start: Start,
}

pub struct Reconciler {
    store: Arc<Store>,
    runtime: Arc<Runtime>,
    logs: Arc<LogHub>,
    apps: Mutex<BTreeMap<AppName, Running>>,
    drain: Duration,
    exits: mpsc::Sender<PoolExit>,
    cgroups: Arc<Cgroups>,
    spawner: Arc<Spawner>,
    /// Checked code recently handed to pools, so a restart or a wake does not read the store.
    code_cache: Arc<CodeCache>,
    /// Restarts that are due (sent after their backoff).
    restarts: mpsc::Sender<(AppName, u64)>,
}

impl Reconciler {
    /// Creates the reconciler and starts the task that handles pool exits.
    pub fn start(
        store: Arc<Store>,
        runtime: Arc<Runtime>,
        logs: Arc<LogHub>,
        cgroups: Arc<Cgroups>,
        pool_user: Option<(u32, u32)>,
        drain: Duration,
    ) -> Arc<Reconciler> {
        let (exits, mut exit_events) = mpsc::channel(256);
        let (restarts, mut due_restarts) = mpsc::channel(256);
        let reconciler = Arc::new(Reconciler {
            store,
            runtime,
            logs,
            apps: Mutex::new(BTreeMap::new()),
            drain,
            exits,
            spawner: Spawner::new(pool_user, Arc::clone(&cgroups)),
            code_cache: Arc::new(CodeCache::new(CODE_CACHE_BYTES)),
            cgroups,
            restarts,
        });
        reconciler.spawner.refill(Duration::ZERO);
        let weak = Arc::downgrade(&reconciler);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(exit) = exit_events.recv() => {
                        let Some(reconciler) = weak.upgrade() else { return };
                        reconciler.pool_exited(exit).await;
                    }
                    Some((app, generation)) = due_restarts.recv() => {
                        let Some(reconciler) = weak.upgrade() else { return };
                        reconciler.restart(&app, generation).await;
                    }
                    else => return,
                }
            }
        });
        reconciler
    }

    /// Brings every app in the store up at its current generation: binds its address and
    /// makes its cgroup, then starts its pool in the background. Returns once every address
    /// is bound (or the app is marked failed with the reason): from then on a connection to an
    /// app waits in its listener's backlog until the pool serves it, and an app whose pool has
    /// not started yet is started at once when a connection arrives, ahead of the rest.
    pub async fn start_all(self: &Arc<Self>) -> Result<(), ReconcileError> {
        let records = self.store.call(|store| store.apps()).await?;
        let mut apps = self.apps.lock().await;
        let mut restored = Vec::with_capacity(records.len());
        for record in records {
            let counters = Arc::new(new_counters(&record.name)?);
            let running = Running {
                owner: record.owner,
                generation: record.generation,
                spec: record.spec,
                state: State::Failed {
                    reason: "not started yet".into(),
                },
                listener: None,
                counters,
                allocator: String::new(),
                started_unix: now_unix(),
                restarts: 0,
                consecutive_failures: 0,
                last_exit: String::new(),
                cgroup: None,
                oom_kills_seen: 0,
                recent_failures: Vec::new(),
                crashloop: false,
                last_good: None,
            };
            restored.push((record.name, running));
        }
        // Addresses are bound side by side: a pool of the previous daemon may still be closing
        // its copy of a listener, which is waited for (briefly) per app.
        futures_util::stream::iter(restored.iter_mut())
            .for_each_concurrent(BIND_CONCURRENCY, |(name, running)| async move {
                match self.prepare_restored(running).await {
                    Ok(listener) => {
                        running.state = State::Starting {
                            waker: Some(Waker(self.wake_on_connection(
                                name.clone(),
                                running.generation,
                                Some(&listener),
                            ))),
                        };
                    }
                    Err(error) => self.mark_failed(running, error),
                }
            })
            .await;
        let pending: Vec<(AppName, u64)> = restored
            .iter()
            .filter(|(_, running)| matches!(running.state, State::Starting { .. }))
            .map(|(name, running)| (name.clone(), running.generation))
            .collect();
        apps.extend(restored);
        drop(apps);
        // Pools start side by side (a pool's start is mostly waiting on exec and loading code),
        // a few at a time so a device with many apps is not swamped at boot.
        let reconciler = Arc::clone(self);
        tokio::spawn(async move {
            futures_util::stream::iter(pending)
                .for_each_concurrent(START_CONCURRENCY, |(app, generation)| {
                    let reconciler = &reconciler;
                    async move { reconciler.start_restored(&app, generation).await }
                })
                .await;
        });
        Ok(())
    }

    /// A restored app's listener (bound now) and cgroup (made now).
    async fn prepare_restored(
        &self,
        running: &mut Running,
    ) -> Result<Arc<std::net::TcpListener>, ReconcileError> {
        let listener =
            Arc::new(bind_patiently(running.spec.http.listen, Duration::from_secs(3)).await?);
        running.listener = Some(Arc::clone(&listener));
        running.cgroup = self.app_cgroup(&running.spec)?;
        Ok(listener)
    }

    /// Starts the pool of a restored app (see `start_all`), unless a connection started it
    /// first or the app changed meanwhile. The start runs without holding the apps, so control
    /// calls and other starts go on beside it.
    async fn start_restored(&self, app: &AppName, generation: u64) {
        let claimed = {
            let mut apps = self.apps.lock().await;
            let Some(running) = apps.get_mut(app) else {
                return;
            };
            let State::Starting { waker } = &mut running.state else {
                return;
            };
            if running.generation != generation {
                return;
            }
            // Claimed: a connection arriving now waits for this start instead of making one.
            *waker = None;
            let listener = Arc::clone(running.listener.as_ref().expect("bound at start"));
            (
                running.spec.clone(),
                listener,
                Arc::clone(&running.counters),
                running.cgroup.clone(),
            )
        };
        let (spec, listener, counters, cgroup) = claimed;
        let launched = self
            .launch(
                &spec,
                generation,
                &listener,
                &counters,
                cgroup.as_ref(),
                Start::Resume { proven: false },
            )
            .await;
        let mut apps = self.apps.lock().await;
        let current = apps.get_mut(app).filter(|running| {
            running.generation == generation
                && matches!(running.state, State::Starting { waker: None })
        });
        match (launched, current) {
            (Ok(pool), Some(running)) => {
                running.serving_with(pool);
            }
            (Err(error), Some(running)) => self.mark_failed(running, error),
            // Removed or replaced while its pool started: that pool is not wanted.
            (Ok(pool), None) => {
                drop(apps);
                pool.stop(self.drain).await;
            }
            (Err(_), None) => {}
        }
    }

    /// Marks an app that could not be started as failed, saying why.
    fn mark_failed(&self, running: &mut Running, error: ReconcileError) {
        let reason = error.to_string();
        tracing::error!(app = %running.spec.name, %reason, "app could not start");
        self.logs.note(
            running.spec.name.as_str(),
            running.generation,
            &format!("could not start: {reason}"),
        );
        running.state = State::Failed { reason };
    }

    /// Starts `running`'s pool on its (possibly new) listener; on failure marks it failed.
    async fn bring_up(&self, running: &mut Running, bind_patience: Duration) {
        let result = async {
            if running.listener.is_none() {
                running.listener = Some(Arc::new(
                    bind_patiently(running.spec.http.listen, bind_patience).await?,
                ));
            }
            if running.cgroup.is_none() {
                running.cgroup = self.app_cgroup(&running.spec)?;
                running.oom_kills_seen = running
                    .cgroup
                    .as_ref()
                    .map(|c| c.usage().oom_kills)
                    .unwrap_or(0);
            }
            let listener = Arc::clone(running.listener.as_ref().expect("bound above"));
            let pool = self
                .launch(
                    &running.spec,
                    running.generation,
                    &listener,
                    &running.counters,
                    running.cgroup.as_ref(),
                    Start::Resume { proven: false },
                )
                .await?;
            Ok::<Pool, ReconcileError>(pool)
        }
        .await;
        match result {
            Ok(pool) => {
                running.serving_with(pool);
            }
            Err(error) => self.mark_failed(running, error),
        }
    }

    /// Tries again to start apps that failed (a port that was busy at boot, say).
    pub async fn retry_failed(&self) {
        let mut apps = self.apps.lock().await;
        for (name, running) in apps.iter_mut() {
            if let State::Failed { .. } = running.state {
                self.bring_up(running, Duration::ZERO).await;
                if let State::Running { .. } = running.state {
                    self.logs.note(
                        name.as_str(),
                        running.generation,
                        "started after an earlier failure",
                    );
                }
            }
        }
    }

    /// The app's cgroup with the spec's limits written, or `None` where limits are not enforced.
    fn app_cgroup(&self, spec: &AppSpec) -> Result<Option<AppCgroup>, ReconcileError> {
        let Some(cgroup) = self.cgroups.for_app(spec.name.as_str())? else {
            return Ok(None);
        };
        cgroup.apply(&pool_limits(spec))?;
        Ok(Some(cgroup))
    }

    /// Loads the app's code (precompiled from the store, or compiled now and cached) and starts
    /// a pool with it. Cached code a pool cannot load is recompiled once.
    async fn launch(
        &self,
        spec: &AppSpec,
        generation: u64,
        listener: &std::net::TcpListener,
        counters: &Counters,
        cgroup: Option<&AppCgroup>,
        start: Start,
    ) -> Result<Pool, ReconcileError> {
        let (code, cached) = self.code(spec, false).await?;
        let attempt = Attempt {
            spec,
            generation,
            listener,
            counters,
            cgroup,
            start,
        };
        match self.launch_with(&attempt, &code).await {
            Err(ReconcileError::Load { message, .. }) if cached => {
                tracing::warn!(app = %spec.name, %message, "precompiled code was not usable; recompiling");
                let (code, _) = self.code(spec, true).await?;
                self.launch_with(&attempt, &code).await
            }
            other => other,
        }
    }

    async fn launch_with(
        &self,
        attempt: &Attempt<'_>,
        code: &Code,
    ) -> Result<Pool, ReconcileError> {
        let spec = attempt.spec;
        self.spawner
            .launch(spawn::Launch {
                limits: pool_limits(spec),
                spec,
                generation: attempt.generation,
                code,
                start: attempt.start,
                listener: attempt.listener,
                counters: attempt.counters,
                cgroup: attempt.cgroup,
                logs: Arc::clone(&self.logs),
                exits: self.exits.clone(),
            })
            .await
            .map_err(|error| match error {
                SpawnError::Load(message) => ReconcileError::Load {
                    digest: spec.component.clone(),
                    message,
                },
                other => ReconcileError::Pool(other.to_string()),
            })
    }

    /// The app's native code, ready for pools, and whether it was compiled before (in memory
    /// or in the store). Reading and compiling are blocking work, so they run on the blocking
    /// pool.
    async fn code(
        &self,
        spec: &AppSpec,
        force_compile: bool,
    ) -> Result<(Arc<Code>, bool), ReconcileError> {
        let store = Arc::clone(&self.store);
        let runtime = Arc::clone(&self.runtime);
        let memory = Arc::clone(&self.code_cache);
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || {
            let digest = spec.component.clone();
            let component_error = |source| ReconcileError::Component {
                digest: digest.clone(),
                source,
            };
            let fingerprint = runtime.fingerprint(&spec.limits).map_err(component_error)?;
            let key = (digest.clone(), fingerprint.clone());
            if !force_compile {
                if let Some(code) = memory.get(&key) {
                    runtime.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((code, true));
                }
            }
            let ready = |code: &[u8], facts| {
                let code = Arc::new(Code::new(code, facts).map_err(|e| {
                    ReconcileError::Internal(format!("cannot hold the code in memory: {e}"))
                })?);
                memory.put(key.clone(), Arc::clone(&code));
                Ok::<_, ReconcileError>(code)
            };
            if !force_compile {
                if let Some((code, facts)) = store.get_compiled(&digest, &fingerprint)? {
                    runtime.cache_hits.fetch_add(1, Ordering::Relaxed);
                    let known = facts.and_then(|facts| serde_json::from_str(&facts).ok());
                    let facts = match known {
                        Some(facts) => facts,
                        // Cached by an older cairnd (or unreadable): learn them once.
                        None => {
                            let facts = runtime
                                .inspect(&code, &spec.limits)
                                .map_err(component_error)?;
                            store.set_compiled_facts(&digest, &fingerprint, &facts_text(&facts))?;
                            facts
                        }
                    };
                    return Ok((ready(&code, facts)?, true));
                }
            }
            let wasm = store
                .get_blob(&digest)?
                .ok_or_else(|| ReconcileError::UnknownComponent(digest.clone()))?;
            let code = runtime
                .compile(&wasm, &spec.limits)
                .map_err(component_error)?;
            let facts = runtime
                .inspect(&code, &spec.limits)
                .map_err(component_error)?;
            store.put_compiled(&digest, &fingerprint, &code, &facts_text(&facts))?;
            Ok((ready(&code, facts)?, false))
        })
        .await
        .map_err(|e| ReconcileError::Internal(format!("preparing the app failed: {e}")))?
    }

    /// Deploys `spec` as the app's next generation. Returns the app as it now runs and whether
    /// the spec equalled the current generation (then nothing changed).
    pub async fn deploy(
        &self,
        spec: AppSpec,
        owner: Owner,
    ) -> Result<(AppView, bool), ReconcileError> {
        let mut apps = self.apps.lock().await;
        if let Some(running) = apps.get(&spec.name) {
            if running.owner != owner {
                return Err(ReconcileError::OwnedElsewhere {
                    app: spec.name.to_string(),
                    owner: if running.owner == Owner::Fleet {
                        "fleet"
                    } else {
                        "local operator"
                    },
                });
            }
            if running.spec == spec
                && matches!(
                    running.state,
                    State::Running { .. } | State::Starting { .. }
                )
            {
                return Ok((view(&spec.name, running), true));
            }
        }
        check_address_free(&apps, &spec)?;
        let digest = spec.component.clone();
        if !self
            .store
            .call(move |store| store.has_blob(&digest))
            .await?
        {
            return Err(ReconcileError::UnknownComponent(spec.component.clone()));
        }
        self.activate(&mut apps, spec, owner, None).await
    }

    /// Makes generation `to` (or the one before the current) current again.
    pub async fn rollback(
        &self,
        name: &AppName,
        to: Option<u64>,
    ) -> Result<AppView, ReconcileError> {
        let mut apps = self.apps.lock().await;
        let running = apps
            .get(name)
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
        let (owner, current) = (running.owner, running.generation);
        let app = name.clone();
        let generations = self
            .store
            .call(move |store| store.generations(&app))
            .await?;
        let target = match to {
            Some(wanted) => generations
                .iter()
                .find(|g| g.generation == wanted)
                .ok_or_else(|| ReconcileError::UnknownGeneration {
                    app: name.to_string(),
                    generation: wanted,
                    available: generations
                        .iter()
                        .map(|g| g.generation.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
            None => generations
                .iter()
                .rev()
                .find(|g| g.generation < current)
                .ok_or_else(|| ReconcileError::NoPreviousGeneration(name.to_string()))?,
        };
        let spec = target.spec.clone();
        check_address_free(&apps, &spec)?;
        let (view, _) = self
            .activate(&mut apps, spec, owner, Some(target.generation))
            .await?;
        Ok(view)
    }

    /// Starts a pool for `spec` (binding its address unless this app already listens there),
    /// records it in the store (a new generation, or `existing` made current), tells it to
    /// serve and stops the previous pool.
    async fn activate(
        &self,
        apps: &mut BTreeMap<AppName, Running>,
        spec: AppSpec,
        owner: Owner,
        existing: Option<u64>,
    ) -> Result<(AppView, bool), ReconcileError> {
        let name = spec.name.clone();
        let next_generation = match existing {
            Some(generation) => generation,
            None => {
                let app = name.clone();
                self.store
                    .call(move |store| {
                        Ok(store
                            .generations(&app)?
                            .last()
                            .map(|g| g.generation)
                            .unwrap_or(0)
                            + 1)
                    })
                    .await?
            }
        };
        let reusable = apps
            .get(&name)
            .and_then(|r| r.listener.as_ref())
            .filter(|l| l.local_addr().ok() == Some(spec.http.listen))
            .cloned();
        let listener = match reusable {
            Some(listener) => listener,
            None => Arc::new(bind_patiently(spec.http.listen, Duration::ZERO).await?),
        };
        let counters = match apps.get(&name) {
            Some(running) => Arc::clone(&running.counters),
            None => Arc::new(new_counters(&name)?),
        };
        // An app new to this daemon gets its cgroup now (removed again if the deploy fails); an
        // existing one keeps its cgroup, whose limits change once the generation is recorded.
        let existing_cgroup = apps.get(&name).and_then(|r| r.cgroup.clone());
        let (cgroup, fresh_cgroup) = match existing_cgroup {
            Some(cgroup) => (Some(cgroup), false),
            None => (self.app_cgroup(&spec)?, true),
        };
        // Every failure before the generation is recorded leaves no cgroup made for it.
        let discard_fresh_cgroup = || {
            if let (true, Some(cgroup)) = (fresh_cgroup, &cgroup) {
                cgroup.remove();
            }
        };
        let launched = self
            .launch(
                &spec,
                next_generation,
                &listener,
                &counters,
                cgroup.as_ref(),
                Start::Prepare,
            )
            .await;
        let pool = match launched {
            Ok(pool) => pool,
            Err(error) => {
                discard_fresh_cgroup();
                return Err(error);
            }
        };

        if let Some(path) = &spec.http.health {
            let answer = pool
                .probe(path, spec.limits.timeout.0 + Duration::from_secs(5))
                .await;
            let unhealthy = match answer {
                Ok(status) if (200..300).contains(&status) => None,
                Ok(status) => Some(format!("answered {status}")),
                Err(error) => Some(format!("got no answer: {error}")),
            };
            if let Some(answer) = unhealthy {
                pool.stop(Duration::ZERO).await;
                discard_fresh_cgroup();
                return Err(ReconcileError::Unhealthy {
                    path: path.clone(),
                    answer,
                });
            }
        }
        let stored_spec = spec.clone();
        let recorded = match existing {
            Some(generation) => {
                let app = name.clone();
                self.store
                    .call(move |store| store.set_current_generation(&app, generation))
                    .await
                    .map(|_| generation)
            }
            None => {
                self.store
                    .call(move |store| store.commit_generation(&stored_spec, owner))
                    .await
            }
        };
        let generation = match recorded {
            Ok(generation) if generation == next_generation => generation,
            Ok(other) => {
                pool.stop(Duration::ZERO).await;
                discard_fresh_cgroup();
                return Err(ReconcileError::Internal(format!(
                    "generation {other} was written where {next_generation} was expected"
                )));
            }
            Err(error) => {
                pool.stop(Duration::ZERO).await;
                discard_fresh_cgroup();
                return Err(error.into());
            }
        };
        if let Some(cgroup) = &cgroup {
            if let Err(error) = cgroup.apply(&pool_limits(&spec)) {
                tracing::warn!(app = %name, %error, "the new generation's limits could not be written");
            }
        }
        if let Err(error) = pool.serve().await {
            // The new pool died between loading and serving; the store already says this
            // generation, so leave it to the restart logic like any other pool death.
            tracing::warn!(app = %name, %error, "new pool went away before serving");
        }
        let previous = apps.remove(&name);
        let verb = if existing.is_some() {
            "rolled back to"
        } else {
            "deployed"
        };
        self.logs.note(
            name.as_str(),
            generation,
            &format!("{verb} generation {generation} ({})", spec.component),
        );
        let running = Running {
            owner,
            generation,
            spec,
            allocator: pool.allocator.clone(),
            state: State::Running {
                pool,
                since: Instant::now(),
            },
            listener: Some(listener),
            counters,
            started_unix: now_unix(),
            restarts: previous.as_ref().map(|p| p.restarts).unwrap_or(0),
            consecutive_failures: 0,
            last_exit: previous
                .as_ref()
                .map(|p| p.last_exit.clone())
                .unwrap_or_default(),
            // A pool start may have given the app a new cgroup (a spare's, renamed into place),
            // whose count starts again.
            oom_kills_seen: {
                let now = cgroup.as_ref().map(|c| c.usage().oom_kills).unwrap_or(0);
                previous.as_ref().map_or(now, |p| p.oom_kills_seen.min(now))
            },
            cgroup,
            recent_failures: Vec::new(),
            crashloop: false,
            // The generation this one replaces served well if it was serving (or idle) and not
            // in a crashloop; otherwise keep the one it remembered.
            last_good: previous.as_ref().and_then(|p| {
                let served = matches!(
                    p.state,
                    State::Running { .. } | State::Idle { .. } | State::Starting { .. }
                ) && !p.crashloop;
                if served {
                    Some(p.generation)
                } else {
                    p.last_good
                }
            }),
        };
        if let Some(Running {
            state: State::Running { pool: old, .. },
            ..
        }) = previous
        {
            // The deploy returns once the old pool has stopped accepting: from then on every
            // new connection reaches the new generation. Its requests in flight finish behind.
            let drain = self.drain;
            let asked = old.drain(drain).await;
            tokio::spawn(async move { old.finish(drain, asked).await });
        }
        let app_view = view(&name, &running);
        apps.insert(name, running);
        Ok((app_view, false))
    }

    /// Handles a pool's exit. Expected exits (after `stop`) are ignored; an idle exit leaves
    /// the app idle until its next connection; anything else is recorded and the pool
    /// restarted after a backoff. A pool that keeps failing is a crashloop: the last generation
    /// that served well is restored if there is one.
    async fn pool_exited(&self, exit: PoolExit) {
        let mut apps = self.apps.lock().await;
        let Some(running) = apps.get_mut(&exit.app) else {
            return;
        };
        let State::Running { pool, since } = &running.state else {
            return;
        };
        if pool.pid != exit.pid {
            return; // an old generation's pool finishing its drain
        }
        if exit.reason.is_idle() {
            self.logs.note(
                exit.app.as_str(),
                running.generation,
                "idle: the pool exited; the next connection starts it again",
            );
            running.state = State::Idle {
                _waker: Waker(self.wake_on_connection(
                    exit.app.clone(),
                    running.generation,
                    running.listener.as_ref(),
                )),
            };
            running.counters.set(Counter::InFlight, 0);
            return;
        }
        if since.elapsed() >= HEALTHY_AFTER {
            running.consecutive_failures = 0;
        }
        let mut reason = exit.reason.clone();
        if let Some(cgroup) = &running.cgroup {
            let oom_kills = cgroup.usage().oom_kills;
            if reason == ExitReason::Signal(9) && oom_kills > running.oom_kills_seen {
                reason = ExitReason::Oom;
            }
            running.oom_kills_seen = oom_kills;
        }
        running.counters.set(Counter::InFlight, 0);
        self.record_failure(&exit.app, running, reason.to_string());

        if running.crashloop {
            if let Some(good) = running.last_good.filter(|good| *good != running.generation) {
                let (owner, app, failed) = (running.owner, exit.app.clone(), running.generation);
                let restored = async {
                    let generations = self
                        .store
                        .call(move |store| store.generations(&app))
                        .await?;
                    let spec = generations
                        .into_iter()
                        .find(|g| g.generation == good)
                        .map(|g| g.spec)
                        .ok_or_else(|| {
                            ReconcileError::Internal(format!("generation {good} is gone"))
                        })?;
                    self.activate(&mut apps, spec, owner, Some(good)).await
                }
                .await;
                match restored {
                    Ok(_) => self.logs.note(
                        exit.app.as_str(),
                        good,
                        &format!("crashloop: generation {failed} kept failing; restored generation {good}, which served well"),
                    ),
                    Err(error) => tracing::error!(app = %exit.app, %error, "could not restore the last good generation"),
                }
            }
        }
    }

    /// Counts a pool failure, detects a crashloop and schedules the next attempt.
    fn record_failure(&self, app: &AppName, running: &mut Running, reason: String) {
        running.consecutive_failures += 1;
        running.restarts += 1;
        running.last_exit = reason.clone();
        let now = Instant::now();
        running
            .recent_failures
            .retain(|at| now.duration_since(*at) < CRASHLOOP_WINDOW);
        running.recent_failures.push(now);
        if running.recent_failures.len() >= CRASHLOOP_FAILURES {
            running.crashloop = true;
        }
        let delay = backoff(running.consecutive_failures);
        let note = if running.crashloop {
            format!("crashloop: the pool ended ({reason}), {} times in {CRASHLOOP_WINDOW:?}; retrying in {delay:?}", running.recent_failures.len())
        } else {
            format!("the pool ended ({reason}); restarting in {delay:?}")
        };
        tracing::warn!(app = %app, %note);
        self.logs.note(app.as_str(), running.generation, &note);
        running.state = State::Restarting { reason: note };
        self.schedule_restart(app.clone(), running.generation, delay);
    }

    fn schedule_restart(&self, app: AppName, generation: u64, delay: Duration) {
        let restarts = self.restarts.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = restarts.send((app, generation)).await;
        });
    }

    /// Waits until a connection is pending on the idle app's listener, then asks for its pool
    /// to be started. The connection stays in the backlog for the new pool to accept.
    fn wake_on_connection(
        &self,
        app: AppName,
        generation: u64,
        listener: Option<&Arc<std::net::TcpListener>>,
    ) -> tokio::task::JoinHandle<()> {
        let restarts = self.restarts.clone();
        let watched = listener.and_then(|l| l.try_clone().ok());
        tokio::spawn(async move {
            let Some(watched) = watched else { return };
            // SAFETY: `watched` is a listener this task owns; its descriptor stays open and the
            // same for as long as the AsyncFd that owns it.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    watched,
                    tokio::io::Interest::READABLE,
                )
            };
            let Ok(readiness) = registered else {
                return;
            };
            if readiness.readable().await.is_ok() {
                let _ = restarts.send((app, generation)).await;
            }
        })
    }

    /// Starts a pool again for an app that is restarting (after a failure) or idle (woken by a
    /// connection), if the app still wants that generation.
    async fn restart(&self, app: &AppName, generation: u64) {
        let mut apps = self.apps.lock().await;
        let Some(running) = apps.get_mut(app) else {
            return;
        };
        // (A restored app whose start the background has claimed is not started twice.)
        let waking = matches!(
            running.state,
            State::Idle { .. } | State::Starting { waker: Some(_) }
        );
        if running.generation != generation
            || !(waking || matches!(running.state, State::Restarting { .. }))
        {
            return;
        }
        let listener = Arc::clone(
            running
                .listener
                .as_ref()
                .expect("a restarting app keeps its listener"),
        );
        // A pool that went idle proved this code with the pooling allocator under these
        // limits: its successor skips the probe instance (the first request is one anyway).
        let proven = waking && running.allocator == POOLING_ALLOCATOR;
        let served = self
            .launch(
                &running.spec,
                generation,
                &listener,
                &running.counters,
                running.cgroup.as_ref(),
                Start::Resume { proven },
            )
            .await;
        match served {
            Ok(pool) => {
                if !waking {
                    self.logs.note(
                        app.as_str(),
                        generation,
                        &format!("pool restarted (pid {})", pool.pid),
                    );
                }
                running.serving_with(pool);
            }
            Err(error) => self.record_failure(app, running, error.to_string()),
        }
    }

    /// Removes the app only if `owner` owns it (fleet state never removes a local app).
    pub async fn remove_owned(&self, name: &AppName, owner: Owner) -> Result<(), ReconcileError> {
        let owned_by = self.apps.lock().await.get(name).map(|r| r.owner);
        match owned_by {
            Some(current) if current == owner => self.remove(name).await,
            Some(_) => Err(ReconcileError::OwnedElsewhere {
                app: name.to_string(),
                owner: "local operator",
            }),
            None => Ok(()),
        }
    }

    /// Stops the app and forgets it.
    pub async fn remove(&self, name: &AppName) -> Result<(), ReconcileError> {
        let mut apps = self.apps.lock().await;
        let running = apps
            .remove(name)
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
        let app = name.clone();
        if let Err(error) = self.store.call(move |store| store.remove_app(&app)).await {
            apps.insert(name.clone(), running);
            return Err(error.into());
        }
        if let State::Running { pool, .. } = running.state {
            pool.stop(self.drain).await;
        }
        if let Some(cgroup) = running.cgroup {
            cgroup.remove();
        }
        Ok(())
    }

    pub async fn list(&self) -> Vec<AppView> {
        let apps = self.apps.lock().await;
        apps.iter()
            .map(|(name, running)| view(name, running))
            .collect()
    }

    pub async fn detail(&self, name: &AppName) -> Result<AppDetailView, ReconcileError> {
        let apps = self.apps.lock().await;
        let running = apps
            .get(name)
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
        let counters = &running.counters;
        Ok(AppDetailView {
            view: view(name, running),
            spec: running.spec.clone(),
            allocator: running.allocator.clone(),
            requests: counters.get(Counter::Requests),
            in_flight: counters.get(Counter::InFlight),
            traps: counters.get(Counter::Traps),
            timeouts: counters.get(Counter::Timeouts),
            rejected: counters.get(Counter::Rejected),
            started_unix: running.started_unix,
            pid: match &running.state {
                State::Running { pool, .. } => pool.pid,
                _ => 0,
            },
            restarts: running.restarts,
            last_exit: running.last_exit.clone(),
            cgroup: match &running.cgroup {
                Some(cgroup) => cgroup.describe(),
                None => self.cgroups.describe(),
            },
            usage: running
                .cgroup
                .as_ref()
                .map(AppCgroup::usage)
                .unwrap_or_default(),
        })
    }

    /// Log lines the pools had to drop because their queue to the supervisor was full.
    pub async fn pool_log_lines_dropped(&self) -> u64 {
        let apps = self.apps.lock().await;
        apps.values()
            .map(|r| r.counters.get(Counter::LogLinesDropped))
            .sum()
    }

    /// Stops every app, draining requests in flight.
    pub async fn shutdown(&self) {
        let mut apps = self.apps.lock().await;
        let mut stops = Vec::new();
        let mut cgroups = Vec::new();
        for (_, running) in std::mem::take(&mut *apps) {
            if let State::Running { pool, .. } = running.state {
                let drain = self.drain;
                stops.push(tokio::spawn(async move { pool.stop(drain).await }));
            }
            cgroups.extend(running.cgroup);
        }
        for stop in stops {
            let _ = stop.await;
        }
        for cgroup in cgroups {
            cgroup.remove();
        }
        self.spawner.shutdown().await;
    }
}

fn pool_limits(spec: &AppSpec) -> PoolLimits {
    PoolLimits {
        memory: Some(spec.limits.pool_memory().0),
        cpu: spec.limits.cpu,
        pids: Some(spec.limits.pool_pids() as u64),
    }
}

fn new_counters(app: &AppName) -> Result<Counters, ReconcileError> {
    Counters::create(app.as_str())
        .map_err(|e| ReconcileError::Internal(format!("cannot create the counters page: {e}")))
}

/// OOM kills counted so far in the app's cgroup. Read after each pool start: the start may
/// have given the app a new cgroup (a spare's, renamed into place), whose count starts again.
fn oom_kills(cgroup: Option<&AppCgroup>) -> u64 {
    cgroup.map(|c| c.usage().oom_kills).unwrap_or(0)
}

impl Running {
    /// Records `pool`, just started for the app's current generation, as serving it.
    fn serving_with(&mut self, pool: Pool) {
        self.oom_kills_seen = oom_kills(self.cgroup.as_ref());
        self.allocator = pool.allocator.clone();
        self.state = State::Running {
            pool,
            since: Instant::now(),
        };
        self.started_unix = now_unix();
    }
}

fn facts_text(facts: &CodeFacts) -> String {
    serde_json::to_string(facts).expect("CodeFacts serialise")
}

fn backoff(failures: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESTART_BACKOFF_CAP)
}

/// Binds `addr`, retrying for up to `patience` while it is in use.
async fn bind_patiently(
    addr: SocketAddr,
    patience: Duration,
) -> Result<std::net::TcpListener, ReconcileError> {
    let start = Instant::now();
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => {
                return Err(ReconcileError::AddressUnavailable {
                    addr,
                    reason: match error.kind() {
                        std::io::ErrorKind::AddrInUse => {
                            "the address is in use by another program".to_string()
                        }
                        std::io::ErrorKind::AddrNotAvailable => {
                            "no interface on this device has that address".to_string()
                        }
                        std::io::ErrorKind::PermissionDenied => {
                            "ports below 1024 need root or CAP_NET_BIND_SERVICE".to_string()
                        }
                        _ => error.to_string(),
                    },
                })
            }
        }
    }
}

fn check_address_free(
    apps: &BTreeMap<AppName, Running>,
    spec: &AppSpec,
) -> Result<(), ReconcileError> {
    let wanted = spec.http.listen;
    for (name, running) in apps {
        if *name == spec.name {
            continue;
        }
        let theirs = running.spec.http.listen;
        let overlaps = theirs.port() == wanted.port()
            && (theirs.ip() == wanted.ip()
                || theirs.ip().is_unspecified()
                || wanted.ip().is_unspecified());
        if overlaps {
            return Err(ReconcileError::AddressTaken {
                addr: wanted,
                app: name.to_string(),
            });
        }
    }
    Ok(())
}

fn view(name: &AppName, running: &Running) -> AppView {
    let (status, error) = match &running.state {
        State::Running { .. } => ("running", String::new()),
        State::Restarting { reason } if running.crashloop => ("crashloop", reason.clone()),
        State::Restarting { reason } => ("restarting", reason.clone()),
        State::Idle { .. } => ("idle", String::new()),
        State::Starting { .. } => ("starting", String::new()),
        State::Failed { reason } => ("failed", reason.clone()),
    };
    AppView {
        name: name.to_string(),
        owner: running.owner.as_str(),
        generation: running.generation,
        status,
        listen: running.spec.http.listen,
        digest: running.spec.component.clone(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::ExitReason;

    #[test]
    fn the_code_cache_drops_the_least_recently_used_over_its_budget() {
        let facts = CodeFacts {
            memories: 1,
            tables: 1,
            max_initial_table_size: None,
        };
        let code = |size: usize| Arc::new(Code::new(&vec![7u8; size], facts).unwrap());
        let key = |name: &str| (Digest::of(name.as_bytes()), "engine".to_string());
        let cache = CodeCache::new(300);
        cache.put(key("a"), code(100));
        cache.put(key("b"), code(100));
        cache.put(key("c"), code(100));
        assert!(cache.get(&key("a")).is_some()); // a is now the most recently used
        cache.put(key("d"), code(100));
        assert!(
            cache.get(&key("b")).is_none(),
            "b was the least recently used"
        );
        for kept in ["a", "c", "d"] {
            assert!(cache.get(&key(kept)).is_some(), "{kept}");
        }
        // Code larger than the whole budget is still kept, alone, for the start that asked.
        cache.put(key("huge"), code(1000));
        assert_eq!(cache.get(&key("huge")).unwrap().len, 1000);
        assert!(cache.get(&key("a")).is_none());
        // The same code under another engine is another entry.
        assert!(cache
            .get(&(Digest::of(b"huge"), "other-engine".to_string()))
            .is_none());
    }

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
}

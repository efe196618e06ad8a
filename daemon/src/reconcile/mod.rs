//! The reconciler: the only thing that changes what runs. Deploys, rollbacks and removals from
//! the control API and fleet sync come here; so does start-up, which brings every app in the
//! store back at its current generation, and so do pool exits and wakes.
//!
//! The policy: a new generation is prepared completely (code loaded from the cache or compiled
//! and cached, a pool process started that linked it and made one instance, the address bound)
//! before it is written to the store and told to serve. If any step fails, the store and the
//! running app are left exactly as they were and the caller is told why. A pool that dies is
//! restarted with exponential backoff on the listener the supervisor kept, so connections
//! queue instead of being refused. An app that cannot start from the store (at boot) is marked
//! failed with its reason and retried by `retry_failed`; the others serve regardless.
//!
//! Changes to one app are serialised by that app's lock (`apps`); no lock is held across one
//! app's long work (compiling, a pool's load, a health check) that another app's change, wake
//! or restart, or any view, needs.
//!
//! Layout: `apps` (the table and its locks), `activate` (a generation made current), `code`
//! (code cache, compile, launch), `boot` (restore at start, retries), `exits` (pool exits and
//! restarts), `crashloop` (the policy after a failure, pure), `listen` (binding, wake on
//! connection), `views` (what `ls` and `status` show).

mod activate;
mod apps;
mod boot;
mod code;
mod crashloop;
mod exits;
mod listen;
mod run;
mod views;

pub use apps::RESTART_REASONS;
pub use run::STARTED;
pub use views::{AppSchedules, AppView};

use crate::counters::Counters;
use crate::digest::Digest;
use crate::engine::{Compiler, RuntimeError};
use crate::limits::{AppCgroup, Cgroups, LimitsError};
use crate::logs::LogHub;
use crate::pool_users::PoolUsers;
use crate::spawn::{Pool, PoolExit, Spawner};
use crate::spec::{AppName, AppSpec, SpecError};
use crate::store::{now_unix, Owner, Store, StoreError};
use apps::{AppLock, Running, State};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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
    #[error("app `{app}`: {reason}")]
    Unreadable { app: String, reason: String },
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
    /// A command app's run could not start (the app serves HTTP, has failed, too many runs).
    #[error("{0}")]
    Run(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub struct Reconciler {
    store: Arc<Store>,
    compiler: Arc<Compiler>,
    logs: Arc<LogHub>,
    /// Every app, each behind its own lock.
    apps: apps::Table,
    drain: Duration,
    exits: mpsc::Sender<PoolExit>,
    cgroups: Arc<Cgroups>,
    spawner: Arc<Spawner>,
    /// Checked code recently handed to pools, so a restart or a wake does not read the store.
    code_cache: Arc<code::CodeCache>,
    /// Restarts that are due (sent after their backoff) and wakes (sent on a connection).
    restarts: mpsc::Sender<(AppName, u64)>,
    /// A `retry_failed` round is under way.
    retrying: AtomicBool,
    /// Who each app's pool runs as…
    pool_users: Arc<PoolUsers>,
    /// …and the ids found so far, so a wake from idle does not wait on the store for them.
    pool_ids: std::sync::Mutex<std::collections::HashMap<AppName, Option<(u32, u32)>>>,
    /// Apps' key-value data: a pool is given its app's store at start, `remove` deletes it.
    kv: Arc<crate::kv::Stores>,
    /// Command apps' runs under way.
    runs: run::Runs,
}

impl Reconciler {
    /// Creates the reconciler and starts the task that handles pool exits, restarts and
    /// wakes: each is handled in a task of its own, so one app's slow start never holds up
    /// another's.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Arc<Store>,
        compiler: Arc<Compiler>,
        logs: Arc<LogHub>,
        cgroups: Arc<Cgroups>,
        pool_users: Arc<PoolUsers>,
        kv: Arc<crate::kv::Stores>,
        secrets_dir: std::path::PathBuf,
        drain: Duration,
    ) -> Arc<Reconciler> {
        let (exits, mut exit_events) = mpsc::channel(256);
        let (restarts, mut due_restarts) = mpsc::channel(256);
        let reconciler = Arc::new(Reconciler {
            store,
            compiler,
            logs,
            apps: apps::Table::default(),
            drain,
            exits,
            spawner: Spawner::new(Arc::clone(&cgroups), secrets_dir),
            pool_users,
            pool_ids: Default::default(),
            code_cache: Arc::new(code::CodeCache::new(code::CODE_CACHE_BYTES)),
            cgroups,
            restarts,
            retrying: AtomicBool::new(false),
            kv,
            runs: run::Runs::default(),
        });
        reconciler.spawner.refill(Duration::ZERO);
        let weak = Arc::downgrade(&reconciler);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(exit) = exit_events.recv() => {
                        let Some(reconciler) = weak.upgrade() else { return };
                        tokio::spawn(async move { reconciler.pool_exited(exit).await });
                    }
                    Some((app, generation)) = due_restarts.recv() => {
                        let Some(reconciler) = weak.upgrade() else { return };
                        tokio::spawn(async move { reconciler.restart(&app, generation).await });
                    }
                    else => return,
                }
            }
        });
        reconciler
    }

    /// Deploys `spec` as the app's next generation. Returns the app as it now runs and whether
    /// the spec equalled the current generation (then nothing changed).
    pub async fn deploy(
        &self,
        spec: AppSpec,
        owner: Owner,
    ) -> Result<(AppView, bool), ReconcileError> {
        let lock = self
            .apps
            .lock(&spec.name, true)
            .await
            .expect("a slot is made for a new app");
        let name = spec.name.clone();
        let deployed = self.deploy_locked(&lock, spec, owner).await;
        // A fleet document meeting a local app is the fleet's conflict, reported and retried
        // there: not a failed deploy of this app, and not in its log each retry.
        if let Some(error) = deployed
            .as_ref()
            .err()
            .filter(|e| !matches!(e, ReconcileError::OwnedElsewhere { .. }))
        {
            self.logs.event(
                name.as_str(),
                0,
                "deploy-failed",
                &format!("deploy failed: {error}"),
            );
        }
        deployed
    }

    async fn deploy_locked(
        &self,
        lock: &AppLock,
        spec: AppSpec,
        owner: Owner,
    ) -> Result<(AppView, bool), ReconcileError> {
        let current = lock.running(|running| {
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
            // Idle (scaled to zero) counts as up: the same spec again must not start a new
            // generation, or a fleet document re-applied (a retry, a new version that keeps
            // this app) would wake every idle app it lists.
            let unchanged = running.spec == spec
                && matches!(
                    running.state,
                    State::Running { .. }
                        | State::Starting { .. }
                        | State::Idle { .. }
                        | State::Ready
                );
            Ok(unchanged.then(|| views::view(&spec.name, running)))
        });
        if let Some(Some(view)) = current.transpose()? {
            return Ok((view, true));
        }
        self.apps.claim_address(lock, &spec)?;
        let digest = spec.component.clone();
        if !self
            .store
            .call(move |store| store.touch_blob(&digest))
            .await?
        {
            return Err(ReconcileError::UnknownComponent(spec.component.clone()));
        }
        self.activate(lock, spec, owner, None, None).await
    }

    /// Makes generation `to` (or the one before the current) current again.
    pub async fn rollback(
        &self,
        name: &AppName,
        to: Option<u64>,
    ) -> Result<AppView, ReconcileError> {
        let lock = self
            .apps
            .lock(name, false)
            .await
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
        let rolled = self.rollback_locked(&lock, to).await;
        if let Err(error) = &rolled {
            self.logs.event(
                name.as_str(),
                0,
                "rollback-failed",
                &format!("rollback failed: {error}"),
            );
        }
        rolled
    }

    async fn rollback_locked(
        &self,
        lock: &AppLock,
        to: Option<u64>,
    ) -> Result<AppView, ReconcileError> {
        let name = &lock.name;
        let (owner, current) = lock
            .running(|running| (running.owner, running.generation))
            .ok_or_else(|| ReconcileError::UnknownApp(name.to_string()))?;
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
        let spec = target
            .spec
            .clone()
            .map_err(|unreadable| ReconcileError::Unreadable {
                app: name.to_string(),
                reason: unreadable.reason,
            })?;
        self.apps.claim_address(lock, &spec)?;
        let (view, _) = self
            .activate(lock, spec, owner, Some(target.generation), None)
            .await?;
        Ok(view)
    }

    /// Removes the app only if `owner` owns it (fleet state never removes a local app).
    pub async fn remove_owned(&self, name: &AppName, owner: Owner) -> Result<(), ReconcileError> {
        let Some(lock) = self.apps.lock(name, false).await else {
            return Ok(());
        };
        match lock.running(|running| running.owner) {
            // The fleet's removal keeps the app's data (a document edited by mistake must not
            // destroy it); `cairnctl rm` of the name deletes it.
            Some(current) if current == owner => self.remove_locked(lock, true).await.map(drop),
            Some(_) => Err(ReconcileError::OwnedElsewhere {
                app: name.to_string(),
                owner: "local operator",
            }),
            None => Ok(()),
        }
    }

    /// The app's `[keyvalue]` quota, when it runs with one.
    pub fn kv_quota(&self, name: &AppName) -> Option<u64> {
        self.apps
            .read(name, |running| {
                running.spec.keyvalue.as_ref().map(|kv| kv.quota.0)
            })
            .flatten()
    }

    /// The app's key-value store, when it has data or a `[keyvalue]` table.
    pub fn kv_store(
        &self,
        name: &AppName,
    ) -> Result<Option<Arc<crate::kv::AppStore>>, crate::pool::services::KvError> {
        // Never created here: only a pool's start makes a store, so the operator cannot bring
        // back data that `rm` is deleting.
        self.kv.existing(name)
    }

    /// The bytes of key-value data the app holds, if it has any (kept data included).
    pub fn kv_usage(&self, name: &AppName) -> Option<u64> {
        self.kv.usage(name).unwrap_or(None)
    }

    /// The app's key-value writes and commits since its store was opened (zero when it has
    /// none open).
    pub fn kv_stats(&self, name: &AppName) -> (u64, u64) {
        self.kv.stats(name)
    }

    /// Stops the app and forgets it; its key-value data goes too unless `keep_data`. Returns
    /// the bytes of data deleted, if it had any, and whether there was only data (no app).
    pub async fn remove(
        &self,
        name: &AppName,
        keep_data: bool,
    ) -> Result<(Option<u64>, bool), ReconcileError> {
        let Some(lock) = self.apps.lock(name, false).await else {
            // No such app, but maybe its data, kept by `rm --keep-data` or a fleet removal.
            if !keep_data {
                if let Some(bytes) = self.kv_usage(name) {
                    self.kv.remove(name).await.map_err(|error| {
                        ReconcileError::Pool(format!(
                            "cannot delete {name}'s key-value data: {error}"
                        ))
                    })?;
                    return Ok((Some(bytes), true));
                }
            }
            return Err(ReconcileError::UnknownApp(name.to_string()));
        };
        Ok((self.remove_locked(lock, keep_data).await?, false))
    }

    async fn remove_locked(
        &self,
        lock: AppLock,
        keep_data: bool,
    ) -> Result<Option<u64>, ReconcileError> {
        let app = lock.name.clone();
        self.store.call(move |store| store.remove_app(&app)).await?;
        // Not in the app's log, which goes with it.
        self.logs.record(
            lock.name.as_str(),
            0,
            "remove",
            if keep_data {
                "removed (its key-value data kept)"
            } else {
                "removed"
            },
        );
        if let Some(running) = self.apps.remove(&lock) {
            self.runs.kill(&lock.name, run::KILLED_REMOVED);
            self.runs.forget(&lock.name);
            if let State::Running { pool, .. } = running.state {
                pool.stop(self.drain).await;
            }
            if let Some(cgroup) = running.cgroup {
                cgroup.remove();
            }
        }
        // Only now: an id given to another app while this pool still ran would let the two
        // signal each other.
        let app = lock.name.clone();
        self.store
            .call(move |store| store.release_pool_id(app.as_str()))
            .await?;
        self.pool_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lock.name);
        if keep_data {
            return Ok(None);
        }
        // After the pool has stopped, still under the app's lock: no deploy of the same name
        // can open the store meanwhile.
        let deleted = self.kv.usage(&lock.name).unwrap_or(None);
        self.kv.remove(&lock.name).await.map_err(|error| {
            ReconcileError::Pool(format!(
                "the app was removed, but not its key-value data: {error}"
            ))
        })?;
        Ok(deleted)
    }

    /// Stops every app, draining requests in flight (side by side; each after a change under
    /// way to it has ended).
    pub async fn shutdown(&self) {
        self.runs.kill_all();
        let stops = self.apps.names().into_iter().map(|name| async move {
            let lock = self.apps.lock(&name, false).await?;
            let running = self.apps.remove(&lock)?;
            if let State::Running { pool, .. } = running.state {
                pool.stop(self.drain).await;
            }
            running.cgroup
        });
        let cgroups = futures_util::future::join_all(stops).await;
        for cgroup in cgroups.into_iter().flatten() {
            cgroup.remove();
        }
        self.spawner.shutdown().await;
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

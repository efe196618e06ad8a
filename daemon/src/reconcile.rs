//! The reconciler: the only thing that changes what runs. Deploys, rollbacks and removals from
//! the control API come here, as will fleet state; so does start-up, which brings every app in
//! the store back at its current generation. Changes are serialised by one lock.
//!
//! The policy: a new generation is prepared completely (component loaded or compiled, linked,
//! one instance made, listener bound) before it is written to the store and swapped in. If any
//! step fails, the store and the running app are left exactly as they were and the caller is
//! told why. An app that cannot start from the store (at boot) is marked failed with its
//! reason and retried by `retry_failed`; the others serve regardless.

use crate::digest::Digest;
use crate::http::{self, AppStats, HttpServer, Serving};
use crate::logs::LogHub;
use crate::runtime::{LoadedApp, Outcome, RequestReport, Runtime, RuntimeError};
use crate::spec::{AppName, AppSpec, SpecError};
use crate::store::{now_unix, Owner, Store, StoreError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

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
}

enum State {
    Running {
        server: HttpServer,
        allocator: String,
    },
    Failed {
        reason: String,
    },
}

struct Running {
    owner: Owner,
    generation: u64,
    spec: AppSpec,
    state: State,
    stats: Arc<AppStats>,
    started_unix: i64,
}

pub struct Reconciler {
    store: Arc<Store>,
    runtime: Arc<Runtime>,
    logs: Arc<LogHub>,
    apps: Mutex<BTreeMap<AppName, Running>>,
    drain: Duration,
}

/// A generation ready to swap in.
struct Prepared {
    loaded: LoadedApp,
    stats: Arc<AppStats>,
}

impl Reconciler {
    pub fn new(
        store: Arc<Store>,
        runtime: Arc<Runtime>,
        logs: Arc<LogHub>,
        drain: Duration,
    ) -> Arc<Reconciler> {
        Arc::new(Reconciler {
            store,
            runtime,
            logs,
            apps: Mutex::new(BTreeMap::new()),
            drain,
        })
    }

    /// Brings every app in the store up at its current generation. Apps that fail are marked
    /// failed with the reason; the rest serve.
    pub async fn start_all(&self) -> Result<(), ReconcileError> {
        let records = self.store.call(|store| store.apps()).await?;
        let mut apps = self.apps.lock().await;
        for record in records {
            let stats = Arc::new(AppStats::default());
            let state = match self
                .start(&record.spec, record.generation, Arc::clone(&stats))
                .await
            {
                Ok(state) => state,
                Err(error) => {
                    let reason = error.to_string();
                    tracing::error!(app = %record.name, %reason, "app could not start");
                    self.logs.note(
                        record.name.as_str(),
                        record.generation,
                        &format!("could not start: {reason}"),
                    );
                    State::Failed { reason }
                }
            };
            apps.insert(
                record.name.clone(),
                Running {
                    owner: record.owner,
                    generation: record.generation,
                    spec: record.spec,
                    state,
                    stats,
                    started_unix: now_unix(),
                },
            );
        }
        Ok(())
    }

    /// Tries again to start apps that failed (a port that was busy at boot, say).
    pub async fn retry_failed(&self) {
        let mut apps = self.apps.lock().await;
        for (name, running) in apps.iter_mut() {
            if let State::Failed { .. } = running.state {
                match self
                    .start(
                        &running.spec,
                        running.generation,
                        Arc::clone(&running.stats),
                    )
                    .await
                {
                    Ok(state) => {
                        self.logs.note(
                            name.as_str(),
                            running.generation,
                            "started after an earlier failure",
                        );
                        running.state = state;
                        running.started_unix = now_unix();
                    }
                    Err(error) => {
                        running.state = State::Failed {
                            reason: error.to_string(),
                        }
                    }
                }
            }
        }
    }

    async fn start(
        &self,
        spec: &AppSpec,
        generation: u64,
        stats: Arc<AppStats>,
    ) -> Result<State, ReconcileError> {
        let prepared = self.prepare(spec, generation, stats.clone()).await?;
        let listener = bind(spec.http.listen)?;
        let allocator = prepared.loaded.allocator.clone();
        let server = HttpServer::start(
            listener,
            Serving::new(prepared.loaded, spec.limits.instances),
            prepared.stats,
        );
        Ok(State::Running { server, allocator })
    }

    /// Loads (or compiles and caches) the component and links it, off the async threads.
    async fn prepare(
        &self,
        spec: &AppSpec,
        generation: u64,
        stats: Arc<AppStats>,
    ) -> Result<Prepared, ReconcileError> {
        let store = Arc::clone(&self.store);
        let runtime = Arc::clone(&self.runtime);
        let spec = spec.clone();
        let reporter = reporter(
            Arc::clone(&self.logs),
            spec.name.to_string(),
            generation,
            Arc::clone(&stats),
        );
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _entered = handle.enter();
            let digest = spec.component.clone();
            let component_error = |source| ReconcileError::Component {
                digest: digest.clone(),
                source,
            };
            let fingerprint = runtime.fingerprint(&spec.limits).map_err(component_error)?;
            let env: Vec<(String, String)> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            if let Some(code) = store.get_compiled(&digest, &fingerprint)? {
                match runtime.load(&spec.name, &code, &spec.limits, env.clone(), Arc::clone(&reporter)) {
                    Ok(loaded) => {
                        runtime.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(Prepared { loaded, stats });
                    }
                    Err(error) => tracing::warn!(%digest, %error, "precompiled code was not usable; recompiling"),
                }
            }
            let wasm = store
                .get_blob(&digest)?
                .ok_or_else(|| ReconcileError::UnknownComponent(digest.clone()))?;
            let code = runtime.compile(&wasm, &spec.limits).map_err(component_error)?;
            let loaded = runtime
                .load(&spec.name, &code, &spec.limits, env, reporter)
                .map_err(component_error)?;
            store.put_compiled(&digest, &fingerprint, &code)?;
            Ok(Prepared { loaded, stats })
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
            if running.spec == spec && matches!(running.state, State::Running { .. }) {
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

    /// Prepares `spec`, binds its address unless this app already listens there, records it in
    /// the store (a new generation, or `existing` made current) and swaps it in.
    async fn activate(
        &self,
        apps: &mut BTreeMap<AppName, Running>,
        spec: AppSpec,
        owner: Owner,
        existing: Option<u64>,
    ) -> Result<(AppView, bool), ReconcileError> {
        let name = spec.name.clone();
        let stats = apps
            .get(&name)
            .map(|r| Arc::clone(&r.stats))
            .unwrap_or_default();
        // The generation number is only known once written; prepare with the number it will get.
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
        let prepared = self
            .prepare(&spec, next_generation, Arc::clone(&stats))
            .await?;
        let reuse_listener = matches!(
            apps.get(&name),
            Some(Running { state: State::Running { server, .. }, .. }) if server.addr == spec.http.listen
        );
        let listener = if reuse_listener {
            None
        } else {
            Some(bind(spec.http.listen)?)
        };

        let stored_spec = spec.clone();
        let generation = match existing {
            Some(generation) => {
                let app = name.clone();
                self.store
                    .call(move |store| store.set_current_generation(&app, generation))
                    .await?;
                generation
            }
            None => {
                self.store
                    .call(move |store| store.commit_generation(&stored_spec, owner))
                    .await?
            }
        };
        if generation != next_generation {
            return Err(ReconcileError::Internal(format!(
                "generation {generation} was written where {next_generation} was expected"
            )));
        }

        let allocator = prepared.loaded.allocator.clone();
        let serving = Serving::new(prepared.loaded, spec.limits.instances);
        let previous = apps.remove(&name);
        let state = match (listener, previous) {
            (
                None,
                Some(Running {
                    state: State::Running { server, .. },
                    ..
                }),
            ) => {
                server.swap(serving);
                State::Running { server, allocator }
            }
            (Some(listener), previous) => {
                let server = HttpServer::start(listener, serving, Arc::clone(&stats));
                if let Some(Running {
                    state: State::Running { server: old, .. },
                    ..
                }) = previous
                {
                    tokio::spawn(old.shutdown(self.drain));
                }
                State::Running { server, allocator }
            }
            (None, _) => {
                return Err(ReconcileError::Internal(
                    "listener vanished during deploy".into(),
                ))
            }
        };
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
            state,
            stats,
            started_unix: now_unix(),
        };
        let app_view = view(&name, &running);
        apps.insert(name, running);
        Ok((app_view, false))
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
        if let State::Running { server, .. } = running.state {
            server.shutdown(self.drain).await;
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
        let (allocator, in_flight) = match &running.state {
            State::Running { server, allocator } => {
                (allocator.clone(), server.serving().in_flight())
            }
            State::Failed { .. } => (String::new(), 0),
        };
        Ok(AppDetailView {
            view: view(name, running),
            spec: running.spec.clone(),
            allocator,
            requests: running.stats.requests.load(Ordering::Relaxed),
            in_flight,
            traps: running.stats.traps.load(Ordering::Relaxed),
            timeouts: running.stats.timeouts.load(Ordering::Relaxed),
            rejected: running.stats.rejected.load(Ordering::Relaxed),
            started_unix: running.started_unix,
        })
    }

    /// Stops every app, draining requests in flight.
    pub async fn shutdown(&self) {
        let mut apps = self.apps.lock().await;
        let mut drains = Vec::new();
        for (_, running) in std::mem::take(&mut *apps) {
            if let State::Running { server, .. } = running.state {
                drains.push(tokio::spawn(server.shutdown(self.drain)));
            }
        }
        for drain in drains {
            let _ = drain.await;
        }
    }
}

fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ReconcileError> {
    http::bind(addr).map_err(|error| ReconcileError::AddressUnavailable {
        addr,
        reason: match error.kind() {
            std::io::ErrorKind::AddrInUse => "the address is in use by another program".to_string(),
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

/// Turns what a request left behind into log lines and counters.
fn reporter(
    logs: Arc<LogHub>,
    app: String,
    generation: u64,
    stats: Arc<AppStats>,
) -> crate::runtime::Reporter {
    Arc::new(move |report: RequestReport| {
        logs.emit(&app, generation, "stdout", &report.stdout);
        logs.emit(&app, generation, "stderr", &report.stderr);
        match &report.outcome {
            Outcome::Ok => {}
            Outcome::Trap(message) => {
                stats.traps.fetch_add(1, Ordering::Relaxed);
                logs.note(
                    &app,
                    generation,
                    &format!("{} {} trapped: {message}", report.method, report.path),
                );
            }
            Outcome::Timeout => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                logs.note(
                    &app,
                    generation,
                    &format!("{} {} stopped at its timeout", report.method, report.path),
                );
            }
            Outcome::NoResponse => {
                logs.note(
                    &app,
                    generation,
                    &format!(
                        "{} {} returned without a response",
                        report.method, report.path
                    ),
                );
            }
        }
    })
}

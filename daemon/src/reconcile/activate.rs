//! Making a generation current (a deploy, a rollback, a crashloop's restore): prepared
//! completely in a new pool (code loaded, one instance made, health checked) before it is
//! written to the store and told to serve; then the old pool drains. If any step fails, the
//! store and the running app are exactly as before. Runs under the app's operation lock only.

use super::apps::{AppLock, Running, State};
use super::code::{pool_limits, Attempt};
use super::listen::bind_patiently;
use super::views::{view, AppView};
use super::{new_counters, oom_kills, ReconcileError, Reconciler};
use crate::spawn::{Pool, Start};
use crate::spec::{AppName, AppSpec};
use crate::store::Owner;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a generation runs with (see `Reconciler::resources`).
struct Resources {
    listener: Arc<std::net::TcpListener>,
    counters: Arc<crate::counters::Counters>,
    cgroup: Option<crate::limits::AppCgroup>,
    fresh_cgroup: bool,
}

impl Reconciler {
    /// Starts a pool for `spec` (binding its address unless this app already listens there),
    /// records it in the store (a new generation, or `existing` made current), tells it to
    /// serve and stops the previous pool. `restore`: why cairnd itself made `existing` current
    /// again (a crashloop), the event recorded instead of a rollback.
    pub(super) async fn activate(
        &self,
        lock: &AppLock,
        spec: AppSpec,
        owner: Owner,
        existing: Option<u64>,
        restore: Option<&str>,
    ) -> Result<(AppView, bool), ReconcileError> {
        let name = spec.name.clone();
        let next_generation = match existing {
            Some(generation) => generation,
            None => self.next_generation(&name).await?,
        };
        if spec.is_command() {
            return self
                .activate_command(lock, spec, owner, existing, next_generation, restore)
                .await;
        }
        let Resources {
            listener,
            counters,
            cgroup,
            fresh_cgroup,
        } = self.resources(lock, &spec).await?;
        let prepared = self
            .prepare(
                &spec,
                owner,
                existing,
                next_generation,
                &listener,
                &counters,
                cgroup.as_ref(),
            )
            .await;
        let (pool, generation) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                // Every failure before the generation is recorded leaves no cgroup made for it.
                if let (true, Some(cgroup)) = (fresh_cgroup, &cgroup) {
                    cgroup.remove();
                }
                return Err(error);
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
        self.record_event(&spec, generation, existing, restore);
        let oom_kills_seen = oom_kills(cgroup.as_ref());
        let next = Running {
            allocator: pool.allocator.clone(),
            listener: Some(listener),
            oom_kills_seen,
            cgroup,
            ..Running::new(
                owner,
                generation,
                spec,
                State::Running {
                    pool,
                    since: Instant::now(),
                },
                counters,
            )
        };
        Ok((self.make_current(lock, &name, next).await, false))
    }

    /// `activate` for a command app: its code is compiled (or found) and checked to be a
    /// command, the generation recorded, and the app is ready to run. No pool starts; the
    /// previous generation's pool, if it served HTTP, drains.
    async fn activate_command(
        &self,
        lock: &AppLock,
        spec: AppSpec,
        owner: Owner,
        existing: Option<u64>,
        next_generation: u64,
        restore: Option<&str>,
    ) -> Result<(AppView, bool), ReconcileError> {
        let name = spec.name.clone();
        let (counters, existing_cgroup) = lock
            .running(|r| (Arc::clone(&r.counters), r.cgroup.clone()))
            .unzip();
        let counters = match counters {
            Some(counters) => counters,
            None => Arc::new(new_counters(&name)?),
        };
        let (cgroup, fresh_cgroup) = match existing_cgroup.flatten() {
            Some(cgroup) => (Some(cgroup), false),
            None => (self.app_cgroup(&spec)?, true),
        };
        // Proved as an HTTP app's generation is: a pool that links the code and makes one
        // instance under the app's limits (a memory limit below what it needs fails here,
        // not at every run), then ends.
        let proved = self
            .launch(Attempt {
                spec: &spec,
                generation: next_generation,
                listener: None,
                counters: &counters,
                cgroup: cgroup.as_ref(),
                start: Start::Prepare,
                run: None,
                tap: None,
            })
            .await;
        let recorded = match proved {
            Ok(pool) => {
                pool.stop(Duration::ZERO).await;
                self.record(&spec, owner, existing, next_generation).await
            }
            Err(error) => Err(error),
        };
        let generation = match recorded {
            Ok(generation) => generation,
            Err(error) => {
                if let (true, Some(cgroup)) = (fresh_cgroup, &cgroup) {
                    cgroup.remove();
                }
                return Err(error);
            }
        };
        if let Some(cgroup) = &cgroup {
            if let Err(error) = cgroup.apply(&pool_limits(&spec)) {
                tracing::warn!(app = %name, %error, "the new generation's limits could not be written");
            }
        }
        self.record_event(&spec, generation, existing, restore);
        let oom_kills_seen = oom_kills(cgroup.as_ref());
        let next = Running {
            oom_kills_seen,
            cgroup,
            ..Running::new(owner, generation, spec, State::Ready, counters)
        };
        Ok((self.make_current(lock, &name, next).await, false))
    }

    /// Makes `next` the app's current state (keeping what `successor` carries over) and
    /// returns its view; the previous generation's pool, if it served, drains. The caller
    /// returns once that pool has stopped accepting: from then on every new connection
    /// reaches the new generation, and its requests in flight finish behind.
    async fn make_current(&self, lock: &AppLock, name: &AppName, next: Running) -> AppView {
        let (app_view, previous) = lock.with(|slot| {
            let previous = slot.running.take();
            let running = successor(previous.as_ref(), next);
            let app_view = view(name, &running);
            slot.running = Some(running);
            (app_view, previous)
        });
        if let Some(Running {
            state: State::Running { pool: old, .. },
            ..
        }) = previous
        {
            let drain = self.drain;
            let asked = old.drain(drain).await;
            tokio::spawn(async move { old.finish(drain, asked).await });
        }
        app_view
    }

    /// Records the deploy, rollback or restore of `generation` as an event.
    fn record_event(
        &self,
        spec: &AppSpec,
        generation: u64,
        existing: Option<u64>,
        restore: Option<&str>,
    ) {
        let (kind, text) = match (existing, restore) {
            (Some(_), Some(why)) => ("restore", why.to_string()),
            (Some(_), None) => (
                "rollback",
                format!(
                    "rolled back to generation {generation} ({})",
                    spec.component
                ),
            ),
            (None, _) => (
                "deploy",
                format!("deployed generation {generation} ({})", spec.component),
            ),
        };
        self.logs.event(spec.name.as_str(), generation, kind, &text);
    }

    /// Writes the generation to the store: `existing` made current, or `spec` as a new one
    /// (which must get number `next_generation`).
    async fn record(
        &self,
        spec: &AppSpec,
        owner: Owner,
        existing: Option<u64>,
        next_generation: u64,
    ) -> Result<u64, ReconcileError> {
        let stored_spec = spec.clone();
        let name = spec.name.clone();
        let recorded = match existing {
            Some(generation) => self
                .store
                .call(move |store| store.set_current_generation(&name, generation))
                .await
                .map(|_| generation),
            None => {
                self.store
                    .call(move |store| store.commit_generation(&stored_spec, owner))
                    .await
            }
        };
        match recorded {
            Ok(generation) if generation == next_generation => Ok(generation),
            Ok(other) => Err(ReconcileError::Internal(format!(
                "generation {other} was written where {next_generation} was expected"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// The number a new generation of `app` gets: one more than the last recorded.
    async fn next_generation(&self, app: &AppName) -> Result<u64, ReconcileError> {
        let app = app.clone();
        Ok(self
            .store
            .call(move |store| {
                Ok(store
                    .generations(&app)?
                    .last()
                    .map(|g| g.generation)
                    .unwrap_or(0)
                    + 1)
            })
            .await?)
    }

    /// What a generation of `spec` runs with: the app's listener (reused if it listens on the
    /// same address, else bound now), its counters, and its cgroup. An app new to this daemon
    /// gets its cgroup now (`fresh_cgroup`: removed again if the deploy fails); an existing
    /// one keeps its cgroup, whose limits change once the generation is recorded.
    async fn resources(&self, lock: &AppLock, spec: &AppSpec) -> Result<Resources, ReconcileError> {
        let (reusable, counters, existing_cgroup) = lock
            .running(|r| {
                let reusable = r
                    .listener
                    .as_ref()
                    .filter(|l| l.local_addr().ok() == spec.listen())
                    .cloned();
                (reusable, Some(Arc::clone(&r.counters)), r.cgroup.clone())
            })
            .unwrap_or((None, None, None));
        let listener = match reusable {
            Some(listener) => listener,
            None => {
                let listen = spec.listen().ok_or_else(|| {
                    ReconcileError::Internal("a command app has no address to bind".into())
                })?;
                Arc::new(bind_patiently(listen, Duration::ZERO).await?)
            }
        };
        let counters = match counters {
            Some(counters) => counters,
            None => Arc::new(new_counters(&spec.name)?),
        };
        let (cgroup, fresh_cgroup) = match existing_cgroup {
            Some(cgroup) => (Some(cgroup), false),
            None => (self.app_cgroup(spec)?, true),
        };
        Ok(Resources {
            listener,
            counters,
            cgroup,
            fresh_cgroup,
        })
    }

    /// Starts the generation's pool (one proving instance), runs its health check and records
    /// the generation: the pool, ready to serve, and the generation recorded. On failure the
    /// pool is stopped and nothing was recorded.
    #[allow(clippy::too_many_arguments)] // one call site; the parts of one activation
    async fn prepare(
        &self,
        spec: &AppSpec,
        owner: Owner,
        existing: Option<u64>,
        next_generation: u64,
        listener: &std::net::TcpListener,
        counters: &crate::counters::Counters,
        cgroup: Option<&crate::limits::AppCgroup>,
    ) -> Result<(Pool, u64), ReconcileError> {
        let pool = self
            .launch(Attempt {
                spec,
                generation: next_generation,
                listener: Some(listener),
                counters,
                cgroup,
                start: Start::Prepare,
                run: None,
                tap: None,
            })
            .await?;
        if let Some(path) = spec.http.as_ref().and_then(|http| http.health.as_ref()) {
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
                return Err(ReconcileError::Unhealthy {
                    path: path.clone(),
                    answer,
                });
            }
        }
        match self.record(spec, owner, existing, next_generation).await {
            Ok(generation) => Ok((pool, generation)),
            Err(error) => {
                pool.stop(Duration::ZERO).await;
                Err(error)
            }
        }
    }
}

/// `next`, the app's new generation, with what it keeps of the `previous` one: its restart
/// count and last exit, the OOM kills already seen, and which generation last served well.
fn successor(previous: Option<&Running>, next: Running) -> Running {
    let Some(previous) = previous else {
        return next;
    };
    // The generation replaced served well if it was serving (or idle) and not in a crashloop;
    // otherwise keep the one it remembered.
    let served = matches!(
        previous.state,
        State::Running { .. } | State::Idle { .. } | State::Starting { .. } | State::Ready
    ) && !previous.failures.crashloop;
    Running {
        restarts: previous.restarts,
        oom_kills: previous.oom_kills,
        cold_starts: previous.cold_starts,
        cold_start_micros: previous.cold_start_micros,
        last_exit: previous.last_exit.clone(),
        // A pool start may have given the app a new cgroup (a spare's, renamed into place),
        // whose count starts again.
        oom_kills_seen: previous.oom_kills_seen.min(next.oom_kills_seen),
        last_good: if served {
            Some(previous.generation)
        } else {
            previous.last_good
        },
        ..next
    }
}

//! An app's native code on its way to a pool: taken from memory (`CodeCache`), else from the
//! store's precompiled code, else compiled now and kept in both; then a pool is launched with
//! it. Reading and compiling are blocking work and run on the blocking pool, holding no lock
//! but the app's own operation lock (held by the caller).

use super::{ReconcileError, Reconciler};
use crate::counters::Counters;
use crate::digest::Digest;
use crate::engine::CodeFacts;
use crate::limits::{AppCgroup, Cgroups, PoolLimits};
use crate::spawn::{self, Code, Pool, SpawnError, Start};
use crate::spec::{AppName, AppSpec};
use crate::store::Compiled;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How much precompiled code the supervisor keeps in memory for pool starts. The pages are
/// shared with the pools that map the code, so this costs memory only for code no running
/// pool uses (idle or removed apps'): a wake from idle of a recently used app reads no SQLite.
pub(super) const CODE_CACHE_BYTES: usize = 32 << 20;

/// Code by (component digest, engine fingerprint), least recently used dropped first once
/// the total is over its budget.
pub(super) struct CodeCache {
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
    pub fn new(budget: usize) -> CodeCache {
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
#[derive(Clone)]
pub(super) struct Attempt<'a> {
    pub spec: &'a AppSpec,
    pub generation: u64,
    /// `None` for a command's run.
    pub listener: Option<&'a std::net::TcpListener>,
    pub counters: &'a Counters,
    pub cgroup: Option<&'a AppCgroup>,
    pub start: Start,
    /// A command's run: its arguments, and who watches its output.
    pub run: Option<&'a [String]>,
    pub tap: Option<spawn::Tap>,
}

impl Reconciler {
    /// Loads the app's code (precompiled from the store, or compiled now and cached) and starts
    /// a pool with it. Cached code a pool cannot load is recompiled once.
    pub(super) async fn launch(&self, attempt: Attempt<'_>) -> Result<Pool, ReconcileError> {
        let spec = attempt.spec;
        let (code, cached) = self.checked_code(spec).await?;
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
        let user = self.pool_user(&spec.name).await?;
        let kv = match &spec.keyvalue {
            Some(keyvalue) => {
                // Opening counts what is stored (a scan): off the runtime's threads.
                let (stores, name) = (Arc::clone(&self.kv), spec.name.clone());
                let store = tokio::task::spawn_blocking(move || stores.open(&name))
                    .await
                    .map_err(|error| ReconcileError::Internal(error.to_string()))?
                    .map_err(|error| ReconcileError::Pool(error.to_string()))?;
                Some(crate::kv::Grant {
                    store,
                    quota: keyvalue.quota.0,
                })
            }
            None => None,
        };
        self.spawner
            .launch(spawn::Launch {
                user,
                limits: pool_limits(spec),
                spec,
                generation: attempt.generation,
                code,
                start: attempt.start,
                listener: attempt.listener,
                counters: attempt.counters,
                cgroup: attempt.cgroup,
                logs: Arc::clone(&self.logs),
                // A command's pool (a run, a deploy's proof) ends by design: its caller waits
                // for it; it is no pool death to restart.
                exits: match attempt.listener {
                    None => tokio::sync::mpsc::channel(1).0,
                    Some(_) => self.exits.clone(),
                },
                kv,
                run: attempt.run,
                tap: attempt.tap.clone(),
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

    /// The uid and gid `app`'s pool runs as: from memory after the first time, else from the
    /// store (which gives the app an id on its first start).
    async fn pool_user(&self, app: &AppName) -> Result<Option<(u32, u32)>, ReconcileError> {
        let known = self
            .pool_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .copied();
        if let Some(ids) = known {
            return Ok(ids);
        }
        let (store, users, name) = (
            Arc::clone(&self.store),
            Arc::clone(&self.pool_users),
            app.clone(),
        );
        let ids = tokio::task::spawn_blocking(move || users.ids_for(&store, &name))
            .await
            .map_err(|e| ReconcileError::Internal(e.to_string()))?
            .map_err(|e| ReconcileError::Pool(e.to_string()))?;
        self.pool_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.clone(), ids);
        Ok(ids)
    }

    /// `code`, once it is known to be of the app's kind (HTTP or command).
    pub(super) async fn checked_code(
        &self,
        spec: &AppSpec,
    ) -> Result<(Arc<Code>, bool), ReconcileError> {
        let (code, cached) = self.code(spec, false).await?;
        code.facts
            .fits(spec)
            .map_err(|source| ReconcileError::Component {
                digest: spec.component.clone(),
                source,
            })?;
        Ok((code, cached))
    }

    /// The app's native code, ready for pools, and whether it was compiled before (in memory
    /// or in the store).
    async fn code(
        &self,
        spec: &AppSpec,
        force_compile: bool,
    ) -> Result<(Arc<Code>, bool), ReconcileError> {
        let store = Arc::clone(&self.store);
        let compiler = Arc::clone(&self.compiler);
        let memory = Arc::clone(&self.code_cache);
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || {
            let digest = spec.component.clone();
            let component_error = |source| ReconcileError::Component {
                digest: digest.clone(),
                source,
            };
            let fingerprint = compiler
                .fingerprint(&spec.limits)
                .map_err(component_error)?;
            let key = (digest.clone(), fingerprint.clone());
            if !force_compile {
                if let Some(code) = memory.get(&key) {
                    compiler.cache_hits.fetch_add(1, Ordering::Relaxed);
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
                if let Some(Compiled { code, facts }) = store.get_compiled(&digest, &fingerprint)? {
                    compiler.cache_hits.fetch_add(1, Ordering::Relaxed);
                    let known = facts.and_then(|facts| serde_json::from_str(&facts).ok());
                    let facts = match known {
                        Some(facts) => facts,
                        // Cached by an older cairnd (or unreadable): learn them once.
                        None => {
                            let facts = compiler
                                .inspect(&code, &spec.limits)
                                .map_err(component_error)?;
                            if let Err(error) = store.set_compiled_facts(&digest, &fingerprint, &facts_text(&facts)) {
                                tracing::warn!(app = %spec.name, %error, "what was learnt about precompiled code could not be stored");
                            }
                            facts
                        }
                    };
                    return Ok((ready(&code, facts)?, true));
                }
            }
            let wasm = store
                .get_blob(&digest)?
                .ok_or_else(|| ReconcileError::UnknownComponent(digest.clone()))?;
            let code = compiler
                .compile(&wasm, &spec.limits)
                .map_err(component_error)?;
            let facts = compiler
                .inspect(&code, &spec.limits)
                .map_err(component_error)?;
            // The app runs without its code cached (a full disk, the store's budget): it is
            // compiled again at its next start instead.
            if let Err(error) = store.put_compiled(&digest, &fingerprint, &code, &facts_text(&facts)) {
                tracing::warn!(app = %spec.name, %error, "precompiled code could not be stored; the app runs and is compiled again at its next start");
            }
            Ok((ready(&code, facts)?, false))
        })
        .await
        .map_err(|e| ReconcileError::Internal(format!("preparing the app failed: {e}")))?
    }

    /// The app's cgroup with the spec's limits written, or `None` where limits are not enforced.
    pub(super) fn app_cgroup(&self, spec: &AppSpec) -> Result<Option<AppCgroup>, ReconcileError> {
        app_cgroup(&self.cgroups, spec)
    }
}

/// See `Reconciler::app_cgroup`.
fn app_cgroup(cgroups: &Cgroups, spec: &AppSpec) -> Result<Option<AppCgroup>, ReconcileError> {
    let Some(cgroup) = cgroups.for_app(spec.name.as_str())? else {
        return Ok(None);
    };
    cgroup.apply(&pool_limits(spec))?;
    Ok(Some(cgroup))
}

pub(super) fn pool_limits(spec: &AppSpec) -> PoolLimits {
    PoolLimits {
        memory: Some(spec.pool_memory().0),
        cpu: spec.limits.cpu,
        pids: Some(spec.pool_pids() as u64),
    }
}

fn facts_text(facts: &CodeFacts) -> String {
    serde_json::to_string(facts).expect("CodeFacts serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Tree;

    /// The limits an app's manifest sets reach its cgroup, on a fake v2 tree (a directory):
    /// the pool's memory (given, or from the instance memory times instances), its CPU
    /// quota, its pids; a redeploy without them lifts the CPU cap and restores the defaults.
    #[test]
    fn an_apps_manifest_limits_reach_its_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let tree = Tree::detect(dir.path()).unwrap();
        let cgroups = Cgroups::with_tree(tree, "cairn", &PoolLimits::default());
        let spec = |limits: &str| {
            AppSpec::from_manifest(&format!(
                "name = \"web\"\ncomponent = \"{}\"\n[http]\nlisten = \"127.0.0.1:8080\"\n[limits]\n{limits}",
                Digest::of(b"web")
            ))
            .unwrap()
        };
        let read = |file: &str| {
            std::fs::read_to_string(dir.path().join("cairn/web").join(file))
                .unwrap()
                .trim()
                .to_string()
        };
        let capped = spec("memory_total = \"200MiB\"\ncpu = 0.25\npids = 32\n");
        app_cgroup(&cgroups, &capped).unwrap().expect("enforced");
        assert_eq!(read("memory.max"), (200u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "25000 100000");
        assert_eq!(read("pids.max"), "32");

        let plain = spec("memory = \"16MiB\"\ninstances = 4\n");
        app_cgroup(&cgroups, &plain).unwrap().expect("enforced");
        assert_eq!(read("memory.max"), plain.limits.pool_memory().0.to_string());
        assert_eq!(
            plain.limits.pool_memory().0,
            4 * (16 << 20) + crate::spec::POOL_BASELINE.0,
            "four instances of 16 MiB and the runtime"
        );
        assert_eq!(read("cpu.max"), "max 100000");
        assert_eq!(read("pids.max"), plain.limits.pool_pids().to_string());

        let unenforced = Cgroups::NotEnforced { why: "test".into() };
        assert!(app_cgroup(&unenforced, &plain).unwrap().is_none());
    }

    #[test]
    fn the_code_cache_drops_the_least_recently_used_over_its_budget() {
        let facts = CodeFacts {
            memories: 1,
            tables: 1,
            max_initial_table_size: None,
            http: true,
            command: false,
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
}

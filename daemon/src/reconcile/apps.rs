//! The app table and its locks. The table maps each app's name to a slot and is held only for
//! moments. A slot has two locks:
//!
//! - the **operation lock** (async), held across the long work of one change to the app
//!   (compiling, a pool's load, a health check, a drain): operations on one app are serialised,
//!   and nothing waits for another app's work;
//! - the **state lock** (a plain mutex), held for moments and never across an await: views,
//!   status and the address check read through it while a change is under way.
//!
//! Lock order: table, then a slot's state. The operation lock is taken with neither held.

use super::listen::Waker;
use super::ReconcileError;
use crate::counters::Counters;
use crate::limits::AppCgroup;
use crate::spawn::Pool;
use crate::spec::{AppName, AppSpec};
use crate::store::Owner;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::OwnedMutexGuard;

pub(super) enum State {
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
    /// started in the background, or sooner by the waker when a connection arrives.
    Starting {
        _waker: Waker,
    },
    /// A command app (no `[http]`): nothing runs between its runs (`Reconciler::run`).
    Ready,
    /// The app could not be started at all.
    Failed {
        reason: String,
    },
    /// Its stored spec cannot be read by this cairnd (`store::Unreadable`): shown as failed,
    /// never started or retried; a deploy, a rollback to a readable generation or `rm` ends it.
    Unreadable {
        reason: String,
    },
}

/// An app the reconciler runs (or tries to).
pub(super) struct Running {
    pub owner: Owner,
    pub generation: u64,
    pub spec: AppSpec,
    pub state: State,
    /// Bound by the supervisor and kept across pool restarts.
    pub listener: Option<Arc<std::net::TcpListener>>,
    pub counters: Arc<Counters>,
    pub allocator: String,
    pub started_unix: i64,
    pub restarts: Restarts,
    /// Pools of the app the kernel's OOM killer ended, since cairnd started.
    pub oom_kills: u64,
    /// Pools started for a connection to an app that had none (idle, or restored at boot),
    /// and the time those starts took together.
    pub cold_starts: u64,
    pub cold_start_micros: u64,
    pub failures: super::crashloop::Failures,
    pub last_exit: String,
    pub cgroup: Option<AppCgroup>,
    /// OOM kills in the cgroup already accounted for, to tell an OOM kill from a plain kill.
    pub oom_kills_seen: u64,
    /// The last generation that served well, restored on a crashloop.
    pub last_good: Option<u64>,
}

impl Running {
    /// An app at `generation` in `state`, with nothing counted yet, no listener and no cgroup
    /// (callers set what they have).
    pub fn new(
        owner: Owner,
        generation: u64,
        spec: AppSpec,
        state: State,
        counters: Arc<Counters>,
    ) -> Running {
        Running {
            owner,
            generation,
            spec,
            state,
            listener: None,
            counters,
            allocator: String::new(),
            started_unix: crate::store::now_unix(),
            restarts: Restarts::default(),
            oom_kills: 0,
            cold_starts: 0,
            cold_start_micros: 0,
            failures: super::crashloop::Failures::default(),
            last_exit: String::new(),
            cgroup: None,
            oom_kills_seen: 0,
            last_good: None,
        }
    }
}

/// Pool failures since cairnd started, each followed by a restart, by reason.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restarts {
    /// In the order of `RESTART_REASONS`.
    pub by_reason: [u64; 4],
}

/// Why a pool had to be restarted: the OOM killer ended it, another signal did, it exited, or
/// it could not be started.
pub const RESTART_REASONS: [&str; 4] = ["oom", "signal", "exit", "start"];

impl Restarts {
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum()
    }

    /// Counts one failure: `kind` as `record_failure` is given it, `reason` how the pool ended.
    pub fn count(&mut self, kind: &str, reason: &str) {
        let index = match kind {
            "oom" => 0,
            "start-failed" => 3,
            _ if reason.starts_with("signal") => 1,
            _ => 2,
        };
        self.by_reason[index] += 1;
    }
}

/// One app's entry in the table.
pub(super) struct Slot {
    /// Serialises changes to this app; see the module comment.
    operations: Arc<tokio::sync::Mutex<()>>,
    /// Held for moments only.
    state: Mutex<SlotState>,
}

#[derive(Default)]
pub(super) struct SlotState {
    /// `None` while the app's first deploy is under way: not shown, not yet the app's.
    pub running: Option<Running>,
    /// The address a change under way will listen on, so that two deploys of different apps
    /// cannot both take it.
    pub claim: Option<SocketAddr>,
}

impl Slot {
    fn new(running: Option<Running>) -> Arc<Slot> {
        Arc::new(Slot {
            operations: Arc::default(),
            state: Mutex::new(SlotState {
                running,
                claim: None,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Nothing under this lock leaves the state half-changed on a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Proof that the holder is the only one changing this app (its operation lock is held).
/// Dropped (the change done, failed or cancelled, as when a client goes away mid-deploy), it
/// settles the slot: its address claim goes, and a slot whose app never came to exist (a
/// first deploy that did not finish) leaves the table.
pub(super) struct AppLock {
    pub name: AppName,
    slot: Arc<Slot>,
    slots: Arc<Mutex<BTreeMap<AppName, Arc<Slot>>>>,
    _operation: OwnedMutexGuard<()>,
}

impl Drop for AppLock {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.slot.state();
        state.claim = None;
        if state.running.is_none()
            && slots
                .get(&self.name)
                .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot))
        {
            slots.remove(&self.name);
        }
    }
}

impl AppLock {
    /// Runs `change` on the app's state, for a moment.
    pub fn with<R>(&self, change: impl FnOnce(&mut SlotState) -> R) -> R {
        change(&mut self.slot.state())
    }

    /// Runs `change` on the app, if it exists yet.
    pub fn running<R>(&self, change: impl FnOnce(&mut Running) -> R) -> Option<R> {
        self.slot.state().running.as_mut().map(change)
    }
}

#[derive(Default)]
pub(super) struct Table {
    /// Shared with every `AppLock`, which settles its slot when dropped.
    slots: Arc<Mutex<BTreeMap<AppName, Arc<Slot>>>>,
}

impl Table {
    fn slots(&self) -> MutexGuard<'_, BTreeMap<AppName, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the app's operation lock, waiting for a change under way to end. `create`: make
    /// an empty slot for an app not in the table (a first deploy); else `None` for one that is
    /// not there (or was removed while this waited).
    pub async fn lock(&self, name: &AppName, create: bool) -> Option<AppLock> {
        loop {
            let slot = {
                let mut slots = self.slots();
                match slots.get(name) {
                    Some(slot) => Arc::clone(slot),
                    None if create => {
                        let slot = Slot::new(None);
                        slots.insert(name.clone(), Arc::clone(&slot));
                        slot
                    }
                    None => return None,
                }
            };
            let operation = Arc::clone(&slot.operations).lock_owned().await;
            // The slot may have been removed (the app removed, or a failed first deploy
            // forgotten) while this waited: then look again.
            let current = self
                .slots()
                .get(name)
                .is_some_and(|now| Arc::ptr_eq(now, &slot));
            if current {
                return Some(AppLock {
                    name: name.clone(),
                    slot,
                    slots: Arc::clone(&self.slots),
                    _operation: operation,
                });
            }
        }
    }

    /// Puts apps restored at start-up into the table.
    pub fn restore(&self, apps: impl IntoIterator<Item = (AppName, Running)>) {
        let mut slots = self.slots();
        for (name, running) in apps {
            slots.insert(name, Slot::new(Some(running)));
        }
    }

    /// Takes the app out (it is being removed). Its slot stays in the table, claiming the
    /// app's address, until `lock` is dropped: a deploy of the same name waits for the removal
    /// to finish, and another app is told the address is still this one's meanwhile.
    pub fn remove(&self, lock: &AppLock) -> Option<Running> {
        let mut state = lock.slot.state();
        let running = state.running.take();
        state.claim = running.as_ref().and_then(|r| r.spec.listen());
        running
    }

    /// Checks that no other app listens (or is about to) on an address overlapping `spec`'s,
    /// and claims it for the change `lock` holds.
    pub fn claim_address(&self, lock: &AppLock, spec: &AppSpec) -> Result<(), ReconcileError> {
        let Some(wanted) = spec.listen() else {
            // A command listens nowhere; whatever this app claimed is free again.
            lock.slot.state().claim = None;
            return Ok(());
        };
        let slots = self.slots();
        for (name, slot) in slots.iter() {
            if *name == spec.name {
                continue;
            }
            let state = slot.state();
            let theirs = state
                .running
                .as_ref()
                .and_then(|running| running.spec.listen())
                .into_iter()
                .chain(state.claim);
            for theirs in theirs {
                if super::listen::overlaps(theirs, wanted) {
                    return Err(ReconcileError::AddressTaken {
                        addr: wanted,
                        app: name.to_string(),
                    });
                }
            }
        }
        lock.slot.state().claim = Some(wanted);
        Ok(())
    }

    /// `each` over every app that exists, in name order, each under its state lock for a
    /// moment.
    pub fn each<R>(&self, mut each: impl FnMut(&AppName, &Running) -> R) -> Vec<R> {
        let slots: Vec<(AppName, Arc<Slot>)> = self
            .slots()
            .iter()
            .map(|(name, slot)| (name.clone(), Arc::clone(slot)))
            .collect();
        slots
            .iter()
            .filter_map(|(name, slot)| slot.state().running.as_ref().map(|r| each(name, r)))
            .collect()
    }

    /// `read` on one app, under its state lock for a moment.
    pub fn read<R>(&self, name: &AppName, read: impl FnOnce(&Running) -> R) -> Option<R> {
        let slot = self.slots().get(name).cloned()?;
        let state = slot.state();
        state.running.as_ref().map(read)
    }

    pub fn names(&self) -> Vec<AppName> {
        self.slots().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, listen: &str) -> AppSpec {
        AppSpec::from_manifest(&format!(
            "name = \"{name}\"\ncomponent = \"{}\"\n[http]\nlisten = \"{listen}\"\n",
            crate::digest::Digest::of(b"x")
        ))
        .unwrap()
    }

    /// A first deploy that never finishes (it fails, or its client goes away and the call is
    /// dropped) leaves neither its slot nor its address claim behind.
    #[tokio::test]
    async fn an_unfinished_first_deploy_leaves_nothing_behind() {
        let table = Table::default();
        let web = spec("web", "127.0.0.1:8080");
        let name = web.name.clone();
        let lock = table.lock(&name, true).await.unwrap();
        table.claim_address(&lock, &web).unwrap();
        let other = spec("other", "0.0.0.0:8080");
        let other_lock = table.lock(&other.name, true).await.unwrap();
        let taken = table.claim_address(&other_lock, &other).unwrap_err();
        assert!(
            taken.to_string().contains("already used by app `web`"),
            "{taken}"
        );
        // Cancelled: the lock is dropped without the app coming to exist.
        drop(lock);
        assert!(table.names().iter().all(|n| n != &name), "the slot is gone");
        table.claim_address(&other_lock, &other).unwrap();
        assert!(table.lock(&name, false).await.is_none());
    }

    /// A waiter on a slot that is removed meanwhile gets the app's new slot, not the old one.
    #[tokio::test]
    async fn a_waiter_never_gets_a_removed_slot() {
        let table = Arc::new(Table::default());
        let name: AppName = "web".parse().unwrap();
        let first = table.lock(&name, true).await.unwrap();
        let waiting = {
            let (table, name) = (Arc::clone(&table), name.clone());
            tokio::spawn(async move {
                table
                    .lock(&name, true)
                    .await
                    .map(|lock| Arc::clone(&lock.slot))
            })
        };
        tokio::task::yield_now().await;
        // The waiter holds the old slot (the table, `first` and the waiter each count once) and
        // waits on its operation lock: without that the test would prove nothing.
        assert_eq!(
            Arc::strong_count(&first.slot),
            3,
            "the waiter is not waiting yet"
        );
        assert!(!waiting.is_finished());
        let old = Arc::clone(&first.slot);
        drop(first); // never came to exist: removed from the table
        let got = waiting.await.unwrap().unwrap();
        assert!(!Arc::ptr_eq(&got, &old));
    }
}

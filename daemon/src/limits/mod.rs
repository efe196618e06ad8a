//! Resource limits around pools: one cgroup per app under a parent cairn owns, with memory,
//! CPU and pids limits. cgroup v2 (unified) and v1 (hybrid, as on many shipped edge kernels)
//! are both first-class: `Tree` is one or the other, chosen once at start-up, with the root
//! passed in (tests point it at a temporary directory tree). All cgroupfs access lives here,
//! and every read and write goes through `fs`, whose errors name the file.
//!
//! Where limits cannot be enforced (not root and no delegated cgroup), `Cgroups::NotEnforced`
//! carries the reason, pools run without them, and status says so instead of pretending.

mod fs;
mod v1;
mod v2;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
pub use v1::V1;
pub use v2::V2;

/// Where the kernel's cgroup filesystem is.
pub const SYSTEM_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period cpu quotas are expressed in.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {message}")]
pub struct LimitsError {
    path: String,
    message: String,
}

/// What one cgroup may use. `None` leaves that resource unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolLimits {
    pub memory: Option<u64>,
    pub cpu: Option<f64>,
    pub pids: Option<u64>,
}

impl PoolLimits {
    /// The CPU quota per `CPU_PERIOD_US`, at least 1 ms (the kernel's floor).
    fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu
            .map(|cores| (cores * CPU_PERIOD_US as f64).round().max(1000.0) as u64)
    }
}

/// Current use, read from the cgroup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_nanos: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

/// The cgroup parent when the config names none. Started by systemd (INVOCATION_ID set) inside
/// a `.service` cgroup, which `Delegate=yes` hands to cairnd: `<service>/apps`. Otherwise
/// `cairn` at the hierarchy root.
pub fn default_parent() -> String {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    parent_for(&own, std::env::var_os("INVOCATION_ID").is_some())
}

fn parent_for(proc_self_cgroup: &str, under_systemd: bool) -> String {
    if under_systemd {
        if let Some(service) =
            own_cgroup(proc_self_cgroup).filter(|path| path.ends_with(".service"))
        {
            return format!("{}/apps", service.trim_start_matches('/'));
        }
    }
    "cairn".to_string()
}

/// This process's cgroup: the unified (v2) line, else the memory controller's (v1).
fn own_cgroup(proc_self_cgroup: &str) -> Option<String> {
    let lines: Vec<(&str, &str)> = proc_self_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers, path))
        })
        .collect();
    let memory = lines
        .iter()
        .find(|(controllers, _)| controllers.split(',').any(|c| c == "memory"));
    let unified = lines.iter().find(|(controllers, _)| controllers.is_empty());
    memory.or(unified).map(|(_, path)| path.to_string())
}

/// On v2 a cgroup with processes cannot delegate controllers to children, so when the parent
/// is inside cairnd's own cgroup, cairnd first moves itself into a `supervisor` leaf beside it.
fn leave_room_for_children(root: &Path, parent: &str) -> Result<(), LimitsError> {
    let own = own_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default())
        .unwrap_or_default();
    let own = own.trim_start_matches('/');
    if own.is_empty() || !parent.starts_with(own) {
        return Ok(());
    }
    let leaf = root.join(own).join("supervisor");
    fs::create_dir(&leaf)?;
    fs::write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
}

/// `parent` as a path below the cgroup root: a leading `/` (as /proc/self/cgroup writes them)
/// is dropped; an empty path or one with `.` or `..` parts is refused, so nothing is ever
/// written outside the root.
fn below_root(parent: &str) -> Result<String, String> {
    let trimmed = parent.trim_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(format!(
            "cgroup_parent `{parent}` must be a path below the cgroup root without empty, `.` \
             or `..` parts, such as `cairn`"
        ));
    }
    Ok(trimmed.to_string())
}

/// The cgroup filesystem, v1 or v2: chosen once at start-up.
#[derive(Debug)]
pub enum Tree {
    V1(V1),
    V2(V2),
}

impl Tree {
    /// What the filesystem at `root` is: v2 where it has `cgroup.controllers`, v1 where it
    /// has a memory hierarchy.
    pub fn detect(root: &Path) -> Option<Tree> {
        if root.join("cgroup.controllers").exists() {
            Some(Tree::V2(V2::new(root)))
        } else if root.join("memory").is_dir() {
            Some(Tree::V1(V1::new(root)))
        } else {
            None
        }
    }

    fn create(&self, path: &str) -> Result<(), LimitsError> {
        match self {
            Tree::V1(v1) => v1.create(path),
            Tree::V2(v2) => v2.create(path),
        }
    }

    fn apply(&self, path: &str, limits: &PoolLimits) -> Result<(), LimitsError> {
        match self {
            Tree::V1(v1) => v1.apply(path, limits),
            Tree::V2(v2) => v2.apply(path, limits),
        }
    }

    fn add(&self, path: &str, pid: u32) -> Result<(), LimitsError> {
        match self {
            Tree::V1(v1) => v1.add(path, pid),
            Tree::V2(v2) => v2.add(path, pid),
        }
    }

    fn usage(&self, path: &str) -> Usage {
        match self {
            Tree::V1(v1) => v1.usage(path),
            Tree::V2(v2) => v2.usage(path),
        }
    }

    fn remove(&self, path: &str) -> Result<(), LimitsError> {
        match self {
            Tree::V1(v1) => v1.remove(path),
            Tree::V2(v2) => v2.remove(path),
        }
    }

    fn describe(&self, path: &str) -> String {
        match self {
            Tree::V1(v1) => v1.describe(path),
            Tree::V2(v2) => v2.describe(path),
        }
    }
}

/// How limits are enforced on this device, decided once at start-up.
pub enum Cgroups {
    Enforced { tree: Arc<Tree>, parent: String },
    NotEnforced { why: String },
}

impl Cgroups {
    /// `detect_at` the kernel's cgroup filesystem.
    pub fn detect(parent: &str, total: &PoolLimits) -> Cgroups {
        Cgroups::detect_at(Path::new(SYSTEM_ROOT), parent, total)
    }

    /// Creates (or adopts) the parent cgroup `parent` (relative to `root`) with the caps for
    /// all apps together. Any failure means limits are not enforced, with the reason.
    pub fn detect_at(root: &Path, parent: &str, total: &PoolLimits) -> Cgroups {
        if !root.exists() {
            return Cgroups::NotEnforced {
                why: format!("this kernel has no cgroup filesystem at {}", root.display()),
            };
        }
        let Some(tree) = Tree::detect(root) else {
            return Cgroups::NotEnforced {
                why: format!(
                    "{} is neither cgroup v2 (no cgroup.controllers) nor v1 (no memory hierarchy)",
                    root.display()
                ),
            };
        };
        let parent = match below_root(parent) {
            Ok(parent) => parent,
            Err(why) => return Cgroups::NotEnforced { why },
        };
        if matches!(tree, Tree::V2(_)) && root == Path::new(SYSTEM_ROOT) {
            if let Err(error) = leave_room_for_children(root, &parent) {
                return Cgroups::NotEnforced {
                    why: error.to_string(),
                };
            }
        }
        Cgroups::with_tree(tree, &parent, total)
    }

    /// Limits enforced in `tree` under `parent`, which is created with the caps in `total`.
    pub fn with_tree(tree: Tree, parent: &str, total: &PoolLimits) -> Cgroups {
        let parent = match below_root(parent) {
            Ok(parent) => parent,
            Err(why) => return Cgroups::NotEnforced { why },
        };
        let parent = parent.as_str();
        let who = if nix::unistd::geteuid().is_root() {
            ""
        } else {
            " (not root, and no cgroup was delegated: run as root or under systemd with Delegate=yes)"
        };
        if let Err(error) = tree.create(parent) {
            return Cgroups::NotEnforced {
                why: format!("cannot create cgroup {parent}: {error}{who}"),
            };
        }
        if let Err(error) = tree.apply(parent, total) {
            return Cgroups::NotEnforced {
                why: format!("cannot set limits on cgroup {parent}: {error}"),
            };
        }
        Cgroups::Enforced {
            tree: Arc::new(tree),
            parent: parent.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Cgroups::Enforced { tree, parent } => {
                let version = if matches!(**tree, Tree::V2(_)) { 2 } else { 1 };
                format!(
                    "enforced with cgroup v{version} under {}",
                    tree.describe(parent)
                )
            }
            Cgroups::NotEnforced { why } => format!("not enforced: {why}"),
        }
    }

    /// The app's cgroup (created if needed), or `None` when limits are not enforced.
    pub fn for_app(&self, app: &str) -> Result<Option<AppCgroup>, LimitsError> {
        let Cgroups::Enforced { tree, parent } = self else {
            return Ok(None);
        };
        let path = format!("{parent}/{app}");
        tree.create(&path)?;
        Ok(Some(AppCgroup::at(path, Arc::clone(tree))))
    }

    /// A cgroup for a spare pool process (no app yet), named so no app can have the name, on
    /// cgroup v1 only: there the app's cgroup can later be renamed into place around the
    /// process (`AppCgroup::take_over`) instead of moving the process, which costs an RCU grace
    /// period (milliseconds) on the pool start's path. cgroup v2 cannot rename a cgroup.
    pub fn for_spare(&self, pid: u32) -> Option<AppCgroup> {
        let Cgroups::Enforced { tree, parent } = self else {
            return None;
        };
        let Tree::V1(v1) = &**tree else {
            return None;
        };
        let path = format!("{parent}/{SPARE_PREFIX}{pid}");
        v1.create(&path).ok()?;
        Some(AppCgroup::at(path, Arc::clone(tree)))
    }

    /// Removes the (empty) cgroups of spare pool processes an earlier cairnd left behind.
    pub fn remove_stale_spares(&self) {
        let Cgroups::Enforced { tree, parent } = self else {
            return;
        };
        let Tree::V1(v1) = &**tree else {
            return;
        };
        for hierarchy in v1.hierarchies() {
            let Ok(entries) = std::fs::read_dir(hierarchy.join(parent)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SPARE_PREFIX)
                {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// Removes the parent cgroup if no app cgroup is left in it.
    pub fn remove_parent(&self) {
        if let Cgroups::Enforced { tree, parent } = self {
            let _ = tree.remove(parent);
        }
    }
}

/// What a spare pool process's cgroup is called (with its pid after): a `.` no app name has.
const SPARE_PREFIX: &str = "spare.";

/// One app's cgroup: its path in the tree, and the CPU time counted by cgroups it replaced
/// (`take_over`).
///
/// Clones share one lock, taken by every operation: `take_over` removes the directory and
/// renames another into its place, and two starts of one app at once (a deploy during the
/// background start of the restored app) must not see it missing in between.
#[derive(Debug, Clone)]
pub struct AppCgroup {
    path: String,
    tree: Arc<Tree>,
    carried_cpu_nanos: Arc<AtomicU64>,
    changing: Arc<Mutex<()>>,
}

impl AppCgroup {
    fn at(path: String, tree: Arc<Tree>) -> AppCgroup {
        AppCgroup {
            path,
            tree,
            carried_cpu_nanos: Arc::default(),
            changing: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `limits` to the cgroup.
    pub fn apply(&self, limits: &PoolLimits) -> Result<(), LimitsError> {
        let _changing = self.lock();
        self.tree.apply(&self.path, limits)
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), LimitsError> {
        let _changing = self.lock();
        self.add_locked(pid)
    }

    fn add_locked(&self, pid: u32) -> Result<(), LimitsError> {
        self.tree.add(&self.path, pid).map_err(|error| LimitsError {
            path: self.path.clone(),
            message: format!("cannot move process {pid} in: {error}"),
        })
    }

    /// Makes this app's cgroup the one around process `pid`, which sits alone in the spare
    /// cgroup `spare`, with `limits` (`held`: the limits the spare's cgroup was given already,
    /// if any: equal ones are not written again). On v1, per hierarchy, the (empty) app cgroup
    /// is removed and the spare's renamed into its place, so the process does not move; CPU
    /// time counted so far is carried over. Where that cannot be done (the app's cgroup still
    /// holds a pool, as during a generation swap), the process is moved in as by `add`, and
    /// the spare's cgroup removed.
    pub fn take_over(
        &self,
        spare: &AppCgroup,
        pid: u32,
        limits: &PoolLimits,
        held: Option<&PoolLimits>,
    ) -> Result<(), LimitsError> {
        let _changing = self.lock();
        let v1 = match &*self.tree {
            Tree::V1(v1) if held == Some(limits) || spare.apply(limits).is_ok() => v1,
            _ => {
                let moved = self.add_locked(pid);
                spare.remove();
                return moved;
            }
        };
        // Only the CPU time is needed here; `usage` reads much more.
        let cpu_before = v1.cpu_nanos(&self.path);
        let cpuacct = v1.cpuacct();
        let mut recreated = false;
        for hierarchy in v1.hierarchies() {
            let (from, to) = (hierarchy.join(&spare.path), hierarchy.join(&self.path));
            if std::fs::remove_dir(&to).is_ok() {
                if std::fs::rename(&from, &to).is_ok() {
                    if cpuacct.as_ref() == Some(&hierarchy) {
                        self.carried_cpu_nanos
                            .fetch_add(cpu_before, Ordering::Relaxed);
                    }
                    continue;
                }
                fs::create_dir(&to)?;
                recreated = true;
            }
            fs::write(&to.join("cgroup.procs"), &pid.to_string())?;
            let _ = std::fs::remove_dir(&from);
        }
        if recreated {
            self.tree.apply(&self.path, limits)?;
        }
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let _changing = self.lock();
        let mut usage = self.tree.usage(&self.path);
        usage.cpu_nanos += self.carried_cpu_nanos.load(Ordering::Relaxed);
        usage
    }

    /// Deletes the cgroup (its processes must have exited).
    pub fn remove(&self) {
        let _changing = self.lock();
        if let Err(error) = self.tree.remove(&self.path) {
            tracing::warn!(cgroup = %self.path, %error, "could not remove cgroup");
        }
    }

    /// Where the limits live, for people.
    pub fn describe(&self) -> String {
        self.tree.describe(&self.path)
    }
}

#[cfg(test)]
mod tests;

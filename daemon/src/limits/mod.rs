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
        if matches!(tree, Tree::V2(_)) && root == Path::new(SYSTEM_ROOT) {
            if let Err(error) = leave_room_for_children(root, parent) {
                return Cgroups::NotEnforced {
                    why: error.to_string(),
                };
            }
        }
        Cgroups::with_tree(tree, parent, total)
    }

    /// Limits enforced in `tree` under `parent`, which is created with the caps in `total`.
    pub fn with_tree(tree: Tree, parent: &str, total: &PoolLimits) -> Cgroups {
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
mod tests {
    use super::*;
    use std::path::PathBuf;

    const LIMITS: PoolLimits = PoolLimits {
        memory: Some(64 << 20),
        cpu: Some(0.5),
        pids: Some(100),
    };

    fn file(path: &Path) -> String {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// A v2 tree as a plain directory: what cairn writes lands in files the test reads back.
    fn fake_v2(controllers: &str) -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        let tree = Tree::detect(dir.path()).expect("cgroup.controllers makes it v2");
        assert!(matches!(tree, Tree::V2(_)));
        (dir, tree)
    }

    fn fake_v1() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        for controller in ["memory", "cpu", "cpuacct", "pids"] {
            std::fs::create_dir(dir.path().join(controller)).unwrap();
        }
        let tree = Tree::detect(dir.path()).expect("a memory hierarchy makes it v1");
        assert!(matches!(tree, Tree::V1(_)));
        (dir, tree)
    }

    #[test]
    fn v2_hands_controllers_down_and_writes_its_own_files() {
        let (dir, tree) = fake_v2("cpuset cpu io memory pids");
        let root = dir.path();
        let total = PoolLimits {
            memory: Some(1 << 30),
            ..PoolLimits::default()
        };
        let cgroups = Cgroups::with_tree(tree, "cairn", &total);
        assert!(
            matches!(cgroups, Cgroups::Enforced { .. }),
            "{}",
            cgroups.describe()
        );
        assert_eq!(
            file(&root.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(file(&root.join("cairn/memory.max")), "1073741824");
        assert_eq!(file(&root.join("cairn/cpu.max")), "max 100000");
        let app = cgroups.for_app("web").unwrap().unwrap();
        assert_eq!(
            file(&root.join("cairn/cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        app.apply(&LIMITS).unwrap();
        let web = root.join("cairn/web");
        assert_eq!(file(&web.join("memory.max")), "67108864");
        assert_eq!(file(&web.join("cpu.max")), "50000 100000");
        assert_eq!(file(&web.join("pids.max")), "100");
        app.apply(&PoolLimits::default()).unwrap();
        assert_eq!(file(&web.join("memory.max")), "max");
        assert_eq!(file(&web.join("cpu.max")), "max 100000");
        assert_eq!(file(&web.join("pids.max")), "max");
        app.add(42).unwrap();
        assert_eq!(file(&web.join("cgroup.procs")), "42");
        std::fs::write(web.join("memory.current"), "123\n").unwrap();
        std::fs::write(
            web.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(
            web.join("cpu.stat"),
            "usage_usec 5\nuser_usec 4\nsystem_usec 1\n",
        )
        .unwrap();
        std::fs::write(web.join("pids.current"), "3\n").unwrap();
        assert_eq!(
            app.usage(),
            Usage {
                memory_bytes: 123,
                cpu_nanos: 5000,
                pids: 3,
                oom_kills: 2
            }
        );
        assert_eq!(app.describe(), web.display().to_string());
        assert!(
            cgroups.for_spare(7).is_none(),
            "v2 cannot rename: no spare cgroups"
        );
    }

    #[test]
    fn v2_without_the_controllers_says_which_are_missing() {
        let (_dir, tree) = fake_v2("hugetlb");
        let cgroups = Cgroups::with_tree(tree, "cairn", &PoolLimits::default());
        let why = cgroups.describe();
        assert!(
            why.starts_with("not enforced: cannot create cgroup cairn")
                && why.contains("the memory, cpu, pids controller(s) cannot be had here"),
            "{why}"
        );
    }

    #[test]
    fn v1_writes_each_controller_in_its_own_hierarchy() {
        let (dir, tree) = fake_v1();
        let root = dir.path();
        let cgroups = Cgroups::with_tree(tree, "cairn", &PoolLimits::default());
        let app = cgroups.for_app("web").unwrap().unwrap();
        app.apply(&LIMITS).unwrap();
        let at = |controller: &str, name: &str| {
            file(&root.join(controller).join("cairn/web").join(name))
        };
        assert_eq!(at("memory", "memory.limit_in_bytes"), "67108864");
        assert_eq!(at("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(at("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(at("pids", "pids.max"), "100");
        app.apply(&PoolLimits::default()).unwrap();
        assert_eq!(at("memory", "memory.limit_in_bytes"), "-1");
        assert_eq!(at("cpu", "cpu.cfs_quota_us"), "-1");
        assert_eq!(at("pids", "pids.max"), "max");
        app.add(42).unwrap();
        for controller in ["memory", "cpu", "cpuacct", "pids"] {
            assert_eq!(at(controller, "cgroup.procs"), "42", "{controller}");
        }
        let web = |controller: &str| root.join(controller).join("cairn/web");
        std::fs::write(web("memory").join("memory.usage_in_bytes"), "4096\n").unwrap();
        std::fs::write(
            web("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .unwrap();
        std::fs::write(web("cpuacct").join("cpuacct.usage"), "777\n").unwrap();
        std::fs::write(web("pids").join("pids.current"), "2\n").unwrap();
        assert_eq!(
            app.usage(),
            Usage {
                memory_bytes: 4096,
                cpu_nanos: 777,
                pids: 2,
                oom_kills: 4
            }
        );
        // A spare's cgroup is made beside the apps', and an earlier daemon's is cleared away.
        let spare = cgroups.for_spare(7).unwrap();
        assert!(root.join("memory/cairn/spare.7").is_dir());
        drop(spare);
        cgroups.remove_stale_spares();
        assert!(!root.join("memory/cairn/spare.7").exists());
    }

    #[test]
    fn cpu_quotas_round_to_the_period_with_a_floor() {
        let quota = |cpu| {
            PoolLimits {
                cpu: Some(cpu),
                ..PoolLimits::default()
            }
            .cpu_quota_us()
        };
        assert_eq!(quota(1.0), Some(100_000));
        assert_eq!(quota(0.25), Some(25_000));
        assert_eq!(quota(2.5), Some(250_000));
        assert_eq!(
            quota(0.001),
            Some(1000),
            "the kernel refuses less than 1 ms"
        );
        assert_eq!(PoolLimits::default().cpu_quota_us(), None);
    }

    /// The kernel's own tree, as cairnd uses it: limits written where the kernel reads them, a
    /// process moved in and counted, everything removed after. Root only.
    #[test]
    fn limits_reach_the_kernels_cgroups() {
        const TEST: &str = "limits::tests::limits_reach_the_kernels_cgroups";
        if !nix::unistd::geteuid().is_root() {
            return skip(TEST, "needs root for real cgroups");
        }
        let parent = format!("cairn-unit-kernel-{}", std::process::id());
        let cgroups = Cgroups::detect(&parent, &PoolLimits::default());
        let Cgroups::Enforced { tree, .. } = &cgroups else {
            return skip(TEST, &format!("no cgroups here: {}", cgroups.describe()));
        };
        let app = cgroups.for_app("web").unwrap().unwrap();
        app.apply(&LIMITS).unwrap();
        let (memory, cpu, pids) = match &**tree {
            Tree::V1(_) => (
                file(
                    &Path::new(SYSTEM_ROOT)
                        .join("memory")
                        .join(&parent)
                        .join("web/memory.limit_in_bytes"),
                ),
                file(
                    &Path::new(SYSTEM_ROOT)
                        .join("cpu")
                        .join(&parent)
                        .join("web/cpu.cfs_quota_us"),
                ),
                file(
                    &Path::new(SYSTEM_ROOT)
                        .join("pids")
                        .join(&parent)
                        .join("web/pids.max"),
                ),
            ),
            Tree::V2(_) => {
                let web = Path::new(SYSTEM_ROOT).join(&parent).join("web");
                (
                    file(&web.join("memory.max")),
                    file(&web.join("cpu.max")),
                    file(&web.join("pids.max")),
                )
            }
        };
        assert_eq!(memory, "67108864");
        assert!(cpu.starts_with("50000"), "{cpu}");
        assert_eq!(pids, "100");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        app.add(sleeper.id()).unwrap();
        let counted = app.usage();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // (Memory already charged stays with the cgroup a process leaves, so only the
        // process count shows the move at once.)
        assert_eq!(counted.pids, 1, "{counted:?}");
        app.remove();
        cgroups.remove_parent();
        assert!(
            !Path::new(SYSTEM_ROOT).join("memory").join(&parent).exists()
                && !Path::new(SYSTEM_ROOT).join(&parent).exists(),
            "the cgroups are gone"
        );
    }

    /// cgroup v2 on the kernel, where a cgroup2 filesystem is mounted (the system's own, or
    /// the unified one a hybrid system mounts beside v1): what can be done there is done for
    /// real. On a hybrid system memory, cpu and pids are bound to v1, so v2 limits can only be
    /// refused there, with the reason: that part is checked on the fake tree and said in the
    /// skip log.
    #[test]
    fn cgroup_v2_on_the_kernel() {
        const TEST: &str = "limits::tests::cgroup_v2_on_the_kernel";
        if !nix::unistd::geteuid().is_root() {
            return skip(TEST, "needs root for real cgroups");
        }
        let root = [SYSTEM_ROOT, "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|root| root.join("cgroup.controllers").exists());
        let Some(root) = root else {
            return skip(TEST, "no cgroup2 filesystem is mounted here");
        };
        let v2 = V2::new(root);
        let path = format!("cairn-unit-v2-{}", std::process::id());
        match v2.create(&format!("{path}/web")) {
            Ok(()) => {
                v2.apply(&format!("{path}/web"), &LIMITS).unwrap();
                assert_eq!(file(&root.join(&path).join("web/memory.max")), "67108864");
            }
            Err(refused) => {
                let text = refused.to_string();
                assert!(text.contains("cannot be had here"), "{text}");
                skip(
                    TEST,
                    &format!("v2 limits not set on the kernel ({text}); the fake tree checks them"),
                );
                fs::create_dir(&root.join(&path).join("web")).unwrap();
            }
        }
        let web = format!("{path}/web");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        v2.add(&web, sleeper.id()).unwrap();
        let listed = file(&root.join(&web).join("cgroup.procs"));
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.id())).unwrap();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(listed, sleeper.id().to_string());
        assert!(own.contains(&format!("0::/{web}")), "{own}");
        v2.remove(&web).unwrap();
        v2.remove(&path).unwrap();
        assert!(!root.join(&path).exists());
    }

    const V1: &str = "12:pids:/system.slice/cairnd.service\n4:memory:/system.slice/cairnd.service\n1:name=systemd:/system.slice/cairnd.service\n0::/system.slice/cairnd.service\n";
    const V2: &str = "0::/system.slice/cairnd.service\n";

    #[test]
    fn under_systemd_pools_go_below_the_delegated_service_cgroup() {
        assert_eq!(parent_for(V1, true), "system.slice/cairnd.service/apps");
        assert_eq!(parent_for(V2, true), "system.slice/cairnd.service/apps");
        assert_eq!(parent_for(V2, false), "cairn");
        assert_eq!(
            parent_for("0::/user.slice/session-3.scope\n", true),
            "cairn"
        );
        assert_eq!(parent_for("", true), "cairn");
    }

    /// A start renaming a spare's cgroup into the app's place while another start of the same
    /// app moves its process in (a deploy during the restored app's background start): the
    /// move must never find the app's cgroup missing. Real cgroups, so root and v1 only.
    #[test]
    fn a_move_racing_a_take_over_never_finds_the_apps_cgroup_missing() {
        const TEST: &str =
            "limits::tests::a_move_racing_a_take_over_never_finds_the_apps_cgroup_missing";
        if !nix::unistd::geteuid().is_root() {
            return skip(TEST, "needs root for real cgroups");
        }
        if !matches!(Tree::detect(Path::new(SYSTEM_ROOT)), Some(Tree::V1(_))) {
            return skip(
                TEST,
                "cgroup v1 only (a take-over renames there; on v2 a start moves the process)",
            );
        }
        let parent = format!("cairn-unit-race-{}", std::process::id());
        let cgroups = Cgroups::detect(&parent, &PoolLimits::default());
        let Cgroups::Enforced { tree, .. } = &cgroups else {
            return skip(TEST, &format!("no cgroups here: {}", cgroups.describe()));
        };
        let outside = AppCgroup::at(parent.clone(), Arc::clone(tree));
        let app = cgroups.for_app("app").unwrap().unwrap();
        let sleeper = || {
            std::process::Command::new("sleep")
                .arg("120")
                .spawn()
                .unwrap()
        };
        let (mut renamed, mut moved) = (sleeper(), sleeper());
        let limits = PoolLimits::default();

        let racer = {
            let (app, outside, pid) = (app.clone(), outside.clone(), moved.id());
            std::thread::spawn(move || -> Result<(), LimitsError> {
                for _ in 0..300 {
                    app.add(pid)?;
                    outside.add(pid)?;
                }
                Ok(())
            })
        };
        // A take-over while the racer's process is inside moves instead of renaming; count
        // the renames (the app's directory is a new one after each) so the test shows it raced
        // the removal and rename, not only moves.
        let memory_dir = PathBuf::from("/sys/fs/cgroup/memory")
            .join(&parent)
            .join("app");
        let inode = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&memory_dir).map(|m| m.ino()).ok()
        };
        let took_over = (|| -> Result<(u32, u32), LimitsError> {
            let (mut takeovers, mut renames) = (0, 0);
            while !racer.is_finished() {
                let spare = cgroups.for_spare(renamed.id()).expect("a spare cgroup");
                spare.add(renamed.id())?;
                let before = inode();
                app.take_over(&spare, renamed.id(), &limits, None)?;
                if inode() != before {
                    renames += 1;
                }
                outside.add(renamed.id())?;
                takeovers += 1;
            }
            Ok((takeovers, renames))
        })();
        let raced = racer.join().unwrap();

        for child in [&mut renamed, &mut moved] {
            let _ = child.kill();
            let _ = child.wait();
        }
        cgroups.remove_stale_spares(); // one a failed take-over left
        app.remove();
        outside.remove();
        raced.expect("the app's cgroup was there for every move");
        let (takeovers, renames) = took_over.expect("every take-over succeeded");
        assert!(
            takeovers > 10 && renames > 0,
            "{takeovers} take-overs ({renames} by renaming) ran beside the moves: too few to race"
        );
    }

    /// A test that cannot run here says why, also in `target/test-skips.log` (which `just test`
    /// prints at the end: cargo hides a passing test's output).
    fn skip(test: &str, reason: &str) {
        use std::io::Write;
        let line = format!("SKIPPED {test}: {reason}");
        eprintln!("{line}");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
        if let Ok(mut file) = std::fs::File::options()
            .create(true)
            .append(true)
            .open(target.join("test-skips.log"))
        {
            let _ = writeln!(file, "{line}");
        }
    }

    #[test]
    fn own_cgroup_prefers_the_memory_controller_on_v1() {
        assert_eq!(own_cgroup("4:memory:/a\n0::/b\n").as_deref(), Some("/a"));
        assert_eq!(own_cgroup("0::/b\n").as_deref(), Some("/b"));
        assert_eq!(own_cgroup("garbage"), None);
    }
}

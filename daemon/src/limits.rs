//! Resource limits around pools: one cgroup per app under a parent cairn owns, with memory,
//! CPU and pids limits, through cgroups-rs. cgroup v2 (unified) and v1 (hybrid, as on many
//! shipped edge kernels) are both handled; which one is decided once at start-up. All cgroupfs
//! access lives here.
//!
//! Where limits cannot be enforced (not root and no delegated cgroup), `Cgroups::NotEnforced`
//! carries the reason, pools run without them, and status says so instead of pretending.

use cgroups_rs::cpu::CpuController;
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{hierarchies, Cgroup, CgroupPid, MaxValue};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The CFS period cpu quotas are expressed in.
const CPU_PERIOD_US: u64 = 100_000;
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

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

/// Current use, read from the cgroup.
#[derive(Debug, Clone, Default)]
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
fn leave_room_for_children(parent: &str) -> Result<(), String> {
    let own = own_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default())
        .unwrap_or_default();
    let own = own.trim_start_matches('/');
    if own.is_empty() || !parent.starts_with(own) {
        return Ok(());
    }
    let leaf = PathBuf::from("/sys/fs/cgroup").join(own).join("supervisor");
    std::fs::create_dir_all(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot move cairnd into {}: {e}", leaf.display()))
}

/// How limits are enforced on this device, decided once at start-up.
pub enum Cgroups {
    Enforced { v2: bool, parent: String },
    NotEnforced { why: String },
}

/// The controllers cairn uses. cgroup v2 has no `cpuacct` (its `cpu` controller accounts CPU
/// time), and asking cgroups-rs for one it does not know fails the whole cgroup.
fn controllers(v2: bool) -> Option<Vec<String>> {
    Some(
        CONTROLLERS
            .iter()
            .filter(|c| !(v2 && **c == "cpuacct"))
            .map(|c| c.to_string())
            .collect(),
    )
}

/// Creates the cgroup `path`, making sure it really exists: cgroups-rs logs a failed mkdir
/// instead of returning it, so the cause is fetched here.
fn create(hierarchy: Box<dyn cgroups_rs::Hierarchy>, path: &str) -> Result<Cgroup, String> {
    let root = hierarchy.root();
    let v2 = hierarchy.v2();
    let cgroup = Cgroup::new_with_specified_controllers(hierarchy, path, controllers(v2))
        .map_err(|e| e.to_string())?;
    if cgroup.exists() {
        return Ok(cgroup);
    }
    let probe = if cgroup.v2() {
        root.join(path)
    } else {
        root.join("memory").join(path)
    };
    Err(match std::fs::create_dir_all(&probe) {
        Err(error) => format!("{}: {error}", probe.display()),
        Ok(()) => format!(
            "{} could not be created in every controller",
            probe.display()
        ),
    })
}

impl Cgroups {
    /// Creates (or adopts) the parent cgroup `parent` (relative to the hierarchy root) with the
    /// caps for all apps together. Any failure means limits are not enforced, with the reason.
    pub fn detect(parent: &str, total: &PoolLimits) -> Cgroups {
        if !std::path::Path::new("/sys/fs/cgroup").exists() {
            return Cgroups::NotEnforced {
                why: "this kernel has no cgroup filesystem at /sys/fs/cgroup".into(),
            };
        }
        let hierarchy = hierarchies::auto();
        let v2 = hierarchy.v2();
        if v2 {
            if let Err(why) = leave_room_for_children(parent) {
                return Cgroups::NotEnforced { why };
            }
        }
        let who = if nix::unistd::geteuid().is_root() {
            ""
        } else {
            " (not root, and no cgroup was delegated: run as root or under systemd with Delegate=yes)"
        };
        let cgroup = match create(hierarchy, parent) {
            Ok(cgroup) => cgroup,
            Err(error) => {
                return Cgroups::NotEnforced {
                    why: format!("cannot create cgroup {parent}: {error}{who}"),
                };
            }
        };
        let manager = AppCgroup::at(parent.to_string(), v2);
        if let Err(error) = manager.apply_to(&cgroup, total) {
            return Cgroups::NotEnforced {
                why: format!("cannot set limits on cgroup {parent}: {error}"),
            };
        }
        Cgroups::Enforced {
            v2,
            parent: parent.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Cgroups::Enforced { v2: true, parent } => {
                format!("enforced with cgroup v2 under /sys/fs/cgroup/{parent}")
            }
            Cgroups::Enforced { v2: false, parent } => {
                format!("enforced with cgroup v1 under /sys/fs/cgroup/{{memory,cpu,cpuacct,pids}}/{parent}")
            }
            Cgroups::NotEnforced { why } => format!("not enforced: {why}"),
        }
    }

    /// The app's cgroup (created if needed), or `None` when limits are not enforced.
    pub fn for_app(&self, app: &str) -> Result<Option<AppCgroup>, LimitsError> {
        let Cgroups::Enforced { v2, parent } = self else {
            return Ok(None);
        };
        let path = format!("{parent}/{app}");
        create(hierarchies::auto(), &path).map_err(|message| LimitsError {
            path: path.clone(),
            message,
        })?;
        Ok(Some(AppCgroup::at(path, *v2)))
    }

    /// A cgroup for a spare pool process (no app yet), named so no app can have the name, on
    /// cgroup v1 only: there the app's cgroup can later be renamed into place around the
    /// process (`AppCgroup::take_over`) instead of moving the process, which costs an RCU grace
    /// period (milliseconds) on the pool start's path. cgroup v2 cannot rename a cgroup.
    pub fn for_spare(&self, pid: u32) -> Option<AppCgroup> {
        let Cgroups::Enforced { v2: false, parent } = self else {
            return None;
        };
        let path = format!("{parent}/{SPARE_PREFIX}{pid}");
        create(hierarchies::auto(), &path).ok()?;
        Some(AppCgroup::at(path, false))
    }

    /// Removes the (empty) cgroups of spare pool processes an earlier cairnd left behind.
    pub fn remove_stale_spares(&self) {
        let Cgroups::Enforced { v2: false, parent } = self else {
            return;
        };
        for root in v1_roots() {
            let Ok(entries) = std::fs::read_dir(root.join(parent)) else {
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
        if let Cgroups::Enforced { parent, .. } = self {
            let _ = Cgroup::load_with_specified_controllers(
                hierarchies::auto(),
                parent,
                CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            )
            .delete();
        }
    }
}

/// What a spare pool process's cgroup is called (with its pid after): a `.` no app name has.
const SPARE_PREFIX: &str = "spare.";

/// The distinct v1 hierarchies cairn uses (`cpu` and `cpuacct` are often one, mounted twice).
fn v1_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for controller in CONTROLLERS {
        let Ok(root) = std::fs::canonicalize(PathBuf::from("/sys/fs/cgroup").join(controller))
        else {
            continue;
        };
        if !roots.contains(&root) {
            roots.push(root);
        }
    }
    roots
}

/// One app's cgroup. Holds only its path (cgroups-rs handles are loaded per operation, which
/// keeps this type `Send` and always in step with the filesystem) and the CPU time counted by
/// cgroups it replaced (`take_over`).
///
/// Clones share one lock, taken by every operation: `take_over` removes the directory and
/// renames another into its place, and two starts of one app at once (a deploy during the
/// background start of the restored app) must not see it missing in between.
#[derive(Debug, Clone)]
pub struct AppCgroup {
    path: String,
    v2: bool,
    carried_cpu_nanos: Arc<AtomicU64>,
    changing: Arc<Mutex<()>>,
}

impl AppCgroup {
    fn at(path: String, v2: bool) -> AppCgroup {
        AppCgroup {
            path,
            v2,
            carried_cpu_nanos: Arc::default(),
            changing: Arc::default(),
        }
    }

    fn load(&self) -> Cgroup {
        Cgroup::load_with_specified_controllers(
            hierarchies::auto(),
            &self.path,
            CONTROLLERS.iter().map(|c| c.to_string()).collect(),
        )
    }

    fn error(&self, message: impl ToString) -> LimitsError {
        LimitsError {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Writes `limits` to the cgroup.
    pub fn apply(&self, limits: &PoolLimits) -> Result<(), LimitsError> {
        let _changing = self.lock();
        self.apply_to(&self.load(), limits)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_to(&self, cgroup: &Cgroup, limits: &PoolLimits) -> Result<(), LimitsError> {
        if let Some(memory) = cgroup.controller_of::<MemController>() {
            let bytes = limits.memory.map(|m| m as i64).unwrap_or(-1);
            memory
                .set_limit(bytes)
                .map_err(|e| self.error(format!("memory limit: {e}")))?;
        }
        if let Some(cpu) = cgroup.controller_of::<CpuController>() {
            let quota = limits
                .cpu
                .map(|cores| (cores * CPU_PERIOD_US as f64).round().max(1000.0) as i64)
                .unwrap_or(-1);
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|e| self.error(format!("cpu quota: {e}")))?;
        }
        if let Some(pids) = cgroup.controller_of::<PidController>() {
            let max = limits
                .pids
                .map(|p| MaxValue::Value(p as i64))
                .unwrap_or(MaxValue::Max);
            pids.set_pid_max(max)
                .map_err(|e| self.error(format!("pids limit: {e}")))?;
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), LimitsError> {
        let _changing = self.lock();
        self.add_locked(pid)
    }

    fn add_locked(&self, pid: u32) -> Result<(), LimitsError> {
        self.load()
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|e| self.error(format!("cannot move process {pid} in: {e}")))
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
        if self.v2 || spare.v2 || (held != Some(limits) && spare.apply(limits).is_err()) {
            let moved = self.add_locked(pid);
            spare.remove();
            return moved;
        }
        // Only the CPU time is needed here; `usage` reads much more.
        let cpu_before: u64 = std::fs::read_to_string(
            PathBuf::from("/sys/fs/cgroup/cpuacct")
                .join(&self.path)
                .join("cpuacct.usage"),
        )
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
        let cpuacct = std::fs::canonicalize("/sys/fs/cgroup/cpuacct").ok();
        let mut recreated = false;
        for root in v1_roots() {
            let (from, to) = (root.join(&spare.path), root.join(&self.path));
            if std::fs::remove_dir(&to).is_ok() {
                if std::fs::rename(&from, &to).is_ok() {
                    if cpuacct.as_ref() == Some(&root) {
                        self.carried_cpu_nanos
                            .fetch_add(cpu_before, Ordering::Relaxed);
                    }
                    continue;
                }
                std::fs::create_dir(&to)
                    .map_err(|e| self.error(format!("cannot recreate {}: {e}", to.display())))?;
                recreated = true;
            }
            std::fs::write(to.join("cgroup.procs"), pid.to_string()).map_err(|e| {
                self.error(format!(
                    "cannot move process {pid} into {}: {e}",
                    to.display()
                ))
            })?;
            let _ = std::fs::remove_dir(&from);
        }
        if recreated {
            self.apply_to(&self.load(), limits)?;
        }
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let _changing = self.lock();
        let cgroup = self.load();
        let mut usage = Usage::default();
        if let Some(memory) = cgroup.controller_of::<MemController>() {
            let stat = memory.memory_stat();
            usage.memory_bytes = stat.usage_in_bytes;
            usage.oom_kills = if self.v2 {
                self.read_key("memory.events", "oom_kill")
            } else {
                stat.oom_control.oom_kill
            };
        }
        if self.v2 {
            usage.cpu_nanos = self.read_key("cpu.stat", "usage_usec") * 1000;
        } else if let Some(cpuacct) = cgroup.controller_of::<CpuAcctController>() {
            usage.cpu_nanos = cpuacct.cpuacct().usage;
        }
        usage.cpu_nanos += self.carried_cpu_nanos.load(Ordering::Relaxed);
        if let Some(pids) = cgroup.controller_of::<PidController>() {
            usage.pids = pids.get_pid_current().unwrap_or(0);
        }
        usage
    }

    /// A `key value` line of a v2 flat-keyed file.
    fn read_key(&self, file: &str, key: &str) -> u64 {
        let path = PathBuf::from("/sys/fs/cgroup").join(&self.path).join(file);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    line.strip_prefix(key)
                        .and_then(|rest| rest.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Deletes the cgroup (its processes must have exited).
    pub fn remove(&self) {
        let _changing = self.lock();
        if let Err(error) = self.load().delete() {
            tracing::warn!(cgroup = %self.path, %error, "could not remove cgroup");
        }
    }

    /// Where the limits live, for people.
    pub fn describe(&self) -> String {
        if self.v2 {
            format!("/sys/fs/cgroup/{}", self.path)
        } else {
            format!("/sys/fs/cgroup/{{memory,cpu,cpuacct,pids}}/{}", self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "12:pids:/system.slice/cairnd.service\n4:memory:/system.slice/cairnd.service\n1:name=systemd:/system.slice/cairnd.service\n0::/system.slice/cairnd.service\n";
    const V2: &str = "0::/system.slice/cairnd.service\n";

    #[test]
    fn cgroup_v2_is_not_asked_for_cpuacct() {
        assert_eq!(
            controllers(true).unwrap(),
            vec!["memory".to_string(), "cpu".into(), "pids".into()]
        );
        assert!(controllers(false).unwrap().contains(&"cpuacct".to_string()));
    }

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
        if !std::path::Path::new("/sys/fs/cgroup").exists() || hierarchies::auto().v2() {
            return skip(
                TEST,
                "cgroup v1 only (a take-over renames there; on v2 a start moves the process)",
            );
        }
        let parent = format!("cairn-unit-race-{}", std::process::id());
        let cgroups = Cgroups::detect(&parent, &PoolLimits::default());
        if !matches!(cgroups, Cgroups::Enforced { .. }) {
            return skip(TEST, &format!("no cgroups here: {}", cgroups.describe()));
        }
        let outside = AppCgroup::at(parent.clone(), false);
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

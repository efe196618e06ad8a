//! cgroup v1 (a hierarchy per controller, as on hybrid systems and many shipped edge kernels):
//! an app's cgroup is a directory of the same name in each of the memory, cpu, cpuacct and
//! pids hierarchies under the root.

use super::fs::{create_dir, read_key, read_number, remove_dir, write};
use super::{LimitsError, PoolLimits, Usage, CPU_PERIOD_US};
use std::path::{Path, PathBuf};

/// The controllers cairn uses, each a hierarchy of its own under the root (`cpu` and
/// `cpuacct` are often one hierarchy, mounted twice).
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

#[derive(Debug)]
pub struct V1 {
    root: PathBuf,
}

impl V1 {
    pub fn new(root: &Path) -> V1 {
        V1 {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self, controller: &str, path: &str) -> PathBuf {
        self.root.join(controller).join(path)
    }

    /// The distinct hierarchies, each once.
    pub fn hierarchies(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = Vec::new();
        for controller in CONTROLLERS {
            let Ok(root) = std::fs::canonicalize(self.root.join(controller)) else {
                continue;
            };
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }

    pub fn create(&self, path: &str) -> Result<(), LimitsError> {
        for hierarchy in self.hierarchies() {
            create_dir(&hierarchy.join(path))?;
        }
        Ok(())
    }

    /// Whether the kernel has this controller's hierarchy here (the memory one always is: the
    /// tree is v1 only with it). A missing cpu or pids hierarchy leaves that limit unset, as
    /// on kernels built without them.
    fn has(&self, controller: &str) -> bool {
        self.root.join(controller).is_dir()
    }

    pub fn apply(&self, path: &str, limits: &PoolLimits) -> Result<(), LimitsError> {
        let memory = limits.memory.map_or("-1".to_string(), |m| m.to_string());
        write(
            &self.dir("memory", path).join("memory.limit_in_bytes"),
            &memory,
        )?;
        if self.has("cpu") {
            let cpu = self.dir("cpu", path);
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            let quota = limits
                .cpu_quota_us()
                .map_or("-1".to_string(), |q| q.to_string());
            write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
        }
        if self.has("pids") {
            let pids = limits.pids.map_or("max".to_string(), |p| p.to_string());
            write(&self.dir("pids", path).join("pids.max"), &pids)?;
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup, in every hierarchy.
    pub fn add(&self, path: &str, pid: u32) -> Result<(), LimitsError> {
        for hierarchy in self.hierarchies() {
            write(&hierarchy.join(path).join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn usage(&self, path: &str) -> Usage {
        let memory = self.dir("memory", path);
        Usage {
            memory_bytes: read_number(&memory.join("memory.usage_in_bytes")),
            oom_kills: read_key(&memory.join("memory.oom_control"), "oom_kill"),
            cpu_nanos: self.cpu_nanos(path),
            pids: read_number(&self.dir("pids", path).join("pids.current")),
        }
    }

    pub fn cpu_nanos(&self, path: &str) -> u64 {
        read_number(&self.dir("cpuacct", path).join("cpuacct.usage"))
    }

    /// The hierarchy that counts CPU time, to carry its count over a rename.
    pub fn cpuacct(&self) -> Option<PathBuf> {
        std::fs::canonicalize(self.root.join("cpuacct")).ok()
    }

    pub fn remove(&self, path: &str) -> Result<(), LimitsError> {
        let mut result = Ok(());
        for hierarchy in self.hierarchies() {
            if let Err(error) = remove_dir(&hierarchy.join(path)) {
                result = Err(error);
            }
        }
        result
    }

    pub fn describe(&self, path: &str) -> String {
        format!(
            "{}/{{{}}}/{path}",
            self.root.display(),
            CONTROLLERS.join(",")
        )
    }
}

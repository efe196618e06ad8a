//! cgroup v2 (the unified hierarchy): an app's cgroup is one directory under the root; its
//! parent must hand the memory, cpu and pids controllers down (`cgroup.subtree_control`),
//! which each ancestor is asked to do when a cgroup is made.

use super::fs::{create_dir, read, read_key, read_number, remove_dir, write};
use super::{LimitsError, PoolLimits, Usage, CPU_PERIOD_US};
use std::path::{Path, PathBuf};

/// The controllers cairn uses (v2's `cpu` also counts CPU time: there is no `cpuacct`).
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug)]
pub struct V2 {
    root: PathBuf,
}

impl V2 {
    pub fn new(root: &Path) -> V2 {
        V2 {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    /// Makes the cgroup `path`, each ancestor (the root included) first handing the
    /// controllers down to its children. Fails, naming them, when the root lacks any.
    pub fn create(&self, path: &str) -> Result<(), LimitsError> {
        let listed = read(&self.root.join("cgroup.controllers"))?;
        let available: Vec<&str> = listed.split_whitespace().collect();
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| !available.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(LimitsError {
                path: self.root.join("cgroup.controllers").display().to_string(),
                message: format!(
                    "the {} controller(s) cannot be had here (available: `{}`); on a hybrid \
                     system they are bound to cgroup v1 hierarchies",
                    missing.join(", "),
                    listed.trim()
                ),
            });
        }
        let mut ancestor = self.root.clone();
        for part in Path::new(path).components() {
            self.delegate(&ancestor)?;
            ancestor.push(part);
            create_dir(&ancestor)?;
        }
        Ok(())
    }

    /// Has `cgroup` hand every controller cairn uses down to its children, writing only the
    /// ones not handed down yet.
    fn delegate(&self, cgroup: &Path) -> Result<(), LimitsError> {
        let file = cgroup.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&file).unwrap_or_default();
        let enabled: Vec<&str> = enabled.split_whitespace().collect();
        let wanted: Vec<String> = CONTROLLERS
            .into_iter()
            .filter(|c| !enabled.contains(c))
            .map(|c| format!("+{c}"))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        write(&file, &wanted.join(" "))
    }

    pub fn apply(&self, path: &str, limits: &PoolLimits) -> Result<(), LimitsError> {
        let dir = self.dir(path);
        let memory = limits.memory.map_or("max".to_string(), |m| m.to_string());
        write(&dir.join("memory.max"), &memory)?;
        let quota = limits
            .cpu_quota_us()
            .map_or("max".to_string(), |q| q.to_string());
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        let pids = limits.pids.map_or("max".to_string(), |p| p.to_string());
        write(&dir.join("pids.max"), &pids)
    }

    pub fn add(&self, path: &str, pid: u32) -> Result<(), LimitsError> {
        write(&self.dir(path).join("cgroup.procs"), &pid.to_string())
    }

    pub fn usage(&self, path: &str) -> Usage {
        let dir = self.dir(path);
        Usage {
            memory_bytes: read_number(&dir.join("memory.current")),
            oom_kills: read_key(&dir.join("memory.events"), "oom_kill"),
            cpu_nanos: read_key(&dir.join("cpu.stat"), "usage_usec") * 1000,
            pids: read_number(&dir.join("pids.current")),
        }
    }

    pub fn remove(&self, path: &str) -> Result<(), LimitsError> {
        remove_dir(&self.dir(path))
    }

    pub fn describe(&self, path: &str) -> String {
        self.dir(path).display().to_string()
    }
}

//! The one pair of helpers every cgroupfs read and write goes through: the error names the
//! file and what was being written, so a refusal says where.

use super::LimitsError;
use std::path::Path;

pub(super) fn write(path: &Path, value: &str) -> Result<(), LimitsError> {
    std::fs::write(path, value).map_err(|e| LimitsError {
        path: path.display().to_string(),
        message: format!("cannot write `{value}`: {e}"),
    })
}

pub(super) fn read(path: &Path) -> Result<String, LimitsError> {
    std::fs::read_to_string(path).map_err(|e| LimitsError {
        path: path.display().to_string(),
        message: format!("cannot read it: {e}"),
    })
}

/// A number from a one-value file (`memory.current`, `pids.current`, …); 0 when absent.
pub(super) fn read_number(path: &Path) -> u64 {
    read(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`, `memory.oom_control`);
/// 0 when absent.
pub(super) fn read_key(path: &Path, key: &str) -> u64 {
    read(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                (name == key).then(|| value.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

pub(super) fn create_dir(path: &Path) -> Result<(), LimitsError> {
    std::fs::create_dir_all(path).map_err(|e| LimitsError {
        path: path.display().to_string(),
        message: format!("cannot create it: {e}"),
    })
}

/// Removes a cgroup directory and the (empty) cgroups below it; one already gone is fine. The
/// kernel refuses a cgroup whose last process is still exiting (EBUSY) for a moment, so that
/// is tried again a few times (10 to 80 ms apart) before it is reported.
pub(super) fn remove_dir(path: &Path) -> Result<(), LimitsError> {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_dir(&entry.path())?;
            }
        }
    }
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match std::fs::remove_dir(path) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && pause.as_millis() <= 80 => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LimitsError {
                    path: path.display().to_string(),
                    message: format!("cannot remove it: {e}"),
                })
            }
            _ => return Ok(()),
        }
    }
}

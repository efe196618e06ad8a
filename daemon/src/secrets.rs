//! Secrets the device supplies: an app's `device_secrets` names keys whose values cairnd
//! reads from `SECRETS_DIR/APP.toml` (default `/etc/cairn/secrets`) each time it starts one of
//! the app's pools, and hands to the pool with the rest of its `[secrets]`. The values are
//! never stored, logged or shown; only the pool that reads them holds them.
//!
//! The file is a TOML table of strings. It must be a regular file owned by root (or cairnd's
//! own user) and readable by its owner only: a secret any local user could read is refused,
//! saying how to fix it, rather than used.

use crate::spec::AppSpec;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the files are unless the config says otherwise (`secrets_dir`).
pub const DEFAULT_DIR: &str = "/etc/cairn/secrets";
/// The largest file read.
const MAX_FILE: u64 = 256 << 10;

/// The values of `spec.device_secrets` from `dir` (empty when it names none).
pub fn read(dir: &Path, spec: &AppSpec) -> Result<BTreeMap<String, String>, String> {
    if spec.device_secrets.is_empty() {
        return Ok(BTreeMap::new());
    }
    let path: PathBuf = dir.join(format!("{}.toml", spec.name));
    let fix = format!(
        "put them in {} (a TOML table of strings, mode 0600, owned by root)",
        path.display()
    );
    // Opened once, never through a symbolic link, and checked on the descriptor read: a
    // link to another root-only file, or a file swapped between a check and the read, is
    // never taken. O_NONBLOCK: a FIFO put there does not hold the start.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the device has none of this app's device_secrets ({}): {fix}",
                spec.device_secrets.join(", ")
            ))
        }
        Err(error) if error.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(format!(
                "{} is a symbolic link: secrets are read from a regular file only",
                path.display()
            ))
        }
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    let metadata = file
        .metadata()
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let owner_ok = metadata.uid() == 0 || metadata.uid() == nix::unistd::geteuid().as_raw();
    if !owner_ok || metadata.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:04o}: secrets must be readable by their owner only, and owned by root; chmod 600 and chown root it",
            path.display(),
            metadata.uid(),
            metadata.mode() & 0o7777
        ));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE + 1), &mut bytes)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!("{} is over {MAX_FILE} bytes", path.display()));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    // Parsed as a manifest's [secrets] is: an error names a key at most, never a value.
    let table: crate::spec::Secrets = toml::from_str(&text).map_err(|error| {
        format!(
            "{} is not a TOML table of strings: {}",
            path.display(),
            error.message()
        )
    })?;
    let mut values = BTreeMap::new();
    let mut missing = Vec::new();
    for key in &spec.device_secrets {
        match table.0.get(key) {
            Some(value) => {
                values.insert(key.clone(), value.clone());
            }
            None => missing.push(key.as_str()),
        }
    }
    // With the manifest's own, within the bound the manifest is held to (what the pool's
    // Start message can carry).
    let bytes: usize = spec
        .config
        .iter()
        .chain(spec.secrets.0.iter())
        .chain(values.iter())
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if bytes > crate::spec::MAX_CONFIG_BYTES {
        return Err(format!(
            "[config], [secrets] and device_secrets hold {bytes} bytes together; at most {} are allowed",
            crate::spec::MAX_CONFIG_BYTES
        ));
    }
    if !missing.is_empty() {
        return Err(format!(
            "device secret{} {} not on this device: {fix}",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", ")
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(names: &[&str]) -> AppSpec {
        let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        AppSpec::from_manifest(&format!(
            "device_secrets = [{}]\nname = \"gateway\"\ncomponent = \"sha256:{}\"\n[http]\nlisten = \"127.0.0.1:8080\"\n",
            list.join(", "),
            "a".repeat(64)
        ))
        .unwrap()
    }

    fn write(dir: &Path, text: &str, mode: u32) {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn values_come_from_the_apps_own_file_and_problems_say_how_to_fix_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), &spec(&[])).unwrap().is_empty());
        let wanted = spec(&["api_token", "db.password"]);

        let none = read(dir.path(), &wanted).unwrap_err();
        assert!(
            none.contains("none of this app's device_secrets (api_token, db.password)"),
            "{none}"
        );
        assert!(none.contains("gateway.toml"), "{none}");

        write(dir.path(), "api_token = \"s3cret\"\nother = \"x\"\n", 0o600);
        let missing = read(dir.path(), &wanted).unwrap_err();
        assert!(
            missing.starts_with("device secret db.password not on this device"),
            "{missing}"
        );

        write(
            dir.path(),
            "api_token = \"s3cret\"\n\"db.password\" = \"hunter2\"\n",
            0o644,
        );
        let open = read(dir.path(), &wanted).unwrap_err();
        assert!(
            open.contains("mode 0644") && open.contains("chmod 600"),
            "{open}"
        );

        write(
            dir.path(),
            "api_token = \"s3cret\"\n\"db.password\" = \"hunter2\"\n",
            0o600,
        );
        let values = read(dir.path(), &wanted).unwrap();
        assert_eq!(values["api_token"], "s3cret");
        assert_eq!(values["db.password"], "hunter2");

        // A symbolic link to a root-only file is not read through.
        let elsewhere = dir.path().join("elsewhere.toml");
        std::fs::rename(dir.path().join("gateway.toml"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("gateway.toml")).unwrap();
        let linked = read(dir.path(), &wanted).unwrap_err();
        assert!(linked.contains("symbolic link"), "{linked}");
        std::fs::remove_file(dir.path().join("gateway.toml")).unwrap();

        // A value of the wrong type is refused by key, never quoted.
        write(dir.path(), "api_token = 123456789\n", 0o600);
        let typed = read(dir.path(), &wanted).unwrap_err();
        assert!(
            typed.contains("api_token") && !typed.contains("123456789"),
            "{typed}"
        );
    }
}

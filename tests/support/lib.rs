//! Test support for the end-to-end suite: builds the real binaries and the test components
//! (once per run), starts `cairnd` on a temp state dir and socket, waits for its sd-notify
//! READY=1 on a real notify socket, runs the real `cairnctl`, and speaks HTTP/1.1 to apps.
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

mod daemon;
mod http;
mod lattice;
mod nats;
pub mod netem;
pub mod random;
pub mod report;
mod upstream;

pub use daemon::{cgroup_dirs, wait_child, Daemon, NotificationRecorder};
pub use http::{get, http, is_listening, Response};
pub use lattice::{connect_all, fleet, fleet_ok, Lattice};
pub use nats::{nats_server_binary, Nats};
pub use upstream::{tls_files, Upstream};

use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo`, without the variables cargo set for this test process: build scripts that watch
/// one of them (ring's watches `CARGO_MANIFEST_DIR`) would otherwise see a change from the
/// same build run by hand or by the Justfile, and cairnd, cairnctl and their TLS stack would be
/// rebuilt at every switch between the two.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| key_text.starts_with(prefix))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key_text.as_ref());
        if set_for_tests {
            command.env_remove(&key);
        }
    }
    command
}

/// The cargo profile of the binaries under test (`CAIRN_PROFILE`: `release`, as CI and the
/// benchmarks use, or another profile of the workspace such as `arm64-test`); `None`: debug.
pub fn profile() -> Option<String> {
    std::env::var("CAIRN_PROFILE")
        .ok()
        .filter(|p| !p.is_empty() && p != "debug" && p != "dev")
}

/// The target the binaries under test are built for (`CAIRN_TARGET`, such as
/// aarch64-unknown-linux-gnu, run through qemu-user by binfmt_misc); `None`: this machine's.
pub fn cross_target() -> Option<String> {
    std::env::var("CAIRN_TARGET").ok().filter(|t| !t.is_empty())
}

/// Runs the real `cairnctl` with no daemon involved (`fleet …`).
pub fn cairnctl(args: &[&str]) -> Ctl {
    let output = Command::new(&binaries().1).args(args).output().unwrap();
    Ctl {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
    }
}

/// The real `cairnd` and `cairnctl`, built (or found up to date) once per test process.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINARIES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let status = cargo()
            .current_dir(workspace_root())
            // Exactly `just build`'s command: another package selection unifies features
            // differently and would rebuild (and relink) both binaries on every run.
            .args(["build", "--quiet", "--workspace", "--bins"])
            .args(profile().map(|profile| format!("--profile={profile}")))
            .args(cross_target().map(|target| format!("--target={target}")))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building cairnd and cairnctl failed");
        let mut dir = target_dir();
        if let Some(target) = cross_target() {
            dir = dir.join(target);
        }
        let dir = dir.join(profile().unwrap_or_else(|| "debug".into()));
        (dir.join("cairnd"), dir.join("cairnctl"))
    })
}

/// Path of a test component from `tests/components`, built for wasm32-wasip2 once per run.
pub fn component(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target = target_dir().join("components");
        let output = cargo()
            .current_dir(workspace_root().join("tests/components"))
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(&target)
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "building the test components failed (is the wasm32-wasip2 target installed? \
             `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        target.join("wasm32-wasip2/release")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.is_file(), "no component {}", path.display());
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut handed = HANDED_OUT.lock().unwrap();
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Records that `test` could not run here and why. cargo hides a passing test's output, so the
/// reason also goes to `target/test-skips.log`, which `just test` prints at the end.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    let log = target_dir().join("test-skips.log");
    if let Ok(mut file) = std::fs::File::options().create(true).append(true).open(log) {
        let _ = writeln!(file, "{line}");
    }
}

/// Waits for `condition` to hold, up to `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {deadline:?} waiting for {what}")
}

/// What one `cairnctl` run gave.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    fn from(output: Output) -> Ctl {
        Ctl {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).to_string(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// A valid component of about `size` bytes: the component header and one custom section.
pub fn padded_component(size: usize) -> Vec<u8> {
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    bytes.extend(custom_section("pad", size.saturating_sub(32), 0));
    bytes
}

/// The hello component with `size` bytes of `fill` in a custom section, written to `path`:
/// still a component that serves, with a digest of its own for each fill and size.
pub fn padded_hello(path: &Path, fill: u8, size: usize) -> PathBuf {
    let mut bytes = std::fs::read(component("hello")).unwrap();
    bytes.extend(custom_section("cairn-test-padding", size, fill));
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// A wasm custom section named `name` holding `payload` bytes of `fill`; appended to a
/// component it keeps it valid and changes its digest and size.
pub fn custom_section(name: &str, payload: usize, fill: u8) -> Vec<u8> {
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name.as_bytes());
    section.resize(section.len() + payload, fill);
    let mut bytes = vec![0]; // custom section id
    let mut length = section.len();
    loop {
        let byte = (length & 0x7f) as u8;
        length >>= 7;
        if length == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.extend_from_slice(&section);
    bytes
}

/// Runs `test` with a `size` tmpfs mounted for it (needs root), unmounted afterwards; skips
/// (saying why) where it cannot be mounted.
pub fn with_small_disk(name: &str, size: &str, test: impl FnOnce(&Path)) {
    if !is_root() {
        skip(name, "needs root to mount a small tmpfs");
        return;
    }
    let mount_point = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "cairn-e2e-disk",
        ])
        .arg(mount_point.path())
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        skip(name, &format!("mounting a tmpfs failed ({mounted:?})"));
        return;
    }
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(mount_point.path())));
    let _ = Command::new("umount").arg(mount_point.path()).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Fills the file system holding `dir` to the last byte, with the file `name` in `dir`.
pub fn fill_disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 1] {
        let bytes = vec![0u8; chunk];
        while file.write_all(&bytes).is_ok() {}
    }
    path
}

/// The digest cairn names a component by: `sha256:` and the hex of its bytes' SHA-256.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

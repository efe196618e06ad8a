//! `Lattice`: the upstream a fleet device syncs with, for tests and benchmarks.

use super::*;
use futures_util::StreamExt;

/// Runs `cairnctl fleet …` (no daemon involved).
pub fn fleet(args: &[&str]) -> Ctl {
    cairnctl(&[&["fleet"], args].concat())
}

pub fn fleet_ok(args: &[&str]) -> String {
    let result = fleet(args);
    assert_eq!(result.code, 0, "cairnctl fleet {args:?}: {}", result.stderr);
    result.stdout
}

/// A real nats-server with JetStream, a fleet key made with `cairnctl fleet keygen` and the
/// hello component uploaded to its artifact store: what a fleet device syncs with.
pub struct Lattice {
    pub nats: Nats,
    /// The other servers of a cluster (`Lattice::cluster`); empty for one server.
    pub others: Vec<Nats>,
    /// What cairnctl fleet is given to reach the server: `--nats URL`, and `--tls-ca` if set.
    pub upstream: Vec<String>,
    pub key: PathBuf,
    pub public: String,
    pub digest: String,
    pub dir: tempfile::TempDir,
}

impl Lattice {
    pub fn start(test: &str) -> Option<Lattice> {
        Lattice::start_with(test, None, None)
    }

    /// A lattice whose server runs with `config` (nats-server's syntax), reached by cairnctl
    /// with `tls_ca` when given.
    pub fn start_with(test: &str, config: Option<&str>, tls_ca: Option<&Path>) -> Option<Lattice> {
        let nats = Nats::start_with_config(test, config)?;
        Some(Lattice::on(nats, Vec::new(), tls_ca))
    }

    /// A lattice whose server sits on the far side of `link` (see `netem`).
    pub fn behind(test: &str, link: &crate::netem::Link) -> Option<Lattice> {
        let nats = Nats::start_behind(test, link)?;
        Some(Lattice::on(nats, Vec::new(), None))
    }

    /// A JetStream cluster of three servers on loopback (routes between them), with the
    /// upstream's streams and buckets made with `replicas` by `cairnctl fleet init`.
    pub fn cluster(test: &str, replicas: u8) -> Option<Lattice> {
        nats_server_binary().or_else(|| {
            skip(test, "no nats-server found (./bootstrap test installs it)");
            None
        })?;
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (index, port) in routes.iter().enumerate() {
            let others: Vec<String> = routes
                .iter()
                .filter(|p| *p != port)
                .map(|p| format!("\"nats://127.0.0.1:{p}\""))
                .collect();
            let config = format!(
                "server_name: n{index}\ncluster {{\n  name: cairn-test\n  listen: \"127.0.0.1:{port}\"\n  routes: [{}]\n}}\n",
                others.join(", ")
            );
            nodes.push(Nats::start_with_config(test, Some(&config))?);
        }
        let urls: Vec<String> = nodes.iter().map(Nats::url).collect();
        let urls = urls.join(",");
        // The cluster elects its JetStream leader in a few seconds; until then init fails.
        let replicas = replicas.to_string();
        wait_for(
            "the cluster to take fleet init",
            Duration::from_secs(60),
            || fleet(&["init", "--nats", &urls, "--replicas", &replicas]).code == 0,
        )
        .unwrap();
        let first = nodes.remove(0);
        Some(Lattice::on(first, nodes, None))
    }

    /// Every server's URL, comma-separated: what devices and cairnctl are given.
    pub fn urls(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.others)
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn on(nats: Nats, others: Vec<Nats>, tls_ca: Option<&Path>) -> Lattice {
        let urls = std::iter::once(&nats)
            .chain(&others)
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",");
        let mut upstream = vec!["--nats".to_string(), urls];
        if let Some(ca) = tls_ca {
            upstream.extend(["--tls-ca".to_string(), ca.to_str().unwrap().to_string()]);
        }
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("fleet.key");
        let public = fleet_ok(&["keygen", "--out", key.to_str().unwrap()])
            .trim()
            .to_string();
        let hello = component("hello");
        let upload: Vec<&str> = ["upload"]
            .into_iter()
            .chain(upstream.iter().map(String::as_str))
            .chain([hello.to_str().unwrap()])
            .collect();
        let digest = fleet_ok(&upload).trim().to_string();
        Lattice {
            nats,
            others,
            upstream,
            key,
            public,
            digest,
            dir,
        }
    }

    pub fn device_config(&self, device: &str) -> String {
        self.device_config_in(device, &[])
    }

    /// A device with no id configured: it uses the one its store made.
    pub fn unnamed_device_config(&self, groups: &[&str]) -> String {
        format!(
            "[upstream]\nnats = \"{}\"\ngroups = {groups:?}\ntrusted_keys = [\"{}\"]\n",
            self.urls(),
            self.public
        )
    }

    pub fn device_config_in(&self, device: &str, groups: &[&str]) -> String {
        format!(
            "[upstream]\nnats = \"{}\"\ndevice = \"{device}\"\ngroups = {groups:?}\ntrusted_keys = [\"{}\"]\n",
            self.urls(),
            self.public
        )
    }

    /// Publishes one app for `target` (a device id, or `group:NAME`) with `key`; returns
    /// cairnctl's result.
    pub fn publish_with(
        &self,
        key: &Path,
        target: &str,
        app: &str,
        listen: &str,
        greeting: &str,
        expires: &str,
    ) -> Ctl {
        self.publish_component(key, target, &self.digest, app, listen, greeting, expires)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn publish_component(
        &self,
        key: &Path,
        target: &str,
        digest: &str,
        app: &str,
        listen: &str,
        greeting: &str,
        expires: &str,
    ) -> Ctl {
        self.publish_state(
            key,
            target,
            &format!("{app}-{greeting}"),
            &format!(
                "[[app]]\nname = \"{app}\"\ncomponent = \"{digest}\"\n[app.http]\nlisten = \"{listen}\"\n[app.env]\nGREETING = \"{greeting}\"\n"
            ),
            expires,
        )
    }

    /// Publishes the fleet state file `state` (kept as `state-NAME.toml`) for `target` (a
    /// device id, or `group:NAME`) with `key`; returns cairnctl's result.
    pub fn publish_state(
        &self,
        key: &Path,
        target: &str,
        name: &str,
        state_text: &str,
        expires: &str,
    ) -> Ctl {
        let state = self.dir.path().join(format!("state-{name}.toml"));
        std::fs::write(&state, state_text).unwrap();
        let (flag, target) = match target.strip_prefix("group:") {
            Some(group) => ("--group", group),
            None => ("--device", target),
        };
        let publish: Vec<&str> = ["publish"]
            .into_iter()
            .chain(self.upstream.iter().map(String::as_str))
            .chain([
                "--key",
                key.to_str().unwrap(),
                flag,
                target,
                "--expires",
                expires,
                state.to_str().unwrap(),
            ])
            .collect();
        fleet(&publish)
    }

    /// `cairnctl fleet init` against this upstream, as an operator provisions it; its output.
    pub fn init(&self) -> String {
        let mut init: Vec<&str> = vec!["init"];
        init.extend(self.upstream.iter().map(String::as_str));
        fleet_ok(&init)
    }

    pub fn publish(&self, device: &str, app: &str, listen: &str, greeting: &str) {
        let result = self.publish_with(&self.key, device, app, listen, greeting, "30d");
        assert_eq!(result.code, 0, "publish: {}", result.stderr);
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    pub fn kv_get(&self, key: &str) -> Vec<u8> {
        let url = self.urls();
        self.block_on(async move {
            let client = connect_all(&url).await;
            let kv = async_nats::jetstream::new(client)
                .get_key_value("cairn-desired")
                .await
                .unwrap();
            kv.get(key).await.unwrap().unwrap().to_vec()
        })
    }

    pub fn kv_put(&self, key: &str, value: Vec<u8>) {
        let url = self.urls();
        self.block_on(async move {
            let client = connect_all(&url).await;
            let kv = async_nats::jetstream::new(client)
                .get_key_value("cairn-desired")
                .await
                .unwrap();
            kv.put(key, value.into()).await.unwrap();
        })
    }

    /// Every report message in the stream for `device`, as JSON: as many as the stream held
    /// when asked (retried while a cluster re-elects its leaders).
    pub fn reports(&self, device: &str) -> Vec<serde_json::Value> {
        let url = self.urls();
        let subject = format!("cairn.report.{device}.>");
        self.block_on(async move {
            let mut last_error = String::new();
            for _ in 0..20 {
                match read_reports(&url, &subject).await {
                    Ok(reports) => return reports,
                    Err(error) => last_error = error,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            panic!("cannot read the reports on {subject}: {last_error}");
        })
    }
}

async fn read_reports(url: &str, subject: &str) -> Result<Vec<serde_json::Value>, String> {
    let client = connect_all(url).await;
    let stream = async_nats::jetstream::new(client)
        .get_stream("CAIRN_REPORTS")
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut reports = Vec::new();
    while (reports.len() as u64) < pending {
        match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(message))) => {
                reports.push(serde_json::from_slice(&message.payload).unwrap())
            }
            Ok(Some(Err(error))) => return Err(error.to_string()),
            Ok(None) | Err(_) => {
                return Err(format!("{} of {pending} reports read", reports.len()))
            }
        }
    }
    Ok(reports)
}

/// A client of every server in `urls` (comma-separated), retrying while the cluster settles.
pub async fn connect_all(urls: &str) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').map(|u| u.parse().unwrap()).collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .unwrap()
}

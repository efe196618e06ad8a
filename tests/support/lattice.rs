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
        let mut upstream = vec!["--nats".to_string(), nats.url()];
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
        Some(Lattice {
            nats,
            upstream,
            key,
            public,
            digest,
            dir,
        })
    }

    pub fn device_config(&self, device: &str) -> String {
        self.device_config_in(device, &[])
    }

    /// A device with no id configured: it uses the one its store made.
    pub fn unnamed_device_config(&self, groups: &[&str]) -> String {
        format!(
            "[upstream]\nnats = \"{}\"\ngroups = {groups:?}\ntrusted_keys = [\"{}\"]\n",
            self.nats.url(),
            self.public
        )
    }

    pub fn device_config_in(&self, device: &str, groups: &[&str]) -> String {
        format!(
            "[upstream]\nnats = \"{}\"\ndevice = \"{device}\"\ngroups = {groups:?}\ntrusted_keys = [\"{}\"]\n",
            self.nats.url(),
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
        let state = self.dir.path().join(format!("state-{app}-{greeting}.toml"));
        std::fs::write(
            &state,
            format!(
                "[[app]]\nname = \"{app}\"\ncomponent = \"{digest}\"\n[app.http]\nlisten = \"{listen}\"\n[app.env]\nGREETING = \"{greeting}\"\n"
            ),
        )
        .unwrap();
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
        let url = self.nats.url();
        self.block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let kv = async_nats::jetstream::new(client)
                .get_key_value("cairn-desired")
                .await
                .unwrap();
            kv.get(key).await.unwrap().unwrap().to_vec()
        })
    }

    pub fn kv_put(&self, key: &str, value: Vec<u8>) {
        let url = self.nats.url();
        self.block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let kv = async_nats::jetstream::new(client)
                .get_key_value("cairn-desired")
                .await
                .unwrap();
            kv.put(key, value.into()).await.unwrap();
        })
    }

    /// Every report message in the stream for `device`, as JSON.
    pub fn reports(&self, device: &str) -> Vec<serde_json::Value> {
        let url = self.nats.url();
        let subject = format!("cairn.report.{device}.>");
        self.block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let stream = async_nats::jetstream::new(client)
                .get_stream("CAIRN_REPORTS")
                .await
                .unwrap();
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                    filter_subject: subject,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut messages = consumer.messages().await.unwrap();
            let mut reports = Vec::new();
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(2), messages.next()).await
            {
                reports.push(serde_json::from_slice(&message.payload).unwrap());
            }
            reports
        })
    }
}

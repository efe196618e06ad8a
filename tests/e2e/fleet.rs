//! Fleet sync against a real nats-server with JetStream, started by the test on a free port;
//! links are cut by ending the server process.

use cairn_tests::{
    cairnctl, component, custom_section, free_port, get, wait_for, Ctl, Daemon, Nats,
};
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs `cairnctl fleet …` (no daemon involved).
fn fleet(args: &[&str]) -> Ctl {
    cairnctl(&[&["fleet"], args].concat())
}

fn fleet_ok(args: &[&str]) -> String {
    let result = fleet(args);
    assert_eq!(result.code, 0, "cairnctl fleet {args:?}: {}", result.stderr);
    result.stdout
}

struct Lattice {
    nats: Nats,
    /// What cairnctl fleet is given to reach the server: `--nats URL`, and `--tls-ca` if set.
    upstream: Vec<String>,
    key: PathBuf,
    public: String,
    digest: String,
    dir: tempfile::TempDir,
}

impl Lattice {
    fn start(test: &str) -> Option<Lattice> {
        Lattice::start_with(test, None, None)
    }

    /// A lattice whose server runs with `config` (nats-server's syntax), reached by cairnctl
    /// with `tls_ca` when given.
    fn start_with(test: &str, config: Option<&str>, tls_ca: Option<&Path>) -> Option<Lattice> {
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

    fn device_config(&self, device: &str) -> String {
        self.device_config_in(device, &[])
    }

    fn device_config_in(&self, device: &str, groups: &[&str]) -> String {
        format!(
            "[upstream]\nnats = \"{}\"\ndevice = \"{device}\"\ngroups = {groups:?}\ntrusted_keys = [\"{}\"]\n",
            self.nats.url(),
            self.public
        )
    }

    /// Publishes one app for `target` (a device id, or `group:NAME`) with `key`; returns
    /// cairnctl's result.
    fn publish_with(
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
    fn publish_component(
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

    fn publish(&self, device: &str, app: &str, listen: &str, greeting: &str) {
        let result = self.publish_with(&self.key, device, app, listen, greeting, "30d");
        assert_eq!(result.code, 0, "publish: {}", result.stderr);
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn kv_get(&self, key: &str) -> Vec<u8> {
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

    fn kv_put(&self, key: &str, value: Vec<u8>) {
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
    fn reports(&self, device: &str) -> Vec<serde_json::Value> {
        let url = self.nats.url();
        let subject = format!("cairn.report.{device}");
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

fn sync_status(daemon: &Daemon) -> serde_json::Value {
    daemon.ctl(&["-o", "json", "sync", "status"]).json()
}

#[test]
fn a_device_converges_stays_up_offline_and_catches_up_to_the_latest() {
    let Some(mut lattice) =
        Lattice::start("a_device_converges_stays_up_offline_and_catches_up_to_the_latest")
    else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config("edge-1")), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    lattice.publish("edge-1", "fleet-web", &listen, "v1");
    wait_for(
        "the device to converge on v1",
        Duration::from_secs(30),
        || {
            get(addr, "/")
                .map(|r| r.body == "v1 from cairn\n")
                .unwrap_or(false)
        },
    )
    .unwrap();
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    assert_eq!(apps[0]["owner"], "fleet");
    let status = sync_status(&daemon);
    assert_eq!(status["state"], "connected", "{status}");
    assert_eq!(status["applied"][0]["key"], "device.edge-1");
    assert_eq!(status["applied"][0]["version"], 1);
    let components = daemon.ctl(&["-o", "json", "components"]).json();
    assert!(components
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["digest"] == lattice.digest.as_str() && c["source"] == "fleet"));

    // The upstream sees the device's report.
    let url = lattice.nats.url();
    wait_for(
        "the device's report upstream",
        Duration::from_secs(20),
        || {
            let result = fleet(&["-o", "json", "status", "--nats", &url, "--device", "edge-1"]);
            result.code == 0 && result.stdout.contains("fleet-web")
        },
    )
    .unwrap();

    // Cut the link: the device keeps serving and still takes local deploys.
    lattice.nats.stop();
    wait_for("the device to notice", Duration::from_secs(30), || {
        sync_status(&daemon)["state"] == "offline"
    })
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "v1 from cairn\n");
    let local = daemon.deploy_hello("local-app", &["--env", "GREETING=local"]);
    assert_eq!(get(local, "/").unwrap().body, "local from cairn\n");
    assert!(!sync_status(&daemon)["last_error"]
        .as_str()
        .unwrap()
        .is_empty());

    // The link returns; two versions are published; the device ends at the latest.
    lattice.nats.restart();
    lattice.publish("edge-1", "fleet-web", &listen, "v2");
    lattice.publish("edge-1", "fleet-web", &listen, "v3");
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the device to converge on v3",
        Duration::from_secs(60),
        || {
            get(addr, "/")
                .map(|r| r.body == "v3 from cairn\n")
                .unwrap_or(false)
        },
    )
    .unwrap();
    wait_for("version 3 to be recorded", Duration::from_secs(10), || {
        sync_status(&daemon)["applied"][0]["version"] == 3
    })
    .unwrap();
    assert_eq!(get(local, "/").unwrap().body, "local from cairn\n");
}

#[test]
fn untrusted_stale_tampered_and_expired_state_is_refused() {
    let Some(lattice) = Lattice::start("untrusted_stale_tampered_and_expired_state_is_refused")
    else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config("edge-2")), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    lattice.publish("edge-2", "guarded", &listen, "one");
    wait_for("v1", Duration::from_secs(30), || {
        get(addr, "/")
            .map(|r| r.body == "one from cairn\n")
            .unwrap_or(false)
    })
    .unwrap();
    let version_one = lattice.kv_get("device.edge-2");
    lattice.publish("edge-2", "guarded", &listen, "two");
    wait_for("v2", Duration::from_secs(30), || {
        get(addr, "/")
            .map(|r| r.body == "two from cairn\n")
            .unwrap_or(false)
    })
    .unwrap();

    let expect_refused = |what: &str, needle: &str| {
        daemon.ctl_ok(&["sync", "now"]);
        wait_for(what, Duration::from_secs(30), || {
            sync_status(&daemon)["rejections"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .any(|r| r["reason"].as_str().unwrap_or("").contains(needle))
                })
                .unwrap_or(false)
        })
        .unwrap();
        assert_eq!(
            get(addr, "/").unwrap().body,
            "two from cairn\n",
            "{what} changed the app"
        );
        assert_eq!(daemon.app_status("guarded")["generation"], 2);
    };

    // A replay of version 1 (a rollback attack).
    lattice.kv_put("device.edge-2", version_one);
    expect_refused(
        "the replay to be refused",
        "is not newer than the applied version 2",
    );

    // A key the device does not trust.
    let stranger = lattice.dir.path().join("stranger.key");
    fleet_ok(&["keygen", "--out", stranger.to_str().unwrap()]);
    assert_eq!(
        lattice
            .publish_with(&stranger, "edge-2", "guarded", &listen, "evil", "30d")
            .code,
        0
    );
    expect_refused(
        "the stranger's state to be refused",
        "which this device does not trust",
    );

    // A document altered after signing.
    lattice.publish("edge-2", "guarded", &listen, "honest");
    let mut signed: serde_json::Value =
        serde_json::from_slice(&lattice.kv_get("device.edge-2")).unwrap();
    let payload = signed["payload"]
        .as_str()
        .unwrap()
        .replace("honest", "forged");
    signed["payload"] = payload.into();
    lattice.kv_put("device.edge-2", serde_json::to_vec(&signed).unwrap());
    // (The honest version may have applied before the forgery landed; either way the forgery
    // must be refused and must not serve.)
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the forgery to be refused", Duration::from_secs(30), || {
        sync_status(&daemon)["rejections"]
            .as_array()
            .map(|r| {
                r.iter().any(|r| {
                    r["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("signature does not match")
                })
            })
            .unwrap_or(false)
    })
    .unwrap();
    assert_ne!(get(addr, "/").unwrap().body, "forged from cairn\n");

    // A document that has already expired (a freeze attack).
    assert_eq!(
        lattice
            .publish_with(&lattice.key, "edge-2", "guarded", &listen, "frozen", "0s")
            .code,
        0
    );
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the expired state to be refused",
        Duration::from_secs(30),
        || {
            sync_status(&daemon)["rejections"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .any(|r| r["reason"].as_str().unwrap_or("").contains("expired"))
                })
                .unwrap_or(false)
        },
    )
    .unwrap();
    assert_ne!(get(addr, "/").unwrap().body, "frozen from cairn\n");

    // The refusals are reported upstream too.
    let reports = lattice.reports("edge-2");
    let rejected: Vec<&serde_json::Value> = reports
        .iter()
        .filter(|r| r["event"] == "rejected")
        .collect();
    for needle in [
        "is not newer",
        "does not trust",
        "signature does not match",
        "expired",
    ] {
        assert!(
            rejected
                .iter()
                .any(|r| r["reason"].as_str().unwrap().contains(needle)),
            "no upstream report of `{needle}`"
        );
    }
}

#[test]
fn a_fleet_app_never_replaces_a_local_one() {
    let Some(lattice) = Lattice::start("a_fleet_app_never_replaces_a_local_one") else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config("edge-3")), &[]);
    let addr = daemon.deploy_hello("shared", &["--env", "GREETING=mine"]);
    let other = format!("127.0.0.1:{}", free_port());
    lattice.publish("edge-3", "shared", &other, "theirs");
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the conflict to be recorded",
        Duration::from_secs(30),
        || {
            sync_status(&daemon)["rejections"]
                .as_array()
                .map(|r| {
                    r.iter().any(|r| {
                        r["reason"]
                            .as_str()
                            .unwrap_or("")
                            .contains("conflict: app `shared` is owned by the local operator")
                    })
                })
                .unwrap_or(false)
        },
    )
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "mine from cairn\n");
    let app = daemon.app_status("shared");
    assert_eq!(
        (app["owner"].as_str(), app["generation"].as_u64()),
        (Some("local"), Some(1))
    );
    wait_for("the conflict upstream", Duration::from_secs(20), || {
        lattice.reports("edge-3").iter().any(|r| {
            r["errors"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .any(|e| e.as_str().unwrap_or("").contains("conflict"))
                })
                .unwrap_or(false)
        })
    })
    .unwrap();
}

#[test]
fn reports_made_offline_arrive_exactly_once_even_across_a_kill_9() {
    let Some(mut lattice) =
        Lattice::start("reports_made_offline_arrive_exactly_once_even_across_a_kill_9")
    else {
        return;
    };
    let mut daemon = Daemon::start_with(Some(&lattice.device_config("edge-4")), &[]);
    let addr = daemon.deploy_hello("chatty", &[]);
    let backlog = |daemon: &Daemon| sync_status(daemon)["backlog"].as_u64().unwrap();
    let count = |lattice: &Lattice, tag: &str| -> (usize, usize) {
        let lines: Vec<String> = lattice
            .reports("edge-4")
            .iter()
            .filter(|r| r["kind"] == "log")
            .filter_map(|r| r["line"].as_str().map(str::to_string))
            .filter(|line| line.starts_with(tag))
            .collect();
        let unique: std::collections::BTreeSet<&String> = lines.iter().collect();
        (lines.len(), unique.len())
    };
    let generate = |tag: &str| {
        // 10,000 records: five requests of 2,000 lines each.
        for request in 0..5 {
            assert_eq!(
                get(addr, &format!("/lines?2000-{tag}{request}"))
                    .unwrap()
                    .status,
                200
            );
        }
    };

    lattice.nats.stop();
    wait_for("offline", Duration::from_secs(30), || {
        sync_status(&daemon)["state"] == "offline"
    })
    .unwrap();
    generate("first");
    wait_for("10,000 records queued", Duration::from_secs(30), || {
        backlog(&daemon) >= 10_000
    })
    .unwrap();
    lattice.nats.restart();
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the outbox to empty", Duration::from_secs(120), || {
        backlog(&daemon) == 0
    })
    .unwrap();
    assert_eq!(count(&lattice, "first"), (10_000, 10_000));

    // Again, with cairnd killed in the middle of the flush.
    lattice.nats.stop();
    wait_for("offline again", Duration::from_secs(30), || {
        sync_status(&daemon)["state"] == "offline"
    })
    .unwrap();
    generate("second");
    wait_for("10,000 more queued", Duration::from_secs(30), || {
        backlog(&daemon) >= 10_000
    })
    .unwrap();
    lattice.nats.restart();
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the flush to be under way", Duration::from_secs(60), || {
        backlog(&daemon) < 9_000
    })
    .unwrap();
    daemon.kill9();
    daemon.restart();
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the outbox to empty after the restart",
        Duration::from_secs(120),
        || backlog(&daemon) == 0,
    )
    .unwrap();
    assert_eq!(count(&lattice, "second"), (10_000, 10_000));
    assert_eq!(sync_status(&daemon)["dropped"], 0);
}

/// Waits until `addr` answers `/` with `greeting`.
fn wait_greeting(addr: std::net::SocketAddr, greeting: &str) {
    let body = format!("{greeting} from cairn\n");
    wait_for(
        &format!("the app to answer `{greeting}`"),
        Duration::from_secs(30),
        || get(addr, "/").map(|r| r.body == body).unwrap_or(false),
    )
    .unwrap();
}

#[test]
fn the_device_key_wins_an_app_over_its_group_and_hands_it_back() {
    let Some(lattice) =
        Lattice::start("the_device_key_wins_an_app_over_its_group_and_hands_it_back")
    else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config_in("edge-4", &["site-a"])), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    lattice.publish("group:site-a", "web", &listen, "group");
    daemon.ctl_ok(&["sync", "now"]);
    wait_greeting(addr, "group");

    // The device's own key names the same app: it wins.
    lattice.publish("edge-4", "web", &listen, "device");
    wait_greeting(addr, "device");

    // The group moves on; the device keeps what its own key says.
    lattice.publish("group:site-a", "web", &listen, "group-two");
    wait_for(
        "group version 2 to be applied",
        Duration::from_secs(30),
        || {
            sync_status(&daemon)["applied"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .any(|a| a["key"] == "group.site-a" && a["version"] == 2)
                })
                .unwrap_or(false)
        },
    )
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "device from cairn\n");
    wait_for(
        "the shadowed app reported upstream",
        Duration::from_secs(20),
        || {
            lattice.reports("edge-4").iter().any(|r| {
                r["event"] == "shadowed" && r["app"] == "web" && r["by"] == "device.edge-4"
            })
        },
    )
    .unwrap();

    // The device key lets go of `web`: the group's current spec takes over, with nothing
    // published for the group in between.
    let other = format!("127.0.0.1:{}", free_port());
    lattice.publish("edge-4", "other", &other, "other");
    wait_greeting(addr, "group-two");
    wait_greeting(other.parse().unwrap(), "other");
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    assert_eq!(apps.as_array().unwrap().len(), 2, "{apps}");
}

/// The hello component with `pad` bytes of custom section appended: still a valid component
/// that serves, with a new digest and a download that takes a while.
fn padded_hello(dir: &Path, pad: usize) -> PathBuf {
    let mut bytes = std::fs::read(component("hello")).unwrap();
    bytes.extend(custom_section("cairn-test-padding", pad, 0x5a));
    let path = dir.join("hello-padded.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn blob_in_store(daemon: &Daemon, digest: &str) -> Option<Vec<u8>> {
    let db = rusqlite::Connection::open_with_flags(
        daemon.database(),
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

#[test]
fn a_download_cut_halfway_leaves_nothing_and_completes_after_the_link_returns() {
    let Some(mut lattice) = Lattice::start(
        "a_download_cut_halfway_leaves_nothing_and_completes_after_the_link_returns",
    ) else {
        return;
    };
    const PAD: usize = 96 << 20;
    let big = padded_hello(lattice.dir.path(), PAD);
    let url = lattice.nats.url();
    let digest = fleet_ok(&["upload", "--nats", &url, big.to_str().unwrap()])
        .trim()
        .to_string();
    let daemon = Daemon::start_with(Some(&lattice.device_config("edge-5")), &[]);
    wait_for("the device to connect", Duration::from_secs(30), || {
        lattice.nats.bytes_sent_to("cairnd edge-5").is_some()
    })
    .unwrap();
    let before = lattice.nats.bytes_sent_to("cairnd edge-5").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let published = lattice.publish_component(
        &lattice.key,
        "edge-5",
        &digest,
        "big",
        &listen,
        "big",
        "30d",
    );
    assert_eq!(published.code, 0, "{}", published.stderr);

    // Cut the link once a few MiB of the artifact have gone down, well short of all of it.
    wait_for(
        "the artifact download to be under way",
        Duration::from_secs(30),
        || {
            lattice
                .nats
                .bytes_sent_to("cairnd edge-5")
                .is_some_and(|sent| sent > before + (4 << 20))
        },
    )
    .unwrap();
    let sent = lattice.nats.bytes_sent_to("cairnd edge-5").unwrap_or(0) - before;
    lattice.nats.stop();
    assert!(
        sent < PAD as u64,
        "the whole artifact ({PAD} bytes) was sent before the cut ({sent} bytes): not a cut halfway"
    );
    wait_for("the device to notice", Duration::from_secs(30), || {
        sync_status(&daemon)["state"] == "offline"
    })
    .unwrap();
    assert!(
        blob_in_store(&daemon, &digest).is_none(),
        "an artifact entered the store although the link was cut after {sent} bytes"
    );
    let components = daemon.ctl(&["-o", "json", "components"]).json();
    assert!(!components.to_string().contains(&digest), "{components}");
    assert!(daemon
        .ctl(&["-o", "json", "ls"])
        .json()
        .as_array()
        .unwrap()
        .is_empty());

    // The link returns: the download starts over and the app serves the whole artifact.
    lattice.nats.restart();
    daemon.ctl_ok(&["sync", "now"]);
    wait_greeting(listen.parse().unwrap(), "big");
    let stored = blob_in_store(&daemon, &digest).expect("the artifact is in the store");
    assert_eq!(stored, std::fs::read(&big).unwrap());
    assert_eq!(daemon.app_status("big")["digest"], digest.as_str());
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`: (CA
/// certificate, server certificate, server key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cairn test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    server_params
        .distinguished_name
        .push(DnType::CommonName, "cairn test lattice");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

#[test]
fn a_device_syncs_over_tls_with_a_password_and_says_why_it_is_refused() {
    let test = "a_device_syncs_over_tls_with_a_password_and_says_why_it_is_refused";
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path());
    // TLS for every client; the device logs in, the operator's tools get the no-auth user.
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         authorization {{\n  users = [\n    {{ user: edge, password: \"right-horse\" }}\n    \
         {{ user: operator, password: \"operator-only\" }}\n  ]\n}}\nno_auth_user: operator\n",
        cert.display(),
        key.display()
    );
    let Some(lattice) = Lattice::start_with(test, Some(&config), Some(&ca)) else {
        return;
    };
    let url = lattice.nats.url();

    // Without the CA the server's certificate is not trusted, and cairnctl says what to give.
    let untrusted = fleet(&[
        "upload",
        "--nats",
        &url,
        component("hello").to_str().unwrap(),
    ]);
    assert_ne!(untrusted.code, 0);
    assert!(
        untrusted.stderr.contains("TLS failed") && untrusted.stderr.contains("--tls-ca"),
        "{}",
        untrusted.stderr
    );
    // With it (the lattice's upload went through already), publishing works too.
    let listen = format!("127.0.0.1:{}", free_port());
    let published = lattice.publish_with(
        &lattice.key,
        "edge-tls",
        "secure-web",
        &listen,
        "tls",
        "30d",
    );
    assert_eq!(published.code, 0, "publish: {}", published.stderr);
    let public = &lattice.public;

    // Without the CA, then with a wrong password: the device runs on, and its sync status
    // says what to fix each time.
    let device_config = format!(
        "[upstream]\nnats = \"{url}\"\ndevice = \"edge-tls\"\ntrusted_keys = [\"{public}\"]\n\
         user = \"edge\"\npassword = \"wrong-horse\"\n"
    );
    let mut daemon = Daemon::start_with(Some(&device_config), &[]);
    wait_for(
        "the untrusted certificate in the sync status",
        Duration::from_secs(30),
        || {
            sync_status(&daemon)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS failed") && e.contains("tls_ca"))
        },
    )
    .unwrap();
    daemon.stop();
    let config_path = daemon.dir.join("cairnd.toml");
    let mut config = std::fs::read_to_string(&config_path).unwrap();
    config.push_str(&format!("tls_ca = \"{}\"\n", ca.display()));
    std::fs::write(&config_path, &config).unwrap();
    daemon.restart();
    wait_for(
        "the refused login in the sync status",
        Duration::from_secs(30),
        || {
            sync_status(&daemon)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused this device's credentials"))
        },
    )
    .unwrap();
    let status = sync_status(&daemon);
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("[upstream] user and password"),
        "{status}"
    );
    assert_eq!(
        daemon.ctl(&["-o", "json", "ls"]).json(),
        serde_json::json!([])
    );

    // The right one: the device converges over TLS.
    daemon.stop();
    std::fs::write(&config_path, config.replace("wrong-horse", "right-horse")).unwrap();
    daemon.restart();
    let addr = listen.parse().unwrap();
    wait_for(
        "the device to converge over TLS",
        Duration::from_secs(30),
        || {
            get(addr, "/")
                .map(|r| r.body == "tls from cairn\n")
                .unwrap_or(false)
        },
    )
    .unwrap();
    assert_eq!(sync_status(&daemon)["state"], "connected");
}

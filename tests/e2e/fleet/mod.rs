//! Fleet sync against a real nats-server with JetStream, started by the test on a free port;
//! links are cut by ending the server process.

use cairn_tests::{component, fleet, fleet_ok, free_port, get, wait_for, Daemon, Lattice};
use std::time::Duration;

mod cluster;
mod convergence;
mod links;
mod privilege;
mod trust;

pub(super) fn sync_status(daemon: &Daemon) -> serde_json::Value {
    daemon.ctl(&["-o", "json", "sync", "status"]).json()
}

#[test]
fn a_device_converges_stays_up_offline_and_catches_up_to_the_latest() {
    let Some(mut lattice) =
        Lattice::start("a_device_converges_stays_up_offline_and_catches_up_to_the_latest")
    else {
        return;
    };
    // Figures go up every 10 s besides the reports a change sends.
    let config = format!(
        "{}report_every = \"10s\"\n",
        lattice.device_config("edge-1")
    );
    let daemon = Daemon::start_with(Some(&config), &[]);
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
    // The new pool serves a moment before its deploy is done and the app is listed.
    wait_for("the app to be listed", Duration::from_secs(10), || {
        daemon.ctl(&["-o", "json", "ls"]).json()[0]["owner"] == "fleet"
    })
    .unwrap();
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
    // With the app's figures: requests served since are in a later report, which no change
    // sent (the periodic one).
    for _ in 0..7 {
        assert_eq!(get(addr, "/").unwrap().status, 200);
    }
    let mut report = serde_json::Value::Null;
    wait_for("the figures upstream", Duration::from_secs(30), || {
        let result = fleet(&["-o", "json", "status", "--nats", &url, "--device", "edge-1"]);
        report = result.json()[0].clone();
        report["apps"][0]["figures"]["requests"]
            .as_u64()
            .is_some_and(|n| n >= 8)
    })
    .unwrap();
    let figures = &report["apps"][0]["figures"];
    assert!(figures["responses"][1].as_u64().unwrap() >= 8, "{report}");
    assert_eq!(figures["traps"], 0, "{report}");
    assert!(
        report["figures"]["store_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["figures"]["apps"], 1, "{report}");
    let table = fleet(&["status", "--nats", &url, "--device", "edge-1"]);
    assert!(
        table.stdout.contains("requests, 0 5xx") && table.stdout.contains("REQUESTS"),
        "{}",
        table.stdout
    );

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

// Over 100 lines: one scenario against one daemon, step by step, each step checked.
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
pub(super) fn wait_greeting(addr: std::net::SocketAddr, greeting: &str) {
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

#[test]
fn a_fleet_app_names_its_secrets_and_the_device_supplies_them() {
    use std::os::unix::fs::PermissionsExt;
    const VALUE: &str = "edge-7-token-c0ffee";
    let Some(lattice) =
        Lattice::start("a_fleet_app_names_its_secrets_and_the_device_supplies_them")
    else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("gw.toml");
    std::fs::write(&file, format!("api_token = \"{VALUE}\"\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "secrets_dir = \"{}\"\n{}",
        secrets.path().display(),
        lattice.device_config("edge-7")
    );
    let daemon = Daemon::start_with(Some(&config), &[]);
    let url = lattice.nats.url();
    let digest = fleet_ok(&[
        "upload",
        "--nats",
        &url,
        component("host_apis").to_str().unwrap(),
    ])
    .trim()
    .to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    // The document names the secret; its value is only on the device.
    let published = lattice.publish_state(
        &lattice.key,
        "edge-7",
        "gw",
        &format!(
            "[[app]]\nname = \"gw\"\ncomponent = \"{digest}\"\ndevice_secrets = [\"api_token\"]\n\
             [app.http]\nlisten = \"{listen}\"\nhealth = \"/health\"\n"
        ),
        "30d",
    );
    assert_eq!(published.code, 0, "{}", published.stderr);
    wait_for("the device to run gw", Duration::from_secs(60), || {
        get(addr, "/config-draft?api_token").is_ok_and(|r| r.body == VALUE)
    })
    .unwrap();
    wait_for("a report of gw", Duration::from_secs(30), || {
        lattice
            .reports("edge-7")
            .iter()
            .any(|r| r.to_string().contains("\"gw\""))
    })
    .unwrap();
    for report in lattice.reports("edge-7") {
        assert!(!report.to_string().contains(VALUE), "{report}");
    }
    assert!(!daemon.app_status("gw").to_string().contains(VALUE));
}

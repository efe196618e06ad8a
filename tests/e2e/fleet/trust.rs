//! Fleet identity and trust against a real nats-server: devices that share an image stay
//! apart, documents are bound to their key, versions are anchored, and what fails is retried on
//! its own.

use super::{sync_status, wait_greeting};
use cairn_tests::{free_port, get, wait_for, Daemon, Lattice};
use std::time::Duration;

/// Asks a device for `count` status reports (one per `sync now`).
fn report_times(daemon: &Daemon, count: usize) {
    for _ in 0..count {
        daemon.ctl_ok(&["sync", "now"]);
    }
}

fn status_reports(lattice: &Lattice, device: &str) -> Vec<serde_json::Value> {
    lattice
        .reports(device)
        .into_iter()
        .filter(|r| r["apps"].is_array())
        .collect()
}

fn rejected(daemon: &Daemon, needle: &str) -> bool {
    sync_status(daemon)["rejections"]
        .as_array()
        .is_some_and(|r| {
            r.iter()
                .any(|r| r["reason"].as_str().unwrap_or("").contains(needle))
        })
}

// Over 100 lines: one scenario (two devices, then a re-flash), each step checked.
#[test]
fn two_devices_from_one_image_and_a_reflashed_one_report_separately_and_nothing_is_deduplicated() {
    let Some(lattice) = Lattice::start("two_devices_from_one_image_report_separately") else {
        return;
    };
    // Same host, same config, no device id: as two devices flashed from one image.
    let config = lattice.unnamed_device_config(&[]);
    let first = Daemon::start_with(Some(&config), &[]);
    let second = Daemon::start_with(Some(&config), &[]);
    let (a, b) = (sync_status(&first), sync_status(&second));
    let host = nix::unistd::gethostname().unwrap();
    for status in [&a, &b] {
        let device = status["device"].as_str().unwrap();
        assert!(device.starts_with("cairn-"), "{status}");
        assert_ne!(
            device,
            host.to_str().unwrap(),
            "the host name is never the id"
        );
        assert_eq!(status["device_source"], "store");
        assert_eq!(status["installation"].as_str().unwrap().len(), 32);
    }
    assert_ne!(a["device"], b["device"], "two devices, one id");
    assert_ne!(a["installation"], b["installation"]);
    let (device_a, device_b) = (
        a["device"].as_str().unwrap().to_string(),
        b["device"].as_str().unwrap().to_string(),
    );
    // The id survives a restart.
    let mut first = first;
    first.stop();
    first.restart();
    assert_eq!(sync_status(&first)["device"], device_a.as_str());

    // Both report, each outbox row numbered from 1; nothing is dropped as a duplicate.
    for daemon in [&first, &second] {
        wait_for("the link", Duration::from_secs(30), || {
            sync_status(daemon)["state"] == "connected"
        })
        .unwrap();
        report_times(daemon, 5);
        wait_for("the outbox to drain", Duration::from_secs(30), || {
            sync_status(daemon)["backlog"] == 0
        })
        .unwrap();
    }
    for device in [&device_a, &device_b] {
        let reports = status_reports(&lattice, device);
        assert!(
            reports.len() >= 6,
            "{device}: {} status reports arrived: {reports:?}",
            reports.len()
        );
        assert!(reports.iter().all(|r| r["device"] == device.as_str()));
    }

    // A re-flash: the same configured device id, a new store. Its outbox rows start at 1
    // again; their message ids do not collide with the first installation's.
    let named = lattice.device_config("edge-reflash");
    let mut device = Daemon::start_with(Some(&named), &[]);
    wait_for("the link", Duration::from_secs(30), || {
        sync_status(&device)["state"] == "connected"
    })
    .unwrap();
    assert_eq!(sync_status(&device)["device_source"], "config");
    report_times(&device, 3);
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        sync_status(&device)["backlog"] == 0
    })
    .unwrap();
    let before = status_reports(&lattice, "edge-reflash").len();
    let old_installation = sync_status(&device)["installation"].clone();
    device.stop();
    std::fs::remove_dir_all(&device.state).unwrap();
    device.restart();
    assert_ne!(sync_status(&device)["installation"], old_installation);
    wait_for("the link", Duration::from_secs(30), || {
        sync_status(&device)["state"] == "connected"
    })
    .unwrap();
    report_times(&device, 3);
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        sync_status(&device)["backlog"] == 0
    })
    .unwrap();
    let after = status_reports(&lattice, "edge-reflash").len();
    assert!(
        after >= before + 4,
        "the re-flashed device's reports were dropped: {before} before, {after} after"
    );
}

#[test]
fn a_document_copied_under_another_key_is_refused_as_mix_and_match() {
    let Some(lattice) = Lattice::start("a_document_copied_under_another_key_is_refused") else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config_in("edge-m", &["north"])), &[]);
    let (mine, group) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    lattice.publish("edge-m", "mine", &mine, "mine");
    wait_greeting(mine.parse().unwrap(), "mine");
    // The group's document, at a higher version than the device's.
    for greeting in ["g1", "g2", "g3"] {
        lattice.publish("group:north", "grouped", &group, greeting);
    }
    wait_greeting(group.parse().unwrap(), "g3");

    // Copied into the device's own key it would win over everything the device runs.
    lattice.kv_put("device.edge-m", lattice.kv_get("group.north"));
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the copy to be refused", Duration::from_secs(30), || {
        rejected(&daemon, "mix-and-match")
    })
    .unwrap();
    assert_eq!(
        get(mine.parse().unwrap(), "/").unwrap().body,
        "mine from cairn\n"
    );
    let status = sync_status(&daemon);
    let device_key = status["applied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "device.edge-m")
        .cloned()
        .unwrap();
    assert_eq!(device_key["version"], 1, "{status}");
    // And the upstream hears of it.
    wait_for("the refusal upstream", Duration::from_secs(30), || {
        lattice.reports("edge-m").iter().any(|r| {
            r["event"] == "rejected" && r["reason"].as_str().unwrap_or("").contains("mix-and-match")
        })
    })
    .unwrap();
}

// Over 100 lines: one scenario, each step checked.
#[test]
fn versions_survive_a_deleted_bucket_and_concurrent_publishes_never_split_the_fleet() {
    let Some(lattice) = Lattice::start("versions_survive_a_deleted_bucket") else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config("edge-v")), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    lattice.publish("edge-v", "web", &listen, "one");
    lattice.publish("edge-v", "web", &listen, "two");
    wait_greeting(addr, "two");
    // The device reports version 2 applied.
    wait_for("the report of version 2", Duration::from_secs(30), || {
        status_reports(&lattice, "edge-v").iter().any(|r| {
            r["applied"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["version"] == 2))
        })
    })
    .unwrap();

    // The whole bucket is deleted (an operator's mistake, a rebuilt upstream).
    let url = lattice.nats.url();
    lattice.block_on(async move {
        let client = async_nats::connect(url).await.unwrap();
        async_nats::jetstream::new(client)
            .delete_key_value("cairn-desired")
            .await
            .unwrap();
    });
    // An explicit version the device would refuse as stale is refused at publish.
    let state = lattice.dir.path().join("web-three.toml");
    std::fs::write(
        &state,
        format!(
            "[[app]]\nname = \"web\"\ncomponent = \"{}\"\n[app.http]\nlisten = \"{listen}\"\n[app.env]\nGREETING = \"three\"\n",
            lattice.digest
        ),
    )
    .unwrap();
    let publish = |extra: &[&str], env: Option<&std::path::Path>| {
        let mut args: Vec<&str> = vec!["publish"];
        args.extend(lattice.upstream.iter().map(String::as_str));
        args.extend(["--key", lattice.key.to_str().unwrap(), "--device", "edge-v"]);
        args.extend(extra);
        args.push(state.to_str().unwrap());
        let (_, cairnctl) = cairn_tests::binaries();
        let mut command = std::process::Command::new(cairnctl);
        command.arg("fleet").args(&args);
        if let Some(pause) = env {
            command.env("CAIRNCTL_TEST_PAUSE_BEFORE_WRITE", pause);
        }
        command
    };
    let refused = publish(&["--version", "2"], None).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("version 2 is not above 2")
            && stderr.contains("highest a device reports applied: 2"),
        "{stderr}"
    );
    // Without one, the version continues from what the device reported: 3, which it applies.
    let out = publish(&[], None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("published version 3"));
    wait_greeting(addr, "three");

    // Two publishes at once: the first has read version 3 and waits; the second lands (4);
    // the first then finds the key moved and writes nothing.
    let pause = lattice.dir.path().join("pause");
    let mut slow = publish(&[], Some(&pause))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "the first publish to pause",
        Duration::from_secs(20),
        || pause.exists(),
    )
    .unwrap();
    std::fs::write(
        &state,
        std::fs::read_to_string(&state)
            .unwrap()
            .replace("three", "four"),
    )
    .unwrap();
    let fast = publish(&[], None).output().unwrap();
    assert!(
        fast.status.success(),
        "{}",
        String::from_utf8_lossy(&fast.stderr)
    );
    assert!(String::from_utf8_lossy(&fast.stdout).contains("published version 4"));
    std::fs::remove_file(&pause).unwrap();
    let status = cairn_tests::wait_child(&mut slow, Duration::from_secs(30)).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut slow.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "both publishes of version 4 landed");
    assert!(
        stderr.contains("another publish to device.edge-v landed")
            && stderr.contains("nothing was written"),
        "{stderr}"
    );
    wait_greeting(addr, "four");
    let signed: serde_json::Value =
        serde_json::from_slice(&lattice.kv_get("device.edge-v")).unwrap();
    assert!(signed["payload"]
        .as_str()
        .unwrap()
        .contains("\"version\":4"));
    wait_for("version 4 applied", Duration::from_secs(20), || {
        sync_status(&daemon)["applied"][0]["version"] == 4
    })
    .unwrap();
}

// Over 100 lines: one scenario (trust, rotate, revoke, replay), each step checked.
#[test]
fn signing_keys_rotate_and_revoke_through_a_root_delegation() {
    let Some(lattice) = Lattice::start("signing_keys_rotate_and_revoke_through_a_root_delegation")
    else {
        return;
    };
    let dir = lattice.dir.path();
    let keygen = |name: &str| {
        let path = dir.join(name);
        let public = cairn_tests::fleet_ok(&["keygen", "--out", path.to_str().unwrap()])
            .trim()
            .to_string();
        (path, public)
    };
    let (root, root_public) = keygen("root.key");
    let (old, old_public) = keygen("old.key");
    let (new, new_public) = keygen("new.key");
    // The device trusts the root only.
    let config = format!(
        "[upstream]\nnats = \"{}\"\ndevice = \"edge-r\"\ntrusted_roots = [\"{root_public}\"]\n",
        lattice.nats.url()
    );
    let daemon = Daemon::start_with(Some(&config), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = listen.parse().unwrap();
    let publish = |key: &std::path::Path, greeting: &str| {
        let result = lattice.publish_with(key, "edge-r", "rotated", &listen, greeting, "30d");
        assert_eq!(result.code, 0, "{}", result.stderr);
    };
    let delegate = |keys: &[&str]| {
        let mut args: Vec<&str> = vec!["delegate"];
        args.extend(lattice.upstream.iter().map(String::as_str));
        args.extend(["--root", root.to_str().unwrap()]);
        for key in keys {
            args.extend(["--signing-key", key]);
        }
        cairn_tests::fleet_ok(&args)
    };

    // Signed by a key no root delegated yet: refused.
    publish(&old, "one");
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the undelegated key refused",
        Duration::from_secs(30),
        || rejected(&daemon, "does not trust"),
    )
    .unwrap();
    // The root delegates it: the document refused before applies, with no new publish.
    assert!(delegate(&[&old_public]).contains("published delegation 1"));
    wait_greeting(addr, "one");
    assert_eq!(sync_status(&daemon)["delegation"]["serial"], 1);
    let first_delegation = lattice.kv_get("trust.delegation");

    // Rotation: both keys, then the new one publishes.
    delegate(&[&old_public, &new_public]);
    wait_for("delegation 2", Duration::from_secs(30), || {
        sync_status(&daemon)["delegation"]["serial"] == 2
    })
    .unwrap();
    publish(&new, "two");
    wait_greeting(addr, "two");

    // A document the old key signed while still trusted, waiting for its artifact when the
    // key is revoked, is not applied once the artifact appears: a retry checks it again.
    let late = cairn_tests::padded_hello(&dir.join("late.wasm"), b'R', 300 << 10);
    let late_digest = cairn_tests::digest_of(&std::fs::read(&late).unwrap());
    let pending = lattice.publish_component(
        &old,
        "edge-r",
        &late_digest,
        "rotated",
        &listen,
        "pending",
        "30d",
    );
    assert_eq!(pending.code, 0, "{}", pending.stderr);
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the pending artifact failure",
        Duration::from_secs(30),
        || rejected(&daemon, &late_digest),
    )
    .unwrap();

    // Revocation: the new key alone. The old key's next document is refused.
    delegate(&[&new_public]);
    wait_for("delegation 3", Duration::from_secs(30), || {
        sync_status(&daemon)["delegation"]["serial"] == 3
    })
    .unwrap();
    let mut upload: Vec<&str> = vec!["upload"];
    upload.extend(lattice.upstream.iter().map(String::as_str));
    upload.push(late.to_str().unwrap());
    cairn_tests::fleet_ok(&upload);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        get(addr, "/").unwrap().body,
        "two from cairn\n",
        "a document of the revoked key was applied by a retry"
    );
    publish(&old, "revoked");
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the revoked key refused", Duration::from_secs(30), || {
        rejected(&daemon, "does not trust")
            && sync_status(&daemon)["rejections"][0]["key"] == "device.edge-r"
    })
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "two from cairn\n");

    // A replay of delegation 1 (which named the revoked key) is refused, and the old key
    // stays refused; a delegation signed by a signing key, not the root, too.
    lattice.kv_put("trust.delegation", first_delegation);
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the replayed delegation refused",
        Duration::from_secs(30),
        || rejected(&daemon, "not newer than the serial 3"),
    )
    .unwrap();
    assert_eq!(sync_status(&daemon)["delegation"]["serial"], 3);
    let mut args: Vec<&str> = vec!["delegate"];
    args.extend(lattice.upstream.iter().map(String::as_str));
    args.extend([
        "--root",
        new.to_str().unwrap(),
        "--signing-key",
        &old_public,
    ]);
    cairn_tests::fleet_ok(&args);
    daemon.ctl_ok(&["sync", "now"]);
    wait_for(
        "the signing key's delegation refused",
        Duration::from_secs(30),
        || rejected(&daemon, "not one of this device's roots"),
    )
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "two from cairn\n");

    // The held delegation survives a restart: the old key is still refused after it.
    let mut daemon = daemon;
    daemon.stop();
    daemon.restart();
    assert_eq!(sync_status(&daemon)["delegation"]["serial"], 3);
    publish(&new, "three");
    wait_greeting(addr, "three");
}

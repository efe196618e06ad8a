//! Least privilege upstream: each device has NATS credentials of its own that the server
//! confines to reading its own and its groups' desired state and the artifacts, and to
//! publishing its own reports. The README's provisioning section describes the same
//! permissions; this test holds the server to them from the attacker's side.

use super::{sync_status, wait_greeting};
use cairn_tests::{free_port, wait_for, Daemon, Lattice};
use std::time::Duration;

/// The permissions of device `id` in groups `groups`, in nats-server's syntax.
fn device_user(id: &str, password: &str, groups: &[&str]) -> String {
    device_user_with(id, password, groups, true)
}

/// As `device_user`; without `pull`, the set before artifacts were pulled (no
/// `CONSUMER.MSG.NEXT` on the artifact stream).
fn device_user_with(id: &str, password: &str, groups: &[&str], pull: bool) -> String {
    let mut keys = vec![format!("device.{id}"), "trust.delegation".to_string()];
    keys.extend(groups.iter().map(|g| format!("group.{g}")));
    let mut allow = vec![
        format!("cairn.report.{id}.>"),
        "$JS.API.STREAM.INFO.KV_cairn-desired".to_string(),
        "$JS.API.STREAM.INFO.OBJ_cairn-artifacts".to_string(),
        "$JS.API.STREAM.INFO.CAIRN_REPORTS".to_string(),
        "$JS.API.DIRECT.GET.OBJ_cairn-artifacts.>".to_string(),
        "$JS.API.CONSUMER.CREATE.OBJ_cairn-artifacts".to_string(),
        "$JS.API.CONSUMER.CREATE.OBJ_cairn-artifacts.>".to_string(),
        "$JS.FC.>".to_string(),
    ];
    if pull {
        // Artifacts are pulled (a bounded window), so the device asks for the next chunks.
        allow.push("$JS.API.CONSUMER.MSG.NEXT.OBJ_cairn-artifacts.*".to_string());
    }
    for key in &keys {
        allow.push(format!(
            "$JS.API.DIRECT.GET.KV_cairn-desired.$KV.cairn-desired.{key}"
        ));
        allow.push(format!(
            "$JS.API.CONSUMER.CREATE.KV_cairn-desired.*.$KV.cairn-desired.{key}"
        ));
    }
    let allow: Vec<String> = allow.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "{{ user: \"{id}\", password: \"{password}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX_{id}.>\"] }} }} }}",
        allow.join(", ")
    )
}

/// What a process holding device `id`'s credentials can do, tried directly.
struct Attempts {
    read_other: bool,
    watch_other: bool,
    write_desired: bool,
    report_as_other: bool,
    read_own: bool,
}

fn attempt(lattice: &Lattice, id: &str, password: &str, other: &str) -> Attempts {
    use async_nats::jetstream::{self, consumer};
    let url = lattice.nats.url();
    let (id, password, other) = (id.to_string(), password.to_string(), other.to_string());
    lattice.block_on(async move {
        let client = async_nats::ConnectOptions::with_user_and_password(id.clone(), password)
            .custom_inbox_prefix(format!("_INBOX_{id}"))
            .request_timeout(Some(Duration::from_secs(2)))
            .connect(url)
            .await
            .unwrap();
        let js = jetstream::new(client.clone());
        let kv = js.get_key_value("cairn-desired").await.unwrap();
        let read_own = matches!(kv.get(format!("device.{id}")).await, Ok(Some(_)));
        let read_other = matches!(kv.get(format!("device.{other}")).await, Ok(Some(_)));
        let stream = js.get_stream("KV_cairn-desired").await.unwrap();
        let watch_other = stream
            .create_consumer(consumer::push::OrderedConfig {
                name: Some(format!("sneak_{id}")),
                deliver_subject: client.new_inbox(),
                filter_subject: format!("$KV.cairn-desired.device.{other}"),
                ..Default::default()
            })
            .await
            .is_ok();
        let write_desired = match tokio::time::timeout(
            Duration::from_secs(3),
            kv.put(format!("device.{id}"), "forged".into()),
        )
        .await
        {
            Ok(Ok(_)) => true,
            Ok(Err(_)) | Err(_) => false,
        };
        let report_as_other = match js
            .publish(format!("cairn.report.{other}.status"), "forged".into())
            .await
        {
            Ok(ack) => matches!(
                tokio::time::timeout(Duration::from_secs(3), ack).await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        };
        Attempts {
            read_other,
            watch_other,
            write_desired,
            report_as_other,
            read_own,
        }
    })
}

// Over 100 lines: one scenario, each step checked.
#[test]
fn each_device_reads_only_its_own_state_and_reports_only_as_itself() {
    let config = format!(
        "authorization {{\n  users = [\n    {{ user: operator, password: \"operator-only\" }}\n    {}\n    {}\n  ]\n}}\nno_auth_user: operator\n",
        device_user("edge-a", "pass-a", &["north"]),
        device_user("edge-b", "pass-b", &[]),
    );
    let Some(lattice) =
        Lattice::start_with("each_device_reads_only_its_own_state", Some(&config), None)
    else {
        return;
    };
    let (mine, north, theirs) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    lattice.publish("edge-a", "mine", &mine, "mine");
    lattice.publish("group:north", "north", &north, "north");
    lattice.publish("edge-b", "theirs", &theirs, "secret");

    // edge-a with its own credentials: the report stream does not exist yet and the device
    // may not make it, so reports wait; desired state applies all the same.
    let device_config = format!(
        "[upstream]\nnats = \"{}\"\ndevice = \"edge-a\"\ngroups = [\"north\"]\nuser = \"edge-a\"\npassword = \"pass-a\"\ntrusted_keys = [\"{}\"]\n",
        lattice.nats.url(),
        lattice.public
    );
    let daemon = Daemon::start_with(Some(&device_config), &[]);
    wait_greeting(mine.parse().unwrap(), "mine");
    wait_greeting(north.parse().unwrap(), "north");
    assert!(cairn_tests::get(theirs.parse().unwrap(), "/").is_err());
    let status = sync_status(&daemon);
    assert_eq!(status["state"], "connected", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("fleet init"),
        "{status}"
    );
    assert!(status["backlog"].as_u64().unwrap() > 0, "{status}");

    // The operator makes the upstream's streams; the device's reports then flow.
    let made = lattice.init();
    assert!(made.contains("made CAIRN_REPORTS"), "{made}");
    daemon.ctl_ok(&["sync", "now"]);
    wait_for("the backlog to drain", Duration::from_secs(30), || {
        sync_status(&daemon)["backlog"] == 0
    })
    .unwrap();
    assert!(lattice
        .reports("edge-a")
        .iter()
        .any(|r| r["device"] == "edge-a" && r["apps"].is_array()));

    // From the attacker's side: edge-a's credentials, used directly.
    let tried = attempt(&lattice, "edge-a", "pass-a", "edge-b");
    assert!(tried.read_own, "the device cannot read its own document");
    assert!(!tried.read_other, "edge-a read edge-b's desired state");
    assert!(!tried.watch_other, "edge-a watched edge-b's desired state");
    assert!(!tried.write_desired, "edge-a wrote desired state");
    assert!(
        !tried.report_as_other,
        "edge-a published a report as edge-b"
    );
    // Nothing it tried landed.
    let signed: serde_json::Value =
        serde_json::from_slice(&lattice.kv_get("device.edge-a")).unwrap();
    assert!(signed["payload"].is_string());
    assert!(lattice.reports("edge-b").is_empty());
    // The server logged the refusals (it, not cairn, enforces them).
    let log = lattice.nats.log();
    for subject in [
        "$JS.API.DIRECT.GET.KV_cairn-desired.$KV.cairn-desired.device.edge-b",
        "$JS.API.CONSUMER.CREATE.KV_cairn-desired.sneak_edge-a.$KV.cairn-desired.device.edge-b",
        "$KV.cairn-desired.device.edge-a",
        "cairn.report.edge-b.status",
    ] {
        assert!(
            log.contains(&format!("Publish Violation - Subject \"{subject}\"")),
            "no refusal of {subject}: {log}"
        );
    }
    // cairnd itself needed nothing beyond these permissions: its only refusal was making the
    // report stream before `fleet init`.
    let cairnd_refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cairnd edge-a") && l.contains("Violation"))
        .collect();
    assert!(
        cairnd_refusals
            .iter()
            .all(|l| l.contains("$JS.API.STREAM.CREATE.CAIRN_REPORTS")),
        "{cairnd_refusals:#?}"
    );
}

#[test]
fn a_device_confined_without_the_pull_permission_is_told_what_it_lacks() {
    let config = format!(
        "authorization {{\n  users = [\n    {{ user: operator, password: \"operator-only\" }}\n    {}\n  ]\n}}\nno_auth_user: operator\n",
        device_user_with("edge-c", "pass-c", &[], false),
    );
    let Some(lattice) = Lattice::start_with("confined_without_pull", Some(&config), None) else {
        return;
    };
    lattice.init();
    let addr = format!("127.0.0.1:{}", free_port());
    lattice.publish("edge-c", "web", &addr, "web");
    let device_config = format!(
        "[upstream]\nnats = \"{}\"\ndevice = \"edge-c\"\nuser = \"edge-c\"\npassword = \"pass-c\"\ntrusted_keys = [\"{}\"]\n",
        lattice.nats.url(),
        lattice.public
    );
    let daemon = Daemon::start_with(Some(&device_config), &[]);
    // The pull requests are refused by the server; after the stall the device says why.
    wait_for(
        "the refusal to name the missing permission",
        Duration::from_secs(60),
        || {
            sync_status(&daemon)["rejections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["key"] == "device.edge-c"
                        && r["reason"]
                            .as_str()
                            .is_some_and(|reason| reason.contains("CONSUMER.MSG.NEXT"))
                })
        },
    )
    .unwrap();
    assert!(cairn_tests::get(addr.parse().unwrap(), "/").is_err());
    assert!(lattice
        .nats
        .log()
        .contains("Publish Violation - Subject \"$JS.API.CONSUMER.MSG.NEXT.OBJ_cairn-artifacts."));
}

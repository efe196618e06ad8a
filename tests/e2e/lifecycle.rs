//! Push, deploy, inspect, roll back, remove, and come back after a restart.

use cairn_tests::{component, get, is_listening, wait_for, Daemon};
use std::time::Duration;

// Over 100 lines: one scenario against one daemon, step by step, each step checked.
#[test]
fn push_deploy_from_a_manifest_and_inspect() {
    let daemon = Daemon::start();
    let hello = component("hello");

    // push prints the digest, and pushing again is harmless.
    let digest = daemon
        .ctl_ok(&["push", hello.to_str().unwrap()])
        .trim()
        .to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let again = daemon
        .ctl(&["-o", "json", "push", hello.to_str().unwrap()])
        .json();
    assert_eq!(again["digest"], digest.as_str());
    assert_eq!(again["already_present"], true);

    // A manifest names its component by a path relative to itself.
    let port = cairn_tests::free_port();
    std::fs::copy(&hello, daemon.dir.join("hello.wasm")).unwrap();
    std::fs::write(
        daemon.dir.join("app.toml"),
        format!(
            "name = \"hello\"\ncomponent = \"hello.wasm\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [limits]\nmemory = \"32MiB\"\ninstances = 8\ntimeout = \"2s\"\n[env]\nGREETING = \"hi\"\n"
        ),
    )
    .unwrap();
    let out = daemon.ctl_ok(&[
        "deploy",
        "-f",
        daemon.dir.join("app.toml").to_str().unwrap(),
    ]);
    assert!(out.contains("hello generation 1 is running"), "{out}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let response = get(addr, "/").unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "hi from cairn\n")
    );
    assert_eq!(get(addr, "/env?GREETING").unwrap().body, "hi");

    // The same manifest again changes nothing.
    let out = daemon.ctl_ok(&[
        "deploy",
        "-f",
        daemon.dir.join("app.toml").to_str().unwrap(),
    ]);
    assert!(out.contains("nothing changed"), "{out}");

    // ls: table and JSON.
    let table = daemon.ctl_ok(&["ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("hello")
            && table.contains("running")
            && table.contains(&format!("127.0.0.1:{port}")),
        "{table}"
    );
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    let app = &apps.as_array().unwrap()[0];
    assert_eq!(app["name"], "hello");
    assert_eq!(app["generation"], 1);
    assert_eq!(app["status"], "running");
    assert_eq!(app["digest"], digest.as_str());
    assert_eq!(app["listen"], format!("127.0.0.1:{port}"));

    // components shows what uses what.
    let components = daemon.ctl(&["-o", "json", "components"]).json();
    let row = components
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["digest"] == digest.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["used_by"][0], "hello");
    assert!(daemon.ctl_ok(&["components"]).contains("hello:latest"));

    // status: daemon and app.
    let status = daemon.ctl(&["-o", "json", "status"]).json();
    assert_eq!(status["apps"], 1);
    assert_eq!(status["apps_running"], 1);
    let limits = status["limits"].as_str().unwrap();
    if cairn_tests::is_root() {
        assert!(limits.starts_with("enforced with cgroup v"), "{limits}");
    } else {
        assert!(limits.starts_with("not enforced: "), "{limits}");
    }
    let detail = daemon.app_status("hello");
    assert_eq!(detail["allocator"], "pooling");
    let limits = detail["limits"].as_array().unwrap();
    assert!(limits
        .iter()
        .any(|l| l["name"] == "memory" && l["value"] == "32MiB"));
    assert!(limits
        .iter()
        .any(|l| l["name"] == "instances" && l["value"] == "8"));
    assert!(limits
        .iter()
        .any(|l| l["name"] == "timeout" && l["value"] == "2s"));
    assert!(daemon.ctl_ok(&["status", "hello"]).contains("limit memory"));

    // logs: the guest's stdout and stderr, and cairn's own notes.
    assert_eq!(get(addr, "/log").unwrap().status, 200);
    cairn_tests::wait_for(
        "the log lines to be stored",
        std::time::Duration::from_secs(10),
        || {
            daemon
                .ctl_ok(&["logs", "hello"])
                .contains("log line to stderr")
        },
    )
    .unwrap();
    let logs = daemon.ctl_ok(&["logs", "hello"]);
    assert!(logs.contains("[stdout] log line to stdout"), "{logs}");
    assert!(logs.contains("[stderr] log line to stderr"), "{logs}");
    assert!(logs.contains("[cairn] deployed generation 1"), "{logs}");
    let tail = daemon.ctl_ok(&["logs", "hello", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains("log line to stderr"), "{tail}");
}

#[test]
fn generations_roll_back_and_apps_are_removed() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("web", &["--env", "GREETING=one"]);
    assert_eq!(get(addr, "/").unwrap().body, "one from cairn\n");
    let listen = addr.to_string();
    let hello = component("hello");
    daemon.ctl_ok(&[
        "deploy",
        "web",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--env",
        "GREETING=two",
    ]);
    assert_eq!(get(addr, "/").unwrap().body, "two from cairn\n");
    assert_eq!(daemon.app_status("web")["generation"], 2);

    let out = daemon.ctl_ok(&["rollback", "web"]);
    assert!(out.contains("back at generation 1"), "{out}");
    assert_eq!(get(addr, "/").unwrap().body, "one from cairn\n");
    // Nothing before generation 1.
    let none = daemon.ctl(&["rollback", "web"]);
    assert_eq!(none.code, 5, "{none:?}");
    assert!(
        none.stderr.contains("no generation before"),
        "{}",
        none.stderr
    );
    // Forward again by number.
    daemon.ctl_ok(&["rollback", "web", "--to", "2"]);
    assert_eq!(get(addr, "/").unwrap().body, "two from cairn\n");
    let missing = daemon.ctl(&["rollback", "web", "--to", "9"]);
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(
        missing.stderr.contains("has no generation 9; it has 1, 2"),
        "{}",
        missing.stderr
    );
    let generations = daemon.app_status("web")["generations"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(generations, 2);

    // Moving to another address binds the new one before letting go of the old.
    let moved = format!("127.0.0.1:{}", cairn_tests::free_port());
    daemon.ctl_ok(&[
        "deploy",
        "web",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &moved,
        "--env",
        "GREETING=three",
    ]);
    let moved_addr = moved.parse().unwrap();
    assert_eq!(get(moved_addr, "/").unwrap().body, "three from cairn\n");
    cairn_tests::wait_for(
        "the old address to close",
        std::time::Duration::from_secs(15),
        || !is_listening(addr),
    )
    .unwrap();

    daemon.ctl_ok(&["rm", "web"]);
    assert!(!is_listening(moved_addr));
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    assert_eq!(apps.as_array().unwrap().len(), 0);
    let again = daemon.ctl(&["rm", "web"]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(
        again.stderr.contains("no app named `web`"),
        "{}",
        again.stderr
    );
}

#[test]
fn apps_come_back_after_sigterm_and_kill_9_without_recompiling() {
    let mut daemon = Daemon::start();
    let addr = daemon.deploy_hello("keeper", &["--env", "GREETING=first"]);
    let listen = addr.to_string();
    let hello = component("hello");
    daemon.ctl_ok(&[
        "deploy",
        "keeper",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--env",
        "GREETING=second",
    ]);
    assert_eq!(daemon.ctl(&["-o", "json", "status"]).json()["compiled"], 1);

    let status = daemon.stop();
    assert!(
        status.success(),
        "cairnd exited with {status} after SIGTERM"
    );
    assert!(!is_listening(addr));
    daemon.restart();
    assert_eq!(get(addr, "/").unwrap().body, "second from cairn\n");
    assert_eq!(daemon.app_status("keeper")["generation"], 2);
    let status = daemon.ctl(&["-o", "json", "status"]).json();
    assert_eq!(
        status["compiled"], 0,
        "a restart must load precompiled code: {status}"
    );
    assert_eq!(status["cache_hits"], 1, "{status}");

    daemon.kill9();
    daemon.restart();
    assert_eq!(get(addr, "/").unwrap().body, "second from cairn\n");
    assert_eq!(daemon.app_status("keeper")["generation"], 2);
    assert_eq!(daemon.ctl(&["-o", "json", "status"]).json()["compiled"], 0);
    // Rollback history survived too.
    daemon.ctl_ok(&["rollback", "keeper"]);
    assert_eq!(get(addr, "/").unwrap().body, "first from cairn\n");
}

#[test]
fn stale_or_damaged_precompiled_code_is_recompiled() {
    let mut daemon = Daemon::start();
    let addr = daemon.deploy_hello("fresh", &[]);
    daemon.stop();

    // As if wasmtime or the CPU had changed: the cached code's fingerprint no longer matches.
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    assert_eq!(
        db.execute(
            "UPDATE compiled SET fingerprint = 'wasmtime-of-another-age'",
            []
        )
        .unwrap(),
        1
    );
    drop(db);
    daemon.restart();
    assert_eq!(get(addr, "/").unwrap().status, 200);
    assert_eq!(daemon.ctl(&["-o", "json", "status"]).json()["compiled"], 1);
    daemon.stop();
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    let stale: i64 = db
        .query_row(
            "SELECT count(*) FROM compiled WHERE fingerprint = 'wasmtime-of-another-age'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stale, 0, "code no engine can use is dropped");

    // Damaged bytes are never handed to wasmtime: they fail their checksum and are rebuilt.
    assert_eq!(
        db.execute("UPDATE compiled SET data = zeroblob(length(data))", [])
            .unwrap(),
        1
    );
    drop(db);
    daemon.restart();
    assert_eq!(get(addr, "/").unwrap().status, 200);
    assert_eq!(daemon.ctl(&["-o", "json", "status"]).json()["compiled"], 1);
    daemon.stop();

    // Code cached by a cairnd that kept no facts about it (the pool's sizing) is still used,
    // not recompiled; the facts are learnt once and recorded.
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    assert_eq!(
        db.execute("UPDATE compiled SET facts = NULL", []).unwrap(),
        1
    );
    drop(db);
    daemon.restart();
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let status = daemon.ctl(&["-o", "json", "status"]).json();
    assert_eq!(status["compiled"], 0, "{status}");
    assert_eq!(status["cache_hits"], 1, "{status}");
    daemon.stop();
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    let facts: String = db
        .query_row("SELECT facts FROM compiled", [], |r| r.get(0))
        .unwrap();
    assert!(facts.contains("\"memories\":1"), "{facts}");
}

#[test]
fn restored_apps_answer_from_ready_while_their_pools_start() {
    let mut daemon = Daemon::start();
    let names: Vec<String> = (0..12).map(|i| format!("app{i:02}")).collect();
    let addrs: Vec<_> = names
        .iter()
        .map(|name| daemon.deploy_hello(name, &[]))
        .collect();
    daemon.stop();
    daemon.restart();
    // READY came once every address was bound; pools start behind it, and a connection to an
    // app whose pool has not started yet starts it at once. Ask the last app first.
    let early = daemon.ctl(&["-o", "json", "ls"]).json();
    for app in early.as_array().unwrap() {
        assert!(
            app["status"] == "starting" || app["status"] == "running",
            "{app}"
        );
    }
    for addr in addrs.iter().rev() {
        assert_eq!(get(*addr, "/").unwrap().status, 200);
    }
    wait_for("every pool to run", Duration::from_secs(60), || {
        let apps = daemon.ctl(&["-o", "json", "ls"]).json();
        apps.as_array()
            .unwrap()
            .iter()
            .all(|app| app["status"] == "running")
    })
    .unwrap();
    for name in &names {
        assert_ne!(daemon.app_status(name)["pid"], 0, "{name}");
    }
    // Each app has exactly one pool process (where a connection and the background start both
    // made one, the one not wanted was stopped), beside the one spare.
    wait_for(
        "one pool process per app and a spare",
        Duration::from_secs(30),
        || daemon.children().len() == names.len() + 1,
    )
    .unwrap();
    let pids: std::collections::BTreeSet<u64> = names
        .iter()
        .map(|name| daemon.app_status(name)["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), names.len());
}

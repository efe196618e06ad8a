//! Apps' key-value state (`wasi:keyvalue` 0.2 draft and Spin's `key-value`), with components
//! built by the ecosystems' own toolchains: `host-apis` (wit-bindgen from the upstream WIT,
//! both interfaces) and `spin-app` (spin-sdk). The data is the app's, kept by cairnd in
//! `STATE/kv/APP.db`: it outlives pools, cairnd, generations and rollbacks, is bounded by the
//! app's quota, and no other app or pool can reach it.

use cairn_tests::{get, is_root, wait_for, Daemon};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::time::Duration;

fn answer(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = get(addr, path).unwrap();
    (response.status, response.body)
}

fn ok(addr: SocketAddr, path: &str) -> String {
    let (status, body) = answer(addr, path);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn deploy(daemon: &Daemon, name: &str, component: &str, tables: &str) -> SocketAddr {
    daemon.deploy_manifest(name, component, &format!("health = \"/health\"\n{tables}"))
}

fn pool_pid(daemon: &Daemon, app: &str) -> i32 {
    daemon.app_status(app)["pid"].as_u64().unwrap() as i32
}

/// Waits until `app` serves from a pool other than `old`.
fn wait_new_pool(daemon: &Daemon, app: &str, old: i32) {
    wait_for("a new pool", Duration::from_secs(30), || {
        let pid = daemon.app_status(app)["pid"].as_u64().unwrap_or(0) as i32;
        pid != 0 && pid != old
    })
    .unwrap();
}

#[test]
fn both_interfaces_share_one_store_that_outlives_kill_9_and_rollback() {
    let mut daemon = Daemon::start();
    let app = deploy(
        &daemon,
        "sensors",
        "host_apis",
        "[keyvalue]\nquota = \"1MiB\"\n",
    );

    // wasi:keyvalue store, atomics and batch; Spin's interface reads the same data.
    assert_eq!(ok(app, "/kv/set?reading=42"), "ok");
    assert_eq!(ok(app, "/kv/get?reading"), "42");
    assert_eq!(ok(app, "/spin-kv/get?reading"), "42");
    assert_eq!(answer(app, "/kv/get?missing").0, 404);
    assert_eq!(ok(app, "/kv/incr?count"), "1");
    assert_eq!(ok(app, "/kv/incr?count"), "2");
    assert_eq!(ok(app, "/kv/batch?b=50"), "50 found, 1 absent");
    assert_eq!(ok(app, "/kv/keys"), "reading\ncount\n");
    // The app's one store answers to "" and "default"; any other name is no store.
    assert_eq!(ok(app, "/kv/open?default"), "opened");
    let (status, body) = answer(app, "/kv/open?elsewhere");
    assert_eq!((status, body.as_str()), (500, "Error::NoSuchStore"));

    // kill -9 of the pool right after a write it saw succeed.
    assert_eq!(ok(app, "/kv/set?last=before-pool-kill"), "ok");
    let pool = pool_pid(&daemon, "sensors");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_new_pool(&daemon, "sensors", pool);
    assert_eq!(ok(app, "/kv/get?last"), "before-pool-kill");

    // kill -9 of cairnd right after a write the guest saw succeed.
    assert_eq!(ok(app, "/kv/set?last=before-cairnd-kill"), "ok");
    daemon.kill9();
    daemon.restart();
    assert_eq!(ok(app, "/kv/get?last"), "before-cairnd-kill");
    assert_eq!(ok(app, "/kv/get?count"), "2");

    // The data is the app's, not a generation's: a new generation and a rollback keep it.
    let manifest = daemon.dir.join("sensors.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("{text}[env]\nGENERATION = \"2\"\n")).unwrap();
    daemon.ctl_ok(&["deploy", "-f", manifest.to_str().unwrap()]);
    assert_eq!(ok(app, "/kv/set?written-by=2"), "ok");
    daemon.ctl_ok(&["rollback", "sensors"]);
    assert_eq!(daemon.app_status("sensors")["generation"], 1);
    assert_eq!(ok(app, "/kv/get?written-by"), "2");
    assert_eq!(ok(app, "/kv/get?reading"), "42");

    let status = daemon.app_status("sensors");
    assert_eq!(status["keyvalue"]["quota"], 1 << 20);
    assert!(status["keyvalue"]["used"].as_u64().unwrap() > 0, "{status}");
}

#[test]
fn the_quota_refuses_cleanly_and_apps_never_see_each_others_data() {
    let daemon = Daemon::start();
    let small = deploy(
        &daemon,
        "small",
        "host_apis",
        "[keyvalue]\nquota = \"4KiB\"\n",
    );
    let other = deploy(&daemon, "other", "host_apis", "[keyvalue]\n");
    let spin = deploy(&daemon, "spin", "spin_app", "[keyvalue]\n");
    let none = deploy(&daemon, "none", "host_apis", "");

    // Past the quota: the interface's error (wasi `other`), the guest goes on, nothing kept.
    assert_eq!(ok(small, "/kv/fill?a=3000"), "ok");
    let (status, body) = answer(small, "/kv/fill?b=2000");
    assert_eq!(status, 500, "{body}");
    assert!(
        body.starts_with("Error::Other(") && body.contains("[keyvalue] quota"),
        "{body}"
    );
    assert_eq!(answer(small, "/kv/get?b").0, 404);
    assert_eq!(ok(small, "/kv/fill?a=10"), "ok");
    assert_eq!(ok(small, "/kv/fill?b=2000"), "ok");
    let table = daemon.ctl_ok(&["status", "small"]);
    assert!(table.contains("2.1KiB of 4.0KiB quota"), "{table}");

    // Same key, three apps, three stores; an app without [keyvalue] is refused as Spin does.
    assert_eq!(ok(other, "/kv/set?a=other's"), "ok");
    assert_eq!(ok(spin, "/kv/set?a=spin's"), "ok");
    assert_eq!(ok(small, "/kv/get?a").len(), 10);
    assert_eq!(ok(other, "/kv/get?a"), "other's");
    assert_eq!(ok(spin, "/kv/get?a"), "spin's");
    assert_eq!(ok(spin, "/kv/keys"), "a\n");
    assert_eq!(
        answer(none, "/kv/open?"),
        (500, "Error::AccessDenied".to_string())
    );
    assert_eq!(
        answer(spin, "/kv/open?other-label"),
        (500, "Error::AccessDenied".to_string())
    );

    // rm deletes the data and says so; --keep-data keeps it for the next deploy.
    let data = daemon.state.join("kv");
    let removed = daemon.ctl_ok(&["rm", "small"]);
    assert!(removed.contains("and its key-value data"), "{removed}");
    assert!(!data.join("small.db").exists());
    let kept = daemon.ctl_ok(&["rm", "other", "--keep-data"]);
    assert!(kept.contains("was kept"), "{kept}");
    assert!(data.join("other.db").exists());
    let other = deploy(&daemon, "other", "host_apis", "[keyvalue]\n");
    assert_eq!(ok(other, "/kv/get?a"), "other's");
    // Kept data of a name that is no longer an app is deleted by `rm` of the name.
    daemon.ctl_ok(&["rm", "other", "--keep-data"]);
    let gone = daemon.ctl_ok(&["rm", "other"]);
    assert!(gone.contains("key-value data"), "{gone}");
    assert!(!data.join("other.db").exists());
    assert_eq!(daemon.ctl(&["rm", "other"]).code, 3);
}

#[test]
fn a_pool_cannot_open_any_apps_data_even_with_its_own_credentials() {
    if !is_root() {
        cairn_tests::skip(
            "a_pool_cannot_open_any_apps_data…",
            "needs root: pools run as users of their own only under root",
        );
        return;
    }
    let daemon = Daemon::start();
    let app = deploy(&daemon, "mine", "host_apis", "[keyvalue]\n");
    let _ = deploy(&daemon, "theirs", "host_apis", "[keyvalue]\n");
    assert_eq!(ok(app, "/kv/set?k=v"), "ok");
    let data = daemon.state.join("kv");
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(mode(&data) & 0o777, 0o700);
    for file in ["mine.db", "mine.db-wal"] {
        let meta = std::fs::metadata(data.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        assert_eq!(meta.uid(), 0, "{file}");
    }
    let pid = pool_pid(&daemon, "mine");
    let uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_ne!(uid, 0, "the pool runs as a user of its own");
    for target in ["mine.db", "theirs.db", "mine.db-wal"] {
        let path = data.join(target);
        // The pool's credentials exactly: its uid and gid, no supplementary groups.
        let output = std::process::Command::new("sh")
            .args(["-c", &format!("cat '{}' >/dev/null", path.display())])
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        assert!(!output.status.success(), "uid {uid} read {target}");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("Permission denied"), "{said}");
    }
}

#[test]
fn the_operator_lists_reads_writes_exports_and_imports_an_apps_data() {
    let daemon = Daemon::start_with(
        Some("[control]\nread_access = \"any\"\ngroup = \"cairn-e2e-none\"\n"),
        &[],
    );
    let app = deploy(
        &daemon,
        "gateway",
        "host_apis",
        "[keyvalue]\nquota = \"64KiB\"\n",
    );
    let _ = deploy(&daemon, "plain", "host_apis", "");
    assert_eq!(ok(app, "/kv/set?reading=17"), "ok");

    // What the guest wrote, the operator sees, and the other way round.
    assert_eq!(daemon.ctl_ok(&["kv", "gateway", "ls"]), "reading\n");
    assert_eq!(daemon.ctl_ok(&["kv", "gateway", "get", "reading"]), "17");
    let set = daemon.ctl_ok(&["kv", "gateway", "set", "mode", "eco"]);
    assert!(set.contains("of 64.0KiB quota used"), "{set}");
    assert_eq!(ok(app, "/kv/get?mode"), "eco");
    let missing = daemon.ctl(&["kv", "gateway", "get", "nothing"]);
    assert_eq!(missing.code, 3, "{missing:?}");

    // Export, delete, import: the same data back, bytes that are not UTF-8 included.
    let export = daemon.dir.join("gateway.jsonl");
    let mut lines = std::fs::read_to_string({
        daemon.ctl_ok(&["kv", "gateway", "export", export.to_str().unwrap()]);
        &export
    })
    .unwrap();
    assert_eq!(
        lines,
        "{\"key\":\"reading\",\"value\":\"17\"}\n{\"key\":\"mode\",\"value\":\"eco\"}\n"
    );
    lines.push_str("{\"key\":\"raw\",\"base64\":\"/wB4\"}\n");
    std::fs::write(&export, &lines).unwrap();
    daemon.ctl_ok(&["kv", "gateway", "rm", "reading", "mode"]);
    assert_eq!(answer(app, "/kv/get?reading").0, 404);
    let imported = daemon.ctl_ok(&["kv", "gateway", "import", export.to_str().unwrap()]);
    assert!(imported.starts_with("imported 3 entries"), "{imported}");
    assert_eq!(ok(app, "/kv/get?reading"), "17");
    assert_eq!(ok(app, "/kv/get?raw"), "\u{fffd}\0x");

    // An export that fails leaves the file as it was; one that succeeds is the owner's alone.
    let before = std::fs::read(&export).unwrap();
    let refused = daemon.ctl(&["kv", "nothing-here", "export", export.to_str().unwrap()]);
    assert_eq!(refused.code, 3, "{refused:?}");
    assert_eq!(std::fs::read(&export).unwrap(), before);
    let fresh = daemon.dir.join("fresh.jsonl");
    daemon.ctl_ok(&["kv", "gateway", "export", fresh.to_str().unwrap()]);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A FIFO is refused at once, never waited on.
    let fifo = daemon.dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let refused = daemon.ctl(&["kv", "gateway", "import", fifo.to_str().unwrap()]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("not a regular file"),
        "{}",
        refused.stderr
    );

    // The quota holds for the operator too, with the exit code of an exhausted resource; a bad
    // import line is named and nothing after it is written.
    let big = "x".repeat(70 << 10);
    let refused = daemon.ctl(&["kv", "gateway", "set", "big", &big]);
    assert_eq!(refused.code, 7, "{refused:?}");
    assert!(
        refused.stderr.contains("[keyvalue] quota"),
        "{}",
        refused.stderr
    );
    std::fs::write(
        &export,
        "{\"key\":\"k\",\"value\":\"v\"}\n{\"key\":\"k2\"}\n",
    )
    .unwrap();
    let bad = daemon.ctl(&["kv", "gateway", "import", export.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("line 2"), "{}", bad.stderr);
    assert_eq!(answer(app, "/kv/get?k").0, 404);

    // An app without a store has no data to show.
    let none = daemon.ctl(&["kv", "plain", "ls"]);
    assert_eq!(none.code, 3, "{none:?}");
    assert!(none.stderr.contains("[keyvalue]"), "{}", none.stderr);

    // Readers list keys; values and changes are for those who may change state.
    if is_root() {
        let reader = daemon.ctl_as(Some(65534), &["kv", "gateway", "ls"]);
        assert_eq!(reader.code, 0, "{reader:?}");
        assert!(reader.stdout.contains("reading"), "{}", reader.stdout);
        for args in [
            &["kv", "gateway", "get", "reading"][..],
            &["kv", "gateway", "set", "reading", "0"][..],
            &["kv", "gateway", "export"][..],
        ] {
            let refused = daemon.ctl_as(Some(65534), args);
            assert_eq!(refused.code, 4, "{args:?}: {refused:?}");
            assert!(!refused.stdout.contains("17"), "{}", refused.stdout);
        }
        assert_eq!(ok(app, "/kv/get?reading"), "17");
    } else {
        cairn_tests::skip(
            "the_operator_…: a reader's view",
            "needs root to run cairnctl as another uid",
        );
    }
}

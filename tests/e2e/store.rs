//! The store across versions: what one cairn wrote and another cannot read.

use cairn_tests::{get, Daemon};

/// A generation written by a newer cairn (a field this one does not know) fails its app with
/// the reason; the daemon and every other app start; the app can be rolled back or removed.
/// A database whose schema is newer is refused before anything is written to it.
#[test]
fn a_record_or_schema_from_a_newer_cairn_fails_its_app_or_is_refused_untouched() {
    let mut daemon = Daemon::start();
    let newer = daemon.deploy_hello("newer", &[]);
    let fine = daemon.deploy_hello("fine", &[]);
    let hello = cairn_tests::component("hello");
    let listen = newer.to_string();
    daemon.ctl_ok(&[
        "deploy",
        "newer",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--env",
        "GREETING=two",
    ]);
    assert_eq!(daemon.app_status("newer")["generation"], 2);
    daemon.stop();

    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    let changed = db
        .execute(
            "UPDATE generations SET spec = json_set(spec, '$.webhooks', 'hourly')
             WHERE app = 'newer' AND generation = 2",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    daemon.restart();
    assert_eq!(get(fine, "/").unwrap().status, 200);
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    let app = apps
        .as_array()
        .unwrap()
        .iter()
        .find(|app| app["name"] == "newer")
        .unwrap()
        .clone();
    assert_eq!(app["status"], "failed", "{app}");
    let error = app["error"].as_str().unwrap();
    assert!(
        error.contains("generation 2") && error.contains("unknown field `webhooks`"),
        "{error}"
    );
    assert_eq!(app["listen"], listen, "{app}");
    assert!(get(newer, "/").is_err(), "an unreadable app does not serve");
    // The reason is in the app's log, and the app is not retried.
    daemon.wait_logged("newer", "cannot read");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        daemon
            .ctl_ok(&["logs", "newer"])
            .matches("could not start")
            .count(),
        1
    );
    // A rollback to the generation this cairnd reads brings it back.
    daemon.ctl_ok(&["rollback", "newer"]);
    assert_eq!(get(newer, "/").unwrap().status, 200);
    let rolled_forward = daemon.ctl(&["rollback", "newer", "--to", "2"]);
    assert_ne!(rolled_forward.code, 0);
    assert!(
        rolled_forward.stderr.contains("cannot read"),
        "{}",
        rolled_forward.stderr
    );
    assert_eq!(get(newer, "/").unwrap().status, 200);
    daemon.stop();

    // A schema from a newer cairn: refused, saying so, and the file is not written.
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    db.pragma_update(None, "user_version", 999).unwrap();
    drop(db);
    let before = std::fs::read(daemon.database()).unwrap();
    let exit = daemon.restart_refused();
    assert!(!exit.success());
    let log = daemon.log();
    assert!(
        log.contains("schema version 999, newer than this cairnd knows"),
        "{log}"
    );
    assert!(std::fs::read(daemon.database()).unwrap() == before);
}

fn padded_hello(daemon: &Daemon, fill: u8, size: usize) -> std::path::PathBuf {
    cairn_tests::padded_hello(&daemon.dir.join(format!("hello-{fill}.wasm")), fill, size)
}

fn deploy_file(daemon: &Daemon, app: &str, file: &std::path::Path, listen: &str) {
    daemon.ctl_ok(&[
        "deploy",
        app,
        "--component",
        file.to_str().unwrap(),
        "--listen",
        listen,
    ]);
}

/// Deploys that each bring a new 1 MiB component, and a removed app: `cairnctl gc` keeps the
/// generations rollback needs, collects the rest and what nothing uses, and the file shrinks.
#[test]
fn old_generations_and_unused_components_are_collected_and_the_file_shrinks() {
    let daemon = Daemon::start_with(Some("[store]\nkeep_generations = 2\ngrace = \"0s\"\n"), &[]);
    let web = format!("127.0.0.1:{}", cairn_tests::free_port());
    for fill in 0..6 {
        deploy_file(&daemon, "web", &padded_hello(&daemon, fill, 1 << 20), &web);
    }
    let gone = format!("127.0.0.1:{}", cairn_tests::free_port());
    for fill in 10..12 {
        deploy_file(
            &daemon,
            "gone",
            &padded_hello(&daemon, fill, 1 << 20),
            &gone,
        );
    }
    daemon.ctl_ok(&["rm", "gone"]);
    let store = |daemon: &Daemon| daemon.ctl(&["-o", "json", "status"]).json()["store"].clone();
    let before = store(&daemon);
    assert!(before["bytes"].as_u64().unwrap() > 8 << 20, "{before}");

    let gc = daemon.ctl(&["-o", "json", "gc"]).json();
    // web keeps generations 5 and 6; 1 to 4 go, with their components and gone's two.
    assert_eq!(gc["generations"], 4, "{gc}");
    assert_eq!(gc["components"], 6, "{gc}");
    assert!(gc["component_bytes"].as_u64().unwrap() >= 6 << 20, "{gc}");
    assert!(gc["compiled"].as_u64().unwrap() >= 6, "{gc}");
    let after = store(&daemon);
    assert!(
        after["bytes"].as_u64().unwrap() + (6 << 20) <= before["bytes"].as_u64().unwrap(),
        "{before} -> {after}"
    );
    assert_eq!(gc["store_bytes"], after["bytes"]);
    let said = daemon.ctl_ok(&["gc"]);
    assert!(
        said.contains("collected 0 generation(s), 0 component(s)"),
        "{said}"
    );

    // What is kept still works: the app serves, and rolls back to the one before.
    assert_eq!(
        cairn_tests::get(web.parse().unwrap(), "/").unwrap().status,
        200
    );
    daemon.ctl_ok(&["rollback", "web"]);
    assert_eq!(daemon.app_status("web")["generation"], 5);
    let old = daemon.ctl(&["rollback", "web", "--to", "2"]);
    assert!(
        old.stderr.contains("has no generation 2; it has 5, 6"),
        "{old:?}"
    );
    assert_eq!(
        cairn_tests::get(web.parse().unwrap(), "/").unwrap().status,
        200
    );
}

/// With a budget, pushes that would pass it are refused, saying what to do, once what
/// nothing uses has been collected; what is stored and what serves are untouched.
#[test]
fn past_the_store_budget_a_push_is_refused_saying_so_and_apps_keep_serving() {
    let daemon = Daemon::start_with(
        Some("log_bytes_per_app = \"4MiB\"\nlog_bytes_total = \"8MiB\"\n[store]\nbudget = \"16MiB\"\ngrace = \"0s\"\n"),
        &[],
    );
    let addr = daemon.deploy_hello("web", &[]);
    let mut refused = None;
    for fill in 0..24 {
        let file = padded_hello(&daemon, fill, 1 << 20);
        let name = format!("keep-{fill}");
        let push = daemon.ctl(&["push", file.to_str().unwrap(), "--name", &name]);
        if push.code != 0 {
            refused = Some((fill, push));
            break;
        }
    }
    let (fill, push) = refused.expect("a push past the budget is refused");
    assert!(fill >= 10, "refused after {fill} pushes: {push:?}");
    assert!(
        push.stderr.contains("would pass its budget of 16MiB")
            && push.stderr.contains("raise [store] budget"),
        "{push:?}"
    );
    let store = daemon.ctl(&["-o", "json", "status"]).json()["store"].clone();
    assert_eq!(store["budget"], 16 << 20);
    assert!(store["used"].as_u64().unwrap() <= 16 << 20, "{store}");
    let components = daemon.ctl(&["-o", "json", "components"]).json();
    assert_eq!(
        components.as_array().unwrap().len(),
        fill as usize + 1,
        "every accepted push is kept: {components}"
    );
    assert_eq!(cairn_tests::get(addr, "/").unwrap().status, 200);
    let status = daemon.ctl_ok(&["status"]);
    assert!(status.contains("of a 16.0MiB budget"), "{status}");
}

/// The disk filled while cairnd was stopped: it still starts and serves (the space it set
/// aside is given back), says the disk is full, refuses a push saying so, and once space
/// returns sets space aside again and takes pushes.
#[test]
fn a_disk_that_filled_while_cairnd_was_stopped_does_not_stop_it_and_space_returns() {
    let name = "a_disk_that_filled_while_cairnd_was_stopped_does_not_stop_it_and_space_returns";
    cairn_tests::with_small_disk(name, "40m", |disk| {
        let state = disk.join("state");
        let mut daemon = Daemon::start_with_state_dir(&state);
        let addr = daemon.deploy_hello("survivor", &[]);
        let reserve = state.join("cairn.reserve");
        assert!(reserve.exists(), "space is set aside: {}", daemon.log());
        daemon.stop();

        let filler = cairn_tests::fill_disk(disk, "filler");
        daemon.restart();
        assert_eq!(get(addr, "/").unwrap().status, 200);
        assert!(!reserve.exists());
        assert!(daemon
            .log()
            .contains("the space set aside for this was given back"));
        let status = daemon.ctl_ok(&["status"]);
        assert!(status.contains("its disk is FULL"), "{status}");
        let file = padded_hello(&daemon, 1, 1 << 20);
        let push = daemon.ctl(&["push", file.to_str().unwrap()]);
        assert_eq!(push.code, 7, "{push:?}");
        // The reserve given back is room the store keeps for its own writes, not for pushes.
        assert!(
            push.stderr
                .contains("free: this needs 1.2MiB and cairn keeps 4MiB aside")
                && push.stderr.contains("free some space, then retry"),
            "{push:?}"
        );
        assert_eq!(get(addr, "/").unwrap().status, 200);

        // Full to the last byte while running: a deploy is refused saying so, a log burst is
        // dropped and counted, and the app serves on.
        let last = cairn_tests::fill_disk(disk, "filler-2");
        let listen = addr.to_string();
        let hello = cairn_tests::component("hello");
        let redeploy = [
            "deploy",
            "survivor",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &listen,
            "--env",
            "GREETING=later",
        ];
        let deploy = daemon.ctl(&redeploy);
        assert_ne!(deploy.code, 0, "{deploy:?}");
        assert!(
            deploy.stderr.contains("is full: free some space"),
            "{deploy:?}"
        );
        assert_eq!(get(addr, "/").unwrap().body, "hello from cairn\n");
        let dropped = |daemon: &Daemon| {
            daemon.ctl(&["-o", "json", "status"]).json()["log_lines_dropped"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(get(addr, "/lines?20000-burst").unwrap().status, 200);
        let seconds = std::time::Duration::from_secs(30);
        cairn_tests::wait_for("the burst to be dropped", seconds, || dropped(&daemon) > 0).unwrap();
        assert_eq!(get(addr, "/").unwrap().status, 200);

        // Space returns: cairn sets space aside again by itself and takes changes.
        std::fs::remove_file(filler).unwrap();
        std::fs::remove_file(last).unwrap();
        cairn_tests::wait_for("space set aside again", seconds, || reserve.exists()).unwrap();
        daemon.ctl_ok(&["push", file.to_str().unwrap()]);
        daemon.ctl_ok(&redeploy);
        assert_eq!(get(addr, "/").unwrap().body, "later from cairn\n");
        assert_eq!(get(addr, "/lines?3-after").unwrap().status, 200);
        daemon.wait_logged("survivor", "after-2");
        let status = daemon.ctl_ok(&["status"]);
        assert!(!status.contains("FULL"), "{status}");
    });
}

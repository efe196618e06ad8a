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
            "UPDATE generations SET spec = json_set(spec, '$.schedule', 'hourly')
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
        error.contains("generation 2") && error.contains("unknown field `schedule`"),
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

//! systemd integration over a real notify socket: readiness, status, watchdog, stopping.

use cairn_tests::Daemon;
use std::time::Duration;

#[test]
fn notifies_ready_status_watchdog_and_stopping() {
    let mut daemon = Daemon::start_with(None, &[("WATCHDOG_USEC", "200000")]);
    // READY=1 came (the harness waited for it); STATUS= came with it.
    assert!(
        daemon
            .notifications()
            .iter()
            .any(|l| l.starts_with("STATUS=serving 0 app(s)")),
        "{:?}",
        daemon.notifications()
    );
    daemon
        .wait_notification("WATCHDOG=1", Duration::from_secs(10))
        .unwrap();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    daemon
        .wait_notification("STOPPING=1", Duration::from_secs(1))
        .unwrap();
    assert!(
        !daemon.socket.exists(),
        "the control socket is removed on shutdown"
    );
}

#[test]
fn a_failing_app_does_not_stop_the_others_from_starting() {
    let mut daemon = Daemon::start();
    let good = daemon.deploy_hello("good", &[]);
    let bad = daemon.deploy_hello("bad", &[]);
    daemon.stop();
    // Something else takes the bad app's port while the daemon is down.
    let squatter = std::net::TcpListener::bind(bad).unwrap();
    daemon.restart();
    assert_eq!(cairn_tests::get(good, "/").unwrap().status, 200);
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    let bad_app = apps
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "bad")
        .unwrap()
        .clone();
    assert_eq!(bad_app["status"], "failed");
    assert!(
        bad_app["error"]
            .as_str()
            .unwrap()
            .contains("in use by another program"),
        "{bad_app}"
    );
    assert!(
        daemon
            .notifications()
            .iter()
            .any(|l| l.contains("1 failed")),
        "{:?}",
        daemon.notifications()
    );
    // Once the port is free again the reconciler's retry brings it back.
    drop(squatter);
    cairn_tests::wait_for(
        "the failed app to be retried",
        Duration::from_secs(30),
        || {
            cairn_tests::get(bad, "/")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        },
    )
    .unwrap();
}

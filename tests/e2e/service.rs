//! systemd integration over a real notify socket: readiness, status, watchdog, stopping.

use cairn_tests::{wait_for, Daemon};
use std::time::{Duration, Instant};

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
    // `status` says so by its exit, for a unit's or a fleet's health check: the device's
    // and the app's, not the good one's.
    let status = daemon.ctl(&["status"]);
    assert_eq!(status.code, 8, "{}", status.stderr);
    assert!(
        status.stdout.contains("UNHEALTHY") && status.stdout.contains("bad: failed: "),
        "{}",
        status.stdout
    );
    assert!(
        status.stderr.contains("an app is failed or in a crashloop"),
        "{}",
        status.stderr
    );
    assert_eq!(daemon.ctl(&["status", "bad"]).code, 8);
    assert_eq!(daemon.ctl(&["status", "good"]).code, 0);
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
    wait_for("status to be healthy", Duration::from_secs(10), || {
        daemon.ctl(&["status"]).code == 0
    })
    .unwrap();
}

/// A deploy whose health check answers only after several watchdog periods holds nothing the
/// supervisor's loop or another app needs: the watchdog pings keep their rate throughout (as
/// systemd would check them), and an app scaled to zero wakes and answers while it waits.
#[test]
fn a_slow_deploy_stops_neither_the_watchdog_nor_another_apps_wake() {
    const WATCHDOG: Duration = Duration::from_millis(1500);
    let mut daemon = Daemon::start_with(None, &[("WATCHDOG_USEC", "1500000")]);
    let sleepy = daemon.deploy_hello("sleepy", &["--idle", "500ms"]);
    wait_for("sleepy to go idle", Duration::from_secs(30), || {
        daemon.app_status("sleepy")["status"] == "idle"
    })
    .unwrap();
    daemon.notifications();
    let recorder = daemon.record_notifications();
    let started = Instant::now();
    let (woke_at, deployed_at) = std::thread::scope(|scope| {
        let deploy = scope.spawn(|| {
            // The health check sleeps 5 s: over three watchdog periods.
            daemon.deploy_hello("slow", &["--health", "/sleep?5000", "--timeout", "20s"]);
            Instant::now()
        });
        // The new generation's pool has taken its name: the deploy is loading or probing.
        wait_for(
            "the slow app's pool to start",
            Duration::from_secs(60),
            || daemon.child_named("cairn:slow").is_some() || deploy.is_finished(),
        )
        .unwrap();
        let response = cairn_tests::get(sleepy, "/").expect("the idle app answers");
        assert_eq!(response.status, 200);
        let woke_at = Instant::now();
        (woke_at, deploy.join().expect("the deploy succeeds"))
    });
    let pings: Vec<Instant> = recorder
        .finish()
        .into_iter()
        .filter(|(_, line)| line == "WATCHDOG=1")
        .map(|(at, _)| at)
        .collect();
    assert!(
        woke_at < deployed_at,
        "the idle app answered only after the slow deploy ended"
    );
    let deploy_took = deployed_at - started;
    assert!(
        deploy_took >= 3 * WATCHDOG,
        "the deploy took {deploy_took:?}: its health check did not wait"
    );
    let mut times = vec![started];
    times.extend(
        pings
            .iter()
            .filter(|at| **at > started && **at < deployed_at),
    );
    times.push(deployed_at);
    let longest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest < WATCHDOG,
        "no watchdog ping for {longest:?} during the deploy ({} pings in {deploy_took:?}); systemd would have killed cairnd",
        times.len() - 2
    );
    assert_eq!(daemon.app_status("slow")["status"], "running");
}

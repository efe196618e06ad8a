//! The event history (`cairnctl events`): what happened to apps and the device, in order, with
//! its time, kept in the store and followed live.

use cairn_tests::{component, get, wait_for, Daemon};
use std::io::BufRead;
use std::time::Duration;

fn events(daemon: &Daemon, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["-o", "json", "events"];
    all.extend_from_slice(args);
    daemon
        .ctl_ok(&all)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}@{}", e["kind"].as_str().unwrap(), e["generation"]))
        .collect()
}

// Over 100 lines: one app's history built step by step, then read back three ways.
#[test]
fn a_deploy_a_failed_gate_a_rollback_and_a_crashloop_are_found_in_order() {
    let daemon = Daemon::start();
    let hello = component("hello");
    let addr = daemon.deploy_hello("wobbly", &["--env", "GREETING=stable"]);
    let listen = addr.to_string();
    let deploy = |extra: &[&str]| {
        let mut args = vec![
            "deploy",
            "wobbly",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        daemon.ctl(&args)
    };
    // A health gate that fails: nothing changes but the history.
    assert_eq!(
        deploy(&["--env", "GREETING=gated", "--health", "/trap"]).code,
        5
    );
    assert_eq!(deploy(&["--env", "GREETING=second"]).code, 0);
    daemon.ctl_ok(&["rollback", "wobbly"]);
    assert_eq!(get(addr, "/").unwrap().body, "stable from cairn\n");
    assert_eq!(deploy(&["--env", "GREETING=broken"]).code, 0);
    // Generation 3's pool keeps dying until the last good one comes back.
    let mut killed = Vec::new();
    while daemon.app_status("wobbly")["generation"] == 3 {
        let mut pid = 0;
        let live = wait_for("a live pool to kill", Duration::from_secs(30), || {
            let status = daemon.app_status("wobbly");
            pid = status["pid"].as_u64().unwrap_or(0);
            status["generation"] != 3 || (pid != 0 && !killed.contains(&pid))
        });
        live.unwrap();
        if daemon.app_status("wobbly")["generation"] != 3 {
            break;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        killed.push(pid);
        assert!(
            killed.len() < 20,
            "no crashloop after {} kills",
            killed.len()
        );
    }
    wait_for(
        "generation 1 to be restored",
        Duration::from_secs(30),
        || daemon.app_status("wobbly")["generation"] == 1,
    )
    .unwrap();
    wait_for(
        "the restore to be recorded",
        Duration::from_secs(10),
        || kinds(&events(&daemon, &["wobbly"])).contains(&"restore@1".to_string()),
    )
    .unwrap();

    let history = events(&daemon, &["wobbly"]);
    let seen = kinds(&history);
    // Each step, in order, with what is between them allowed (exits, restarts).
    let mut wanted = [
        "deploy@1",
        "deploy-failed@0",
        "deploy@2",
        "rollback@1",
        "deploy@3",
        "exit@3",
        "crashloop@3",
        "restore@1",
    ]
    .into_iter()
    .peekable();
    for kind in &seen {
        if wanted.peek() == Some(&kind.as_str()) {
            wanted.next();
        }
    }
    assert_eq!(wanted.next(), None, "out of order or missing: {seen:?}");
    // The operator's one rollback, and the crashloop's restore recorded as a restore only.
    assert_eq!(
        seen.iter().filter(|k| k.starts_with("rollback@")).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|k| *k == "restore@1").count(),
        1,
        "{seen:?}"
    );
    let failed = history
        .iter()
        .find(|e| e["kind"] == "deploy-failed")
        .unwrap();
    assert!(
        failed["text"]
            .as_str()
            .unwrap()
            .contains("failed its health check: GET /trap"),
        "{failed}"
    );
    // Times only go forward.
    let times: Vec<i64> = history
        .iter()
        .map(|e| e["time_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // --since and --tail narrow it; the human form names the app and the kind.
    assert!(events(&daemon, &["--since", "2099-01-01 00:00"]).is_empty());
    assert_eq!(events(&daemon, &["--since", "1h"]).len(), history.len());
    assert_eq!(kinds(&events(&daemon, &["--tail", "1"])), ["restore@1"]);
    let human = daemon.ctl_ok(&["events", "wobbly", "--tail", "1"]);
    assert!(
        human.contains(" wobbly restore crashloop: generation 3 kept failing"),
        "{human}"
    );
    assert!(daemon
        .ctl_ok(&["logs", "wobbly", "--since", "2099-01-01 00:00"])
        .is_empty());
    assert!(!daemon
        .ctl_ok(&["logs", "wobbly", "--since", "1h"])
        .is_empty());
    let bad = daemon.ctl(&["events", "--since", "yesterday"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("neither a time ago"), "{}", bad.stderr);

    // -f: what happens next arrives as it happens.
    let mut follower = daemon.ctl_child(&["-o", "json", "events", "wobbly", "-f", "--tail", "1"]);
    let stdout = follower.stdout.take().unwrap();
    let (lines, arrived) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let first = arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.contains("\"restore\""), "{first}");
    daemon.ctl_ok(&["rm", "wobbly"]);
    let next = arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        next.contains("\"remove\"") && next.contains("\"wobbly\""),
        "{next}"
    );
    let _ = follower.kill();
    let _ = follower.wait();
}

//! A three-server JetStream cluster on loopback with R3 streams and buckets: the server a
//! device is connected to is killed while it syncs and while it flushes reports; nothing is
//! lost, nothing duplicated, and the device converges through the others.

use super::{sync_status, wait_greeting};
use cairn_tests::{free_port, get, wait_for, Daemon, Lattice, Nats};
use std::time::Duration;

const DEVICE: &str = "edge-c";

/// The server of the cluster that holds the device's connection, if one does.
fn serving_node(lattice: &mut Lattice) -> Option<&mut Nats> {
    let name = format!("cairnd {DEVICE}");
    std::iter::once(&mut lattice.nats)
        .chain(lattice.others.iter_mut())
        .find(|n| n.is_running() && n.bytes_sent_to(&name).is_some())
}

/// Kills the device's server; returns its URL.
fn kill_serving_node(lattice: &mut Lattice) -> String {
    let node = serving_node(lattice).expect("the device is connected to a server");
    node.stop();
    node.url()
}

/// Starts the server at `url` again (it rejoins the cluster and catches up).
fn restart_node(lattice: &mut Lattice, url: &str) {
    std::iter::once(&mut lattice.nats)
        .chain(lattice.others.iter_mut())
        .find(|n| n.url() == url)
        .expect("a server of the cluster")
        .restart();
}

#[test]
fn an_r3_cluster_loses_nothing_when_the_devices_server_dies_mid_sync_and_mid_flush() {
    let Some(mut lattice) = Lattice::cluster("an_r3_cluster_loses_nothing", 3) else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config(DEVICE)), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    lattice.publish(DEVICE, "fleet-web", &listen, "v1");
    wait_greeting(listen.parse().unwrap(), "v1");
    wait_for("the device's connection", Duration::from_secs(30), || {
        serving_node(&mut lattice).is_some()
    })
    .unwrap();

    // During a sync: a new version lands and the device's server dies at once.
    lattice.publish(DEVICE, "fleet-web", &listen, "v2");
    let killed = kill_serving_node(&mut lattice);
    wait_for(
        "the device to converge on v2",
        Duration::from_secs(90),
        || get(listen.parse().unwrap(), "/").is_ok_and(|r| r.body == "v2 from cairn\n"),
    )
    .unwrap();
    wait_for(
        "the device's new connection",
        Duration::from_secs(60),
        || sync_status(&daemon)["state"] == "connected" && serving_node(&mut lattice).is_some(),
    )
    .unwrap();
    // Back to three, so that losing one more keeps a quorum of two.
    restart_node(&mut lattice, &killed);

    // During a flush: a burst of log lines goes up, and the device's server dies under it.
    let web = daemon.deploy_hello("web", &[]);
    // (Each request's output is kept up to 64 KiB: 2,000 lines a request stay well inside.)
    for request in 0..5 {
        let path = format!("/lines?2000-flush{request}");
        assert_eq!(get(web, &path).unwrap().status, 200);
    }
    // The lines reach the outbox, then the flush takes them up batch by batch: the server
    // dies once the backlog has started to fall and before it is empty.
    let backlog = || sync_status(&daemon)["backlog"].as_u64().unwrap();
    wait_for("the lines in the outbox", Duration::from_secs(30), || {
        backlog() >= 2000
    })
    .unwrap();
    let mut peak = backlog();
    let mut backlog_at_kill = 0;
    wait_for("the flush to be under way", Duration::from_secs(60), || {
        let now = backlog();
        peak = peak.max(now);
        backlog_at_kill = now;
        now < peak && now > 0
    })
    .unwrap_or_else(|e| panic!("{e}: {}", sync_status(&daemon)));
    kill_serving_node(&mut lattice);
    wait_for(
        "the outbox to drain through the last server",
        Duration::from_secs(120),
        || {
            let status = sync_status(&daemon);
            status["state"] == "connected" && status["backlog"] == 0
        },
    )
    .unwrap();

    let upstream: Vec<String> = lattice
        .reports(DEVICE)
        .iter()
        .filter_map(|r| r["line"].as_str().map(str::to_string))
        .filter(|l| l.starts_with("flush"))
        .collect();
    let unique: std::collections::BTreeSet<&String> = upstream.iter().collect();
    assert_eq!(
        unique.len(),
        upstream.len(),
        "a report reached the stream twice"
    );
    let stored = daemon.ctl_ok(&["logs", "web", "--tail", "0"]);
    let mut checked = 0;
    for line in stored.lines().filter_map(|l| l.split_whitespace().last()) {
        if line.starts_with("flush") {
            assert!(
                unique.contains(&line.to_string()),
                "{line} never reached the stream"
            );
            checked += 1;
        }
    }
    assert!(checked >= 9000, "only {checked} stored lines to check");
    eprintln!(
        "cluster: {checked} lines checked, {} in the stream, {backlog_at_kill} waiting when the server died",
        upstream.len()
    );
    assert_eq!(
        get(listen.parse().unwrap(), "/").unwrap().body,
        "v2 from cairn\n"
    );
}

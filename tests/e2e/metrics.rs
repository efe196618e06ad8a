//! The Prometheus endpoint (`[metrics] listen`), scraped and read with a Prometheus text
//! parser (`prometheus-parse`): its counters move with traffic, a trap, a timeout, an OOM kill
//! and a restart.

use cairn_tests::{cross_target, free_port, get, wait_for, Daemon};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Scrapes `addr` and parses what it says: each sample by `name{app}` (or `name` for the
/// device's own).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let response = get(addr, "/metrics").unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let lines = response.body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text that parses");
    let mut samples = HashMap::new();
    for sample in parsed.samples {
        let value = match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            // A histogram: its count, and each cumulative bucket by its bound.
            prometheus_parse::Value::Histogram(buckets) => {
                let app = sample.labels.get("app").unwrap_or_default();
                for bucket in buckets {
                    samples.insert(
                        format!("{}_bucket{{{app},{}}}", sample.metric, bucket.less_than),
                        bucket.count,
                    );
                }
                buckets.last().map_or(0.0, |b| b.count)
            }
            _ => continue,
        };
        let state = sample
            .labels
            .get("state")
            .or(sample.labels.get("class"))
            .or(sample.labels.get("reason"));
        let key = match (sample.labels.get("app"), state) {
            (Some(app), Some(state)) => format!("{}{{{app},{state}}}", sample.metric),
            (Some(app), None) => format!("{}{{{app}}}", sample.metric),
            (None, Some(state)) => format!("{}{{{state}}}", sample.metric),
            (None, None) => sample.metric.clone(),
        };
        samples.insert(key, value);
    }
    samples
}

/// Scrapes until `key` reads `value` (a scrape's text is kept for 2 s), then returns that
/// scrape.
fn scrape_when(addr: SocketAddr, key: &str, value: f64) -> HashMap<String, f64> {
    let mut last = HashMap::new();
    let seen = wait_for(
        &format!("{key} to read {value}"),
        Duration::from_secs(15),
        || {
            last = scrape(addr);
            last.get(key) == Some(&value)
        },
    );
    assert!(seen.is_ok(), "{key}: {last:?}");
    last
}

#[test]
fn the_counters_move_with_traffic_a_trap_a_timeout_an_oom_kill_and_a_restart() {
    let port = free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let daemon = Daemon::start_with(Some(&format!("[metrics]\nlisten = \"{metrics}\"\n")), &[]);
    let web = daemon.deploy_hello("web", &["--timeout", "300ms"]);
    let before = scrape(metrics);
    assert_eq!(before["cairn_app_requests_total{web}"], 0.0);
    assert_eq!(before["cairn_app_state{web,running}"], 1.0);
    assert_eq!(before["cairn_app_generation{web}"], 1.0);
    assert_eq!(before["cairn_apps"], 1.0);
    assert_eq!(before["cairn_upstream_state{disabled}"], 1.0);
    assert!(before["cairn_store_bytes"] > 0.0, "{before:?}");
    assert_eq!(before["cairn_outbox_bytes"], 0.0, "{before:?}");

    for _ in 0..5 {
        assert_eq!(get(web, "/").unwrap().status, 200);
    }
    assert_eq!(get(web, "/trap").unwrap().status, 500);
    assert_eq!(get(web, "/loop").unwrap().status, 500);
    let after = scrape_when(metrics, "cairn_app_requests_total{web}", 7.0);
    assert_eq!(after["cairn_app_traps_total{web}"], 1.0);
    assert_eq!(after["cairn_app_timeouts_total{web}"], 1.0);
    assert_eq!(after["cairn_app_restarts_total{web,signal}"], 0.0);
    // By status class: five 200s, two 500s (the trap, the timeout).
    assert_eq!(
        after["cairn_app_responses_total{web,2xx}"], 5.0,
        "{after:?}"
    );
    assert_eq!(after["cairn_app_responses_total{web,5xx}"], 2.0);
    assert_eq!(after["cairn_app_responses_total{web,4xx}"], 0.0);
    // The latency histogram holds all seven; the timeout took at least its 300 ms.
    assert_eq!(
        after["cairn_app_request_duration_seconds{web}"], 7.0,
        "{after:?}"
    );
    assert!(after["cairn_app_request_duration_seconds_bucket{web,0.25}"] <= 6.0);
    assert!(after["cairn_app_memory_bytes{web}"] > 0.0, "{after:?}");

    // A restart: the pool killed.
    let pid = daemon.app_status("web")["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the restart to be counted", Duration::from_secs(30), || {
        scrape(metrics).get("cairn_app_restarts_total{web,signal}") == Some(&1.0)
    })
    .unwrap();

    // A cold start: an app scaled to zero, woken by a request.
    let sleepy = daemon.deploy_hello("sleepy", &["--idle", "500ms"]);
    wait_for("sleepy to go idle", Duration::from_secs(30), || {
        daemon.app_status("sleepy")["status"] == "idle"
    })
    .unwrap();
    scrape_when(metrics, "cairn_app_state{sleepy,idle}", 1.0);
    assert_eq!(get(sleepy, "/").unwrap().status, 200);
    let woken = scrape_when(metrics, "cairn_app_cold_starts_total{sleepy}", 1.0);
    assert!(woken["cairn_app_cold_start_seconds_total{sleepy}"] > 0.0);

    // An OOM kill, where cgroup limits hold.
    let limits = daemon.ctl(&["-o", "json", "status"]).json()["limits"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !limits.starts_with("enforced") {
        cairn_tests::skip(
            "the_counters_move_with_traffic_a_trap_a_timeout_an_oom_kill_and_a_restart (OOM part)",
            &format!("cgroup limits are not available here ({limits})"),
        );
        return;
    }
    let (instance, total, alloc) = match cross_target() {
        None => ("512MiB", "64MiB", "/alloc?256"),
        Some(_) => ("1GiB", "384MiB", "/alloc?768"),
    };
    let hungry = daemon.deploy_hello("hungry", &["--memory", instance, "--memory-total", total]);
    let _ = get(hungry, alloc);
    let counted = wait_for(
        "the OOM kill to be counted",
        Duration::from_secs(30),
        || scrape(metrics).get("cairn_app_oom_kills_total{hungry}") == Some(&1.0),
    );
    assert!(
        counted.is_ok(),
        "{:?}\n{}",
        scrape(metrics),
        daemon.app_status("hungry")
    );
    let last = scrape_when(metrics, "cairn_apps", 3.0);
    assert!(last["cairn_app_restarts_total{hungry,oom}"] >= 1.0);
    assert_eq!(last["cairn_app_restarts_total{hungry,exit}"], 0.0);
}

#[test]
fn the_endpoint_serves_metrics_only_and_a_taken_address_stops_the_start() {
    let port = free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let daemon = Daemon::start_with(Some(&format!("[metrics]\nlisten = \"{metrics}\"\n")), &[]);
    assert_eq!(get(metrics, "/").unwrap().status, 404);
    let response = get(metrics, "/metrics").unwrap();
    assert!(response.body.ends_with("# EOF\n"), "{}", response.body);
    drop(daemon);

    // The address already taken: cairnd does not start, and says which setting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let refused = Daemon::start_refused(Some(&format!("[metrics]\nlisten = \"{addr}\"\n")));
    assert!(refused.contains("[metrics] listen"), "{refused}");
}

//! Link cuts: two devices sync with a nats-server on the far side of a link (`netem::Link`:
//! the server in a network namespace of its own, every packet through a forwarder that delays,
//! drops, rate-limits and cuts). Each round publishes a new version for both devices and
//! makes each log a burst of lines that go up through the outbox, then cuts the link at a
//! random moment (packets dropped with no reset, or the interface taken down) for 0.5 to 4 s,
//! then makes it poor until the next round (delay 20 to 200 ms one way, loss 1 to 5%, 1 to 20
//! Mbit/s). At the end, with
//! the link clean, every device must be at the last version and every log line it stores must
//! have reached the upstream exactly once.
//!
//! `CAIRN_LINKCUT_ROUNDS` (default 5: the slice `cargo test` runs; `just linkcut` runs 50),
//! `CAIRN_LINKCUT_SEED` to replay, `CAIRN_LINKCUT_REPORT=1` writes RELIABILITY.md's section.

use cairn_tests::netem::{Link, Shape};
use cairn_tests::random::Rng;
use cairn_tests::{get, wait_for, Daemon, Lattice};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DEVICES: [&str; 2] = ["cut-1", "cut-2"];

struct Device {
    id: &'static str,
    daemon: Daemon,
    fleet_app: String,
    web: std::net::SocketAddr,
}

fn main() {
    let (rounds, seed) = cairn_tests::random::rounds_and_seed("CAIRN_LINKCUT", 5);
    let link = match Link::create() {
        Ok(link) => link,
        Err(reason) => {
            cairn_tests::skip("link cuts", &format!("cannot make a shaped link: {reason}"));
            return;
        }
    };
    println!("link cuts: {rounds} rounds, CAIRN_LINKCUT_SEED={seed}");
    let Some(lattice) = Lattice::behind("link cuts", &link) else {
        return;
    };
    let mut rng = Rng(seed);
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|id| {
            let daemon = Daemon::start_with(Some(&lattice.device_config(id)), &[]);
            let web = daemon.deploy_hello("web", &[]);
            Device {
                id,
                daemon,
                fleet_app: format!("127.0.0.1:{}", cairn_tests::free_port()),
                web,
            }
        })
        .collect();
    let started = Instant::now();
    let mut tally = std::collections::BTreeMap::<&str, u32>::new();
    for round in 1..=rounds {
        let version = format!("r{round}");
        // The operator publishes from elsewhere: not through the device's poor link.
        link.clear();
        for device in &devices {
            lattice.publish(device.id, "fleet-app", &device.fleet_app, &version);
            let lines = format!("/lines?200-{version}-{}", device.id);
            assert_eq!(get(device.web, &lines).unwrap().status, 200);
        }
        // The cut lands at a random moment while the devices fetch, deploy and flush.
        std::thread::sleep(Duration::from_millis(rng.between(0, 1500)));
        let hold = Duration::from_millis(rng.between(500, 4000));
        if rng.between(0, 1) == 0 {
            *tally.entry("cut").or_default() += 1;
            link.set(Shape {
                cut: true,
                ..Default::default()
            });
            std::thread::sleep(hold);
        } else {
            *tally.entry("interface down").or_default() += 1;
            link.interface(false);
            std::thread::sleep(hold);
            link.interface(true);
        }
        // Then a poor spell until the next round.
        let poor = Shape {
            delay: Duration::from_millis(rng.between(20, 200)),
            loss: rng.between(1, 5) as f64 / 100.0,
            rate: rng.between(1, 20) * 1_000_000,
            cut: false,
        };
        link.set(poor);
        std::thread::sleep(Duration::from_millis(rng.between(1000, 3000)));
        link.clear();
        println!(
            "round {round}: {version} published; link cut for {hold:?}, then {} ms, {:.0}% loss, {} Mbit/s",
            poor.delay.as_millis(),
            poor.loss * 100.0,
            poor.rate / 1_000_000
        );
    }
    let last = format!("r{rounds}");
    let mut checked = 0;
    for device in &devices {
        let daemon = &device.daemon;
        let body = format!("{last} from cairn\n");
        let addr = device.fleet_app.parse().unwrap();
        wait_for(
            &format!("{} to converge on {last}", device.id),
            Duration::from_secs(180),
            || get(addr, "/").is_ok_and(|r| r.body == body),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        wait_for(
            &format!("{}'s outbox to empty", device.id),
            Duration::from_secs(180),
            || {
                let sync = daemon.ctl(&["-o", "json", "sync", "status"]).json();
                sync["state"] == "connected" && sync["backlog"] == 0
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        let upstream: Vec<String> = lattice
            .reports(device.id)
            .iter()
            .filter_map(|r| r["line"].as_str().map(str::to_string))
            .filter(|l| l.starts_with('r'))
            .collect();
        let unique: BTreeSet<&String> = upstream.iter().collect();
        assert_eq!(
            unique.len(),
            upstream.len(),
            "{}: a log line arrived twice",
            device.id
        );
        let stored = daemon.ctl_ok(&["logs", "web", "--tail", "0"]);
        for line in stored.lines().filter_map(|l| l.split_whitespace().last()) {
            if line.starts_with('r') && line.contains(device.id) {
                assert!(
                    unique.contains(&line.to_string()),
                    "{}: {line} was stored and never reached the upstream",
                    device.id
                );
                checked += 1;
            }
        }
        let status = daemon.ctl(&["-o", "json", "sync", "status"]).json();
        assert_eq!(status["applied"][0]["version"], rounds, "{status}");
    }
    assert!(
        checked >= rounds as usize * 100,
        "only {checked} lines checked"
    );
    let elapsed = started.elapsed();
    println!(
        "link cuts: {rounds} rounds passed in {elapsed:.0?}: {tally:?}; {checked} log lines arrived exactly once; both devices at {last}"
    );
    if std::env::var_os("CAIRN_LINKCUT_REPORT").is_some() {
        let body = format!(
            "## Link cuts\n\n{rounds} rounds in {elapsed:.0?} (seed {seed}), cuts {tally:?}. Two devices, a new \
             version each per round and 200 log lines each per round; each round the link to the nats-server is cut \
             at a random moment (packets dropped, or its interface taken down) for 0.5 to 4 s, then made poor (20 to \
             200 ms one way, 1 to 5% loss, 1 to 20 Mbit/s) until the next round. Both devices converged on the last \
             version; {checked} stored log lines each reached the stream exactly once. The link is a TUN pair with a \
             forwarder in the test (this kernel has no `sch_netem`); see tests/support/netem.rs.\n\n{}\n- command: \
             `just linkcut {rounds}`\n",
            cairn_tests::report::machine()
        );
        cairn_tests::report::write_section_in(
            "RELIABILITY.md",
            "# Reliability\n",
            "linkcut",
            &body,
        );
    }
}

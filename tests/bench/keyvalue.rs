//! Key-value benchmark (not a test): the `host-apis` component answering `/health` (no
//! key-value call) against `/kv/rw` (a `wasi:keyvalue` read and a write per request, through
//! the pool's host-services socket to cairnd's per-app SQLite, every write synced before the
//! guest hears it succeeded), under the serving benchmark's load; and how many writes each
//! commit (one sync to disk) carried, from `cairnctl status`. `just bench` runs it with release
//! binaries; `--quick` does one short round.

use cairn_tests::report::{machine, median, write_section, Load};
use cairn_tests::Daemon;
use std::net::SocketAddr;

fn wrk(addr: SocketAddr, path: &str, threads: u32, connections: u32, seconds: u32) -> Load {
    let load = cairn_tests::report::wrk(addr, path, threads, connections, seconds);
    assert!(
        load.errors.is_empty(),
        "wrk saw errors against {addr}{path}: {}",
        load.errors
    );
    load
}

/// The app's key-value writes and commits so far.
fn stats(daemon: &Daemon) -> (u64, u64) {
    let status = daemon.app_status("kv");
    let kv = &status["keyvalue"];
    (
        kv["writes"].as_u64().unwrap(),
        kv["commits"].as_u64().unwrap(),
    )
}

/// Runs `load` and returns it with the writes per commit it made.
fn with_commits(daemon: &Daemon, load: impl FnOnce() -> Load) -> (Load, f64) {
    let before = stats(daemon);
    let load = load();
    let after = stats(daemon);
    let (writes, commits) = (after.0 - before.0, after.1 - before.1);
    (load, writes as f64 / commits.max(1) as f64)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, seconds) = if quick { (1, 3) } else { (5, 10) };
    let daemon = Daemon::start();
    let addr = daemon.deploy_manifest(
        "kv",
        "host_apis",
        "[limits]\ninstances = 1000\n[keyvalue]\nquota = \"64MiB\"\n",
    );
    let paths = [
        ("no key-value call", "/health"),
        ("a read and a write", "/kv/rw?counter"),
    ];
    let mut loaded: Vec<Vec<Load>> = vec![Vec::new(); 2];
    let mut single: Vec<Vec<Load>> = vec![Vec::new(); 2];
    let (mut batched, mut alone) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (index, (name, path)) in paths.iter().enumerate() {
            let (load, per_commit) = with_commits(&daemon, || wrk(addr, path, 2, 32, seconds));
            let (one, per_commit_one) =
                with_commits(&daemon, || wrk(addr, path, 1, 1, seconds.min(5)));
            println!(
                "round {round} {name:<20} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  1-conn avg {:>6.3} ms",
                load.requests_per_sec, load.p50_ms, load.p99_ms, one.avg_ms
            );
            if index == 1 {
                println!("        writes per commit: {per_commit:.1} at -c32, {per_commit_one:.1} on one connection");
                batched.push(per_commit);
                alone.push(per_commit_one);
            }
            loaded[index].push(load);
            single[index].push(one);
        }
    }
    let figure =
        |loads: &Vec<Load>, pick: fn(&Load) -> f64| median(loads.iter().map(pick).collect());
    let [bare, kv] = [0, 1].map(|i| {
        (
            figure(&loaded[i], |l| l.requests_per_sec),
            figure(&loaded[i], |l| l.p50_ms),
            figure(&loaded[i], |l| l.p99_ms),
            figure(&single[i], |l| l.avg_ms),
        )
    });
    let table = format!(
        "| figure | `/health` (no key-value call) | `/kv/rw` (a read and a write) | ratio |\n\
         |---|---:|---:|---:|\n\
         | req/s, wrk -t2 -c32 -d{seconds}s | {:.0} | {:.0} | {:.2}× |\n\
         | p50 at -c32 | {:.2} ms | {:.2} ms | {:.2}× |\n\
         | p99 at -c32 | {:.2} ms | {:.2} ms | {:.2}× |\n\
         | avg latency, one connection | {:.3} ms | {:.3} ms | {:.2}× |\n\
         | writes per commit (one sync each), -c32 | | {:.1} | |\n\
         | writes per commit, one connection | | {:.1} | |\n",
        bare.0,
        kv.0,
        kv.0 / bare.0,
        bare.1,
        kv.1,
        kv.1 / bare.1,
        bare.2,
        kv.2,
        kv.2 / bare.2,
        bare.3,
        kv.3,
        kv.3 / bare.3,
        median(batched),
        median(alone),
    );
    println!("\n{table}");
    write_section(
        "keyvalue",
        &format!(
            "## Key-value\n\n{}\n- command: `just bench{}` (release binaries; wrk from Debian, sharing the cores with cairnd; medians of {rounds} alternating rounds; the store on the state dir's disk, WAL with `synchronous = FULL`)\n\n{table}",
            machine(),
            if quick { " --quick" } else { "" }
        ),
    );
}

//! Flash wear (not a test): the bytes cairnd and its pools write to the state directory's disk,
//! from `/proc/PID/io` `write_bytes` (what each process sent towards the block device, counted
//! when it dirtied the page cache), with 10 apps idle and with the same 10 apps serving one
//! request a second each that logs one line; and what one collection of the store (hourly)
//! writes. Each figure is extrapolated to an hour. `just bench` runs it with release binaries;
//! `--quick` measures for 30 s instead of 5 minutes.

use cairn_tests::report::{machine, write_section};
use cairn_tests::{get, Daemon};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const APPS: usize = 10;

/// `write_bytes` of cairnd and of every process it started that still runs (its pools).
fn written(daemon: &Daemon) -> u64 {
    std::iter::once(daemon.pid() as u64)
        .chain(daemon.children())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/io")).ok())
        .filter_map(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("write_bytes: "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Bytes one collection of the store writes (`cairnctl gc`, what cairnd does hourly).
fn collection(daemon: &Daemon) -> u64 {
    let before = written(daemon);
    daemon.ctl_ok(&["gc"]);
    written(daemon) - before
}

/// Bytes written while `during` runs for `period`, and that rate per hour.
fn measure(daemon: &Daemon, period: Duration, during: impl Fn(Instant)) -> (u64, f64) {
    let before = written(daemon);
    let end = Instant::now() + period;
    during(end);
    let bytes = written(daemon) - before;
    (bytes, bytes as f64 * 3600.0 / period.as_secs_f64())
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1 << 20) as f64)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let period = Duration::from_secs(if quick { 30 } else { 300 });
    let daemon = Daemon::start();
    let apps: Vec<SocketAddr> = (0..APPS)
        .map(|i| daemon.deploy_hello(&format!("app{i}"), &[]))
        .collect();
    for app in &apps {
        assert_eq!(get(*app, "/").unwrap().status, 200);
    }
    // What the deploys and first requests left to write (the WAL's pages, copied into the
    // database by the next checkpoint) is not the idle figure: a collection writes it now.
    std::thread::sleep(Duration::from_secs(20));
    let after_deploys = collection(&daemon);
    println!("the deploys' checkpoint: {after_deploys} bytes");

    let (idle_bytes, idle_hour) = measure(&daemon, period, |end| {
        std::thread::sleep(end.saturating_duration_since(Instant::now()))
    });
    let idle_collection = collection(&daemon);
    println!(
        "idle:  {idle_bytes} bytes in {period:?}, {} per hour; then one collection: {idle_collection} bytes",
        mib(idle_hour)
    );

    // One request a second to each app, each logging one line.
    let requests = std::sync::atomic::AtomicU64::new(0);
    let (busy_bytes, busy_hour) = measure(&daemon, period, |end| {
        let mut tick = Instant::now();
        while tick < end {
            for app in &apps {
                let answer = get(*app, "/lines?1-req").unwrap();
                assert_eq!(answer.status, 200, "{}", answer.body);
                requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tick += Duration::from_secs(1);
            std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        }
    });
    let requests = requests.into_inner();
    println!(
        "busy:  {busy_bytes} bytes in {period:?} ({requests} requests, each one logged line), {} per hour, {:.0} bytes per request",
        mib(busy_hour),
        busy_bytes as f64 / requests.max(1) as f64
    );
    // Let the last lines reach the store before the collection is measured.
    std::thread::sleep(Duration::from_secs(2));
    let busy_collection = collection(&daemon);
    println!("then one collection: {busy_collection} bytes");

    // The same apps idle on a device connected to an upstream, which sends a status report
    // (with its figures) every report_every: here 10 s, so a short period sees several.
    let lattice = cairn_tests::Lattice::start("flashwear").expect("nats-server runs");
    let config = format!(
        "{}report_every = \"10s\"\n",
        lattice.device_config("wear-1")
    );
    let device = Daemon::start_with(Some(&config), &[]);
    for i in 0..APPS {
        device.deploy_hello(&format!("app{i}"), &[]);
    }
    std::thread::sleep(Duration::from_secs(20));
    collection(&device);
    let (connected_bytes, _) = measure(&device, period, |end| {
        std::thread::sleep(end.saturating_duration_since(Instant::now()))
    });
    let per_report = connected_bytes as f64 / (period.as_secs_f64() / 10.0);
    println!(
        "idle, connected: {connected_bytes} bytes in {period:?}, {per_report:.0} bytes per status report"
    );
    drop(device);
    drop(lattice);

    let command = format!(
        "cargo bench -p cairn-tests --bench flashwear{}` (part of `just bench`",
        if quick { " -- --quick" } else { "" }
    );
    let binaries = cairn_tests::profile().unwrap_or_else(|| "debug".to_string());
    write_section(
        "Flash wear",
        &format!(
            "{}\n- command: `{command}), {binaries} binaries (what is written does not depend on \
             the build), the state directory on the machine's disk\n- method: `write_bytes` of `/proc/PID/io` summed over cairnd and its pools, \
             over {period:?} each, extrapolated to an hour; one collection (`cairnctl gc`, what \
             cairnd does hourly) measured on its own\n\n\
             | figure | bytes per hour |\n|---|---|\n\
             | {APPS} apps idle | {} (and {idle_collection} bytes for the hourly collection) |\n\
             | {APPS} apps, one request a second each, one logged line per request | {} ({:.0} bytes per request; and {} for the hourly collection) |\n\
             | {APPS} apps idle, connected to an upstream, a status report every 5 minutes (the default `report_every`) | {} ({per_report:.0} bytes per report, measured at one every 10 s) |\n",
            machine(),
            mib(idle_hour),
            mib(busy_hour),
            busy_bytes as f64 / requests.max(1) as f64,
            mib(busy_collection as f64),
            mib(per_report * 12.0),
        ),
    );
}

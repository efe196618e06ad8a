//! Poor link benchmark (not a test): a 5 MiB component fetched by a device over a link of
//! 1 Mbit/s, 200 ms round trip and 1% loss, cut twice (2 s each, packets dropped) mid-transfer.
//! The time from publish to the app answering is compared with the component's bytes over the
//! bandwidth; the target is at most 1.3 times that. The link is `netem::Link` (a TUN pair
//! with a forwarder: this kernel has no `sch_netem`). `just bench` runs it (root needed);
//! `--quick` is the same single run. Prints the figures and rewrites its section of
//! BENCHMARKS.md.

use cairn_tests::netem::{Link, Shape};
use cairn_tests::report::{machine, write_section};
use cairn_tests::{fleet_ok, get, padded_hello, wait_for, Daemon, Lattice};
use std::time::{Duration, Instant};

const SIZE: usize = 5 << 20;
const RATE: u64 = 1_000_000;

fn main() {
    let link = match Link::create() {
        Ok(link) => link,
        Err(reason) => {
            eprintln!("poor link bench skipped: cannot make a shaped link: {reason}");
            return;
        }
    };
    let Some(lattice) = Lattice::behind("poor link bench", &link) else {
        return;
    };
    // Provisioned as the README's fleet flow has it (`fleet init`): on an upstream where
    // nothing was ever published, the device would find the first document's bucket only at
    // its next look (every 2 s), which is not the link's doing.
    lattice.init();
    let big = padded_hello(&lattice.dir.path().join("big.wasm"), b'P', SIZE);
    let bytes = std::fs::metadata(&big).unwrap().len();
    let mut upload: Vec<&str> = vec!["upload"];
    upload.extend(lattice.upstream.iter().map(String::as_str));
    upload.push(big.to_str().unwrap());
    let digest = fleet_ok(&upload).trim().to_string();
    let daemon = Daemon::start_with(Some(&lattice.device_config("poor-1")), &[]);
    wait_for("the device to connect", Duration::from_secs(30), || {
        daemon.ctl(&["-o", "json", "sync", "status"]).json()["state"] == "connected"
    })
    .unwrap();

    // For looking into where the time goes: CAIRN_POORLINK_LOSS (percent) and
    // CAIRN_POORLINK_CUTS (0, 1 or 2) change the link; the figure recorded is the default.
    let loss_percent: f64 = std::env::var("CAIRN_POORLINK_LOSS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let cut_count: usize = std::env::var("CAIRN_POORLINK_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let standard = loss_percent == 1.0 && cut_count == 2;
    let poor = Shape {
        delay: Duration::from_millis(100),
        loss: loss_percent / 100.0,
        rate: RATE,
        cut: false,
    };
    link.set(poor);
    let listen = format!("127.0.0.1:{}", cairn_tests::free_port());
    let ideal = Duration::from_secs_f64(bytes as f64 * 8.0 / RATE as f64);
    // The nats-server is behind the shaped link, so `fleet publish` crosses it too (about ten
    // round trips: 2 s). An operator publishes over the upstream's own network, not the
    // device's: the clock starts once the document is in the bucket.
    let publish_started = Instant::now();
    let published = lattice.publish_component(
        &lattice.key,
        "poor-1",
        &digest,
        "big",
        &listen,
        "big",
        "30d",
    );
    assert_eq!(published.code, 0, "{}", published.stderr);
    let publishing = publish_started.elapsed();
    let started = Instant::now();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    // Two cuts, at about a third and two thirds of the ideal transfer.
    let mut cuts = vec![ideal.mul_f64(0.33), ideal.mul_f64(0.66)];
    cuts.truncate(cut_count);
    let deadline = ideal * 4;
    let serving = loop {
        if get(addr, "/").is_ok_and(|r| r.body == "big from cairn\n") {
            break Some(started.elapsed());
        }
        if started.elapsed() > deadline {
            break None;
        }
        if cuts.first().is_some_and(|at| started.elapsed() >= *at) {
            cuts.remove(0);
            link.set(Shape { cut: true, ..poor });
            std::thread::sleep(Duration::from_secs(2));
            link.set(poor);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    link.clear();
    // The daemon's own account of the fetch (start, progress, verified, admitted), to tell
    // the phases apart.
    let published_at = (std::time::SystemTime::now() - started.elapsed())
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "published at unix {:.3} s (`fleet publish` took {:.2} s); the device's log of the fetch:",
        published_at.as_secs_f64(),
        publishing.as_secs_f64()
    );
    for line in daemon
        .log()
        .lines()
        .filter(|l| l.contains("artifact") || l.contains("download") || l.contains("fleet state"))
    {
        println!("  {line}");
    }
    // The server's side: a device it dropped as a slow consumer shows here.
    for line in lattice
        .nats
        .log()
        .lines()
        .filter(|l| l.contains("Slow Consumer"))
    {
        println!("  nats-server: {line}");
    }
    let ideal_s = ideal.as_secs_f64();
    let body = match serving {
        Some(took) => {
            let ratio = took.as_secs_f64() / ideal_s;
            format!(
                "| component | link | cuts | took | bytes / bandwidth | ratio (target ≤ 1.3) | with `fleet publish` over the same link |\n|---|---|---|---:|---:|---:|---:|\n\
                 | {:.2} MiB | 1 Mbit/s, 200 ms RTT, 1% loss | 2 × 2 s | {:.1} s | {ideal_s:.1} s | {ratio:.2}× | {:.1} s ({:.2}×) |\n",
                bytes as f64 / (1 << 20) as f64,
                took.as_secs_f64(),
                (took + publishing).as_secs_f64(),
                (took + publishing).as_secs_f64() / ideal_s
            )
        }
        None => format!(
            "The component did not land within {:.0} s (4× bytes / bandwidth).\n",
            deadline.as_secs_f64()
        ),
    };
    let section = format!(
        "## Poor link\n\n{body}\nFrom the document's landing in the bucket (`cairnctl fleet publish` returned) to \
         the app answering with the new component, the download resuming across the cuts. The \
         nats-server sits behind the shaped link, so the publish itself (about ten round trips) \
         crosses it too; the last column counts it. The upstream is provisioned (`fleet init`). \
         The link is a TUN pair with a forwarder in the bench (tests/support/netem.rs; this \
         kernel has no `sch_netem`).\n\n{}\n- command: `just bench`\n",
        machine()
    );
    println!("{section}");
    if standard {
        write_section("poor-link", &section);
    } else {
        println!("(loss {loss_percent}%, {cut_count} cut(s): not the standard link, not recorded)");
    }
    drop(daemon);
}

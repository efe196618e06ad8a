//! Serving benchmark (not a test): cairn against `wasmtime serve` (the same wasmtime version,
//! a fresh instance per request on both sides) and a native hyper server, on the same hello
//! component, with the same load generator (wrk), alternating A/B/C rounds so machine drift
//! cancels out. Also cold start from scale-to-zero, start-to-READY with 100 apps, and memory.
//! `just bench` runs it with release binaries; `--quick` does one short round of each figure.

use cairn_tests::report::{machine, median, millis, write_section, Load};
use cairn_tests::{component, free_port, wait_for, Daemon};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// wrk with the errors that would make its figures meaningless refused.
fn wrk(addr: SocketAddr, threads: u32, connections: u32, seconds: u32) -> Load {
    let load = cairn_tests::report::wrk(addr, "/", threads, connections, seconds);
    assert!(
        load.errors.is_empty(),
        "wrk saw errors against {addr}: {}",
        load.errors
    );
    load
}

/// One GET over a fresh raw socket, retried every 0.5 ms until it answers 200; the time it
/// took from `start`.
fn first_200(addr: SocketAddr, start: Instant) -> Duration {
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr) {
            let _ = stream.set_nodelay(true);
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if stream.read_exact(&mut head).is_ok() && &head[9..12] == b"200" {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} never answered 200"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn wasmtime_binary() -> std::path::PathBuf {
    std::env::var_os("CAIRN_WASMTIME")
        .map(Into::into)
        .unwrap_or_else(|| {
            eprintln!("set CAIRN_WASMTIME to wasmtime-cli 48.0.8 (just bench installs it)");
            std::process::exit(2)
        })
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wasmtime_serve(module: &std::path::Path, addr: SocketAddr) -> Peer {
    Peer(
        Command::new(wasmtime_binary())
            .args([
                "serve",
                "-S",
                "cli",
                "--allow-precompiled",
                "--env",
                "GREETING=hello",
                "--addr",
            ])
            .arg(addr.to_string())
            .arg(module)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wasmtime serve starts"),
    )
}

/// The physical limit: a hyper hello-world in its own process (this binary, re-run).
fn native_serve(addr: SocketAddr) -> Peer {
    Peer(
        Command::new(std::env::current_exe().unwrap())
            .args(["--native-server", &addr.to_string()])
            .spawn()
            .expect("the native server starts"),
    )
}

fn run_native_server(addr: SocketAddr) -> ! {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"hello from native\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until `count` apps run a pool (polled every few milliseconds).
fn wait_all_running(daemon: &Daemon, count: usize) {
    wait_for("every app to run", Duration::from_secs(120), || {
        let apps = daemon.ctl(&["-o", "json", "ls"]).json();
        apps.as_array()
            .map(|apps| apps.iter().filter(|a| a["status"] == "running").count())
            == Some(count)
    })
    .unwrap();
}

fn wait_idle(daemon: &Daemon, app: &str) {
    wait_for(
        &format!("{app} to go idle"),
        Duration::from_secs(30),
        || daemon.app_status(app)["status"] == "idle",
    )
    .unwrap();
}

/// Stops the daemon; if it does not stop, shows its log before failing.
fn stop(daemon: &mut Daemon) {
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        daemon.stop();
    }));
    if let Err(panic) = stopped {
        let log = daemon.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("cairnd's log, last lines first:\n{}", tail.join("\n"));
        std::panic::resume_unwind(panic);
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// Over 100 lines: the benchmark's rounds in the order they run, each one reported.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--native-server") {
        run_native_server(args[at + 1].parse().unwrap());
    }
    let quick = args.iter().any(|a| a == "--quick");
    // Five rounds: per round the p99 ratio to wasmtime serve spreads over about ±0.05 here, and
    // a median of three moved by ±0.03 between invocations.
    let (rounds, seconds, cold_rounds) = if quick { (1, 3, 5) } else { (5, 10, 20) };
    let hello = component("hello");
    let dir = tempfile::tempdir().unwrap();
    let cwasm = dir.path().join("hello.cwasm");
    let compiled = Command::new(wasmtime_binary())
        .args(["compile", "-o"])
        .arg(&cwasm)
        .arg(&hello)
        .status()
        .unwrap();
    assert!(compiled.success(), "wasmtime compile failed");

    // Throughput and latency, A/B/C per round.
    let mut daemon = Daemon::start();
    let cairn = daemon.deploy_hello("bench", &["--env", "GREETING=hello", "--instances", "1000"]);
    let wasmtime_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _wasmtime = wasmtime_serve(&cwasm, wasmtime_addr);
    let native_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _native = native_serve(native_addr);
    first_200(wasmtime_addr, Instant::now());
    first_200(native_addr, Instant::now());
    let sides = [
        ("cairn", cairn),
        ("wasmtime serve", wasmtime_addr),
        ("native hyper", native_addr),
    ];
    let mut loaded: Vec<Vec<Load>> = vec![Vec::new(); 3];
    let mut single: Vec<Vec<Load>> = vec![Vec::new(); 3];
    for round in 0..rounds {
        for (index, (name, addr)) in sides.iter().enumerate() {
            let load = wrk(*addr, 2, 32, seconds);
            let one = wrk(*addr, 1, 1, seconds.min(5));
            println!(
                "round {round} {name:<15} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  1-conn avg {:>6.3} ms",
                load.requests_per_sec, load.p50_ms, load.p99_ms, one.avg_ms
            );
            loaded[index].push(load);
            single[index].push(one);
        }
    }
    let figure =
        |loads: &Vec<Load>, pick: fn(&Load) -> f64| median(loads.iter().map(pick).collect());
    let pool_rss = daemon
        .children()
        .into_iter()
        .filter(|pid| {
            // Not the spare pool process (no app yet).
            !std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .windows(7)
                .any(|w| w == b"(spare)")
        })
        .map(|pid| rss_kib(pid as i32))
        .max()
        .unwrap_or(0);

    // Cold start from scale-to-zero: the listener is held, no pool runs.
    let cold_addr = daemon.deploy_hello("cold", &["--idle", "100ms"]);
    let mut cairn_cold = Vec::new();
    for _ in 0..cold_rounds {
        wait_idle(&daemon, "cold");
        cairn_cold.push(millis(first_200(cold_addr, Instant::now())));
    }
    let mut wasmtime_cold = Vec::new();
    for _ in 0..cold_rounds {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let start = Instant::now();
        let _peer = wasmtime_serve(&cwasm, addr);
        wasmtime_cold.push(millis(first_200(addr, start)));
    }

    // Start to READY with 100 deployed apps, the compiled-code cache warm and cleared.
    daemon.ctl_ok(&["rm", "bench"]);
    daemon.ctl_ok(&["rm", "cold"]);
    for n in 0..100 {
        daemon.deploy_hello(&format!("app{n}"), &[]);
    }
    // READY comes once every address is bound; the pools start behind it, so the time until
    // all 100 run is measured too.
    let (mut ready_warm, mut running_warm) = (Vec::new(), Vec::new());
    let (mut ready_cold, mut running_cold) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        stop(&mut daemon);
        let start = Instant::now();
        daemon.restart();
        ready_warm.push(millis(start.elapsed()));
        wait_all_running(&daemon, 100);
        running_warm.push(millis(start.elapsed()));
        stop(&mut daemon);
        rusqlite::Connection::open(daemon.database())
            .unwrap()
            .execute("DELETE FROM compiled", [])
            .unwrap();
        let start = Instant::now();
        daemon.restart();
        ready_cold.push(millis(start.elapsed()));
        wait_all_running(&daemon, 100);
        running_cold.push(millis(start.elapsed()));
    }
    let hundred_rss = rss_kib(daemon.pid());
    drop(daemon);

    // Supervisor memory with 1,000 deployed apps, all idle (scaled to zero).
    let daemon = Daemon::start();
    let thousand = if quick { 200 } else { 1000 };
    for n in 0..thousand {
        daemon.deploy_hello(&format!("idle{n}"), &["--idle", "100ms"]);
    }
    for n in 0..thousand {
        wait_idle(&daemon, &format!("idle{n}"));
    }
    let idle_rss = rss_kib(daemon.pid());

    let [c, w, n] = [0, 1, 2].map(|i| {
        (
            figure(&loaded[i], |l| l.requests_per_sec),
            figure(&loaded[i], |l| l.p50_ms),
            figure(&loaded[i], |l| l.p99_ms),
            figure(&single[i], |l| l.avg_ms),
        )
    });
    let (cold_c, cold_w) = (median(cairn_cold), median(wasmtime_cold));
    // Ratios with three decimals where there is a target, so a figure at the line is not rounded
    // onto it.
    let table = format!(
        "| figure | cairn | wasmtime serve | cairn / wasmtime | native hyper | target |\n\
         |---|---:|---:|---:|---:|---|\n\
         | req/s, wrk -t2 -c32 -d{seconds}s | {:.0} | {:.0} | {:.3}× | {:.0} | ≥ 2.0× |\n\
         | p50 at -c32 | {:.2} ms | {:.2} ms | {:.2}× | {:.2} ms | |\n\
         | p99 at -c32 | {:.2} ms | {:.2} ms | {:.3}× | {:.2} ms | ≤ 0.5× |\n\
         | avg latency, one connection | {:.3} ms | {:.3} ms | {:.3}× | {:.3} ms | ≤ 0.8× |\n\
         | cold start to first 200 (cairn: from scale-to-zero; wasmtime: process start, precompiled) | {cold_c:.2} ms | {cold_w:.2} ms | {:.2}× | | ≤ 5 ms |\n\
         | start to READY, 100 apps, compiled cache warm | {:.0} ms | | | | ≤ 300 ms |\n\
         | start to all 100 pools running, cache warm | {:.0} ms | | | | |\n\
         | start to READY, 100 apps, cache cleared | {:.0} ms | | | | |\n\
         | start to all 100 pools running, cache cleared | {:.0} ms | | | | |\n\
         | supervisor RSS, 100 running apps | {} | | | | |\n\
         | supervisor RSS, {thousand} idle apps | {} | | | | ≤ 64 MiB (1,000) |\n\
         | RSS of one warm pool (after load) | {} | | | | |\n",
        c.0, w.0, c.0 / w.0, n.0,
        c.1, w.1, c.1 / w.1, n.1,
        c.2, w.2, c.2 / w.2, n.2,
        c.3, w.3, c.3 / w.3, n.3,
        cold_c / cold_w,
        median(ready_warm),
        median(running_warm),
        median(ready_cold),
        median(running_cold),
        mib(hundred_rss),
        mib(idle_rss),
        mib(pool_rss),
    );
    println!("\n{table}");
    write_section(
        "serve",
        &format!(
            "## Serving\n\n{}\n- command: `just bench{}` (release binaries; wrk from Debian; wasmtime-cli 48.0.8 `serve -S cli` with the component precompiled; medians of {rounds} alternating rounds, {cold_rounds} cold starts)\n\n{table}",
            machine(),
            if quick { " --quick" } else { "" }
        ),
    );
}

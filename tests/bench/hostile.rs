//! The hostile suite (not a test; `just hostile`): one app is attacked, one attack at a time
//! and then all at once, while a well-behaved neighbour on the same device serves wrk. For
//! each attack: the neighbour's p99 under attack against its p99 alone, what the attacked app
//! answered, how long it took to answer 200 again once the attack stopped, and cairnd's peak
//! resident memory. At the end: nothing acknowledged before the attacks was lost.
//! Release binaries; run as root for the pool-credential attack (skipped otherwise, loudly).

use cairn_tests::report::{machine, write_section, wrk};
use cairn_tests::{get, Daemon};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the neighbour is measured, alone and under each attack (each way).
const MEASURE_SECONDS: u32 = 5;
/// The neighbour's steady traffic, requests a second (`paced`).
const STEADY_RATE: u32 = 1000;

/// What the attacking clients saw, by answer ("200", "503", "413", "closed", …).
type Seen = Arc<Mutex<BTreeMap<String, u64>>>;

fn note(seen: &Seen, what: &str) {
    *seen.lock().unwrap().entry(what.to_string()).or_default() += 1;
}

/// One request on a fresh connection; the status, or how it failed.
fn answer(addr: SocketAddr, head: &str, body: &[u8], read_timeout: Duration) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return "connect failed".into();
    };
    let _ = stream.set_read_timeout(Some(read_timeout));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    if stream.write_all(head.as_bytes()).is_err() {
        return "closed".into();
    }
    let mut written = 0;
    while written < body.len() {
        let end = (written + (1 << 20)).min(body.len());
        if stream.write_all(&body[written..end]).is_err() {
            break;
        }
        written = end;
    }
    let mut status = [0u8; 12];
    if stream.read_exact(&mut status).is_err() {
        return "closed".into();
    }
    // Read (and drop) the rest, so a large response is taken as a client would.
    let mut sink = vec![0u8; 1 << 16];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    String::from_utf8_lossy(&status[9..12]).into_owned()
}

/// An attack: threads that run until `stop`, and what they saw.
struct Attack {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    seen: Seen,
}

impl Attack {
    fn start(workers: usize, work: impl Fn(&Seen, &AtomicBool) + Send + Sync + 'static) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let work = Arc::new(work);
        let threads = (0..workers)
            .map(|_| {
                let (stop, seen, work) = (Arc::clone(&stop), Arc::clone(&seen), Arc::clone(&work));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        work(&seen, &stop);
                    }
                })
            })
            .collect();
        Attack {
            stop,
            threads,
            seen,
        }
    }

    fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// Starts an attack.
type Starter = Box<dyn Fn() -> Attack>;

/// The attacks, by name, each started against `target`.
fn attacks(target: SocketAddr) -> Vec<(&'static str, Starter)> {
    let get_path = move |path: &'static str| {
        move |seen: &Seen, _: &AtomicBool| {
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            note(seen, &answer(target, &head, b"", Duration::from_secs(30)));
        }
    };
    vec![
        (
            "every instance in a busy loop",
            Box::new(move || Attack::start(12, get_path("/loop"))),
        ),
        (
            "memory bomb",
            Box::new(move || Attack::start(8, get_path("/alloc"))),
        ),
        (
            "unbounded recursion",
            Box::new(move || Attack::start(8, get_path("/recurse"))),
        ),
        (
            "log flood (64 KiB per request, up to 1 GiB)",
            Box::new(move || {
                let written = Arc::new(AtomicU64::new(0));
                let path = format!("/lines?8-{}", "x".repeat(8 << 10));
                Attack::start(8, move |seen, _| {
                    if written.fetch_add(64 << 10, Ordering::Relaxed) >= 1 << 30 {
                        std::thread::sleep(Duration::from_millis(50));
                        return;
                    }
                    let head =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    note(seen, &answer(target, &head, b"", Duration::from_secs(30)));
                })
            }),
        ),
        (
            "100 MiB request bodies",
            Box::new(move || {
                let body = Arc::new(vec![b'b'; 100 << 20]);
                Attack::start(4, move |seen, _| {
                    let head = format!(
                        "POST /sink HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    note(seen, &answer(target, &head, &body, Duration::from_secs(30)));
                })
            }),
        ),
        (
            "100 MiB responses",
            Box::new(move || Attack::start(4, get_path("/big?100"))),
        ),
        (
            "2,000 slowloris connections",
            Box::new(move || {
                Attack::start(40, move |seen, stop| {
                    let mut open: Vec<TcpStream> = (0..50)
                        .filter_map(|_| {
                            let mut s =
                                TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()?;
                            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").ok()?;
                            Some(s)
                        })
                        .collect();
                    // Hold them, one more header byte now and then, until each is closed.
                    while !open.is_empty() && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(500));
                        open.retain_mut(|s| {
                            let kept = s.write_all(b"a").is_ok();
                            if !kept {
                                note(seen, "closed by the server");
                            }
                            kept
                        });
                    }
                })
            }),
        ),
        (
            "clients that never read their response",
            Box::new(move || {
                Attack::start(50, move |seen, stop| {
                    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    else {
                        return;
                    };
                    let _ = s.write_all(b"GET /big?100 HTTP/1.1\r\nHost: x\r\n\r\n");
                    let started = Instant::now();
                    // Never read; wait for the server to give up on us.
                    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(60)
                    {
                        std::thread::sleep(Duration::from_millis(200));
                        if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                            note(seen, "closed by the server");
                            return;
                        }
                    }
                })
            }),
        ),
    ]
}

/// Samples cairnd's resident memory every 50 ms until stopped; the peak, in MiB.
fn rss_sampler(pid: i32) -> (Arc<AtomicBool>, JoinHandle<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let sampler = std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        while !stopped.load(Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        peak_kib as f64 / 1024.0
    });
    (stop, sampler)
}

/// How long after `since` the app first answers 200 (polled every 20 ms, up to 60 s).
fn recovery(addr: SocketAddr, since: Instant) -> Duration {
    while since.elapsed() < Duration::from_secs(60) {
        if get(addr, "/").map(|r| r.status == 200).unwrap_or(false) {
            return since.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    since.elapsed()
}

fn describe(seen: &BTreeMap<String, u64>) -> String {
    if seen.is_empty() {
        return "no answer finished".into();
    }
    seen.iter()
        .map(|(what, count)| format!("{count}× {what}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pool-credential attack: the target pool's uid calls the control socket and signals
/// the neighbour's pool.
fn pool_credentials(daemon: &Daemon) -> String {
    if !cairn_tests::is_root() {
        cairn_tests::skip(
            "hostile: pool credentials",
            "needs root to act as a pool's user",
        );
        return "skipped (not root)".into();
    }
    let status = daemon.app_status("target");
    let pool = status["pid"].as_u64().unwrap();
    let uid = std::fs::read_to_string(format!("/proc/{pool}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap();
    let rm = daemon.ctl_as(Some(uid), &["rm", "calm"]);
    let neighbour_pool = daemon.app_status("calm")["pid"].as_u64().unwrap();
    use std::os::unix::process::CommandExt;
    let kill = std::process::Command::new("sh")
        .args(["-c", &format!("kill -0 {neighbour_pool}")])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    format!(
        "`cairnctl rm calm` as uid {uid}: {}; signal the neighbour's pool: {}",
        if rm.code == 0 { "SUCCEEDED" } else { "refused" },
        if kill.status.success() {
            "SUCCEEDED"
        } else {
            "refused (EPERM)"
        }
    )
}

/// The neighbour's traffic at a steady rate, as a device's real clients send it: `rate`
/// requests a second over four kept-alive connections for `seconds`, each timed from when it
/// was due (so a stall counts for every request it delays). The p99 in ms and the failures,
/// by kind.
fn paced(addr: SocketAddr, rate: u32, seconds: u32) -> (f64, String) {
    const CONNECTIONS: u32 = 4;
    let interval = Duration::from_secs_f64(f64::from(CONNECTIONS) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(10);
    let end = start + Duration::from_secs(u64::from(seconds));
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|worker| {
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut failures: Vec<String> = Vec::new();
                let mut stream: Option<TcpStream> = None;
                let mut due = start + interval.mul_f64(f64::from(worker) / f64::from(CONNECTIONS));
                while due < end {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let connection = match &mut stream {
                        Some(stream) => stream,
                        None => match TcpStream::connect(addr) {
                            Ok(new) => {
                                let _ = new.set_read_timeout(Some(Duration::from_secs(5)));
                                let _ = new.set_nodelay(true);
                                stream.insert(new)
                            }
                            Err(error) => {
                                failures.push(format!("connect: {}", error.kind()));
                                due += interval;
                                continue;
                            }
                        },
                    };
                    match one_kept_alive(connection) {
                        Ok(()) => latencies.push(due.elapsed().as_secs_f64() * 1000.0),
                        Err(failure) => {
                            failures.push(failure);
                            stream = None;
                        }
                    }
                    due += interval;
                }
                (latencies, failures)
            })
        })
        .collect();
    let (mut latencies, mut failures) = (Vec::new(), BTreeMap::<String, u64>::new());
    for worker in workers {
        let (some, failed) = worker.join().unwrap();
        latencies.extend(some);
        for failure in failed {
            *failures.entry(failure).or_default() += 1;
        }
    }
    let failures = failures
        .iter()
        .map(|(what, count)| format!("{count}× {what}"))
        .collect::<Vec<_>>()
        .join(", ");
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN);
    (p99, failures)
}

/// GET / on a kept-alive connection; a whole 200, or what came instead.
fn one_kept_alive(stream: &mut TcpStream) -> Result<(), String> {
    if let Err(error) = stream.write_all(b"GET / HTTP/1.1\r\nHost: neighbour\r\n\r\n") {
        return Err(format!("write: {}", error.kind()));
    }
    let mut read = Vec::with_capacity(512);
    let mut buffer = [0u8; 512];
    loop {
        let n = match stream.read(&mut buffer) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => n,
            Err(error) => return Err(format!("read: {}", error.kind())),
        };
        read.extend_from_slice(&buffer[..n]);
        let Some(head_end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&read[..head_end]).to_ascii_lowercase();
        // A guest's body may come chunked (its length unknown when the head was sent): the
        // response ends with the last chunk, else after content-length bytes.
        let complete = if head.contains("transfer-encoding: chunked") {
            read[head_end + 2..].ends_with(b"\r\n0\r\n\r\n")
        } else {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            read.len() >= head_end + 4 + length
        };
        if complete {
            return match head.starts_with("http/1.1 200") {
                true => Ok(()),
                false => Err(head.lines().next().unwrap_or_default().to_string()),
            };
        }
    }
}

/// Binds the calling thread (and what it starts from now on) to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity (of this
    // thread, pid 0) read and write only that set.
    unsafe {
        let mut set: nix::libc::cpu_set_t = std::mem::zeroed();
        nix::libc::CPU_SET(cpu, &mut set);
        let result =
            nix::libc::sched_setaffinity(0, std::mem::size_of::<nix::libc::cpu_set_t>(), &set);
        assert_eq!(result, 0, "cannot pin to CPU {cpu}");
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Before any pinning, which would make it see one CPU.
    let machine = machine();
    // `--pinned`: cairnd (and so every pool) on CPU 0; wrk and the attackers on CPU 1, as for
    // a device whose clients are elsewhere.
    let pinned = std::env::args().any(|a| a == "--pinned");
    if pinned {
        assert!(
            std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2,
            "--pinned needs two CPUs"
        );
        pin_to(0);
    }
    let daemon = Daemon::start();
    if pinned {
        pin_to(1);
    }
    let neighbour = daemon.deploy_hello("calm", &["--env", "GREETING=calm"]);
    let target = daemon.deploy_hello_manifest(
        "target",
        "header_timeout = \"5s\"\nsend_timeout = \"5s\"",
        "instances = 8\ntimeout = \"2s\"\nmemory = \"32MiB\"",
    );
    // Acknowledged before the attacks: a line in the neighbour's log, and both apps' state.
    assert_eq!(get(neighbour, "/log").unwrap().status, 200);
    daemon.wait_logged("calm", "log line to stdout");
    let apps_before = daemon.ctl_ok(&["-o", "json", "ls"]);

    let seconds = if quick { 2 } else { MEASURE_SECONDS };
    let alone = wrk(neighbour, "/", 1, 4, seconds);
    let (steady_alone, _) = paced(neighbour, STEADY_RATE, seconds);
    println!(
        "neighbour alone: p99 {:.2} ms, {:.0} req/s; at {STEADY_RATE} req/s p99 {steady_alone:.2} ms",
        alone.p99_ms, alone.requests_per_sec
    );
    let mut rows = Vec::new();
    let run = |name: &str, attacks: Vec<Attack>, rows: &mut Vec<String>| {
        let (stop_rss, sampler) = rss_sampler(daemon.pid());
        std::thread::sleep(Duration::from_secs(1));
        let under = wrk(neighbour, "/", 1, 4, seconds);
        let (steady, steady_failures) = paced(neighbour, STEADY_RATE, seconds);
        let stopped = Instant::now();
        let mut seen = BTreeMap::new();
        for attack in attacks {
            for (what, count) in attack.finish() {
                *seen.entry(what).or_default() += count;
            }
        }
        let recovered = recovery(target, stopped);
        stop_rss.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        let errors = if under.errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", under.errors)
        };
        let steady_errors = if steady_failures.is_empty() {
            String::new()
        } else {
            format!(" (failed: {steady_failures})")
        };
        println!(
            "{name}: neighbour p99 {:.2} ms{errors}, at {STEADY_RATE} req/s {steady:.2} ms{steady_errors}, target {}, recovered in {:.0} ms, cairnd peak RSS {peak:.1} MiB",
            under.p99_ms,
            describe(&seen),
            recovered.as_secs_f64() * 1000.0
        );
        rows.push(format!(
            "| {name} | {:.2} ms | {:.1}×{errors} | {steady:.2} ms | {:.1}×{steady_errors} | {} | {:.0} ms | {peak:.1} MiB |",
            under.p99_ms,
            under.p99_ms / alone.p99_ms,
            steady / steady_alone,
            describe(&seen),
            recovered.as_secs_f64() * 1000.0
        ));
    };
    for (name, attack) in attacks(target) {
        run(name, vec![attack()], &mut rows);
    }
    let everything: Vec<Attack> = attacks(target).iter().map(|(_, start)| start()).collect();
    run("all of the above at once", everything, &mut rows);
    let credentials = pool_credentials(&daemon);
    println!("pool credentials: {credentials}");

    // Nothing acknowledged was lost: both apps as they were, the neighbour's line still kept.
    let apps_after = daemon.ctl_ok(&["-o", "json", "ls"]);
    let names = |json: &str| -> Vec<(String, u64)> {
        serde_json::from_str::<serde_json::Value>(json)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().to_string(),
                    a["generation"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        names(&apps_before),
        names(&apps_after),
        "the apps changed under attack"
    );
    assert!(
        daemon
            .ctl_ok(&["logs", "calm"])
            .contains("log line to stdout"),
        "the neighbour's acknowledged log line was lost"
    );
    assert_eq!(get(neighbour, "/").unwrap().body, "calm from cairn\n");

    let (section, title, command, sharing) = if pinned {
        (
            "hostile-pinned",
            "Hostile suite, pinned",
            "just hostile --pinned",
            "cairnd and its pools are pinned to CPU 0, wrk and the attacking clients to CPU 1",
        )
    } else {
        (
            "hostile",
            "Hostile suite",
            "just hostile",
            "every process shares the machine's cores",
        )
    };
    write_section(
        section,
        &format!(
            "## {title}\n\n{}\n- command: `{command}` (release binaries; wrk from Debian)\n\n\
             One app (`target`: 8 instances, 2 s timeout, 32 MiB per \
             instance, header and send timeouts 5 s, everything else default) is attacked while \
             its neighbour (`calm`, defaults) serves wrk -t1 -c4 for {seconds} s (as fast as it \
             can: any CPU the attack takes lengthens its queue), then steady traffic for \
             {seconds} s ({STEADY_RATE} req/s over 4 kept-alive connections, each request timed \
             from when it was due); {sharing}. Neighbour alone: p99 {:.2} ms at {:.0} req/s \
             under wrk, {steady_alone:.2} ms at {STEADY_RATE} req/s. Recovery: \
             from the attack's end to the target's first 200. Peak RSS: cairnd (the \
             supervisor), sampled every 50 ms.\n\n\
             | attack | neighbour p99 (wrk) | vs alone | p99 at {STEADY_RATE} req/s | vs alone | target answered | recovery | cairnd peak RSS |\n\
             |---|---:|---:|---:|---:|---|---:|---:|\n{}\n\n\
             Pool credentials: {credentials}. After every attack both apps kept their \
             generations and the neighbour's log line stored before the attacks was still \
             there.\n",
            machine,
            alone.p99_ms,
            alone.requests_per_sec,
            rows.join("\n")
        ),
    );
}

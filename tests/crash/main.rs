//! The crash loop: rounds of a random operation (deploy, rollback, removing or adding an app,
//! a push, a log flood whose lines go through the outbox to a real nats-server, a fleet
//! document whose new component the device fetches) during which cairnd, or one of its pools,
//! is killed with SIGKILL at a random moment. After each round the database passes `PRAGMA
//! integrity_check`, every operation that returned success is in effect (one that did not is
//! either in effect or not, never half), every pushed component is present and hashes to its
//! digest, every log line the device stored reaches the upstream exactly once, the device
//! converges on the latest fleet document, and cairnd reaches READY with every app serving.
//!
//! `cargo test` runs a short slice (`CAIRN_CRASH_ROUNDS`, default 6); `just crash` runs 100
//! rounds and writes its figures to RELIABILITY.md. `CAIRN_CRASH_SEED` replays a run.

use cairn_tests::random::Rng;
use cairn_tests::{component, fleet_ok, get, wait_for, Daemon, Lattice};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// xorshift64*: enough randomness to pick operations and moments, and a seed to replay them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Deploy,
    Rollback,
    /// Removes the second app, or deploys it again when it is gone.
    ToggleExtra,
    Push,
    LogFlood,
    /// A fleet document with a new component for `fleet-app`, which the device fetches.
    FleetPublish,
}

const OPS: [Op; 6] = [
    Op::Deploy,
    Op::Rollback,
    Op::ToggleExtra,
    Op::Push,
    Op::LogFlood,
    Op::FleetPublish,
];

const DEVICE: &str = "crash-1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Daemon,
    Pool,
}

/// What the device must show: the state every acknowledged operation left.
#[derive(Debug, Clone)]
struct Model {
    /// `web`'s current generation and the greeting it serves.
    web: (u64, String),
    extra: bool,
    /// Pushed components by digest.
    pushed: Vec<String>,
    /// The greeting of the latest fleet document published for `fleet-app`.
    fleet: String,
}

struct Harness {
    daemon: Daemon,
    lattice: Lattice,
    web: String,
    extra: String,
    fleet_app: String,
    model: Model,
    rng: Rng,
    /// Stored log lines found upstream so far (so the outbox check is seen to check).
    lines_verified: std::sync::atomic::AtomicUsize,
}

fn main() {
    let (rounds, seed) = cairn_tests::random::rounds_and_seed("CAIRN_CRASH", 6);
    println!("crash loop: {rounds} rounds, CAIRN_CRASH_SEED={seed}");
    let Some(lattice) = Lattice::start("crash loop") else {
        return;
    };
    let daemon = Daemon::start_with(Some(&lattice.device_config(DEVICE)), &[]);
    let port = || format!("127.0.0.1:{}", cairn_tests::free_port());
    let mut harness = Harness {
        daemon,
        lattice,
        web: port(),
        extra: port(),
        fleet_app: port(),
        model: Model {
            web: (0, String::new()),
            extra: false,
            pushed: Vec::new(),
            fleet: String::new(),
        },
        rng: Rng(seed),
        lines_verified: std::sync::atomic::AtomicUsize::new(0),
    };
    harness.deploy_web("round-0");
    harness.model.web = (1, "round-0".into());
    harness.toggle_extra();
    harness.model.extra = true;
    let (ok, _) = harness.run(Op::FleetPublish, "round-0", &harness.padded(0));
    assert!(ok, "the first fleet document is published");
    harness.model.fleet = "round-0".into();

    let mut tally: BTreeMap<(Op, Victim), (u32, u32)> = BTreeMap::new();
    let mut ready_after: Vec<Duration> = Vec::new();
    let started = Instant::now();
    for round in 1..=rounds {
        let op = OPS[harness.rng.below(OPS.len() as u64) as usize];
        let victim = if harness.rng.below(3) == 0 {
            Victim::Pool
        } else {
            Victim::Daemon
        };
        // Half the kills land in the first 40 ms, where most operations are still under way.
        let window = if harness.rng.below(2) == 0 { 40 } else { 300 };
        let delay = Duration::from_millis(harness.rng.below(window));
        let acked = harness.round(round, op, victim, delay, &mut ready_after);
        let entry = tally.entry((op, victim)).or_default();
        entry.0 += 1;
        entry.1 += u32::from(acked);
        println!(
            "round {round}: {op:?}, {victim:?} killed after {delay:?}: {}",
            if acked {
                "acknowledged, in effect"
            } else {
                "not acknowledged, all or nothing"
            }
        );
    }
    let elapsed = started.elapsed();
    // A flood is acknowledged by its response; its lines may still be lost with a kill, but
    // not those of five floods: then the outbox check is finding nothing to check.
    let floods: u32 = tally
        .iter()
        .filter(|((op, _), _)| *op == Op::LogFlood)
        .map(|(_, (_, acked))| acked)
        .sum();
    assert!(
        floods < 5
            || harness
                .lines_verified
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
        "{floods} floods acknowledged, and no stored line of theirs was found to check upstream"
    );
    println!("crash loop: {rounds} rounds passed in {elapsed:.0?}");
    if std::env::var_os("CAIRN_CRASH_REPORT").is_some() {
        report(rounds, seed, elapsed, &tally, &ready_after);
    }
}

impl Harness {
    /// One round: `op` runs while `victim` is killed after `delay`; then everything is
    /// checked. Returns whether the operation was acknowledged.
    fn round(
        &mut self,
        round: u32,
        op: Op,
        victim: Victim,
        delay: Duration,
        ready_after: &mut Vec<Duration>,
    ) -> bool {
        let before = self.model.clone();
        // Any app's pool may be the one killed.
        let apps = ["web", "extra", "fleet-app"];
        let app = apps[self.rng.below(apps.len() as u64) as usize];
        let pool = match self.daemon.ctl(&["-o", "json", "status", app]) {
            status if status.code == 0 => status.json()["pid"].as_u64().unwrap_or(0),
            _ => 0,
        };
        let greeting = format!("round-{round}");
        let file = self.padded(round);
        let daemon_pid = self.daemon.pid();
        let (acked, reply) = std::thread::scope(|scope| {
            let running = scope.spawn(|| self.run(op, &greeting, &file));
            std::thread::sleep(delay);
            let pid = match victim {
                Victim::Daemon => daemon_pid,
                Victim::Pool => pool as i32,
            };
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            running.join().expect("the operation's thread")
        });
        if victim == Victim::Daemon {
            self.daemon.reap();
            integrity(&self.daemon);
            let start = Instant::now();
            self.daemon.restart();
            ready_after.push(start.elapsed());
        }
        self.settle(op, acked, &reply, &greeting, &file, &before);
        self.check(round);
        acked
    }

    /// Runs `op` with cairnctl; whether it succeeded, and what it printed.
    fn run(&self, op: Op, greeting: &str, file: &std::path::Path) -> (bool, serde_json::Value) {
        let result = match op {
            Op::Deploy => self.daemon.ctl(&[
                "-o",
                "json",
                "deploy",
                "web",
                "--component",
                component("hello").to_str().unwrap(),
                "--listen",
                &self.web,
                "--env",
                &format!("GREETING={greeting}"),
            ]),
            Op::Rollback => self.daemon.ctl(&["-o", "json", "rollback", "web"]),
            Op::ToggleExtra if self.model.extra => self.daemon.ctl(&["-o", "json", "rm", "extra"]),
            Op::ToggleExtra => self.daemon.ctl(&[
                "-o",
                "json",
                "deploy",
                "extra",
                "--component",
                component("hello").to_str().unwrap(),
                "--listen",
                &self.extra,
            ]),
            Op::Push => self.daemon.ctl(&[
                "-o",
                "json",
                "push",
                file.to_str().unwrap(),
                "--name",
                "crash",
                "--tag",
                file.file_stem().unwrap().to_str().unwrap(),
            ]),
            Op::LogFlood => {
                let addr = self.web.parse().unwrap();
                let ok =
                    get(addr, &format!("/lines?1000-{greeting}")).is_ok_and(|r| r.status == 200);
                return (ok, serde_json::Value::Null);
            }
            Op::FleetPublish => {
                // Not the device's doing: the upstream takes the upload and the document
                // whatever happens to the device, which fetches and applies it meanwhile.
                let upload: Vec<&str> = ["upload"]
                    .into_iter()
                    .chain(self.lattice.upstream.iter().map(String::as_str))
                    .chain([file.to_str().unwrap()])
                    .collect();
                let digest = fleet_ok(&upload).trim().to_string();
                let published = self.lattice.publish_component(
                    &self.lattice.key,
                    DEVICE,
                    &digest,
                    "fleet-app",
                    &self.fleet_app,
                    greeting,
                    "30d",
                );
                return (published.code == 0, serde_json::Value::Null);
            }
        };
        let json = serde_json::from_str(&result.stdout).unwrap_or(serde_json::Value::Null);
        (result.code == 0, json)
    }

    /// Brings the model up to date: an acknowledged operation must be in effect; one that was
    /// not may be in effect or not, and the model takes what the device shows.
    fn settle(
        &mut self,
        op: Op,
        acked: bool,
        reply: &serde_json::Value,
        greeting: &str,
        file: &std::path::Path,
        before: &Model,
    ) {
        let status = self.wait_status("web");
        let now = (
            status["generation"].as_u64().unwrap(),
            status["env"]["GREETING"].as_str().unwrap_or("").to_string(),
        );
        match op {
            Op::Deploy | Op::Rollback if acked => {
                // deploy prints {"app": {...}}, rollback the app itself.
                let generation = reply["app"]["generation"]
                    .as_u64()
                    .or(reply["generation"].as_u64())
                    .expect("the reply names a generation");
                assert_eq!(
                    now.0, generation,
                    "{op:?} acknowledged generation {generation}: {reply}"
                );
                self.model.web = now;
            }
            Op::Deploy => {
                let new = now.0 > before.web.0 && now.1 == greeting;
                assert!(
                    now == before.web || new,
                    "an unacknowledged deploy left generation {now:?}, neither {:?} nor a new one with {greeting}",
                    before.web
                );
                self.model.web = now;
            }
            Op::Rollback => {
                // Either as before, or an earlier generation made current.
                assert!(
                    now == before.web || now.0 < before.web.0,
                    "{now:?} after {:?}",
                    before.web
                );
                self.model.web = now;
            }
            Op::ToggleExtra => {
                let present = self.app_listed("extra");
                if acked {
                    assert_eq!(present, !before.extra, "an acknowledged change of extra");
                }
                self.model.extra = present;
            }
            Op::Push => {
                let digest = sha_digest(file);
                if acked {
                    assert_eq!(reply["digest"], digest.as_str());
                    self.model.pushed.push(digest);
                } else if self.daemon.stored_blob(&digest).is_some() {
                    self.model.pushed.push(digest);
                }
            }
            Op::LogFlood => {}
            Op::FleetPublish => {
                assert!(acked, "the upstream took the document");
                self.model.fleet = greeting.to_string();
            }
        }
    }

    /// Every app serves as the model says; every pushed component is present and verifies.
    fn check(&self, round: u32) {
        let web: std::net::SocketAddr = self.web.parse().unwrap();
        let expected = format!("{} from cairn\n", self.model.web.1);
        let mut last = String::new();
        let served = wait_for(
            &format!("web to serve after round {round}"),
            Duration::from_secs(30),
            || match get(web, "/") {
                Ok(response) if response.status == 200 && response.body == expected => true,
                Ok(response) => {
                    last = format!("{} {:?}", response.status, response.body);
                    false
                }
                Err(error) => {
                    last = error.to_string();
                    false
                }
            },
        );
        assert!(
            served.is_ok(),
            "web does not serve {expected:?}: {last}\n{}",
            self.daemon.log()
        );
        assert_eq!(self.app_listed("extra"), self.model.extra);
        if self.model.extra {
            let extra: std::net::SocketAddr = self.extra.parse().unwrap();
            wait_for("extra to serve", Duration::from_secs(30), || {
                get(extra, "/").is_ok_and(|r| r.status == 200)
            })
            .unwrap();
        }
        let fleet_app: std::net::SocketAddr = self.fleet_app.parse().unwrap();
        let latest = format!("{} from cairn\n", self.model.fleet);
        wait_for(
            &format!(
                "the device to converge on fleet document {}",
                self.model.fleet
            ),
            Duration::from_secs(60),
            || get(fleet_app, "/").is_ok_and(|r| r.status == 200 && r.body == latest),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon.log()));
        self.check_outbox();
        for digest in &self.model.pushed {
            let bytes = self
                .daemon
                .stored_blob(digest)
                .unwrap_or_else(|| panic!("{digest} was pushed and is gone"));
            assert_eq!(
                &format!("sha256:{}", hex(&sha2::Sha256::digest(&bytes))),
                digest,
                "stored bytes hash to their digest"
            );
        }
    }

    /// Once the outbox has emptied: no log line reached the upstream twice, and every flood
    /// line the device still stores reached it.
    fn check_outbox(&self) {
        wait_for("the outbox to empty", Duration::from_secs(60), || {
            let sync = self.daemon.ctl(&["-o", "json", "sync", "status"]).json();
            sync["state"] == "connected" && sync["backlog"] == 0
        })
        .unwrap();
        let upstream: Vec<String> = self
            .lattice
            .reports(DEVICE)
            .iter()
            .filter(|r| r["kind"] == "log")
            .filter_map(|r| r["line"].as_str().map(str::to_string))
            .filter(|line| line.starts_with("round-"))
            .collect();
        let unique: std::collections::BTreeSet<&String> = upstream.iter().collect();
        assert_eq!(
            unique.len(),
            upstream.len(),
            "a log line reached the upstream twice"
        );
        let stored = self.daemon.ctl_ok(&["logs", "web", "--tail", "0"]);
        for line in stored.lines().filter_map(|l| l.split_whitespace().last()) {
            if line.starts_with("round-") {
                assert!(
                    unique.contains(&line.to_string()),
                    "{line} was stored and never reached the upstream"
                );
                self.lines_verified
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn wait_status(&self, app: &str) -> serde_json::Value {
        let mut status = serde_json::Value::Null;
        wait_for(&format!("status of {app}"), Duration::from_secs(30), || {
            let result = self.daemon.ctl(&["-o", "json", "status", app]);
            status = serde_json::from_str(&result.stdout).unwrap_or_default();
            result.code == 0
        })
        .unwrap();
        status
    }

    fn app_listed(&self, app: &str) -> bool {
        self.daemon
            .ctl(&["-o", "json", "ls"])
            .json()
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == app)
    }

    fn deploy_web(&self, greeting: &str) {
        let (ok, reply) = self.run(Op::Deploy, greeting, std::path::Path::new(""));
        assert!(ok, "{reply}");
    }

    fn toggle_extra(&self) {
        let (ok, reply) = self.run(Op::ToggleExtra, "", std::path::Path::new(""));
        assert!(ok, "{reply}");
    }

    /// A distinct 256 KiB component for a push.
    fn padded(&self, round: u32) -> std::path::PathBuf {
        let path = self.daemon.dir.join(format!("r{round}.wasm"));
        cairn_tests::padded_hello(&path, round as u8, (256 << 10) + round as usize)
    }
}

/// With cairnd dead: the database is whole and consistent.
fn integrity(daemon: &Daemon) {
    let db = rusqlite::Connection::open(daemon.database()).unwrap();
    let result: String = db
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(result, "ok", "integrity_check after a kill");
    let dangling: i64 = db
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(dangling, 0, "rows pointing at nothing after a kill");
}

fn sha_digest(file: &std::path::Path) -> String {
    format!(
        "sha256:{}",
        hex(&sha2::Sha256::digest(std::fs::read(file).unwrap()))
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn report(
    rounds: u32,
    seed: u64,
    elapsed: Duration,
    tally: &BTreeMap<(Op, Victim), (u32, u32)>,
    ready_after: &[Duration],
) {
    let mut body = format!(
        "## Crash loop\n\n`just crash` ({rounds} rounds, `CAIRN_CRASH_SEED={seed}`, {} binaries), {elapsed:.0?} in all:\n\n{}\n\n\
         Every round passed: after each kill the database passed `PRAGMA integrity_check` and \
         `foreign_key_check`, every acknowledged operation was in effect, every unacknowledged \
         one was whole or absent, every pushed component hashed to its digest, every log line \
         the device stored reached the nats-server exactly once, the device converged on the \
         latest fleet document, and every app served. (Rollbacks and pushes are often not \
         acknowledged: a kill lands while they run, or a rollback has no earlier generation.)\n\n| operation | killed | rounds | acknowledged |\n|---|---|---|---|\n",
        std::env::var("CAIRN_PROFILE").unwrap_or_else(|_| "debug".into()),
        cairn_tests::report::machine()
    );
    for ((op, victim), (count, acked)) in tally {
        body.push_str(&format!("| {op:?} | {victim:?} | {count} | {acked} |\n"));
    }
    let mut ready: Vec<f64> = ready_after
        .iter()
        .map(|d| cairn_tests::report::millis(*d))
        .collect();
    if !ready.is_empty() {
        ready.sort_by(f64::total_cmp);
        body.push_str(&format!(
            "\nFrom restart to READY after a kill: median {:.0} ms, slowest {:.0} ms ({} restarts).\n",
            cairn_tests::report::median(ready.clone()),
            ready.last().unwrap(),
            ready.len()
        ));
    }
    cairn_tests::report::write_section_in("RELIABILITY.md", "# Reliability\n", "crash", &body);
}

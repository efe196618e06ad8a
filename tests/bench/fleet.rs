//! Fleet sync benchmark (not a test): outbox flush throughput and time to converge, against a
//! real nats-server on loopback and the release `cairnd`. `just bench` runs it; `--quick`
//! does one round of each. Prints a table and rewrites its section of BENCHMARKS.md.

use cairn_tests::report::{machine, median, millis, write_section};
use cairn_tests::{cairnctl, component, free_port, get, wait_for, Daemon, Nats};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const RECORDS: usize = 10_000;

struct Bench {
    nats: Nats,
    dir: tempfile::TempDir,
    key: String,
    public: String,
    digest: String,
}

impl Bench {
    fn fleet(&self, args: &[&str]) -> String {
        let result = cairnctl(&[&["fleet"], args].concat());
        assert_eq!(result.code, 0, "cairnctl fleet {args:?}: {}", result.stderr);
        result.stdout
    }

    fn publish(&self, listen: &str, greeting: &str) {
        let state = self.dir.path().join("state.toml");
        std::fs::write(
            &state,
            format!(
                "[[app]]\nname = \"web\"\ncomponent = \"{}\"\n[app.http]\nlisten = \"{listen}\"\n[app.env]\nGREETING = \"{greeting}\"\n",
                self.digest
            ),
        )
        .unwrap();
        let url = self.nats.url();
        self.fleet(&[
            "publish",
            "--nats",
            &url,
            "--key",
            &self.key,
            "--device",
            "bench",
            state.to_str().unwrap(),
        ]);
    }
}

fn sync_status(daemon: &Daemon) -> serde_json::Value {
    daemon.ctl(&["-o", "json", "sync", "status"]).json()
}

fn wait_state(daemon: &Daemon, state: &str) {
    wait_for(state, Duration::from_secs(60), || {
        sync_status(daemon)["state"] == state
    })
    .unwrap();
}

fn wait_greeting(addr: SocketAddr, greeting: &str) {
    let body = format!("{greeting} from cairn\n");
    wait_for(greeting, Duration::from_secs(60), || {
        get(addr, "/").map(|r| r.body == body).unwrap_or(false)
    })
    .unwrap();
}

// Over 100 lines: the benchmark's rounds in the order they run, each one reported.
fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 3 };
    let Some(nats) = Nats::start("fleet benchmark") else {
        eprintln!("the fleet benchmark needs nats-server: run it through `./bootstrap bench`");
        std::process::exit(2);
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key").to_str().unwrap().to_string();
    let mut bench = Bench {
        nats,
        dir,
        key: key.clone(),
        public: String::new(),
        digest: String::new(),
    };
    bench.public = bench.fleet(&["keygen", "--out", &key]).trim().to_string();
    let url = bench.nats.url();
    bench.digest = bench
        .fleet(&[
            "upload",
            "--nats",
            &url,
            component("hello").to_str().unwrap(),
        ])
        .trim()
        .to_string();
    let config = format!(
        "[upstream]\nnats = \"{url}\"\ndevice = \"bench\"\ntrusted_keys = [\"{}\"]\n",
        bench.public
    );
    let daemon = Daemon::start_with(Some(&config), &[]);

    // Outbox flush: RECORDS log lines queued offline, then the link returns.
    let chatty = daemon.deploy_hello("chatty", &[]);
    let backlog = |daemon: &Daemon| sync_status(daemon)["backlog"].as_u64().unwrap_or(0);
    let mut flush_rates = Vec::new();
    for round in 0..rounds {
        bench.nats.stop();
        wait_state(&daemon, "offline");
        for request in 0..RECORDS / 2_000 {
            let response = get(chatty, &format!("/lines?2000-r{round}q{request}")).unwrap();
            assert_eq!(response.status, 200);
        }
        wait_for("records queued", Duration::from_secs(60), || {
            backlog(&daemon) >= RECORDS as u64
        })
        .unwrap();
        let queued = backlog(&daemon);
        bench.nats.restart();
        let start = Instant::now();
        daemon.ctl(&["sync", "now"]);
        wait_for("the outbox to empty", Duration::from_secs(300), || {
            backlog(&daemon) == 0
        })
        .unwrap();
        let rate = queued as f64 / start.elapsed().as_secs_f64();
        println!("flush round {round}: {queued} records, {rate:.0} msg/s");
        flush_rates.push(rate);
    }

    // Time to converge.
    let listen = format!("127.0.0.1:{}", free_port());
    let addr: SocketAddr = listen.parse().unwrap();
    let mut version = 0;
    let mut next = |bench: &Bench| {
        version += 1;
        let greeting = format!("v{version}");
        bench.publish(&listen, &greeting);
        greeting
    };
    let mut watched = Vec::new();
    let mut prompted = Vec::new();
    let mut unprompted = Vec::new();
    let converge_rounds = if quick { 1 } else { 5 };
    let first = next(&bench);
    wait_greeting(addr, &first);
    for round in 0..converge_rounds {
        // Connected: the watch delivers the new document.
        let greeting = next(&bench);
        let start = Instant::now();
        wait_greeting(addr, &greeting);
        watched.push(millis(start.elapsed()));

        // The link returns and the operator runs `cairnctl sync now`.
        bench.nats.stop();
        wait_state(&daemon, "offline");
        bench.nats.restart();
        let start = Instant::now();
        let greeting = next(&bench);
        daemon.ctl(&["sync", "now"]);
        wait_greeting(addr, &greeting);
        prompted.push(millis(start.elapsed()));

        // The link returns and nobody does anything: the device's backoff decides.
        bench.nats.stop();
        wait_state(&daemon, "offline");
        bench.nats.restart();
        let start = Instant::now();
        let greeting = next(&bench);
        wait_greeting(addr, &greeting);
        unprompted.push(millis(start.elapsed()));
        println!(
            "converge round {round}: watched {:.0} ms, sync now {:.0} ms, backoff {:.0} ms",
            watched[round], prompted[round], unprompted[round]
        );
    }

    let table = format!(
        "| figure | median | rounds |\n|---|---:|---:|\n\
         | outbox flush, {RECORDS} records queued offline | {:.0} msg/s | {rounds} |\n\
         | converge while connected (publish → new version serving) | {:.0} ms | {converge_rounds} |\n\
         | converge after the link returns, `cairnctl sync now` | {:.0} ms | {converge_rounds} |\n\
         | converge after the link returns, reconnect backoff only | {:.0} ms | {converge_rounds} |\n",
        median(flush_rates),
        median(watched),
        median(prompted),
        median(unprompted),
    );
    println!("\n{table}");
    write_section(
        "fleet",
        &format!(
            "## Fleet sync\n\n{}\n- command: `just bench{}` (release binaries; nats-server on loopback)\n\n{table}",
            machine(),
            if quick { " --quick" } else { "" }
        ),
    );
}

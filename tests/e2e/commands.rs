//! Command apps: a component exporting `wasi:cli/run` (tests/components/cli-only), deployed
//! without `[http]`, run by `cairnctl run` and by `[[schedule]]`s, each run a pool of its own
//! with the app's limits, `[env]`, `[config]` and key-value store.

use cairn_tests::{component, wait_for, Daemon};
use std::io::BufRead;
use std::time::Duration;

/// Deploys the command component as `name` with `rest` of a manifest (no `[http]`).
fn deploy_command(daemon: &Daemon, name: &str, rest: &str) {
    let manifest = daemon.dir.join(format!("{name}.toml"));
    std::fs::write(
        &manifest,
        format!(
            "name = \"{name}\"\ncomponent = \"{}\"\n{rest}",
            component("cli-only").display()
        ),
    )
    .unwrap();
    let deployed = daemon.ctl_ok(&["deploy", "-f", manifest.to_str().unwrap()]);
    assert!(
        deployed.contains(&format!("cairnctl run {name}")),
        "{deployed}"
    );
}

#[test]
fn a_command_app_runs_with_its_arguments_env_config_and_store_and_ends_with_its_code() {
    let daemon = Daemon::start();
    deploy_command(
        &daemon,
        "job",
        "[env]\nGREETING = \"hi\"\n[config]\nsite = \"north\"\n[keyvalue]\n[limits]\ntimeout = \"2s\"\n",
    );
    let listed = daemon.ctl_ok(&["-o", "json", "ls"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["status"], "ready", "{listed}");
    // No pool waits between runs.
    assert_eq!(daemon.app_status("job")["pid"], 0);

    let hello = daemon.ctl(&["run", "job", "--", "hello", "a b", "c"]);
    assert_eq!(hello.code, 0, "{hello:?}");
    assert_eq!(
        hello.stdout.trim(),
        r#"hello from job args=["hello", "a b", "c"] GREETING=hi"#,
        "{hello:?}"
    );
    assert!(hello.stderr.contains("a line to stderr"), "{hello:?}");

    let config = daemon.ctl(&["run", "job", "--", "config", "site"]);
    assert_eq!(
        (config.code, config.stdout.trim()),
        (0, "north"),
        "{config:?}"
    );
    // The store is the app's, not the run's: a count kept across runs.
    for expected in ["runs: 1", "runs: 2"] {
        let count = daemon.ctl(&["run", "job", "--", "count"]);
        assert_eq!(
            (count.code, count.stdout.trim()),
            (0, expected),
            "{count:?}"
        );
    }
    assert_eq!(daemon.ctl_ok(&["kv", "job", "get", "runs"]).trim(), "2");

    // Its own exit code, and the codes cairn gives a trap and a timeout.
    // wasi:cli/exit at 0.2 carries success or failure only: Rust's exit(3) arrives as 1.
    let exit = daemon.ctl(&["run", "job", "--", "exit", "3"]);
    assert_eq!(exit.code, 1, "{exit:?}");
    assert!(exit.stderr.contains("the run ended: exit 1"), "{exit:?}");
    let trap = daemon.ctl(&["run", "job", "--", "trap"]);
    assert_eq!(trap.code, 134, "{trap:?}");
    assert!(trap.stderr.contains("trapped"), "{trap:?}");
    let spin = daemon.ctl(&["run", "job", "--", "spin"]);
    assert_eq!(spin.code, 124, "{spin:?}");
    assert!(spin.stderr.contains("timeout"), "{spin:?}");
    let unknown = daemon.ctl(&["run", "job", "--", "nonsense"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown command nonsense"),
        "{unknown:?}"
    );

    // wasi:logging lines reach the caller and the app's log with their level.
    let logged = daemon.ctl(&["run", "job", "--", "log", "checked the valve"]);
    assert_eq!(logged.code, 0, "{logged:?}");
    assert!(
        logged.stderr.contains("[warn] job: checked the valve")
            || logged.stderr.contains("[warn] checked the valve"),
        "{logged:?}"
    );
    let warnings = daemon.ctl_ok(&["logs", "job", "--level", "warn"]);
    assert!(warnings.contains("checked the valve"), "{warnings}");
    // Each run is noted in the app's log, with how it ended.
    let log = daemon.ctl_ok(&["logs", "job"]);
    assert!(log.contains("run (cairnctl run): exit 0"), "{log}");
    assert!(log.contains("run (cairnctl run): trapped"), "{log}");
    // And kept for `status`, with who asked and how each ended.
    let runs = daemon.app_status("job")["runs"].clone();
    let codes: Vec<i64> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 0, 0, 0, 1, 134, 124, 1, 0], "{runs}");
    assert_eq!(runs[0]["by"], "cairnctl run", "{runs}");
    assert!(
        runs[6]["outcome"].as_str().unwrap().contains("timeout"),
        "{runs}"
    );
    let table = daemon.ctl_ok(&["status", "job"]);
    assert!(table.contains("9 kept (4 not exit 0)"), "{table}");

    // What cannot run says why, with 125 (not a code the command could have given).
    let missing = daemon.ctl(&["run", "nosuch"]);
    assert_eq!(missing.code, 125, "{missing:?}");
    assert!(
        missing.stderr.contains("no app named `nosuch`"),
        "{missing:?}"
    );
    daemon.deploy_hello("web", &[]);
    let http = daemon.ctl(&["run", "web"]);
    assert_eq!(http.code, 125, "{http:?}");
    assert!(http.stderr.contains("serves HTTP"), "{http:?}");
    let nul = daemon.ctl(&["run", "job", "--", &"x".repeat(70_000)]);
    assert_eq!(nul.code, 125, "{nul:?}");
    assert!(nul.stderr.contains("arguments"), "{nul:?}");
}

#[test]
fn the_kind_of_component_must_match_the_manifest() {
    let daemon = Daemon::start();
    // An HTTP component without [http]: refused, saying what to add.
    let manifest = daemon.dir.join("wrong.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"wrong\"\ncomponent = \"{}\"\n",
            component("hello").display()
        ),
    )
    .unwrap();
    let refused = daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("does not export wasi:cli/run")
            && refused.stderr.contains("Add an [http] table"),
        "{refused:?}"
    );
    // A command app's schedule has no path, an HTTP app's no args; idle is for HTTP apps.
    for (rest, says) in [
        (
            "[[schedule]]\nname = \"t\"\nevery = \"1m\"\npath = \"/x\"\n",
            "has no `path`",
        ),
        (
            "[limits]\nidle = \"10s\"\n",
            "[limits] idle is for apps that serve HTTP",
        ),
        (
            "[limits]\ninstances = 8\n",
            "[limits] instances is for apps that serve HTTP",
        ),
        (
            "[[schedule]]\nname = \"t\"\nevery = \"1m\"\nmethod = \"GET\"\n",
            "`method` is for HTTP apps",
        ),
        // Proved at deploy, as an HTTP app's generation is: a memory limit below what the
        // component needs fails now, not at every run.
        ("[limits]\nmemory = \"1MiB\"\n", "exceeds"),
    ] {
        std::fs::write(
            &manifest,
            format!(
                "name = \"wrong\"\ncomponent = \"{}\"\n{rest}",
                component("cli-only").display()
            ),
        )
        .unwrap();
        let refused = daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);
        assert_eq!(refused.code, 2, "{rest}: {refused:?}");
        assert!(refused.stderr.contains(says), "{rest}: {refused:?}");
    }
    assert!(
        daemon.ctl_ok(&["ls"]).lines().count() <= 1,
        "nothing was deployed"
    );
}

#[test]
fn output_streams_while_the_command_runs() {
    let daemon = Daemon::start();
    deploy_command(&daemon, "talker", "[limits]\ntimeout = \"20s\"\n");
    let mut child = daemon.ctl_child(&["run", "talker", "--", "lines", "6", "500"]);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "line 1\n");
    // The first line came while the run still had seconds to go.
    assert!(
        child.try_wait().unwrap().is_none(),
        "cairnctl had ended when the first line came"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "line 2\nline 3\nline 4\nline 5\nline 6\n");
    let status = cairn_tests::wait_child(&mut child, Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_caller_that_stops_reading_holds_up_neither_the_run_nor_the_next() {
    let daemon = Daemon::start();
    deploy_command(&daemon, "flood", "[limits]\ntimeout = \"30s\"\n");
    // cairnctl's stdout is a pipe nobody reads: once it is full, cairnctl stops taking the
    // stream, and cairnd must neither wait for it nor hold more than its bound.
    let stalled = std::process::Command::new(&cairn_tests::binaries().1)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "flood", "--", "flood", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the stalled run to end", Duration::from_secs(30), || {
        daemon.app_status("flood")["runs"]
            .as_array()
            .is_some_and(|runs| !runs.is_empty())
    })
    .unwrap();
    let runs = daemon.app_status("flood")["runs"].clone();
    assert_eq!(runs[0]["exit_code"], 0, "{runs}");
    // Its slot is free: another run goes through at once.
    let next = daemon.ctl(&["run", "flood", "--", "hello"]);
    assert_eq!(next.code, 0, "{next:?}");
    // Read now, the stalled caller gets what was kept for it, is told what it missed, and
    // ends with the run's code.
    let stalled = stalled.wait_with_output().unwrap();
    assert_eq!(stalled.status.code(), Some(0));
    let said = String::from_utf8_lossy(&stalled.stderr);
    let missed: u64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of missed output: {said}"));
    // What was missed is counted, and what was shown is no more than the rest (the pool may
    // also have cut output it could not send on in time, with a note).
    let written = 5 * 100 * 6 * 1024 + "flooded\n".len() as u64;
    assert!(missed > 0, "{said}");
    assert!(
        stalled.stdout.len() as u64 + missed <= written + 4096,
        "{said}"
    );
    let log = daemon.ctl_ok(&["logs", "flood"]);
    assert!(log.contains("flooded"), "the log has all of it");
}

#[test]
fn a_command_schedule_runs_it_and_removal_kills_a_run_under_way() {
    let mut daemon = Daemon::start();
    deploy_command(
        &daemon,
        "counter",
        "[keyvalue]\n[[schedule]]\nname = \"tick\"\nevery = \"1s\"\nargs = [\"count\"]\n",
    );
    let schedule = |daemon: &Daemon| daemon.app_status("counter")["schedules"][0].clone();
    wait_for("three scheduled runs", Duration::from_secs(20), || {
        schedule(&daemon)["runs"].as_u64().unwrap_or(0) >= 3
    })
    .unwrap();
    let seen = schedule(&daemon);
    assert_eq!(seen["request"], "run count", "{seen}");
    assert_eq!(seen["failed"], 0, "{seen}");
    assert_eq!(seen["recent"][0]["exit_code"], 0, "{seen}");
    let runs = daemon.app_status("counter")["runs"].clone();
    assert_eq!(runs[0]["by"], "schedule tick", "{runs}");
    let table = daemon.ctl_ok(&["status", "counter"]);
    assert!(table.contains("exited 0 after"), "{table}");
    let counted: u64 = daemon
        .ctl_ok(&["kv", "counter", "get", "runs"])
        .trim()
        .parse()
        .unwrap();
    assert!(counted >= 3, "{counted}");

    // After a restart of cairnd the app is ready again and its schedule goes on.
    daemon.stop();
    daemon.restart();
    let listed = daemon.ctl_ok(&["ls"]);
    assert!(listed.contains("ready"), "{listed}");
    wait_for("a run after the restart", Duration::from_secs(20), || {
        schedule(&daemon)["runs"].as_u64().unwrap_or(0) >= 1
    })
    .unwrap();

    // A long run is killed when its app is removed: it ends at once, with the code of a kill.
    deploy_command(&daemon, "sleeper", "[limits]\ntimeout = \"60s\"\n");
    let mut child = daemon.ctl_child(&["run", "sleeper", "--", "sleep", "50000"]);
    wait_for("the run's pool", Duration::from_secs(20), || {
        daemon.child_named("cairn:sleeper").is_some()
    })
    .unwrap();
    daemon.ctl_ok(&["rm", "sleeper"]);
    let status = cairn_tests::wait_child(&mut child, Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(137), "killed by SIGKILL");
    assert!(daemon.child_named("cairn:sleeper").is_none());
    // Nothing of the killed run is left to the app's next namesake.
    deploy_command(&daemon, "sleeper", "");
    assert_eq!(daemon.app_status("sleeper")["runs"], serde_json::json!([]));
    let log = daemon.ctl_ok(&["logs", "sleeper"]);
    assert!(!log.contains("killed"), "{log}");
}

/// Processes anywhere on the machine named `comm` (a run's pool outlives a killed cairnd,
/// reparented away from it, if anything does).
fn processes_named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == comm)
        })
        .collect()
}

#[test]
fn a_run_ends_with_cairnd_and_its_caller_is_told_the_end_is_unknown() {
    let mut daemon = Daemon::start();
    deploy_command(&daemon, "orphan-check", "[limits]\ntimeout = \"60s\"\n");
    // A line every 100 ms for 100 s: once the first has come, the run is under way.
    let mut caller = std::process::Command::new(&cairn_tests::binaries().1)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "orphan-check", "--", "lines", "1000", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(caller.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "line 1\n");
    assert!(!processes_named("cairn:orphan-ch").is_empty());
    daemon.kill9();
    // The pool does not spin on unsupervised for the rest of its minute.
    wait_for(
        "the pool to end with cairnd",
        Duration::from_secs(10),
        || processes_named("cairn:orphan-ch").is_empty(),
    )
    .unwrap();
    let caller = caller.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&caller.stderr);
    assert_eq!(caller.status.code(), Some(255), "{said}");
    assert!(said.contains("how it ended is unknown"), "{said}");
}

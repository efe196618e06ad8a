//! Each app runs in its own pool process; the supervisor holds the listener, restarts dead
//! pools, and swaps generations without dropping requests.

use cairn_tests::{component, get, wait_for, Daemon};
use std::time::Duration;

/// A process's command line. Under qemu-user (an arm64 run) the kernel's binfmt_misc puts
/// the emulator and the binary's path first (flag P keeps the original argv[0] after them);
/// those two are dropped so both runs see the command line cairnd gave.
fn cmdline(pid: u64) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args: Vec<String> = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|arg| !arg.is_empty())
        .map(str::to_string)
        .collect();
    if args
        .first()
        .is_some_and(|first| first.ends_with("-binfmt-P"))
    {
        args.drain(..2.min(args.len()));
    }
    args.join(" ")
}

/// The spare pool process the daemon keeps ready, once it is there (not one of `pools`: under
/// qemu-user a pool started on a spare keeps the spare's title).
fn spare(daemon: &Daemon, pools: &[u64]) -> u64 {
    let mut found = 0;
    wait_for("a spare pool process", Duration::from_secs(30), || {
        found = daemon
            .children()
            .into_iter()
            .filter(|pid| !pools.contains(pid))
            .find(|pid| cmdline(*pid).starts_with("cairnd pool --app (spare)"))
            .unwrap_or(0);
        found != 0
    })
    .unwrap();
    found
}

fn pool_pid(daemon: &Daemon, app: &str) -> u64 {
    daemon.app_status(app)["pid"].as_u64().unwrap()
}

#[test]
fn apps_run_in_their_own_pool_process() {
    let daemon = Daemon::start();
    // A spare process waits for the next app to start; it becomes that app's pool.
    let spare_pid = spare(&daemon, &[]);
    // (It names itself once running, a moment after its exec, which set its command line.)
    wait_for("the spare to name itself", Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{spare_pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "cairn:(spare)")
    })
    .unwrap();
    let addr = daemon.deploy_hello("apart", &[]);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let pid = pool_pid(&daemon, "apart");
    assert_ne!(pid, 0);
    assert_ne!(
        pid as i32,
        daemon.pid(),
        "the supervisor must not serve the app itself"
    );
    // `top` names it after its app, not after the /proc/self/exe it was started through.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "cairn:apart");
    assert_eq!(pid, spare_pid, "the spare became the app's pool");
    if cairn_tests::cross_target().is_none() {
        // `ps` says whose pool it is. (Under qemu-user the emulator's /proc does not say where
        // a process's arguments are, so a spare keeps its placeholder there.)
        assert!(
            cmdline(pid).starts_with("cairnd pool --app apart"),
            "{}",
            cmdline(pid)
        );
        // No transparent huge pages for the supervisor or its pools (alloc.rs): memory use stays
        // what was touched. (qemu-user does not pass this prctl on to the kernel.)
        for process in [daemon.pid() as u64, pid] {
            let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap();
            assert!(
                status.lines().any(|line| line == "THP_enabled:\t0"),
                "process {process} may get transparent huge pages:\n{status}"
            );
        }
    }
    // And the next spare is started.
    assert_ne!(spare(&daemon, &[pid]), 0);
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = parent
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, daemon.pid());
    // Removing the app ends its pool.
    daemon.ctl_ok(&["rm", "apart"]);
    wait_for("the pool to exit", Duration::from_secs(15), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .unwrap();
}

#[test]
fn a_killed_pool_is_restarted_and_the_next_request_served() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("phoenix", &["--env", "GREETING=again"]);
    let first = pool_pid(&daemon, "phoenix");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The supervisor keeps the listener: the connection waits for the restarted pool.
    let response = get(addr, "/").unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "again from cairn\n")
    );
    let status = daemon.app_status("phoenix");
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["restarts"], 1, "{status}");
    assert_eq!(status["last_exit"], "signal 9", "{status}");
    assert_ne!(status["pid"].as_u64().unwrap(), first);
    assert!(daemon
        .ctl_ok(&["logs", "phoenix"])
        .contains("the pool ended (signal 9)"));
}

#[test]
fn generations_swap_without_failing_a_request() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("steady-swap", &["--env", "GREETING=g0"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            // Bounded: at most 5000 requests or until told to stop.
            for _ in 0..5000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                statuses.push(get(addr, "/").map(|r| r.status).map_err(|e| e.to_string()));
            }
            statuses
        })
    };
    let hello = component("hello");
    let listen = addr.to_string();
    for generation in 1..=3 {
        let greeting = format!("GREETING=g{generation}");
        daemon.ctl_ok(&[
            "deploy",
            "steady-swap",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &listen,
            "--env",
            &greeting,
        ]);
        // `deploy` returns once the old generation no longer accepts.
        assert_eq!(
            get(addr, "/").unwrap().body,
            format!("g{generation} from cairn\n"),
            "the first request after deploy returned"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.join().unwrap();
    assert!(statuses.len() > 10, "the load ran: {}", statuses.len());
    let failed: Vec<_> = statuses.iter().filter(|s| **s != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during swaps: {:?}",
        failed.len(),
        statuses.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(get(addr, "/").unwrap().body, "g3 from cairn\n");
}

/// A line of /proc/PID/status, such as `Uid:` or `NoNewPrivs:`.
fn proc_status(pid: u64, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(key).map(|rest| rest.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn pools_run_unprivileged_and_cannot_write_the_store() {
    if !cairn_tests::is_root() {
        cairn_tests::skip(
            "pools_run_unprivileged_and_cannot_write_the_store",
            "needs root to start pools as another user",
        );
        return;
    }
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("humble", &[]);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let pid = pool_pid(&daemon, "humble");
    let uids: Vec<u32> = proc_status(pid, "Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4);
    assert!(
        uids.iter().all(|u| *u != 0),
        "the pool keeps a root id: {uids:?}"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Groups:"), "", "no supplementary groups");
    // It opened its page map while still root (after the switch its /proc files are root's),
    // so a freed instance slot is reset page by page, only where the request wrote.
    let page_map_open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| target.ends_with("pagemap"));
    assert!(page_map_open, "the pool does not hold its page map open");
    let status = daemon.app_status("humble");
    assert!(
        status["pool_user"]
            .as_str()
            .unwrap()
            .contains(&format!("uid {}", uids[0])),
        "{status}"
    );

    // The store belongs to root and is closed to others: the pool's user cannot write it.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let state = std::fs::metadata(&daemon.state).unwrap();
    assert_eq!(state.uid(), 0);
    assert_eq!(
        state.permissions().mode() & 0o007,
        0,
        "the state dir is open to others"
    );
    let database = std::fs::metadata(daemon.database()).unwrap();
    assert_eq!(database.uid(), 0);
    assert_ne!(
        database.gid(),
        uids[0],
        "the pool's group owns the database"
    );
}

#[test]
fn a_generation_that_fails_its_health_check_never_goes_live() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello(
        "checked",
        &["--health", "/health", "--env", "GREETING=good"],
    );
    assert_eq!(daemon.app_status("checked")["generation"], 1);
    let hello = component("hello");
    let listen = addr.to_string();
    let refused = daemon.ctl(&[
        "deploy",
        "checked",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--health",
        "/nope",
        "--env",
        "GREETING=bad",
    ]);
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(
        refused.stderr.contains("failed its health check: GET /nope answered 404; the previous generation keeps serving"),
        "{}",
        refused.stderr
    );
    assert_eq!(get(addr, "/").unwrap().body, "good from cairn\n");
    let status = daemon.app_status("checked");
    assert_eq!(status["generation"], 1);
    assert_eq!(
        status["generations"].as_array().unwrap().len(),
        1,
        "a refused generation is not recorded"
    );
    // A health path that traps is refused the same way.
    let trapped = daemon.ctl(&[
        "deploy",
        "checked",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--health",
        "/trap",
    ]);
    assert_eq!(trapped.code, 5, "{trapped:?}");
    assert_eq!(get(addr, "/").unwrap().body, "good from cairn\n");
}

#[test]
fn a_crashlooping_generation_gives_way_to_the_last_good_one() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("wobbly", &["--env", "GREETING=stable"]);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let hello = component("hello");
    let listen = addr.to_string();
    daemon.ctl_ok(&[
        "deploy",
        "wobbly",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--env",
        "GREETING=broken",
    ]);
    // `deploy` returns once generation 1 no longer accepts: the very next request is 2's.
    assert_eq!(get(addr, "/").unwrap().body, "broken from cairn\n");

    // Generation 2's pool keeps dying.
    let mut killed = Vec::new();
    for _ in 0..5 {
        let mut pid = 0;
        wait_for("a live pool to kill", Duration::from_secs(30), || {
            let status = daemon.app_status("wobbly");
            pid = status["pid"].as_u64().unwrap_or(0);
            status["generation"] == 2 && pid != 0 && !killed.contains(&pid)
        })
        .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(pid);
    }
    wait_for(
        "generation 1 to be restored",
        Duration::from_secs(30),
        || daemon.app_status("wobbly")["generation"] == 1,
    )
    .unwrap();
    assert_eq!(get(addr, "/").unwrap().body, "stable from cairn\n");
    let logs = daemon.ctl_ok(&["logs", "wobbly"]);
    assert!(
        logs.contains("crashloop: generation 2 kept failing; restored generation 1"),
        "{logs}"
    );
}

#[test]
fn an_idle_pool_exits_and_the_next_connection_brings_it_back() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("sleepy", &["--idle", "500ms"]);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let pid = pool_pid(&daemon, "sleepy");
    wait_for("the pool to go idle", Duration::from_secs(15), || {
        let status = daemon.app_status("sleepy");
        status["status"] == "idle" && status["pid"] == 0
    })
    .unwrap();
    wait_for(
        "the idle pool's process to be gone",
        Duration::from_secs(10),
        || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
    )
    .unwrap();
    assert!(daemon.ctl_ok(&["ls"]).contains("idle"));
    // The supervisor held the listener: the first request is served, not refused.
    let response = get(addr, "/").unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "hello from cairn\n")
    );
    let status = daemon.app_status("sleepy");
    assert_eq!(status["status"], "running");
    assert_eq!(status["restarts"], 0, "waking is not a restart");
    assert_ne!(status["pid"].as_u64().unwrap(), pid);
}

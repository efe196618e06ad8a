//! Pools run in cgroups with the manifest's limits, on the real kernel (v1 here, v2 where the
//! machine has it). Each test skips, saying why, where cgroups cannot be used.

use cairn_tests::{cgroup_dirs, cross_target, get, wait_for, Daemon};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The daemon enforces limits, or the test is skipped with the reason.
fn enforcing(daemon: &Daemon, test: &str) -> bool {
    let status = daemon.ctl(&["-o", "json", "status"]).json();
    let limits = status["limits"].as_str().unwrap_or_default().to_string();
    if limits.starts_with("enforced") {
        return true;
    }
    cairn_tests::skip(
        test,
        &format!("cgroup limits are not available here ({limits})"),
    );
    false
}

fn v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A limit file of the app's cgroup, trimmed: v1 names first, v2 names second.
fn read_limit(daemon: &Daemon, app: &str, v1: (&str, &str), v2_file: &str) -> String {
    let relative = format!("{}/{app}", daemon.cgroup_parent);
    let path: PathBuf = if v2() {
        cgroup_dirs(&relative)[0].join(v2_file)
    } else {
        PathBuf::from("/sys/fs/cgroup")
            .join(v1.0)
            .join(&relative)
            .join(v1.1)
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The app's cgroup holds the limits the tests deploy with: 96 MiB, half a core, 24 pids.
fn assert_test_limits(daemon: &Daemon, app: &str) {
    assert_eq!(
        read_limit(
            daemon,
            app,
            ("memory", "memory.limit_in_bytes"),
            "memory.max"
        ),
        (96u64 << 20).to_string()
    );
    let cpu = read_limit(daemon, app, ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(cpu == "50000" || cpu == "50000 100000", "{cpu}");
    assert_eq!(
        read_limit(daemon, app, ("pids", "pids.max"), "pids.max"),
        "24"
    );
}

/// Process `pid` is in the app's cgroup in every hierarchy.
fn assert_in_cgroup(daemon: &Daemon, app: &str, pid: u64, context: &str) {
    for dir in cgroup_dirs(&format!("{}/{app}", daemon.cgroup_parent)) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|line| line == pid.to_string()),
            "{context}: pool {pid} is not in {}: {procs:?}",
            dir.display()
        );
    }
}

#[test]
fn a_pools_cgroup_has_the_manifest_limits_and_goes_with_the_app() {
    let daemon = Daemon::start();
    if !enforcing(
        &daemon,
        "a_pools_cgroup_has_the_manifest_limits_and_goes_with_the_app",
    ) {
        return;
    }
    daemon.deploy_hello(
        "limited",
        &["--cpu", "0.5", "--memory-total", "96MiB", "--pids", "24"],
    );
    assert_test_limits(&daemon, "limited");
    let pid = daemon.app_status("limited")["pid"].as_u64().unwrap();
    assert_in_cgroup(&daemon, "limited", pid, "the first generation");

    // A new generation's limits replace the old ones.
    let hello = cairn_tests::component("hello");
    let listen = daemon.app_status("limited")["listen"]
        .as_str()
        .unwrap()
        .to_string();
    daemon.ctl_ok(&[
        "deploy",
        "limited",
        "--component",
        hello.to_str().unwrap(),
        "--listen",
        &listen,
        "--cpu",
        "0.25",
    ]);
    let cpu = read_limit(&daemon, "limited", ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(cpu == "25000" || cpu == "25000 100000", "{cpu}");
    // The new generation's pool started while the old one still drained in the cgroup, so it
    // was moved in (not renamed into place): it is there in every hierarchy.
    let pid = daemon.app_status("limited")["pid"].as_u64().unwrap();
    assert_in_cgroup(&daemon, "limited", pid, "the new generation");

    let status = daemon.app_status("limited");
    assert!(
        status["cgroup"]
            .as_str()
            .unwrap()
            .contains(&format!("{}/limited", daemon.cgroup_parent)),
        "{status}"
    );
    assert!(status["pids"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["memory_bytes"].as_u64().unwrap() > 0, "{status}");

    daemon.ctl_ok(&["rm", "limited"]);
    for dir in cgroup_dirs(&format!("{}/limited", daemon.cgroup_parent)) {
        assert!(!dir.exists(), "{} is left behind", dir.display());
    }
}

#[test]
fn a_pool_over_its_memory_is_oom_killed_and_the_neighbour_keeps_serving() {
    let daemon = Daemon::start();
    if !enforcing(
        &daemon,
        "a_pool_over_its_memory_is_oom_killed_and_the_neighbour_keeps_serving",
    ) {
        return;
    }
    let neighbour = daemon.deploy_hello("neighbour", &[]);
    // Each instance may grow to 512MiB, but the whole pool only to 64MiB: the cgroup, not
    // wasmtime, stops this one. Under qemu-user (an arm64 run) the pool process also holds the
    // emulator and its translated code, well over 64MiB before the guest allocates anything:
    // the same shape, scaled up.
    let (instance, total, alloc) = match cross_target() {
        None => ("512MiB", "64MiB", "/alloc?256"),
        Some(_) => ("1GiB", "384MiB", "/alloc?768"),
    };
    let hungry = daemon.deploy_hello(
        "hungry-pool",
        &["--memory", instance, "--memory-total", total],
    );
    let watcher = std::thread::spawn(move || {
        let mut statuses = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) && statuses.len() < 2000 {
            statuses.push(get(neighbour, "/").map(|r| r.status).unwrap_or(0));
        }
        statuses
    });
    let killed = get(hungry, alloc);
    assert!(
        !matches!(&killed, Ok(r) if r.status == 200),
        "the allocation should not have succeeded: {killed:?}"
    );
    wait_for(
        "the OOM kill to be recorded",
        Duration::from_secs(15),
        || daemon.app_status("hungry-pool")["last_exit"] == "oom",
    )
    .unwrap();
    let statuses = watcher.join().unwrap();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the neighbour failed requests: {statuses:?}"
    );
    // The killed pool was restarted and serves again.
    wait_for(
        "the hungry pool to be back",
        Duration::from_secs(15),
        || get(hungry, "/").map(|r| r.status == 200).unwrap_or(false),
    )
    .unwrap();
    let status = daemon.app_status("hungry-pool");
    assert!(status["restarts"].as_u64().unwrap() >= 1, "{status}");
    assert!(daemon
        .ctl_ok(&["logs", "hungry-pool"])
        .contains("the pool ended (oom)"));
}

#[test]
fn a_cpu_bound_pool_gets_its_cpu_share_and_no_more() {
    let daemon = Daemon::start();
    if !enforcing(&daemon, "a_cpu_bound_pool_gets_its_cpu_share_and_no_more") {
        return;
    }
    let spinner = daemon.deploy_hello("spinner", &["--cpu", "0.2", "--timeout", "6s"]);
    let spin = std::thread::spawn(move || get(spinner, "/loop"));
    wait_for("the spinning request", Duration::from_secs(5), || {
        daemon.app_status("spinner")["in_flight"] == 1
    })
    .unwrap();
    let cpu = |daemon: &Daemon| {
        daemon.app_status("spinner")["cpu_usage_nanos"]
            .as_u64()
            .unwrap()
    };
    let (start_cpu, start) = (cpu(&daemon), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (end_cpu, elapsed) = (cpu(&daemon), start.elapsed());
    let share = (end_cpu - start_cpu) as f64 / elapsed.as_nanos() as f64;
    assert!(
        (0.1..=0.3).contains(&share),
        "a pool capped at 0.2 cores used {share:.3} of a core"
    );
    assert_eq!(
        spin.join().unwrap().unwrap().status,
        500,
        "the spin ends at its timeout"
    );
}

#[test]
fn the_parent_cgroup_caps_all_apps_together() {
    let daemon = Daemon::start_with(Some("total_memory = \"1GiB\"\ntotal_cpu = 1.5\n"), &[]);
    if !enforcing(&daemon, "the_parent_cgroup_caps_all_apps_together") {
        return;
    }
    let parent = |v1: (&str, &str), v2_file: &str| -> String {
        let path: PathBuf = if v2() {
            cgroup_dirs(&daemon.cgroup_parent)[0].join(v2_file)
        } else {
            PathBuf::from("/sys/fs/cgroup")
                .join(v1.0)
                .join(&daemon.cgroup_parent)
                .join(v1.1)
        };
        std::fs::read_to_string(&path).unwrap().trim().to_string()
    };
    assert_eq!(
        parent(("memory", "memory.limit_in_bytes"), "memory.max"),
        (1u64 << 30).to_string()
    );
    let cpu = parent(("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(cpu == "150000" || cpu == "150000 100000", "{cpu}");
}

#[test]
fn without_privileges_limits_are_reported_as_not_enforced() {
    if !cairn_tests::is_root() {
        cairn_tests::skip(
            "without_privileges_limits_are_reported_as_not_enforced",
            "needs root to start cairnd as another user",
        );
        return;
    }
    let daemon = Daemon::start_as(65534);
    let limits = daemon.ctl(&["-o", "json", "status"]).json()["limits"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        limits.starts_with("not enforced: cannot create cgroup"),
        "{limits}"
    );
    assert!(
        limits.contains("run as root or under systemd with Delegate=yes"),
        "{limits}"
    );
    // It still runs apps, and says so per app too.
    let addr = daemon.deploy_hello("unconfined", &["--cpu", "0.5"]);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let status = daemon.app_status("unconfined");
    let cpu = status["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "cpu")
        .unwrap()
        .clone();
    assert!(
        cpu["enforcement"]
            .as_str()
            .unwrap()
            .starts_with("not enforced"),
        "{cpu}"
    );
    let status = daemon.ctl(&["-o", "json", "status"]).json();
    assert!(status["pool_user"].as_str().unwrap().contains("not root"));
    // What that gives up is spelled out.
    let gaps = status["isolation_gaps"].as_array().unwrap();
    assert!(
        gaps.iter().any(|gap| gap
            .as_str()
            .unwrap()
            .contains("could use the control socket")),
        "{status}"
    );
    assert!(daemon.ctl_ok(&["status"]).contains("ISOLATION GAP"));
}

#[test]
fn a_pool_woken_from_idle_is_in_its_apps_cgroup_with_its_limits() {
    let daemon = Daemon::start();
    if !enforcing(
        &daemon,
        "a_pool_woken_from_idle_is_in_its_apps_cgroup_with_its_limits",
    ) {
        return;
    }
    // Long enough for the status calls below, which take a while under qemu-user.
    let idle = if cross_target().is_some() {
        "5s"
    } else {
        "300ms"
    };
    let addr = daemon.deploy_hello(
        "sleeper",
        &[
            "--idle",
            idle,
            "--memory-total",
            "96MiB",
            "--pids",
            "24",
            "--cpu",
            "0.5",
        ],
    );
    let relative = format!("{}/sleeper", daemon.cgroup_parent);
    let mut cpu_before = 0;
    let mut pids_seen = Vec::new();
    let app_dir = || cgroup_dirs(&relative).remove(0);
    let mut dir_before = None;
    // Each wake starts the pool on the spare process, whose own cgroup is renamed into the
    // app's place on v1 (moved into it on v2): either way it must end up exactly here.
    for round in 0..3 {
        assert_eq!(get(addr, "/").unwrap().status, 200, "round {round}");
        // On v1 the wake renamed the spare's cgroup into the app's place: a new directory.
        let dir_now = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(app_dir()).unwrap());
        if let (false, Some(before)) = (v2(), dir_before) {
            assert_ne!(
                dir_now, before,
                "round {round}: the pool was moved in, not renamed into place"
            );
        }
        dir_before = Some(dir_now);
        let status = daemon.app_status("sleeper");
        let pid = status["pid"].as_u64().unwrap();
        assert!(!pids_seen.contains(&pid), "a new pool each round");
        pids_seen.push(pid);
        assert_in_cgroup(&daemon, "sleeper", pid, &format!("round {round}"));
        assert_test_limits(&daemon, "sleeper");
        // CPU time used by earlier pools is not forgotten when the cgroup is replaced.
        let cpu_now = status["cpu_usage_nanos"].as_u64().unwrap_or(0);
        assert!(
            cpu_now >= cpu_before,
            "round {round}: {cpu_now} < {cpu_before}"
        );
        cpu_before = cpu_now;
        // Beside the app cgroups there is at most the current spare's, holding only it.
        for parent in cgroup_dirs(&daemon.cgroup_parent) {
            let spares: Vec<PathBuf> = std::fs::read_dir(&parent)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("spare.")
                })
                .collect();
            assert!(spares.len() <= 1, "{spares:?}");
            for spare in spares {
                let procs = std::fs::read_to_string(spare.join("cgroup.procs")).unwrap();
                assert!(procs.lines().count() <= 1, "{}: {procs:?}", spare.display());
            }
        }
        wait_for("the app to go idle", Duration::from_secs(30), || {
            daemon.app_status("sleeper")["status"] == "idle"
        })
        .unwrap();
    }
    assert!(cpu_before > 0, "the pools' CPU time is counted");
}

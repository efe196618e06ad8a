//! Tests of both trees: against a plain directory, and against the kernel's own cgroups where
//! this machine allows (root; v1 and a cgroup2 mount as found).

use super::*;
use std::path::PathBuf;

const LIMITS: PoolLimits = PoolLimits {
    memory: Some(64 << 20),
    cpu: Some(0.5),
    pids: Some(100),
};

fn file(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// A v2 tree as a plain directory: what cairn writes lands in files the test reads back.
fn fake_v2(controllers: &str) -> (tempfile::TempDir, Tree) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
    let tree = Tree::detect(dir.path()).expect("cgroup.controllers makes it v2");
    assert!(matches!(tree, Tree::V2(_)));
    (dir, tree)
}

fn fake_v1() -> (tempfile::TempDir, Tree) {
    let dir = tempfile::tempdir().unwrap();
    for controller in ["memory", "cpu", "cpuacct", "pids"] {
        std::fs::create_dir(dir.path().join(controller)).unwrap();
    }
    let tree = Tree::detect(dir.path()).expect("a memory hierarchy makes it v1");
    assert!(matches!(tree, Tree::V1(_)));
    (dir, tree)
}

#[test]
fn v2_hands_controllers_down_and_writes_its_own_files() {
    let (dir, tree) = fake_v2("cpuset cpu io memory pids");
    let root = dir.path();
    let total = PoolLimits {
        memory: Some(1 << 30),
        ..PoolLimits::default()
    };
    let cgroups = Cgroups::with_tree(tree, "cairn", &total);
    assert!(
        matches!(cgroups, Cgroups::Enforced { .. }),
        "{}",
        cgroups.describe()
    );
    assert_eq!(
        file(&root.join("cgroup.subtree_control")),
        "+memory +cpu +pids"
    );
    assert_eq!(file(&root.join("cairn/memory.max")), "1073741824");
    assert_eq!(file(&root.join("cairn/cpu.max")), "max 100000");
    let app = cgroups.for_app("web").unwrap().unwrap();
    assert_eq!(
        file(&root.join("cairn/cgroup.subtree_control")),
        "+memory +cpu +pids"
    );
    app.apply(&LIMITS).unwrap();
    let web = root.join("cairn/web");
    assert_eq!(file(&web.join("memory.max")), "67108864");
    assert_eq!(file(&web.join("cpu.max")), "50000 100000");
    assert_eq!(file(&web.join("pids.max")), "100");
    app.apply(&PoolLimits::default()).unwrap();
    assert_eq!(file(&web.join("memory.max")), "max");
    assert_eq!(file(&web.join("cpu.max")), "max 100000");
    assert_eq!(file(&web.join("pids.max")), "max");
    app.add(42).unwrap();
    assert_eq!(file(&web.join("cgroup.procs")), "42");
    std::fs::write(web.join("memory.current"), "123\n").unwrap();
    std::fs::write(
        web.join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
    )
    .unwrap();
    std::fs::write(
        web.join("cpu.stat"),
        "usage_usec 5\nuser_usec 4\nsystem_usec 1\n",
    )
    .unwrap();
    std::fs::write(web.join("pids.current"), "3\n").unwrap();
    assert_eq!(
        app.usage(),
        Usage {
            memory_bytes: 123,
            cpu_nanos: 5000,
            pids: 3,
            oom_kills: 2
        }
    );
    assert_eq!(app.describe(), web.display().to_string());
    assert!(
        cgroups.for_spare(7).is_none(),
        "v2 cannot rename: no spare cgroups"
    );
}

#[test]
fn v2_without_the_controllers_says_which_are_missing() {
    let (_dir, tree) = fake_v2("hugetlb");
    let cgroups = Cgroups::with_tree(tree, "cairn", &PoolLimits::default());
    let why = cgroups.describe();
    assert!(
        why.starts_with("not enforced: cannot create cgroup cairn")
            && why.contains("the memory, cpu, pids controller(s) cannot be had here"),
        "{why}"
    );
}

#[test]
fn v1_writes_each_controller_in_its_own_hierarchy() {
    let (dir, tree) = fake_v1();
    let root = dir.path();
    let cgroups = Cgroups::with_tree(tree, "cairn", &PoolLimits::default());
    let app = cgroups.for_app("web").unwrap().unwrap();
    app.apply(&LIMITS).unwrap();
    let at =
        |controller: &str, name: &str| file(&root.join(controller).join("cairn/web").join(name));
    assert_eq!(at("memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(at("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(at("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(at("pids", "pids.max"), "100");
    app.apply(&PoolLimits::default()).unwrap();
    assert_eq!(at("memory", "memory.limit_in_bytes"), "-1");
    assert_eq!(at("cpu", "cpu.cfs_quota_us"), "-1");
    assert_eq!(at("pids", "pids.max"), "max");
    app.add(42).unwrap();
    for controller in ["memory", "cpu", "cpuacct", "pids"] {
        assert_eq!(at(controller, "cgroup.procs"), "42", "{controller}");
    }
    let web = |controller: &str| root.join(controller).join("cairn/web");
    std::fs::write(web("memory").join("memory.usage_in_bytes"), "4096\n").unwrap();
    std::fs::write(
        web("memory").join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
    )
    .unwrap();
    std::fs::write(web("cpuacct").join("cpuacct.usage"), "777\n").unwrap();
    std::fs::write(web("pids").join("pids.current"), "2\n").unwrap();
    assert_eq!(
        app.usage(),
        Usage {
            memory_bytes: 4096,
            cpu_nanos: 777,
            pids: 2,
            oom_kills: 4
        }
    );
    // A spare's cgroup is made beside the apps', and an earlier daemon's is cleared away.
    let spare = cgroups.for_spare(7).unwrap();
    assert!(root.join("memory/cairn/spare.7").is_dir());
    drop(spare);
    cgroups.remove_stale_spares();
    assert!(!root.join("memory/cairn/spare.7").exists());
}

#[test]
fn the_parent_stays_below_the_root() {
    let cases = [
        ("cairn", Some("cairn")),
        (
            "/system.slice/cairnd.service/apps",
            Some("system.slice/cairnd.service/apps"),
        ),
        ("cairn/", Some("cairn")),
        ("", None),
        ("/", None),
        ("../etc", None),
        ("cairn/../..", None),
        ("a//b", None),
        ("./cairn", None),
    ];
    for (parent, expected) in cases {
        assert_eq!(below_root(parent).ok().as_deref(), expected, "{parent}");
    }
    let (dir, tree) = fake_v2("cpu memory pids");
    let cgroups = Cgroups::with_tree(tree, "../outside", &PoolLimits::default());
    assert!(
        cgroups
            .describe()
            .contains("must be a path below the cgroup root"),
        "{}",
        cgroups.describe()
    );
    assert!(!dir.path().parent().unwrap().join("outside").exists());
}

#[test]
fn cpu_quotas_round_to_the_period_with_a_floor() {
    let quota = |cpu| {
        PoolLimits {
            cpu: Some(cpu),
            ..PoolLimits::default()
        }
        .cpu_quota_us()
    };
    assert_eq!(quota(1.0), Some(100_000));
    assert_eq!(quota(0.25), Some(25_000));
    assert_eq!(quota(2.5), Some(250_000));
    assert_eq!(
        quota(0.001),
        Some(1000),
        "the kernel refuses less than 1 ms"
    );
    assert_eq!(PoolLimits::default().cpu_quota_us(), None);
}

/// The kernel's own tree, as cairnd uses it: limits written where the kernel reads them, a
/// process moved in and counted, everything removed after. Root only.
#[test]
fn limits_reach_the_kernels_cgroups() {
    const TEST: &str = "limits::tests::limits_reach_the_kernels_cgroups";
    if !nix::unistd::geteuid().is_root() {
        return skip(TEST, "needs root for real cgroups");
    }
    let parent = format!("cairn-unit-kernel-{}", std::process::id());
    let cgroups = Cgroups::detect(&parent, &PoolLimits::default());
    let Cgroups::Enforced { tree, .. } = &cgroups else {
        return skip(TEST, &format!("no cgroups here: {}", cgroups.describe()));
    };
    let app = cgroups.for_app("web").unwrap().unwrap();
    app.apply(&LIMITS).unwrap();
    let (memory, cpu, pids) = match &**tree {
        Tree::V1(_) => (
            file(
                &Path::new(SYSTEM_ROOT)
                    .join("memory")
                    .join(&parent)
                    .join("web/memory.limit_in_bytes"),
            ),
            file(
                &Path::new(SYSTEM_ROOT)
                    .join("cpu")
                    .join(&parent)
                    .join("web/cpu.cfs_quota_us"),
            ),
            file(
                &Path::new(SYSTEM_ROOT)
                    .join("pids")
                    .join(&parent)
                    .join("web/pids.max"),
            ),
        ),
        Tree::V2(_) => {
            let web = Path::new(SYSTEM_ROOT).join(&parent).join("web");
            (
                file(&web.join("memory.max")),
                file(&web.join("cpu.max")),
                file(&web.join("pids.max")),
            )
        }
    };
    assert_eq!(memory, "67108864");
    assert!(cpu.starts_with("50000"), "{cpu}");
    assert_eq!(pids, "100");
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    app.add(sleeper.id()).unwrap();
    let counted = app.usage();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // (Memory already charged stays with the cgroup a process leaves, so only the
    // process count shows the move at once.)
    assert_eq!(counted.pids, 1, "{counted:?}");
    app.remove();
    cgroups.remove_parent();
    assert!(
        !Path::new(SYSTEM_ROOT).join("memory").join(&parent).exists()
            && !Path::new(SYSTEM_ROOT).join(&parent).exists(),
        "the cgroups are gone"
    );
}

/// cgroup v2 on the kernel, where a cgroup2 filesystem is mounted (the system's own, or
/// the unified one a hybrid system mounts beside v1): what can be done there is done for
/// real. On a hybrid system memory, cpu and pids are bound to v1, so v2 limits can only be
/// refused there, with the reason: that part is checked on the fake tree and said in the
/// skip log.
#[test]
fn cgroup_v2_on_the_kernel() {
    const TEST: &str = "limits::tests::cgroup_v2_on_the_kernel";
    if !nix::unistd::geteuid().is_root() {
        return skip(TEST, "needs root for real cgroups");
    }
    let root = [SYSTEM_ROOT, "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|root| root.join("cgroup.controllers").exists());
    let Some(root) = root else {
        return skip(TEST, "no cgroup2 filesystem is mounted here");
    };
    let v2 = V2::new(root);
    let path = format!("cairn-unit-v2-{}", std::process::id());
    match v2.create(&format!("{path}/web")) {
        Ok(()) => {
            v2.apply(&format!("{path}/web"), &LIMITS).unwrap();
            assert_eq!(file(&root.join(&path).join("web/memory.max")), "67108864");
        }
        Err(refused) => {
            let text = refused.to_string();
            assert!(text.contains("cannot be had here"), "{text}");
            skip(
                TEST,
                &format!("v2 limits not set on the kernel ({text}); the fake tree checks them"),
            );
            fs::create_dir(&root.join(&path).join("web")).unwrap();
        }
    }
    let web = format!("{path}/web");
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    v2.add(&web, sleeper.id()).unwrap();
    let listed = file(&root.join(&web).join("cgroup.procs"));
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.id())).unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(listed, sleeper.id().to_string());
    assert!(own.contains(&format!("0::/{web}")), "{own}");
    v2.remove(&web).unwrap();
    v2.remove(&path).unwrap();
    assert!(!root.join(&path).exists());
}

const V1: &str = "12:pids:/system.slice/cairnd.service\n4:memory:/system.slice/cairnd.service\n1:name=systemd:/system.slice/cairnd.service\n0::/system.slice/cairnd.service\n";
const V2: &str = "0::/system.slice/cairnd.service\n";

#[test]
fn under_systemd_pools_go_below_the_delegated_service_cgroup() {
    assert_eq!(parent_for(V1, true), "system.slice/cairnd.service/apps");
    assert_eq!(parent_for(V2, true), "system.slice/cairnd.service/apps");
    assert_eq!(parent_for(V2, false), "cairn");
    assert_eq!(
        parent_for("0::/user.slice/session-3.scope\n", true),
        "cairn"
    );
    assert_eq!(parent_for("", true), "cairn");
}

/// A start renaming a spare's cgroup into the app's place while another start of the same
/// app moves its process in (a deploy during the restored app's background start): the
/// move must never find the app's cgroup missing. Real cgroups, so root and v1 only.
#[test]
fn a_move_racing_a_take_over_never_finds_the_apps_cgroup_missing() {
    const TEST: &str =
        "limits::tests::a_move_racing_a_take_over_never_finds_the_apps_cgroup_missing";
    if !nix::unistd::geteuid().is_root() {
        return skip(TEST, "needs root for real cgroups");
    }
    if !matches!(Tree::detect(Path::new(SYSTEM_ROOT)), Some(Tree::V1(_))) {
        return skip(
            TEST,
            "cgroup v1 only (a take-over renames there; on v2 a start moves the process)",
        );
    }
    let parent = format!("cairn-unit-race-{}", std::process::id());
    let cgroups = Cgroups::detect(&parent, &PoolLimits::default());
    let Cgroups::Enforced { tree, .. } = &cgroups else {
        return skip(TEST, &format!("no cgroups here: {}", cgroups.describe()));
    };
    let outside = AppCgroup::at(parent.clone(), Arc::clone(tree));
    let app = cgroups.for_app("app").unwrap().unwrap();
    let sleeper = || {
        std::process::Command::new("sleep")
            .arg("120")
            .spawn()
            .unwrap()
    };
    let (mut renamed, mut moved) = (sleeper(), sleeper());
    let limits = PoolLimits::default();

    let racer = {
        let (app, outside, pid) = (app.clone(), outside.clone(), moved.id());
        std::thread::spawn(move || -> Result<(), LimitsError> {
            for _ in 0..300 {
                app.add(pid)?;
                outside.add(pid)?;
            }
            Ok(())
        })
    };
    // A take-over while the racer's process is inside moves instead of renaming; count
    // the renames (the app's directory is a new one after each) so the test shows it raced
    // the removal and rename, not only moves.
    let memory_dir = PathBuf::from("/sys/fs/cgroup/memory")
        .join(&parent)
        .join("app");
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&memory_dir).map(|m| m.ino()).ok()
    };
    let took_over = (|| -> Result<(u32, u32), LimitsError> {
        let (mut takeovers, mut renames) = (0, 0);
        while !racer.is_finished() {
            let spare = cgroups.for_spare(renamed.id()).expect("a spare cgroup");
            spare.add(renamed.id())?;
            let before = inode();
            app.take_over(&spare, renamed.id(), &limits, None)?;
            if inode() != before {
                renames += 1;
            }
            outside.add(renamed.id())?;
            takeovers += 1;
        }
        Ok((takeovers, renames))
    })();
    let raced = racer.join().unwrap();

    for child in [&mut renamed, &mut moved] {
        let _ = child.kill();
        let _ = child.wait();
    }
    cgroups.remove_stale_spares(); // one a failed take-over left
    app.remove();
    outside.remove();
    raced.expect("the app's cgroup was there for every move");
    let (takeovers, renames) = took_over.expect("every take-over succeeded");
    assert!(
        takeovers > 10 && renames > 0,
        "{takeovers} take-overs ({renames} by renaming) ran beside the moves: too few to race"
    );
}

/// A test that cannot run here says why, also in `target/test-skips.log` (which `just test`
/// prints at the end: cargo hides a passing test's output).
fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    if let Ok(mut file) = std::fs::File::options()
        .create(true)
        .append(true)
        .open(target.join("test-skips.log"))
    {
        let _ = writeln!(file, "{line}");
    }
}

#[test]
fn own_cgroup_prefers_the_memory_controller_on_v1() {
    assert_eq!(own_cgroup("4:memory:/a\n0::/b\n").as_deref(), Some("/a"));
    assert_eq!(own_cgroup("0::/b\n").as_deref(), Some("/b"));
    assert_eq!(own_cgroup("garbage"), None);
}

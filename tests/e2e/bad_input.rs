//! Bad input gets a clear message and a non-zero exit, and leaves the daemon and its data as
//! they were.

use cairn_tests::{component, get, Daemon};

fn write(daemon: &Daemon, name: &str, bytes: &[u8]) -> String {
    let path = daemon.dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

// Over 100 lines: one scenario against one daemon, step by step, each step checked.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let daemon = Daemon::start();
    let addr = daemon.deploy_hello("steady", &["--env", "GREETING=steady"]);
    let before = daemon.ctl_ok(&["-o", "json", "ls"]);
    let components_before = daemon.ctl_ok(&["-o", "json", "components"]);

    let expect = |args: &[&str], code: i32, message: &str| {
        let result = daemon.ctl(args);
        assert_eq!(result.code, code, "cairnctl {args:?}: {result:?}");
        assert!(
            result.stderr.contains(message),
            "cairnctl {args:?}: expected `{message}` in: {}",
            result.stderr
        );
        assert!(!result.stderr.contains("panicked"), "{}", result.stderr);
    };

    // Files that are not components.
    let text = write(&daemon, "notes.txt", b"this is not wasm at all");
    expect(&["push", &text], 2, "not WebAssembly");
    let core = write(&daemon, "core.wasm", b"\0asm\x01\0\0\0");
    expect(
        &["push", &core],
        2,
        "core WebAssembly module, not a component",
    );
    let listen = format!("127.0.0.1:{}", cairn_tests::free_port());
    expect(
        &["deploy", "x", "--component", &core, "--listen", &listen],
        2,
        "core WebAssembly module",
    );
    let mut truncated = std::fs::read(component("hello")).unwrap();
    truncated.truncate(truncated.len() / 2);
    let truncated = write(&daemon, "truncated.wasm", &truncated);
    expect(&["push", &truncated], 2, "the component is not valid");
    expect(
        &[
            "deploy",
            "half",
            "--component",
            &truncated,
            "--listen",
            &listen,
        ],
        2,
        "not valid",
    );
    // A component without an HTTP handler.
    let cli_only = component("cli-only");
    expect(
        &[
            "deploy",
            "cli",
            "--component",
            cli_only.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        2,
        "does not export wasi:http/incoming-handler",
    );
    let missing = daemon.dir.join("missing.wasm");
    expect(&["push", missing.to_str().unwrap()], 2, "cannot read");

    // Bad manifests.
    let hello = component("hello");
    let manifest = |extra: &str| {
        write(
            &daemon,
            "bad.toml",
            format!(
                "name = \"bad\"\ncomponent = \"{}\"\n[http]\nlisten = \"{listen}\"\n{extra}",
                hello.display()
            )
            .as_bytes(),
        )
    };
    expect(
        &["deploy", "-f", &manifest("colour = \"red\"\n")],
        2,
        "unknown field `colour`",
    );
    expect(
        &["deploy", "-f", &manifest("[limits]\nmemory = \"lots\"\n")],
        2,
        "`lots` is not a size",
    );
    expect(
        &[
            "deploy",
            "-f",
            &manifest("[limits]\ntimeout = \"forever\"\n"),
        ],
        2,
        "not a duration",
    );
    expect(
        &["deploy", "-f", &write(&daemon, "broken.toml", b"name = ")],
        2,
        "not valid TOML",
    );
    expect(
        &[
            "deploy",
            "Bad_Name",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        2,
        "app name `Bad_Name` is not allowed",
    );

    // Addresses: taken by another program, or by another app.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    expect(
        &[
            "deploy",
            "squat",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &taken,
        ],
        5,
        "in use by another program",
    );
    expect(
        &[
            "deploy",
            "twin",
            "--component",
            hello.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
        ],
        5,
        "already used by app `steady`",
    );

    // Unknown apps and digests.
    let unknown_digest = format!("sha256:{}", "0".repeat(64));
    expect(
        &[
            "deploy",
            "ghost",
            "--component",
            &unknown_digest,
            "--listen",
            &listen,
        ],
        3,
        "push it first",
    );
    expect(&["status", "nope"], 3, "no app named `nope`");
    expect(&["logs", "nope"], 3, "no app named `nope`");
    expect(&["rollback", "nope"], 3, "no app named `nope`");
    expect(&["rm", "nope"], 3, "no app named `nope`");

    // Nothing changed: same apps, same generation, same components, still serving.
    assert_eq!(daemon.ctl_ok(&["-o", "json", "ls"]), before);
    assert_eq!(
        daemon.ctl_ok(&["-o", "json", "components"]),
        components_before
    );
    assert_eq!(get(addr, "/").unwrap().body, "steady from cairn\n");
    drop(squatter);
}

#[test]
fn an_empty_file_is_not_a_component() {
    // (The daemon also checks the client's announced digest against the bytes it received;
    // cairnctl always announces the right one, so that path has no end-to-end test yet.)
    let daemon = Daemon::start();
    let result = daemon.ctl(&["push", "/dev/null"]);
    assert_eq!(result.code, 2, "{result:?}");
    assert!(
        result.stderr.contains("not WebAssembly"),
        "{}",
        result.stderr
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let daemon = Daemon::start();
    let (cairnd, _) = cairn_tests::binaries();
    let output = std::process::Command::new(cairnd)
        .arg("--state-dir")
        .arg(daemon.dir.join("other-state"))
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another cairnd is already serving"),
        "{stderr}"
    );
    // The first one is unharmed.
    daemon.ctl_ok(&["ls"]);
}

#[test]
fn cairnctl_says_when_no_daemon_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cairnctl) = cairn_tests::binaries();
    let output = std::process::Command::new(cairnctl)
        .arg("--socket")
        .arg(dir.path().join("nothing.sock"))
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cairnd is not running at"), "{stderr}");
}

#[test]
fn a_full_disk_is_reported_and_loses_nothing() {
    if !cairn_tests::is_root() {
        cairn_tests::skip(
            "a_full_disk_is_reported_and_loses_nothing",
            "needs root to mount a small tmpfs",
        );
        return;
    }
    let mount_point = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "cairn-e2e-full"])
        .arg(mount_point.path())
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        cairn_tests::skip(
            "a_full_disk_is_reported_and_loses_nothing",
            &format!("mounting a tmpfs failed ({mounted:?})"),
        );
        return;
    }
    let unmount = |path: &std::path::Path| {
        let _ = std::process::Command::new("umount").arg(path).status();
    };
    let result = std::panic::catch_unwind(|| {
        let daemon = Daemon::start_with_state_dir(&mount_point.path().join("state"));
        let addr = daemon.deploy_hello("survivor", &[]);
        let big = write(
            &daemon,
            "big.wasm",
            &cairn_tests::padded_component(14 << 20),
        );
        let result = daemon.ctl(&["push", &big]);
        assert_eq!(result.code, 7, "{result:?}");
        assert!(
            result.stderr.contains("free some space, then retry"),
            "{}",
            result.stderr
        );
        // Nothing was lost and the daemon still works.
        assert_eq!(get(addr, "/").unwrap().status, 200);
        let apps = daemon.ctl(&["-o", "json", "ls"]).json();
        assert_eq!(apps[0]["name"], "survivor");
        assert_eq!(apps[0]["status"], "running");
    });
    unmount(mount_point.path());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

//! The control socket authorises every call from the peer's credentials.

use cairn_tests::{is_root, wait_for, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const NOBODY: u32 = 65534;

#[test]
fn another_user_is_refused_by_default() {
    if !is_root() {
        cairn_tests::skip(
            "another_user_is_refused_by_default",
            "needs root to run cairnctl as another uid",
        );
        return;
    }
    let daemon = Daemon::start();
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "the control socket must be 0660");
    let result = daemon.ctl_as(Some(NOBODY), &["ls"]);
    assert_eq!(result.code, 4, "{result:?}");
    assert!(
        result.stderr.contains("permission denied"),
        "{}",
        result.stderr
    );
    assert!(result.stderr.contains("usermod -aG"), "{}", result.stderr);
}

#[test]
fn readers_may_read_but_not_change_state() {
    if !is_root() {
        cairn_tests::skip(
            "readers_may_read_but_not_change_state",
            "needs root to run cairnctl as another uid",
        );
        return;
    }
    let daemon = Daemon::start_with(
        Some("[control]\nread_access = \"any\"\ngroup = \"cairn-e2e-none\"\n"),
        &[],
    );
    let addr = daemon.deploy_hello("guarded", &["--env", "API_TOKEN=s3cret-value"]);

    let read = daemon.ctl_as(Some(NOBODY), &["-o", "json", "ls"]);
    assert_eq!(read.code, 0, "{read:?}");
    assert_eq!(read.json()[0]["name"], "guarded");
    // A reader sees which variables an app has, not their values (often secrets); those who
    // may change state see them.
    for args in [
        &["-o", "json", "status", "guarded"][..],
        &["status", "guarded"][..],
    ] {
        let status = daemon.ctl_as(Some(NOBODY), args);
        assert_eq!(status.code, 0, "{status:?}");
        assert!(status.stdout.contains("API_TOKEN"), "{}", status.stdout);
        assert!(!status.stdout.contains("s3cret"), "{}", status.stdout);
    }
    assert_eq!(
        daemon.app_status("guarded")["env"]["API_TOKEN"],
        "s3cret-value"
    );

    for args in [
        vec!["rm", "guarded"],
        vec!["rollback", "guarded"],
        vec!["gc"],
    ] {
        let result = daemon.ctl_as(Some(NOBODY), &args);
        assert_eq!(result.code, 4, "{args:?}: {result:?}");
        assert!(
            result.stderr.contains(&format!("uid {NOBODY} may not")),
            "{}",
            result.stderr
        );
    }
    // Running an app runs its code with its grants: refused to readers (125: the run did
    // not happen, whatever the command's own codes are).
    let run = daemon.ctl_as(Some(NOBODY), &["run", "guarded"]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(
        run.stderr.contains(&format!("uid {NOBODY} may not")),
        "{run:?}"
    );
    let listen = format!("127.0.0.1:{}", cairn_tests::free_port());
    let digest = format!("sha256:{}", "0".repeat(64));
    let deploy = daemon.ctl_as(
        Some(NOBODY),
        &[
            "deploy",
            "intruder",
            "--component",
            &digest,
            "--listen",
            &listen,
        ],
    );
    assert_eq!(deploy.code, 4, "{deploy:?}");
    // Root still may, and the refused calls changed nothing.
    assert_eq!(cairn_tests::get(addr, "/").unwrap().status, 200);
    assert_eq!(
        daemon
            .ctl(&["-o", "json", "ls"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A command app's scheduled arguments may carry a token, as a path's query may: readers
    // see that it runs, not with what.
    let job = daemon.dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"job\"\ncomponent = \"{}\"\n[[schedule]]\nname = \"sync\"\nevery = \"1h\"\nargs = [\"--token\", \"s3cret-arg\"]\n",
            cairn_tests::component("cli-only").display()
        ),
    )
    .unwrap();
    daemon.ctl_ok(&["deploy", "-f", job.to_str().unwrap()]);
    wait_for("the schedule", Duration::from_secs(10), || {
        daemon.app_status("job")["schedules"][0]["request"] == "run --token s3cret-arg"
    })
    .unwrap();
    for args in [&["-o", "json", "status", "job"][..], &["status", "job"][..]] {
        let seen = daemon.ctl_as(Some(NOBODY), args);
        assert_eq!(seen.code, 0, "{seen:?}");
        assert!(seen.stdout.contains("sync"), "{seen:?}");
        assert!(!seen.stdout.contains("s3cret-arg"), "{}", seen.stdout);
    }
}

#[test]
fn one_uid_cannot_hold_every_control_connection() {
    if !is_root() {
        cairn_tests::skip(
            "one_uid_cannot_hold_every_control_connection",
            "needs root to run cairnctl as another uid",
        );
        return;
    }
    let daemon = Daemon::start_with(Some("[control]\nread_access = \"any\"\n"), &[]);
    // Root opens 40 connections and sends nothing: the first 32 are held, the rest closed.
    let mut held: Vec<std::os::unix::net::UnixStream> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    let closed = held
        .iter_mut()
        .filter(|stream| {
            use std::io::Read;
            let mut stream: &std::os::unix::net::UnixStream = stream;
            stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            // A timeout means still open; the end or a reset means closed by cairnd.
            match stream.read(&mut [0u8; 1]) {
                Ok(0) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                Ok(_) => false,
            }
        })
        .count();
    assert_eq!(
        closed, 8,
        "connections over the per-uid bound were not closed"
    );
    // Root's slots are full, another uid's are not.
    assert_ne!(daemon.ctl(&["ls"]).code, 0, "root got a 33rd connection");
    let other = daemon.ctl_as(Some(NOBODY), &["ls"]);
    assert_eq!(other.code, 0, "{other:?}");
    // Closing them gives the slots back.
    drop(held);
    wait_for(
        "root's slots to be free again",
        Duration::from_secs(10),
        || daemon.ctl(&["ls"]).code == 0,
    )
    .unwrap();
}

//! The import folder (an image's boot partition `cairn/`): preloaded apps serve at READY with
//! no network, a bad file is reported on the console, in `cairnctl status` and in report.txt
//! while the rest still serves, and a restart re-imports only what changed.

use cairn_tests::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn write_app(dir: &Path, name: &str, listen: SocketAddr, greeting: &str) {
    let apps = dir.join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    std::fs::copy(component("hello"), apps.join("hello.wasm")).unwrap();
    std::fs::write(
        apps.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\ncomponent = \"hello.wasm\"\n[http]\nlisten = \"{listen}\"\n\
             [env]\nGREETING = \"{greeting}\"\n"
        ),
    )
    .unwrap();
}

fn greeting(addr: SocketAddr) -> String {
    let response = get(addr, "/").expect("the app answers");
    assert_eq!(response.status, 200, "{}", response.body);
    response.body.trim().to_string()
}

fn import_status(daemon: &Daemon) -> serde_json::Value {
    daemon.ctl(&["-o", "json", "status"]).json()["import"].clone()
}

// Over 100 lines: one scenario against one daemon, step by step, each step checked.
#[test]
fn preloaded_apps_serve_at_ready_and_bad_files_are_reported_not_fatal() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write_app(dir, "hello", addr, "preloaded");
    std::fs::write(dir.join("apps/broken.toml"), "name = \"broken\"\n[http\n").unwrap();
    std::fs::write(dir.join("apps/garbage.wasm"), b"\0asm but not really").unwrap();
    std::fs::write(
        dir.join("apps/garbage.toml"),
        format!(
            "name = \"garbage\"\ncomponent = \"garbage.wasm\"\n[http]\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    // The device's identity comes from the folder; the upstream is unreachable, as on a first
    // boot with no network.
    let dead_port = free_port();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[upstream]\nnats = \"nats://127.0.0.1:{dead_port}\"\ndevice = \"pump-7\"\n\
             trusted_keys = [\"0100000000000000000000000000000000000000000000000000000000000000\"]\n"
        ),
    )
    .unwrap();

    let import_dir = dir.to_str().unwrap();
    let mut daemon = Daemon::start_with(None, &[("CAIRN_IMPORT_DIR", import_dir)]);
    // READY came after the import: the app serves at once.
    assert_eq!(greeting(addr), "preloaded from cairn");
    assert_eq!(daemon.app_status("hello")["generation"], 1);
    let sync = daemon.ctl(&["-o", "json", "sync", "status"]).json();
    assert_eq!(sync["device"], "pump-7", "{sync}");

    let status = import_status(&daemon);
    assert_eq!(status["dir"], import_dir);
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("apps/broken.toml: not valid TOML") && problems.contains("line 2"),
        "{problems}"
    );
    assert!(
        problems.contains("apps/garbage.toml: the component garbage.wasm"),
        "{problems}"
    );
    let lines = status["lines"].to_string();
    assert!(
        lines.contains("apps/hello.toml: deployed as app hello generation 1"),
        "{lines}"
    );
    assert!(
        lines.contains("config.toml: laid over the config file"),
        "{lines}"
    );
    let console = daemon.console();
    assert!(
        console.contains("IMPORT PROBLEM") && console.contains("apps/broken.toml"),
        "console: {console}"
    );
    let text = daemon.ctl_ok(&["status"]);
    assert!(
        text.contains("IMPORT PROBLEM") && text.contains("apps/garbage.toml"),
        "{text}"
    );
    let report = std::fs::read_to_string(dir.join("report.txt")).unwrap();
    assert!(
        report.contains("ok: apps/hello.toml: deployed as app hello generation 1"),
        "{report}"
    );
    assert!(report.contains("PROBLEM: apps/broken.toml"), "{report}");
    // The rejected component left nothing behind.
    let components = daemon.ctl(&["-o", "json", "components"]).json();
    assert_eq!(components.as_array().unwrap().len(), 1, "{components}");

    // A restart with nothing changed keeps the generation.
    daemon.stop();
    daemon.restart();
    assert_eq!(greeting(addr), "preloaded from cairn");
    assert_eq!(daemon.app_status("hello")["generation"], 1);
    let lines = import_status(&daemon)["lines"].to_string();
    assert!(
        lines.contains(
            "apps/hello.toml: unchanged since it was imported; app hello is at generation 1"
        ),
        "{lines}"
    );

    // An edited manifest is imported as the next generation.
    write_app(dir, "hello", addr, "edited");
    daemon.stop();
    daemon.restart();
    assert_eq!(greeting(addr), "edited from cairn");
    assert_eq!(daemon.app_status("hello")["generation"], 2);

    // What the operator removed with cairnctl stays removed until the file changes.
    daemon.ctl_ok(&["rm", "hello"]);
    daemon.stop();
    daemon.restart();
    wait_for("the app is gone", Duration::from_secs(5), || {
        !is_listening(addr)
    })
    .unwrap();
    let lines = import_status(&daemon)["lines"].to_string();
    assert!(
        lines.contains("was removed since and stays removed"),
        "{lines}"
    );
}

#[test]
fn a_malformed_config_in_the_import_folder_leaves_the_config_file_in_charge() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write_app(dir, "hello", addr, "still");
    std::fs::write(dir.join("config.toml"), "[upstream]\nnats = 42\n").unwrap();

    let daemon = Daemon::start_with(None, &[("CAIRN_IMPORT_DIR", dir.to_str().unwrap())]);
    assert_eq!(greeting(addr), "still from cairn");
    let problems = import_status(&daemon)["problems"].to_string();
    assert!(
        problems.contains("config.toml is not valid")
            && problems.contains("started with the config file alone"),
        "{problems}"
    );
    assert!(
        daemon.console().contains("IMPORT PROBLEM"),
        "{}",
        daemon.console()
    );
    // The bad overlay did not switch sync on.
    let sync = daemon.ctl(&["-o", "json", "sync", "status"]).json();
    assert_ne!(sync["state"], "connected", "{sync}");
    assert!(sync["upstream"].as_str().unwrap_or("").is_empty(), "{sync}");
}

/// What a hostile or mistaken import folder can hold: a component that is a device (named
/// outright, or through a link), a FIFO, a link out of the folder, a path with `..`, and a
/// manifest that is itself a FIFO. cairnd reads none of them, reaches READY, imports the rest,
/// and reports each problem.
#[test]
fn devices_fifos_links_out_and_dotdot_are_refused_and_the_rest_imports() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write_app(dir, "hello", addr, "still here");
    let apps = dir.join("apps");
    let manifest = |name: &str, component: &str| {
        std::fs::write(
            apps.join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\ncomponent = \"{component}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n",
                free_port()
            ),
        )
        .unwrap();
    };
    let fifo = |path: &Path| {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
    };
    manifest("zero", "/dev/zero");
    std::os::unix::fs::symlink("/dev/zero", apps.join("zero-link.wasm")).unwrap();
    manifest("zerolink", "zero-link.wasm");
    fifo(&apps.join("pipe.wasm"));
    manifest("pipe", "pipe.wasm");
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(component("hello"), outside.path().join("hello.wasm")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("hello.wasm"), apps.join("out.wasm")).unwrap();
    manifest("out", "out.wasm");
    std::fs::copy(component("hello"), dir.join("up.wasm")).unwrap();
    manifest("up", "../up.wasm");
    fifo(&apps.join("waiting.toml"));
    // The config overlay, linked out of the folder (to a device, even).
    std::os::unix::fs::symlink("/dev/zero", dir.join("config.toml")).unwrap();

    let daemon = Daemon::start_with(None, &[("CAIRN_IMPORT_DIR", dir.to_str().unwrap())]);
    assert_eq!(greeting(addr), "still here from cairn");
    let problems = import_status(&daemon)["problems"].clone();
    let problems: Vec<&str> = problems
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for (file, needle) in [
        ("apps/zero.toml", "is an absolute path"),
        ("apps/zerolink.toml", "outside the import folder"),
        ("apps/pipe.toml", "is a FIFO, not a regular file"),
        ("apps/out.toml", "outside the import folder"),
        ("apps/up.toml", "goes up with `..`"),
        ("apps/waiting.toml", "is a FIFO, not a regular file"),
        ("config.toml", "outside the import folder"),
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{file}:")) && p.contains(needle)),
            "no problem `{needle}` for {file} in {problems:#?}"
        );
    }
    let apps = daemon.ctl(&["-o", "json", "ls"]).json();
    let names: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello"]);
}

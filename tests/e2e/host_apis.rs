//! What an app can use beyond WASI and `wasi:http`, through the interfaces other ecosystems'
//! components import: runtime configuration and secrets (`wasi:config/store` at both
//! versions in use, Spin's `variables`), with components built by those ecosystems' own
//! toolchains (`host-apis`: wit-bindgen from the upstream WIT; `spin-app`: spin-sdk).

use cairn_tests::{component, free_port, get, is_root, Daemon};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

const NOBODY: u32 = 65534;
const SECRET: &str = "s3cret-value-7f3a";

/// Deploys `component_name` as `name` with a health path and `tables` (TOML) after `[http]`.
fn deploy(daemon: &Daemon, name: &str, component_name: &str, tables: &str) -> SocketAddr {
    daemon.deploy_manifest(
        name,
        component_name,
        &format!("health = \"/health\"\n{tables}"),
    )
}

fn answer(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = get(addr, path).unwrap();
    (response.status, response.body)
}

#[test]
fn config_and_secrets_reach_the_guest_through_every_interface_and_nobody_else() {
    let daemon = Daemon::start_with(
        Some("[control]\nread_access = \"any\"\ngroup = \"cairn-e2e-none\"\n"),
        &[],
    );
    let tables = format!(
        "[config]\napi_url = \"https://example.net/v1\"\nmode = \"fast\"\n[secrets]\napi_token = \"{SECRET}\"\n"
    );
    let wasmcloud = deploy(&daemon, "wasmcloud", "host_apis", &tables);
    let spin = deploy(&daemon, "spin", "spin_app", &tables);

    // wasi:config, both versions: values, secrets alike, and a missing key is `none`.
    for route in ["/config-draft", "/config-rc"] {
        assert_eq!(
            answer(wasmcloud, &format!("{route}?api_url")),
            (200, "https://example.net/v1".to_string())
        );
        assert_eq!(
            answer(wasmcloud, &format!("{route}?api_token")),
            (200, SECRET.to_string())
        );
        assert_eq!(answer(wasmcloud, &format!("{route}?missing")).0, 404);
    }
    let (status, all) = answer(wasmcloud, "/config-all");
    assert_eq!(status, 200);
    assert_eq!(
        all,
        format!("api_token={SECRET}\napi_url=https://example.net/v1\nmode=fast\n")
    );

    // Spin's variables, with Spin's errors for an undefined and an ill-formed name.
    assert_eq!(
        answer(spin, "/variable?api_url"),
        (200, "https://example.net/v1".to_string())
    );
    assert_eq!(
        answer(spin, "/variable?api_token"),
        (200, SECRET.to_string())
    );
    let (status, body) = answer(spin, "/variable?missing");
    assert_eq!(status, 404, "{body}");
    assert!(body.starts_with("undefined"), "{body}");
    let (status, body) = answer(spin, "/variable?Api-Url");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("lower-case"), "{body}");

    // Who sees what: the secret's key to everyone, its value to nobody; [config] values to
    // callers who may change state only.
    let as_root = daemon.app_status("wasmcloud");
    assert_eq!(as_root["config"]["api_url"], "https://example.net/v1");
    assert_eq!(as_root["secrets"], serde_json::json!(["api_token"]));
    let mut shown = vec![
        daemon.ctl_ok(&["-o", "json", "status", "wasmcloud"]),
        daemon.ctl_ok(&["status", "spin"]),
        daemon.ctl_ok(&["logs", "wasmcloud"]),
        daemon.ctl_ok(&["logs", "spin"]),
        daemon.ctl_ok(&["-o", "json", "ls"]),
    ];
    if is_root() {
        for args in [
            &["-o", "json", "status", "spin"][..],
            &["status", "wasmcloud"][..],
        ] {
            let reader = daemon.ctl_as(Some(NOBODY), args);
            assert_eq!(reader.code, 0, "{reader:?}");
            assert!(reader.stdout.contains("api_token"), "{}", reader.stdout);
            assert!(!reader.stdout.contains("example.net"), "{}", reader.stdout);
            shown.push(reader.stdout);
        }
    } else {
        cairn_tests::skip(
            "config_and_secrets_…: the reader's view",
            "needs root to run cairnctl as another uid",
        );
    }
    let table = daemon.ctl_ok(&["status", "wasmcloud"]);
    assert!(table.contains("secret api_token"), "{table}");
    assert!(table.contains("config api_url"), "{table}");
    shown.push(table);
    shown.push(daemon.log());
    for text in &shown {
        assert!(!text.contains(SECRET), "the secret shows in:\n{text}");
    }

    // The store that keeps it is its owner's alone, database and WAL.
    for suffix in ["", "-wal"] {
        let file = format!("{}{suffix}", daemon.database().display());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }

    // A secret from a file (never on a command line), replacing the manifest's.
    let token = daemon.dir.join("token");
    std::fs::write(&token, "rotated-token\n").unwrap();
    let flag = format!("api_token={}", token.display());
    let manifest = daemon.dir.join("spin.toml");
    daemon.ctl_ok(&[
        "deploy",
        "-f",
        manifest.to_str().unwrap(),
        "--secret-file",
        &flag,
    ]);
    assert_eq!(
        answer(spin, "/variable?api_token"),
        (200, "rotated-token".to_string())
    );
    assert_eq!(
        answer(spin, "/variable?api_url"),
        (200, "https://example.net/v1".to_string())
    );
}

#[test]
fn an_app_without_config_reads_nothing_and_bad_config_is_refused() {
    let daemon = Daemon::start();
    let bare = deploy(&daemon, "bare", "host_apis", "");
    assert_eq!(answer(bare, "/config-all"), (200, String::new()));
    assert_eq!(answer(bare, "/config-rc?api_url").0, 404);

    // Each refused by the key, with no value quoted, whatever the value is.
    for (tables, expected, value) in [
        (
            format!("[config]\ntoken = \"a\"\n[secrets]\ntoken = \"{SECRET}\"\n"),
            "in both [config] and [secrets]",
            SECRET,
        ),
        (
            "[secrets]\npin = 98765432\n".to_string(),
            "[secrets] `pin` must be a string",
            "98765432",
        ),
    ] {
        let manifest = daemon.dir.join("refused.toml");
        std::fs::write(
            &manifest,
            format!(
                "name = \"refused\"\ncomponent = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n{tables}",
                component("host_apis").display(),
                free_port()
            ),
        )
        .unwrap();
        let refused = daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);
        assert_ne!(refused.code, 0);
        assert!(refused.stderr.contains(expected), "{}", refused.stderr);
        assert!(!refused.stderr.contains(value), "{}", refused.stderr);
        assert!(!daemon.log().contains(value));
    }
}

#[test]
fn wasi_logging_lines_keep_their_level_and_logs_filter_by_it() {
    let daemon = Daemon::start();
    let app = deploy(&daemon, "logger", "host_apis", "");
    assert_eq!(answer(app, "/log?tag-1"), (200, "logged".to_string()));
    daemon.wait_logged("logger", "tag-1 at critical");

    let lines: Vec<serde_json::Value> = daemon
        .ctl_ok(&["-o", "json", "logs", "logger"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["line"].as_str().unwrap().contains("tag-1"))
        .collect();
    let seen: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().into(),
                l["line"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["trace", "debug", "info", "warn", "error", "critical"]
        .iter()
        .map(|level| (level.to_string(), format!("host-apis: tag-1 at {level}")))
        .collect();
    assert_eq!(seen, expected);

    // At warn and above: warn, error, critical, and cairn's own notes; not the rest.
    let warn = daemon.ctl_ok(&["logs", "logger", "--level", "warn"]);
    for kept in ["tag-1 at warn", "tag-1 at error", "tag-1 at critical"] {
        assert!(warn.contains(kept), "{warn}");
    }
    for dropped in ["tag-1 at info", "tag-1 at debug", "tag-1 at trace"] {
        assert!(!warn.contains(dropped), "{warn}");
    }
    let last = daemon.ctl_ok(&["logs", "logger", "--level", "error", "--tail", "1"]);
    assert!(last.contains("tag-1 at critical"), "{last}");
    assert_eq!(last.lines().count(), 1, "{last}");

    let refused = daemon.ctl(&["logs", "logger", "--level", "loud"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("critical"), "{}", refused.stderr);
}

#[test]
fn device_secrets_come_from_a_root_only_file_on_the_device() {
    const VALUE: &str = "device-only-7f3a9c";
    let secrets = tempfile::tempdir().unwrap();
    // `nogroup` is the control group here, so uid 65534 (primary group 65534) may change
    // state: it may deploy, but not an app that reads the device's secrets.
    let daemon = Daemon::start_with(
        Some(&format!(
            "secrets_dir = \"{}\"\n[control]\ngroup = \"nogroup\"\n",
            secrets.path().display()
        )),
        &[],
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let manifest = secrets.path().join("gateway-manifest.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"gateway\"\ncomponent = \"{}\"\ndevice_secrets = [\"api_token\"]\n\
             [http]\nlisten = \"{addr}\"\nhealth = \"/health\"\n[config]\nmode = \"fast\"\n",
            component("host_apis").display()
        ),
    )
    .unwrap();
    let deploy = || daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);

    // No file, then a file any local user could read: refused, saying how to fix it.
    let refused = deploy();
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("none of this app's device_secrets (api_token)")
            && refused.stderr.contains("gateway.toml"),
        "{}",
        refused.stderr
    );
    let file = secrets.path().join("gateway.toml");
    std::fs::write(&file, format!("api_token = \"{VALUE}\"\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = deploy();
    assert!(refused.stderr.contains("mode 0644"), "{}", refused.stderr);

    // Readable by root only: the guest reads it as any secret.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // ... once root deploys it: a member of the control group would choose the code that
    // reads the device's secrets.
    if is_root() {
        let member = daemon.ctl_as(Some(NOBODY), &["deploy", "-f", manifest.to_str().unwrap()]);
        assert_eq!(member.code, 4, "{}", member.stderr);
        assert!(
            member.stderr.contains("only root or cairnd's own user"),
            "{}",
            member.stderr
        );
    }
    let deployed = deploy();
    assert_eq!(deployed.code, 0, "{}", deployed.stderr);
    assert_eq!(
        answer(addr, "/config-draft?api_token"),
        (200, VALUE.to_string())
    );
    assert_eq!(
        answer(addr, "/config-draft?mode"),
        (200, "fast".to_string())
    );

    // Its name shows, its value nowhere: not in status, the store or the logs.
    let status = daemon.app_status("gateway");
    assert_eq!(
        status["secrets"],
        serde_json::json!(["api_token (from the device)"])
    );
    let logs = daemon.ctl_ok(&["logs", "gateway"]);
    for text in [status.to_string(), logs, daemon.log()] {
        assert!(!text.contains(VALUE), "the secret shows in:\n{text}");
    }
    for file in ["cairn.db", "cairn.db-wal"] {
        let path = daemon.database().with_file_name(file);
        let stored = std::fs::read(&path).unwrap_or_default();
        assert!(
            !stored.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
            "the secret is in {}",
            path.display()
        );
    }
}

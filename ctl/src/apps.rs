//! `cairnctl deploy`, `ls`, `rollback` and `rm`: an app's generations.

use crate::output::{app_json, print_json, print_table, row, short};
use anyhow::Context as _;
use cairn_core::proto::{self, control_client::ControlClient};
use cairn_ctl::exit::{self, Failure};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

#[derive(Args)]
pub struct DeployArgs {
    /// The app's name (with flags; a manifest names its app itself).
    name: Option<String>,
    /// A TOML manifest; a `component` path in it is relative to the manifest and is uploaded.
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["name", "component", "listen"])]
    file: Option<PathBuf>,
    /// A component file to upload, or the digest (sha256:<hex>) of a pushed one.
    #[arg(long, value_name = "FILE|DIGEST")]
    component: Option<String>,
    /// The address to serve HTTP on, such as 127.0.0.1:8080. Leave it out for a command
    /// component (one that exports wasi:cli/run): the app then runs with `cairnctl run`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Linear memory per instance, such as 64MiB.
    #[arg(long)]
    memory: Option<String>,
    /// CPU cores the app's pool may use, such as 0.5.
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory the app's whole pool may use, such as 256MiB.
    #[arg(long)]
    memory_total: Option<String>,
    /// Processes and threads the app's pool may have.
    #[arg(long)]
    pids: Option<u32>,
    /// Stop the app's pool after this long without a request, such as 30s; the next
    /// connection starts it again.
    #[arg(long)]
    idle: Option<String>,
    /// A path the app answers 2xx on when healthy, such as /health; a new generation goes live
    /// only once it does.
    #[arg(long)]
    health: Option<String>,
    /// Requests served at once; more get 503.
    #[arg(long)]
    instances: Option<u32>,
    /// Deadline per request, such as 5s.
    #[arg(long)]
    timeout: Option<String>,
    /// An environment variable for the app, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A runtime configuration value the app reads through wasi:config or Spin's variables,
    /// K=V (repeatable; replaces the manifest's [config] K).
    #[arg(long = "config", value_name = "K=V")]
    config: Vec<String>,
    /// A secret the app reads like configuration, its value read from FILE (a trailing
    /// newline dropped) so that it never shows in a process list; status, logs and reports
    /// never show it (repeatable; replaces the manifest's [secrets] K).
    #[arg(long = "secret-file", value_name = "K=FILE")]
    secret_file: Vec<String>,
}

/// `cairnctl deploy`.
pub async fn deploy(
    client: &mut ControlClient<Channel>,
    args: DeployArgs,
    json_output: bool,
) -> Result<(), Failure> {
    let manifest = build_manifest(client, args).await?;
    let reply = client
        .deploy(proto::DeployRequest { manifest })
        .await?
        .into_inner();
    let app = reply.app.unwrap_or_default();
    if json_output {
        print_json(&json!({"app": app_json(&app), "unchanged": reply.unchanged}));
    } else if reply.unchanged {
        println!(
            "{} is already at generation {} with this manifest; nothing changed",
            app.name, app.generation
        );
    } else if app.listen.is_empty() {
        println!(
            "{} generation {} is {}: run it with `cairnctl run {}`",
            app.name, app.generation, app.status, app.name
        );
    } else {
        println!(
            "{} generation {} is {} on http://{}",
            app.name, app.generation, app.status, app.listen
        );
    }
    Ok(())
}

/// `cairnctl ls`.
pub async fn list(client: &mut ControlClient<Channel>, json_output: bool) -> Result<(), Failure> {
    let apps = client
        .list_apps(proto::ListAppsRequest {})
        .await?
        .into_inner()
        .apps;
    if json_output {
        print_json(&json!(apps.iter().map(app_json).collect::<Vec<_>>()));
    } else {
        let mut rows = vec![row(["NAME", "GEN", "STATUS", "LISTEN", "DIGEST", "OWNER"])];
        for app in &apps {
            rows.push(vec![
                app.name.clone(),
                app.generation.to_string(),
                app.status.clone(),
                if app.listen.is_empty() {
                    "-".to_string()
                } else {
                    app.listen.clone()
                },
                short(&app.digest),
                app.owner.clone(),
            ]);
        }
        print_table(&rows);
        for app in apps.iter().filter(|a| !a.error.is_empty()) {
            println!(
                "\n{}: {}",
                app.name,
                crate::output::for_terminal_if(crate::output::stdout_is_terminal(), &app.error)
            );
        }
    }
    Ok(())
}

/// `cairnctl rollback`.
pub async fn rollback(
    client: &mut ControlClient<Channel>,
    app: String,
    to: Option<u64>,
    json_output: bool,
) -> Result<(), Failure> {
    let reply = client
        .rollback(proto::RollbackRequest {
            app,
            to_generation: to.unwrap_or(0),
        })
        .await?
        .into_inner();
    let app = reply.app.unwrap_or_default();
    if json_output {
        print_json(&app_json(&app));
    } else {
        println!(
            "{} is back at generation {} ({}){}",
            app.name,
            app.generation,
            short(&app.digest),
            if app.listen.is_empty() {
                " (a command app)".to_string()
            } else {
                format!(" on http://{}", app.listen)
            }
        );
    }
    Ok(())
}

/// `cairnctl rm`.
pub async fn remove(
    client: &mut ControlClient<Channel>,
    app: String,
    keep_data: bool,
    json_output: bool,
) -> Result<(), Failure> {
    let reply = client
        .remove(proto::RemoveRequest {
            app: app.clone(),
            keep_data,
        })
        .await?
        .into_inner();
    if json_output {
        print_json(
            &json!({"removed": app, "data_deleted": reply.data_deleted, "data_kept": keep_data, "data_only": reply.data_only}),
        );
    } else if reply.data_only {
        println!(
            "{app} is no longer an app; deleted its kept key-value data ({})",
            crate::output::human_size(reply.data_deleted.unwrap_or(0))
        );
    } else if keep_data {
        println!("removed {app}; its key-value data was kept");
    } else if let Some(bytes) = reply.data_deleted {
        println!(
            "removed {app} and its key-value data ({})",
            crate::output::human_size(bytes)
        );
    } else {
        println!("removed {app}");
    }
    Ok(())
}

/// Turns `deploy` arguments into the manifest the daemon parses, uploading a component file
/// named by path first.
async fn build_manifest(
    client: &mut ControlClient<Channel>,
    args: DeployArgs,
) -> Result<String, Failure> {
    let (mut table, base) = base_manifest(&args)?;
    refine(&mut table, &args)?;
    let component = table
        .get("component")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            invalid("the manifest has no `component` (a file path or sha256:<hex>)".into())
        })?
        .to_string();
    if !component.starts_with("sha256:") {
        let path = base.join(&component);
        if !path.is_file() {
            return Err(invalid(format!(
                "component file {} does not exist (paths in a manifest are relative to the manifest)",
                path.display()
            )));
        }
        // Untagged: if the deploy fails, the daemon drops the upload again.
        let reply = crate::components::upload(client, &path, Some(String::new()), "").await?;
        table.insert("component".into(), reply.digest.into());
    }
    toml::to_string(&table).map_err(|e| invalid(e.to_string()))
}

fn invalid(message: String) -> Failure {
    Failure {
        code: exit::INVALID,
        message,
    }
}

/// The manifest file (`-f`) with the folder its paths are relative to, or one made of the
/// NAME, `--component` and `--listen` flags.
fn base_manifest(args: &DeployArgs) -> Result<(toml::Table, PathBuf), Failure> {
    if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the manifest {}", file.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            invalid(format!(
                "{} is not valid TOML: {}",
                file.display(),
                e.message()
            ))
        })?;
        return Ok((
            table,
            file.parent().map(Path::to_path_buf).unwrap_or_default(),
        ));
    }
    let name = args
        .name
        .clone()
        .ok_or_else(|| invalid("give the app a NAME, or a manifest with -f FILE".into()))?;
    let component = args
        .component
        .clone()
        .ok_or_else(|| invalid("give --component FILE|sha256:HEX".into()))?;
    let mut table = toml::Table::new();
    table.insert("name".into(), name.into());
    table.insert("component".into(), component.into());
    // Without an address the app is a command, which `cairnctl run` runs.
    if let Some(listen) = args.listen.clone() {
        let mut http = toml::Table::new();
        http.insert("listen".into(), listen.into());
        table.insert("http".into(), http.into());
    }
    Ok((table, PathBuf::from(".")))
}

/// Lays the flags over the manifest: each limit, health path and env variable given replaces
/// the manifest's.
fn refine(table: &mut toml::Table, args: &DeployArgs) -> Result<(), Failure> {
    let section = |table: &toml::Table, name: &str| {
        table
            .get(name)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default()
    };
    let mut limits = section(table, "limits");
    let texts = [
        ("memory", &args.memory),
        ("memory_total", &args.memory_total),
        ("idle", &args.idle),
        ("timeout", &args.timeout),
    ];
    for (key, value) in texts {
        if let Some(value) = value {
            limits.insert(key.into(), value.clone().into());
        }
    }
    if let Some(cpu) = args.cpu {
        limits.insert("cpu".into(), cpu.into());
    }
    if let Some(pids) = args.pids {
        limits.insert("pids".into(), i64::from(pids).into());
    }
    if let Some(instances) = args.instances {
        limits.insert("instances".into(), i64::from(instances).into());
    }
    if !limits.is_empty() {
        table.insert("limits".into(), limits.into());
    }
    if let Some(health) = &args.health {
        if !table.contains_key("http") {
            return Err(invalid(
                "--health is for apps that serve HTTP: give --listen ADDR too (an app without an address is a command, which has no health check)".into(),
            ));
        }
        let mut http = section(table, "http");
        http.insert("health".into(), health.clone().into());
        table.insert("http".into(), http.into());
    }
    let mut secrets = Vec::new();
    for pair in &args.secret_file {
        let (key, path) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("--secret-file {pair}: write it as KEY=FILE")))?;
        secrets.push(format!("{key}={}", read_secret(Path::new(path))?));
    }
    let flagged = [
        ("env", "--env", &args.env),
        ("config", "--config", &args.config),
        ("secrets", "--secret-file", &secrets),
    ];
    for (name, flag, pairs) in flagged {
        if pairs.is_empty() {
            continue;
        }
        let mut entries = section(table, name);
        for pair in pairs {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("{flag} {pair}: write it as KEY=VALUE")))?;
            entries.insert(key.into(), value.into());
        }
        table.insert(name.into(), entries.into());
    }
    Ok(())
}

/// A secret's value from its file: regular files only, within the manifest's bound, one
/// trailing newline dropped (as `echo` leaves it).
fn read_secret(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    let limit = cairn_core::spec::MAX_CONFIG_BYTES as u64;
    // Looked at before it is opened: opening a FIFO would wait for a writer.
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("--secret-file: {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "--secret-file: {} is not a regular file",
            path.display()
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| {
        invalid(format!(
            "--secret-file: cannot open {}: {e}",
            path.display()
        ))
    })?;
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            invalid(format!(
                "--secret-file: cannot read {}: {e}",
                path.display()
            ))
        })?;
    if text.len() as u64 > limit {
        return Err(invalid(format!(
            "--secret-file: {} is over {limit} bytes",
            path.display()
        )));
    }
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Deploy {
        #[command(flatten)]
        args: DeployArgs,
    }

    #[test]
    fn flags_refine_a_manifest() {
        let mut table: toml::Table = toml::from_str(
            "name = \"web\"\ncomponent = \"web.wasm\"\n[http]\nlisten = \"127.0.0.1:1\"\n\
             [limits]\nmemory = \"8MiB\"\ninstances = 2\n[env]\nA = \"manifest\"\nB = \"kept\"\n",
        )
        .unwrap();
        let deploy = Deploy::parse_from([
            "deploy",
            "--memory",
            "32MiB",
            "--cpu",
            "0.5",
            "--health",
            "/health",
            "--env",
            "A=flag",
            "--env",
            "C=new=with=equals",
        ]);
        refine(&mut table, &deploy.args)
            .map_err(|f| f.message)
            .unwrap();
        let limits = table["limits"].as_table().unwrap();
        assert_eq!(limits["memory"].as_str(), Some("32MiB"));
        assert_eq!(
            limits["instances"].as_integer(),
            Some(2),
            "unflagged limits stay"
        );
        assert_eq!(limits["cpu"].as_float(), Some(0.5));
        assert_eq!(table["http"]["listen"].as_str(), Some("127.0.0.1:1"));
        assert_eq!(table["http"]["health"].as_str(), Some("/health"));
        let env = table["env"].as_table().unwrap();
        assert_eq!(env["A"].as_str(), Some("flag"));
        assert_eq!(env["B"].as_str(), Some("kept"));
        assert_eq!(env["C"].as_str(), Some("new=with=equals"));

        let broken = Deploy::parse_from(["deploy", "--env", "NOVALUE"]);
        let refused = refine(&mut table, &broken.args).err().unwrap();
        assert_eq!(refused.code, exit::INVALID);
        assert!(refused.message.contains("KEY=VALUE"), "{}", refused.message);
    }

    #[test]
    fn config_and_secret_files_refine_a_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret=with=equals\n").unwrap();
        let mut table: toml::Table = toml::from_str(
            "name = \"web\"\n[config]\nkept = \"yes\"\nurl = \"old\"\n[secrets]\nother = \"x\"\n",
        )
        .unwrap();
        let secret = format!("api_token={}", token.display());
        let deploy = Deploy::parse_from([
            "deploy",
            "--config",
            "url=https://example.net",
            "--secret-file",
            secret.as_str(),
        ]);
        refine(&mut table, &deploy.args)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!(table["config"]["url"].as_str(), Some("https://example.net"));
        assert_eq!(table["config"]["kept"].as_str(), Some("yes"));
        assert_eq!(
            table["secrets"]["api_token"].as_str(),
            Some("s3cret=with=equals")
        );
        assert_eq!(table["secrets"]["other"].as_str(), Some("x"));

        // A FIFO is refused before it is opened (opening one waits for a writer).
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        for (path, expected) in [
            (dir.path().to_path_buf(), "not a regular file"),
            (fifo, "not a regular file"),
            (PathBuf::from("/dev/zero"), "not a regular file"),
            (dir.path().join("missing"), "missing"),
        ] {
            let flag = format!("k={}", path.display());
            let deploy = Deploy::parse_from(["deploy", "--secret-file", flag.as_str()]);
            let refused = refine(&mut table, &deploy.args).err().unwrap();
            assert_eq!(refused.code, exit::INVALID);
            assert!(refused.message.contains(expected), "{}", refused.message);
        }
    }
}

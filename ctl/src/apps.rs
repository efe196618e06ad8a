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
    /// The address to serve HTTP on, such as 127.0.0.1:8080.
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
                app.listen.clone(),
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
            "{} is back at generation {} ({}) on http://{}",
            app.name,
            app.generation,
            short(&app.digest),
            app.listen
        );
    }
    Ok(())
}

/// `cairnctl rm`.
pub async fn remove(
    client: &mut ControlClient<Channel>,
    app: String,
    json_output: bool,
) -> Result<(), Failure> {
    client
        .remove(proto::RemoveRequest { app: app.clone() })
        .await?;
    if json_output {
        print_json(&json!({"removed": app}));
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
    let listen = args
        .listen
        .clone()
        .ok_or_else(|| invalid("give --listen ADDR, such as 127.0.0.1:8080".into()))?;
    let mut table = toml::Table::new();
    table.insert("name".into(), name.into());
    table.insert("component".into(), component.into());
    let mut http = toml::Table::new();
    http.insert("listen".into(), listen.into());
    table.insert("http".into(), http.into());
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
        let mut http = section(table, "http");
        http.insert("health".into(), health.clone().into());
        table.insert("http".into(), http.into());
    }
    if !args.env.is_empty() {
        let mut env = section(table, "env");
        for pair in &args.env {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("--env {pair}: write it as KEY=VALUE")))?;
            env.insert(key.into(), value.into());
        }
        table.insert("env".into(), env.into());
    }
    Ok(())
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
}

//! `cairnctl fleet …`: drive a fleet through the upstream NATS JetStream lattice, with nothing
//! but NATS and this binary. Keys, artifacts, signed desired state, and device reports.

use crate::output::{print_json, print_table, row};
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, kv, object_store};
use cairn_core::fleet;
use clap::{Args, Subcommand};
use sha2::{Digest as _, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct Upstream {
    /// The NATS server, such as nats://nats.example:4222.
    #[arg(long, value_name = "URL")]
    nats: String,
    /// A NATS credentials file.
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// A CA certificate (PEM) to verify the server's TLS certificate with; TLS is then
    /// required. Without it a server that asks for TLS is verified against the system's roots.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Make a fleet signing key (ed25519); prints the public key devices must trust.
    Keygen {
        /// Where to write the private key (created with mode 0600; never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Upload a component to the artifact store, by digest; prints the digest.
    Upload {
        #[command(flatten)]
        upstream: Upstream,
        file: PathBuf,
    },
    /// Sign and publish desired state (a TOML file of [[app]] tables) for a device or a group.
    Publish {
        #[command(flatten)]
        upstream: Upstream,
        /// The fleet key made by `fleet keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The device this state is for.
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        /// The group of devices this state is for.
        #[arg(long)]
        group: Option<String>,
        /// How long devices accept this state, such as 30d or 12h.
        #[arg(long, default_value = "30d")]
        expires: String,
        state: PathBuf,
    },
    /// Show the devices' last reports: apps, generations, errors, when last seen.
    Status {
        #[command(flatten)]
        upstream: Upstream,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
    },
}

async fn connect(upstream: &Upstream) -> Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(10));
    if let Some(creds) = &upstream.creds {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot read the NATS credentials {}", creds.display()))?;
    }
    if let Some(ca) = &upstream.tls_ca {
        // Read here, so a wrong path is named as such rather than as a failed connection.
        std::fs::metadata(ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    tokio::time::timeout(
        Duration::from_secs(15),
        options.connect(upstream.nats.as_str()),
    )
    .await
    .map_err(|_| anyhow!("no answer from {} within 15s", upstream.nats))?
    .map_err(|error| {
        let url = &upstream.nats;
        match fleet::connect_refusal(&error) {
            Some(fleet::ConnectRefusal::Credentials) => anyhow!(
                "cannot connect to {url}: the server refused these credentials ({error}); \
                 give the right ones with --creds"
            ),
            Some(fleet::ConnectRefusal::Tls) => anyhow!(
                "cannot connect to {url}: TLS failed ({error}); give the CA that signed the \
                 server's certificate with --tls-ca"
            ),
            None => anyhow!(error).context(format!("cannot connect to {url}")),
        }
    })
}

pub async fn run(command: FleetCommand, json_output: bool) -> Result<()> {
    match command {
        FleetCommand::Keygen { out } => keygen(&out, json_output),
        FleetCommand::Upload { upstream, file } => upload(&upstream, &file, json_output).await,
        FleetCommand::Publish {
            upstream,
            key,
            device,
            group,
            expires,
            state,
        } => {
            let target = match (device, group) {
                (Some(device), _) => fleet::device_key(&device),
                (None, Some(group)) => fleet::group_key(&group),
                (None, None) => bail!("give --device ID or --group NAME"),
            };
            publish(&upstream, &key, target, &expires, &state, json_output).await
        }
        FleetCommand::Status { upstream, device } => {
            status(&upstream, device.as_deref(), json_output).await
        }
    }
}

fn keygen(out: &Path, json_output: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = fleet::generate_key()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "cannot create {} (an existing key is never overwritten)",
                out.display()
            )
        })?;
    file.write_all(fleet::key_file_text(&key).as_bytes())?;
    let public = hex::encode(key.verifying_key().as_bytes());
    if json_output {
        print_json(&serde_json::json!({"public_key": public, "private_key_file": out}));
    } else {
        println!("{public}");
        eprintln!("private key written to {}; devices trust it with upstream.trusted_keys = [\"{public}\"]", out.display());
    }
    Ok(())
}

async fn upload(upstream: &Upstream, file: &Path, json_output: bool) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" || bytes[6..8] != [1, 0] {
        bail!("{} is not a WebAssembly component", file.display());
    }
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let store = match context.get_object_store(fleet::ARTIFACT_BUCKET).await {
        Ok(store) => store,
        Err(_) => context
            .create_object_store(object_store::Config {
                bucket: fleet::ARTIFACT_BUCKET.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("cannot create the artifact store: {e}"))?,
    };
    let present =
        matches!(store.info(&digest).await, Ok(info) if info.size == bytes.len() && !info.deleted);
    if !present {
        let mut reader = Progress::new(&bytes);
        store
            .put(digest.as_str(), &mut reader)
            .await
            .map_err(|e| anyhow!("uploading {digest} failed: {e}"))?;
    }
    if json_output {
        print_json(
            &serde_json::json!({"digest": digest, "size": bytes.len(), "already_present": present}),
        );
    } else {
        println!("{digest}");
    }
    Ok(())
}

async fn publish(
    upstream: &Upstream,
    key_file: &Path,
    target: String,
    expires: &str,
    state: &Path,
    json_output: bool,
) -> Result<()> {
    let key = fleet::read_key(key_file).map_err(|e| anyhow!(e))?;
    let text = std::fs::read_to_string(state)
        .with_context(|| format!("cannot read {}", state.display()))?;
    let apps = fleet::parse_state(&text).map_err(|e| anyhow!("{}: {e}", state.display()))?;
    let lifetime: cairn_core::spec::HumanDuration = parse_lifetime(expires)?;
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let bucket = match context.get_key_value(fleet::DESIRED_BUCKET).await {
        Ok(bucket) => bucket,
        Err(_) => context
            .create_key_value(kv::Config {
                bucket: fleet::DESIRED_BUCKET.to_string(),
                history: 5,
                max_value_size: fleet::MAX_DOCUMENT as i32,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("cannot create the desired-state bucket: {e}"))?,
    };
    // Versions only grow: one more than what is there now.
    let previous = match bucket.get(target.as_str()).await {
        Ok(Some(bytes)) => serde_json::from_slice::<fleet::Signed>(&bytes)
            .ok()
            .and_then(|signed| serde_json::from_str::<fleet::Document>(&signed.payload).ok())
            .map(|document| document.version)
            .unwrap_or(0),
        _ => 0,
    };
    // Warn about components devices could not fetch.
    if let Ok(store) = context.get_object_store(fleet::ARTIFACT_BUCKET).await {
        for app in &apps {
            if store.info(app.component.to_string()).await.is_err() {
                eprintln!(
                    "warning: {} (app `{}`) is not in the artifact store; devices cannot converge until `cairnctl fleet upload` puts it there",
                    app.component, app.name
                );
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let document = fleet::Document {
        version: previous + 1,
        target: target.clone(),
        issued_unix: now,
        expires_unix: now + lifetime.0.as_secs() as i64,
        apps,
    };
    let signed = fleet::sign(&document, &key);
    bucket
        .put(target.as_str(), signed.into())
        .await
        .map_err(|e| anyhow!("publishing to {target} failed: {e}"))?;
    if json_output {
        print_json(
            &serde_json::json!({"target": target, "version": document.version, "expires_unix": document.expires_unix, "apps": document.apps.len()}),
        );
    } else {
        println!(
            "published version {} for {target}: {} app(s), valid until {} UTC",
            document.version,
            document.apps.len(),
            cairn_core::time::utc(document.expires_unix)
        );
    }
    Ok(())
}

fn parse_lifetime(text: &str) -> Result<cairn_core::spec::HumanDuration> {
    if let Some(days) = text.strip_suffix('d') {
        let days: u64 = days
            .parse()
            .map_err(|_| anyhow!("`{text}` is not a lifetime such as 30d or 12h"))?;
        return Ok(cairn_core::spec::HumanDuration(Duration::from_secs(
            days * 86_400,
        )));
    }
    text.parse().map_err(|e: String| anyhow!(e))
}

async fn status(upstream: &Upstream, device: Option<&str>, json_output: bool) -> Result<()> {
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let reports_stream = context
        .get_stream(fleet::REPORT_STREAM)
        .await
        .map_err(|_| {
            anyhow!(
                "no device has reported yet (the stream {} does not exist)",
                fleet::REPORT_STREAM
            )
        })?;
    let subjects: Vec<String> = match device {
        Some(device) => vec![fleet::report_subject(device)],
        None => {
            use futures_util::StreamExt;
            let mut info = reports_stream
                .info_with_subjects(fleet::REPORT_SUBJECTS)
                .await?;
            let mut subjects = Vec::new();
            while let Some(entry) = info.next().await {
                subjects.push(entry?.0);
            }
            subjects.sort();
            subjects
        }
    };
    let mut reports = Vec::new();
    for subject in subjects {
        match reports_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => {
                let report: serde_json::Value =
                    serde_json::from_slice(&message.payload).unwrap_or_default();
                reports.push(report);
            }
            Err(_) if device.is_some() => {
                bail!("device `{}` has not reported", device.unwrap_or_default())
            }
            Err(_) => {}
        }
    }
    if json_output {
        print_json(&serde_json::Value::Array(reports));
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let mut rows = vec![row(["DEVICE", "LAST SEEN (UTC)", "APPS", "ERRORS"])];
    rows.extend(reports.iter().map(|report| device_row(report, now)));
    print_table(&rows);
    Ok(())
}

/// One device's report as a row of `fleet status`.
fn device_row(report: &serde_json::Value, now: i64) -> Vec<String> {
    let strings = |value: &serde_json::Value,
                   each: &dyn Fn(&serde_json::Value) -> Option<String>| {
        value
            .as_array()
            .map(|items| items.iter().filter_map(each).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let apps = strings(&report["apps"], &|a| {
        Some(format!(
            "{}@{} {}",
            a["name"].as_str().unwrap_or("?"),
            a["generation"],
            a["status"].as_str().unwrap_or("?")
        ))
    });
    let errors = strings(&report["errors"], &|e| e.as_str().map(str::to_string));
    let seen = match report["unix"].as_i64() {
        Some(unix) => format!("{} ({} ago)", cairn_core::time::utc(unix), ago(now - unix)),
        None => "?".to_string(),
    };
    vec![
        report["device"].as_str().unwrap_or("?").to_string(),
        seen,
        apps.join(", "),
        errors.join("; "),
    ]
}

/// A short age: `42s`, `7m`, `3h`, `2d`.
fn ago(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// Reads `bytes`, printing upload progress on a terminal.
struct Progress<'a> {
    bytes: &'a [u8],
    sent: usize,
    show: bool,
}

impl<'a> Progress<'a> {
    fn new(bytes: &'a [u8]) -> Progress<'a> {
        Progress {
            bytes,
            sent: 0,
            show: std::io::stderr().is_terminal() && bytes.len() > 1 << 20,
        }
    }
}

impl tokio::io::AsyncRead for Progress<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let take = buf.remaining().min(self.bytes.len() - self.sent);
        let start = self.sent;
        buf.put_slice(&self.bytes[start..start + take]);
        self.sent += take;
        if self.show {
            eprint!(
                "\ruploading: {:>3}%",
                self.sent * 100 / self.bytes.len().max(1)
            );
            if self.sent == self.bytes.len() {
                eprintln!();
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short_and_never_negative() {
        assert_eq!(ago(-5), "0s");
        assert_eq!(ago(42), "42s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3_600), "3h");
        assert_eq!(ago(5 * 86_400), "5d");
    }
}

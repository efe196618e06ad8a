//! `cairnctl fleet …`: drive a fleet through the upstream NATS JetStream lattice, with nothing
//! but NATS and this binary. Keys, artifacts, signed desired state, and device reports.

use crate::output::{print_json, print_table, row};
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, kv};
use cairn_core::fleet;
use clap::{Args, Subcommand};
use sha2::{Digest as _, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct Upstream {
    /// The NATS server, such as nats://nats.example:4222; the servers of a cluster separated
    /// by commas.
    #[arg(long, value_name = "URL[,URL...]")]
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
        /// How long devices accept this state, such as 30d or 12h. Past it a device keeps
        /// serving what it has and reports the state expired.
        #[arg(long, default_value = "30d")]
        expires: String,
        /// The version to publish. Default: one above both the version stored upstream and
        /// the highest version any device reports applied for this target (so a deleted key
        /// or bucket does not restart at 1, which every device would refuse as stale). A
        /// version not above those is refused.
        #[arg(long)]
        version: Option<u64>,
        state: PathBuf,
    },
    /// Publish, signed by an offline root key, which signing keys devices accept
    ///
    /// Devices that list the root in upstream.trusted_roots take the newest delegation and
    /// never go back to an older one. To rotate: delegate the old and the new key, publish
    /// with the new one, then delegate the new one alone (which revokes the old).
    Delegate {
        #[command(flatten)]
        upstream: Upstream,
        /// The root key (made by `fleet keygen`).
        #[arg(long, value_name = "FILE")]
        root: PathBuf,
        /// A signing key's public key (hex, as `fleet keygen` prints it); repeat for several.
        #[arg(long = "signing-key", value_name = "HEX", required = true)]
        signing_keys: Vec<String>,
        /// How long devices accept this delegation, such as 365d.
        #[arg(long, default_value = "365d")]
        expires: String,
    },
    /// Make the upstream's streams and buckets (desired state, artifacts, reports)
    ///
    /// Run once per lattice, before devices with least-privilege credentials (which may not
    /// make them) connect; --replicas 3 on a cluster. Existing ones are kept and listed.
    Init {
        #[command(flatten)]
        upstream: Upstream,
        /// Copies JetStream keeps of each: 3 on a cluster of three or more servers.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
    /// Show the devices' last reports: apps, generations, figures (requests, 5xx, restarts,
    /// OOM kills, the store, reports waiting), errors, when last seen. With --device, each
    /// app's figures too. A device reports on every change and every `report_every` (5m).
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
        options.connect(fleet::server_addrs(&upstream.nats).map_err(|e| anyhow!("--nats: {e}"))?),
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
            version,
            state,
        } => {
            let target = match (device, group) {
                (Some(device), _) => {
                    fleet::check_name("device id", &device).map_err(|e| anyhow!(e))?;
                    fleet::device_key(&device)
                }
                (None, Some(group)) => {
                    fleet::check_name("group name", &group).map_err(|e| anyhow!(e))?;
                    fleet::group_key(&group)
                }
                (None, None) => bail!("give --device ID or --group NAME"),
            };
            let publication = Publication {
                key_file: &key,
                target,
                expires: &expires,
                version,
                state: &state,
            };
            publish(&upstream, publication, json_output).await
        }
        FleetCommand::Delegate {
            upstream,
            root,
            signing_keys,
            expires,
        } => delegate(&upstream, &root, &signing_keys, &expires, json_output).await,
        FleetCommand::Init { upstream, replicas } => {
            init(&upstream, replicas as usize, json_output).await
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
        eprintln!("private key written to {}; devices trust it with upstream.trusted_keys = [\"{public}\"] (or, for a root key that delegates signing keys with `fleet delegate`, upstream.trusted_roots)", out.display());
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
            .create_object_store(fleet::artifact_store_config(1))
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

/// What `fleet publish` was asked to publish.
struct Publication<'a> {
    key_file: &'a Path,
    target: String,
    expires: &'a str,
    version: Option<u64>,
    state: &'a Path,
}

async fn publish(
    upstream: &Upstream,
    publication: Publication<'_>,
    json_output: bool,
) -> Result<()> {
    let Publication {
        key_file,
        target,
        expires,
        version,
        state,
    } = publication;
    let key = fleet::read_key(key_file).map_err(|e| anyhow!(e))?;
    let text = std::fs::read_to_string(state)
        .with_context(|| format!("cannot read {}", state.display()))?;
    let apps = fleet::parse_state(&text).map_err(|e| anyhow!("{}: {e}", state.display()))?;
    let lifetime: cairn_core::spec::HumanDuration = parse_lifetime(expires)?;
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let bucket = desired_bucket(&context).await?;
    // Versions only grow, anchored twice: on what is stored (read with its revision, so the
    // write below lands only if nothing was published in between) and on what devices report
    // applied (so a deleted key or bucket does not start again at 1).
    let (entry, stored) = stored_number(&bucket, &target, |payload| {
        serde_json::from_str::<fleet::Document>(payload)
            .ok()
            .map(|d| d.version)
    })
    .await?;
    let reported = reported_floor(&context, stored, &target, |report| {
        report["applied"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|applied| applied["key"].as_str() == Some(target.as_str()))
            .filter_map(|applied| applied["version"].as_u64())
            .max()
    })
    .await?;
    let floor = stored.max(reported);
    let version = match version {
        Some(version) if version <= floor => bail!(
            "version {version} is not above {floor} (stored upstream: {stored}; highest a device reports applied: {reported}): devices would refuse it as stale; leave out --version to publish {}",
            floor + 1
        ),
        Some(version) => version,
        None => floor
            .checked_add(1)
            .ok_or_else(|| anyhow!("{target} is at the highest version there is"))?,
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
        version,
        target: target.clone(),
        issued_unix: now,
        expires_unix: now + lifetime.0.as_secs() as i64,
        apps,
    };
    let signed = fleet::sign(&document, &key);
    write_anchored(&bucket, &target, entry.as_ref(), signed).await?;
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

/// `fleet delegate`: a root-signed list of signing keys, at the next serial, written only if
/// nothing else was published in between.
async fn delegate(
    upstream: &Upstream,
    root_file: &Path,
    signing_keys: &[String],
    expires: &str,
    json_output: bool,
) -> Result<()> {
    let root = fleet::read_key(root_file).map_err(|e| anyhow!(e))?;
    let mut keys = Vec::new();
    for key in signing_keys {
        fleet::parse_public_key(key).map_err(|e| anyhow!("--signing-key: {e}"))?;
        let key = key.trim().to_lowercase();
        if hex::encode(root.verifying_key().as_bytes()) == key {
            bail!("--signing-key {key} is the root itself: keep the root offline and delegate a separate signing key");
        }
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let lifetime = parse_lifetime(expires)?;
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let bucket = desired_bucket(&context).await?;
    let (entry, stored) = stored_number(&bucket, fleet::DELEGATION_KEY, |payload| {
        serde_json::from_str::<fleet::Delegation>(payload)
            .ok()
            .map(|d| d.serial)
    })
    .await?;
    let reported = reported_floor(&context, stored, fleet::DELEGATION_KEY, |report| {
        report["delegation_serial"].as_u64()
    })
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let delegation = fleet::Delegation {
        serial: stored
            .max(reported)
            .checked_add(1)
            .ok_or_else(|| anyhow!("the delegation serial is at its maximum"))?,
        issued_unix: now,
        expires_unix: now + lifetime.0.as_secs() as i64,
        keys,
    };
    let signed = fleet::sign_delegation(&delegation, &root);
    write_anchored(&bucket, fleet::DELEGATION_KEY, entry.as_ref(), signed).await?;
    if json_output {
        print_json(
            &serde_json::json!({"serial": delegation.serial, "keys": delegation.keys, "expires_unix": delegation.expires_unix}),
        );
    } else {
        println!(
            "published delegation {} of {} signing key(s), valid until {} UTC; devices trust the root with upstream.trusted_roots = [\"{}\"]",
            delegation.serial,
            delegation.keys.len(),
            cairn_core::time::utc(delegation.expires_unix),
            hex::encode(root.verifying_key().as_bytes())
        );
    }
    Ok(())
}

/// The desired-state bucket, made (one replica; `fleet init` for more) if there is none yet.
async fn desired_bucket(context: &jetstream::Context) -> Result<kv::Store> {
    match context.get_key_value(fleet::DESIRED_BUCKET).await {
        Ok(bucket) => Ok(bucket),
        Err(_) => context
            .create_key_value(fleet::desired_bucket_config(1))
            .await
            .map_err(|e| anyhow!("cannot create the desired-state bucket: {e}")),
    }
}

/// `key`'s entry (kept for its revision) and the number its signed payload carries (`read`:
/// a document's version, a delegation's serial; 0 when there is none).
async fn stored_number(
    bucket: &kv::Store,
    key: &str,
    read: impl Fn(&str) -> Option<u64>,
) -> Result<(Option<kv::Entry>, u64)> {
    let entry = bucket
        .entry(key)
        .await
        .map_err(|e| anyhow!("cannot read {key} from the desired-state bucket: {e}"))?;
    let number = entry
        .as_ref()
        .filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| serde_json::from_slice::<fleet::Signed>(&e.value).ok())
        .and_then(|signed| read(&signed.payload))
        .unwrap_or(0);
    Ok((entry, number))
}

/// Writes `value` under `key` only if the key is still at `entry`'s revision (or still absent):
/// a concurrent publish makes this fail with a clear message instead of one silently winning.
async fn write_anchored(
    bucket: &kv::Store,
    key: &str,
    entry: Option<&kv::Entry>,
    value: Vec<u8>,
) -> Result<()> {
    pause_before_write_for_tests();
    let written = match entry {
        Some(entry) => bucket
            .update(key, value.into(), entry.revision)
            .await
            .map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
        None => bucket.create(key, value.into()).await.map_err(|e| {
            (
                e.kind() == kv::CreateErrorKind::AlreadyExists,
                e.to_string(),
            )
        }),
    };
    match written {
        Ok(_) => Ok(()),
        Err((true, _)) => bail!(
            "another publish to {key} landed while this one was being made; nothing was written (publishing both would split the fleet); publish again to build on the new version"
        ),
        Err((false, error)) => bail!("publishing to {key} failed: {error}"),
    }
}

/// Tests make two publishes overlap: with `CAIRNCTL_TEST_PAUSE_BEFORE_WRITE` naming a file,
/// publish makes that file once it has read the stored version, then waits (up to a minute)
/// until the file is removed before writing.
fn pause_before_write_for_tests() {
    let Some(path) = std::env::var_os("CAIRNCTL_TEST_PAUSE_BEFORE_WRITE") else {
        return;
    };
    let path = PathBuf::from(path);
    if std::fs::write(&path, b"paused\n").is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each device's latest status report.
async fn latest_statuses(
    context: &jetstream::Context,
    device: Option<&str>,
) -> Result<Option<Vec<serde_json::Value>>> {
    use futures_util::StreamExt;
    let Ok(stream) = context.get_stream(fleet::REPORT_STREAM).await else {
        return Ok(None);
    };
    let subjects: Vec<String> = match device {
        Some(device) => vec![fleet::report_subject(device, "status")],
        None => {
            let mut info = stream.info_with_subjects(fleet::STATUS_SUBJECTS).await?;
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
        if let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await {
            reports.push(serde_json::from_slice(&message.payload).unwrap_or_default());
        }
    }
    Ok(Some(reports))
}

/// Reported numbers above the stored one by more than this are not taken as a floor: a
/// device's own reports are its word, and a hostile one could otherwise wedge a key.
const CREDIBLE_GAP: u64 = 1_000_000;

/// The highest number (`read` from each latest status report) devices report for `key`, as a
/// floor for the next one. A device key counts only its own device's reports; numbers far
/// above `stored` are ignored with a warning naming the device.
async fn reported_floor(
    context: &jetstream::Context,
    stored: u64,
    key: &str,
    read: impl Fn(&serde_json::Value) -> Option<u64>,
) -> Result<u64> {
    let device = key.strip_prefix("device.");
    let reports = latest_statuses(context, device).await?.unwrap_or_default();
    let mut floor = 0;
    for report in &reports {
        let Some(number) = read(report) else {
            continue;
        };
        let from = report["device"].as_str().unwrap_or("?");
        if number > stored.saturating_add(CREDIBLE_GAP) {
            eprintln!(
                "warning: device `{from}` reports {number} for {key}, far above the {stored} stored; not taken as a floor"
            );
            continue;
        }
        if number > stored {
            eprintln!("note: device `{from}` reports {number} applied for {key}, above the {stored} stored upstream; continuing from it");
        }
        floor = floor.max(number);
    }
    Ok(floor)
}

/// `fleet init`: the report stream, the desired-state bucket and the artifact store.
async fn init(upstream: &Upstream, replicas: usize, json_output: bool) -> Result<()> {
    let client = connect(upstream).await?;
    let context = jetstream::new(client);
    let mut made = Vec::new();
    let mut kept = Vec::new();
    // Each is a stream underneath; it exists or is made with the replicas asked for.
    for (name, stream) in [
        (fleet::REPORT_STREAM, fleet::REPORT_STREAM.to_string()),
        (
            fleet::DESIRED_BUCKET,
            format!("KV_{}", fleet::DESIRED_BUCKET),
        ),
        (
            fleet::ARTIFACT_BUCKET,
            format!("OBJ_{}", fleet::ARTIFACT_BUCKET),
        ),
    ] {
        if context.get_stream(&stream).await.is_ok() {
            kept.push(name);
            continue;
        }
        let created = match name {
            fleet::REPORT_STREAM => context
                .create_stream(fleet::report_stream_config(replicas))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            fleet::DESIRED_BUCKET => context
                .create_key_value(fleet::desired_bucket_config(replicas))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            _ => context
                .create_object_store(fleet::artifact_store_config(replicas))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        created.map_err(|e| anyhow!("cannot create {name}: {e}"))?;
        made.push(name);
    }
    if json_output {
        print_json(&serde_json::json!({"made": made, "kept": kept, "replicas": replicas}));
    } else {
        for name in &made {
            println!("made {name} with {replicas} replica(s)");
        }
        for name in &kept {
            println!("kept {name} (it exists; its replicas are unchanged)");
        }
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
    let Some(reports) = latest_statuses(&context, device).await? else {
        bail!(
            "no device has reported yet (the stream {} does not exist)",
            fleet::REPORT_STREAM
        );
    };
    if let (Some(device), true) = (device, reports.is_empty()) {
        bail!("device `{device}` has not reported");
    }
    if json_output {
        print_json(&serde_json::Value::Array(reports));
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let mut rows = vec![row([
        "DEVICE",
        "LAST SEEN (UTC)",
        "APPS",
        "FIGURES",
        "ERRORS",
    ])];
    rows.extend(reports.iter().map(|report| device_row(report, now)));
    print_table(&rows);
    // One device: its apps' figures too.
    if let (Some(_), Some(report)) = (device, reports.first()) {
        println!();
        let mut rows = vec![row([
            "APP", "REQUESTS", "4XX", "5XX", "REJECTED", "TIMEOUTS", "TRAPS", "RESTARTS", "OOM",
            "MEMORY", "CPU",
        ])];
        for app in report["apps"].as_array().into_iter().flatten() {
            let figures = &app["figures"];
            let number = |key: &str| figures[key].as_u64().map_or("-".into(), |n| n.to_string());
            let class = |i: usize| {
                figures["responses"][i]
                    .as_u64()
                    .map_or("-".into(), |n| n.to_string())
            };
            rows.push(vec![
                app["name"].as_str().unwrap_or("?").to_string(),
                number("requests"),
                class(3),
                class(4),
                number("rejected"),
                number("timeouts"),
                number("traps"),
                number("restarts"),
                number("oom_kills"),
                figures["memory_bytes"]
                    .as_u64()
                    .map_or("-".into(), |b| cairn_core::spec::ByteSize(b).to_string()),
                figures["cpu_seconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1}s")),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

/// A device's own figures in a few words: requests and server errors over its apps, restarts,
/// the store against its budget, reports waiting.
fn device_figures(report: &serde_json::Value) -> String {
    let apps = report["apps"].as_array().cloned().unwrap_or_default();
    let sum = |key: &str| -> u64 { apps.iter().filter_map(|a| a["figures"][key].as_u64()).sum() };
    let errors: u64 = apps
        .iter()
        .filter_map(|a| a["figures"]["responses"][4].as_u64())
        .sum();
    let figures = &report["figures"];
    if figures.is_null() {
        return "-".to_string();
    }
    let store = match (
        figures["store_bytes"].as_u64(),
        figures["store_budget"].as_u64(),
    ) {
        (Some(bytes), Some(budget)) => format!(
            "store {}/{}",
            cairn_core::spec::ByteSize(bytes),
            cairn_core::spec::ByteSize(budget)
        ),
        (Some(bytes), None) => format!("store {}", cairn_core::spec::ByteSize(bytes)),
        _ => "store ?".to_string(),
    };
    format!(
        "{} requests, {errors} 5xx, {} restarts, {} OOM; {store}; {} reports waiting",
        sum("requests"),
        sum("restarts"),
        sum("oom_kills"),
        figures["outbox_reports"].as_u64().unwrap_or(0)
    )
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
    let mut errors = strings(&report["applied"], &|a| {
        (a["expired"] == true).then(|| {
            format!(
                "{} version {} expired",
                a["key"].as_str().unwrap_or("?"),
                a["version"]
            )
        })
    });
    errors.extend(strings(&report["errors"], &|e| {
        e.as_str().map(str::to_string)
    }));
    let seen = match report["unix"].as_i64() {
        Some(unix) => format!("{} ({} ago)", cairn_core::time::utc(unix), ago(now - unix)),
        None => "?".to_string(),
    };
    vec![
        report["device"].as_str().unwrap_or("?").to_string(),
        seen,
        apps.join(", "),
        device_figures(report),
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

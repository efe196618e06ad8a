//! Fleet sync: the device's link to the upstream NATS JetStream lattice. It never blocks
//! anything local: serving, local deploys and rollbacks go on whether or not a link exists.
//! When one does, it reads the signed desired state for this device and its groups (latest
//! value first, then watching), refuses what it should not trust (`cairn_core::fleet::verify`),
//! fetches missing artifacts by digest, hands apps to the reconciler as fleet-owned, and
//! publishes the reports waiting in the outbox with publish acks and `Nats-Msg-Id`
//! de-duplication, deleting each row only after its ack. All NATS access lives here.

mod precedence;

use crate::admission;
use crate::config::UpstreamConfig;
use crate::digest::Digest;
use crate::reconcile::{ReconcileError, Reconciler};
use crate::spec::AppName;
use crate::store::{now_unix, OutboxBounds, OutboxKind, Store};
use async_nats::jetstream::{self, stream};
use cairn_core::fleet;
use ed25519_dalek::VerifyingKey;
use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Notify};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// How often a connected device checks its link, flushes the outbox and reports.
const TICK: Duration = Duration::from_secs(2);
/// A download with no progress for this long is abandoned (and retried on the next link).
const DOWNLOAD_STALL: Duration = Duration::from_secs(15);
/// Outbox rows published per batch before waiting for their acks.
const FLUSH_BATCH: u64 = 256;

/// What a failed connection means for this device's `[upstream]` settings.
fn connect_failure(error: &async_nats::ConnectError) -> String {
    match fleet::connect_refusal(error) {
        Some(fleet::ConnectRefusal::Credentials) => format!(
            "the server refused this device's credentials ({error}); check [upstream] user and \
             password, or credentials"
        ),
        Some(fleet::ConnectRefusal::Tls) => format!(
            "TLS failed ({error}); set [upstream] tls_ca to the CA that signed the server's \
             certificate"
        ),
        None => error.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the link to the upstream was lost")]
    Lost,
    #[error("{0}")]
    Upstream(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn upstream_error(error: impl std::fmt::Display) -> SyncError {
    SyncError::Upstream(error.to_string())
}

/// What `cairnctl sync status` shows.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub state: &'static str,
    pub last_success_unix: i64,
    pub last_error: String,
}

pub struct Sync {
    config: Option<UpstreamConfig>,
    device: String,
    trusted: Vec<VerifyingKey>,
    store: Arc<Store>,
    reconciler: Arc<Reconciler>,
    link: Mutex<LinkState>,
    wake: Notify,
    /// Counts finished connection attempts, so `sync now` can wait for the next one.
    attempts: watch::Sender<u64>,
}

impl Sync {
    /// Starts syncing when an upstream is configured. Bad trusted keys are a config error.
    pub fn start(
        config: Option<UpstreamConfig>,
        store: Arc<Store>,
        reconciler: Arc<Reconciler>,
    ) -> anyhow::Result<Arc<Sync>> {
        let device = config.as_ref().map(device_id).unwrap_or_default();
        let trusted = match &config {
            Some(config) => config.trusted().map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        let (attempts, _) = watch::channel(0);
        let sync = Arc::new(Sync {
            link: Mutex::new(LinkState {
                state: if config.is_some() {
                    "connecting"
                } else {
                    "disabled"
                },
                ..Default::default()
            }),
            config,
            device,
            trusted,
            store,
            reconciler,
            wake: Notify::new(),
            attempts,
        });
        if sync.config.is_some() {
            tokio::spawn(Arc::clone(&sync).run());
        }
        Ok(sync)
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn upstream(&self) -> String {
        self.config
            .as_ref()
            .map(|c| c.nats.clone())
            .unwrap_or_default()
    }

    pub fn link(&self) -> LinkState {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tries the upstream at once and waits (up to 15s) for that attempt to finish.
    pub async fn now(&self) {
        if self.config.is_none() {
            return;
        }
        let mut attempts = self.attempts.subscribe();
        let seen = *attempts.borrow_and_update();
        self.wake.notify_one();
        let _ = tokio::time::timeout(
            Duration::from_secs(15),
            attempts.wait_for(|count| *count > seen),
        )
        .await;
    }

    fn set_link(&self, change: impl FnOnce(&mut LinkState)) {
        change(&mut self.link.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn targets(&self) -> Vec<String> {
        let mut targets = vec![fleet::device_key(&self.device)];
        if let Some(config) = &self.config {
            targets.extend(config.groups.iter().map(|g| fleet::group_key(g)));
        }
        targets
    }

    fn bounds(&self) -> OutboxBounds {
        let config = self.config.as_ref();
        OutboxBounds {
            max_bytes: config.map(|c| c.outbox_max_bytes.0).unwrap_or(64 << 20),
            max_age_secs: config
                .map(|c| c.outbox_max_age.0.as_secs() as i64)
                .unwrap_or(7 * 24 * 3600),
        }
    }

    /// Queues a report for the upstream (kept while offline, within the outbox bounds).
    pub async fn report(&self, kind: OutboxKind, payload: serde_json::Value) {
        if self.config.is_none() {
            return;
        }
        let bytes = serde_json::to_vec(&payload).expect("reports serialise");
        let bounds = self.bounds();
        if let Err(error) = self
            .store
            .call(move |store| store.outbox_push(kind, &bytes, bounds))
            .await
        {
            tracing::warn!(%error, "a report could not be queued");
        }
    }

    /// A snapshot of this device for the upstream: apps, versions, recent errors.
    async fn status_report(&self) -> serde_json::Value {
        let apps = self.reconciler.list().await;
        let store = Arc::clone(&self.store);
        let (applied, rejections) = store
            .call(|store| Ok((store.applied()?, store.rejections(10)?)))
            .await
            .unwrap_or_default();
        serde_json::json!({
            "device": self.device,
            "unix": now_unix(),
            "apps": apps.iter().map(|a| serde_json::json!({
                "name": a.name, "generation": a.generation, "status": a.status,
                "owner": a.owner, "digest": a.digest.to_string(), "error": a.error,
            })).collect::<Vec<_>>(),
            "applied": applied.iter().map(|a| serde_json::json!({"key": a.key, "version": a.version})).collect::<Vec<_>>(),
            "errors": rejections.iter().map(|r| format!("{}: {}", r.key, r.reason)).collect::<Vec<_>>(),
        })
    }

    async fn run(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            self.set_link(|link| link.state = "connecting");
            let result = self.session(&mut failures).await;
            let error = match result {
                Ok(()) => "the session ended".to_string(),
                Err(error) => error.to_string(),
            };
            failures = failures.saturating_add(1);
            tracing::info!(%error, "upstream unavailable; local operation goes on");
            self.set_link(|link| {
                link.state = "offline";
                link.last_error = error;
            });
            self.attempts.send_modify(|count| *count += 1);
            let delay = jittered_backoff(failures);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn connect(&self) -> Result<async_nats::Client, SyncError> {
        let config = self
            .config
            .as_ref()
            .expect("sync runs only with an upstream");
        let connect_error = |message: String| SyncError::Connect {
            url: config.nats.clone(),
            message,
        };
        // The name shows in the server's connection list (connz), so operators see devices.
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("cairnd {}", self.device))
            .connection_timeout(CONNECT_TIMEOUT);
        if let Some(path) = &config.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| connect_error(format!("credentials {}: {e}", path.display())))?;
        }
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(config.nats.as_str()))
            .await
            .map_err(|_| connect_error("no answer".into()))?
            .map_err(|e| connect_error(connect_failure(&e)))
    }

    /// One connected session: report, apply the latest desired state, then watch until the
    /// link breaks.
    async fn session(&self, failures: &mut u32) -> Result<(), SyncError> {
        let client = self.connect().await?;
        let context = jetstream::new(client.clone());
        *failures = 0;
        self.set_link(|link| {
            link.state = "connected";
            link.last_success_unix = now_unix();
            link.last_error.clear();
        });
        self.attempts.send_modify(|count| *count += 1);
        self.ensure_report_stream(&context).await?;
        self.report(OutboxKind::Status, self.status_report().await)
            .await;
        self.flush(&context).await?;

        let targets = self.targets();
        let mut bucket = match context.get_key_value(fleet::DESIRED_BUCKET).await {
            Ok(bucket) => Some(bucket),
            Err(error) => {
                tracing::info!(%error, "no desired state published yet; reports still go up");
                None
            }
        };
        // Watch first, then read the current values: a document published in between is then
        // seen by the watch (seeing one twice is harmless: the same version is not news).
        let mut watch = match &bucket {
            Some(bucket) => Some(
                bucket
                    .watch_many(targets.iter().map(String::as_str))
                    .await
                    .map_err(upstream_error)?,
            ),
            None => None,
        };
        if let Some(bucket) = &bucket {
            self.apply_latest(&context, bucket, &targets).await?;
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                entry = async { watch.as_mut().expect("guarded").next().await }, if watch.is_some() => match entry {
                    Some(Ok(entry)) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                        self.apply(&context, &entry.key, &entry.value).await?;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(upstream_error(error)),
                    None => return Err(SyncError::Lost),
                },
                _ = tick.tick() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return Err(SyncError::Lost);
                    }
                    self.flush(&context).await?;
                    self.set_link(|link| link.last_success_unix = now_unix());
                    if bucket.is_none() {
                        // Nothing published yet: stay connected, keep reporting, look again.
                        if let Ok(found) = context.get_key_value(fleet::DESIRED_BUCKET).await {
                            watch = Some(found.watch_many(targets.iter().map(String::as_str)).await.map_err(upstream_error)?);
                            self.apply_latest(&context, &found, &targets).await?;
                            bucket = Some(found);
                        }
                    }
                }
                _ = self.wake.notified() => {
                    // `sync now` while connected: read the latest state again and report.
                    if let Some(bucket) = &bucket {
                        self.apply_latest(&context, bucket, &targets).await?;
                    }
                    self.report(OutboxKind::Status, self.status_report().await).await;
                    self.flush(&context).await?;
                    self.attempts.send_modify(|count| *count += 1);
                }
            }
        }
    }

    /// Applies the current value of each target key (on connect, on `sync now`, and when the
    /// bucket first appears).
    async fn apply_latest(
        &self,
        context: &jetstream::Context,
        bucket: &jetstream::kv::Store,
        targets: &[String],
    ) -> Result<(), SyncError> {
        for key in targets {
            if let Some(value) = bucket.get(key.as_str()).await.map_err(upstream_error)? {
                self.apply(context, key, &value).await?;
            }
        }
        Ok(())
    }

    async fn ensure_report_stream(&self, context: &jetstream::Context) -> Result<(), SyncError> {
        context
            .get_or_create_stream(stream::Config {
                name: fleet::REPORT_STREAM.to_string(),
                subjects: vec![fleet::REPORT_SUBJECTS.to_string()],
                duplicate_window: Duration::from_secs(24 * 3600),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(upstream_error)
    }

    /// Publishes waiting reports, oldest first; a row goes only after the stream acked it.
    /// Its message id (`device-row`) makes a re-send after a crash a duplicate the stream drops.
    async fn flush(&self, context: &jetstream::Context) -> Result<(), SyncError> {
        let subject = fleet::report_subject(&self.device);
        loop {
            let rows = self
                .store
                .call(|store| store.outbox_peek(FLUSH_BATCH))
                .await?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut acks = Vec::with_capacity(rows.len());
            for row in &rows {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    "Nats-Msg-Id",
                    format!("{}-{}", self.device, row.id).as_str(),
                );
                let ack = context
                    .publish_with_headers(subject.clone(), headers, row.payload.clone().into())
                    .await
                    .map_err(upstream_error)?;
                acks.push((row.id, ack));
            }
            let mut acked = Vec::with_capacity(acks.len());
            for (id, ack) in acks {
                match ack.await {
                    Ok(_) => acked.push(id),
                    Err(error) => {
                        let done = acked.clone();
                        self.store
                            .call(move |store| store.outbox_delete(&done))
                            .await?;
                        return Err(upstream_error(error));
                    }
                }
            }
            self.store
                .call(move |store| store.outbox_delete(&acked))
                .await?;
        }
    }

    /// Checks one document and, if it is to be trusted, makes it so.
    async fn apply(
        &self,
        context: &jetstream::Context,
        key: &str,
        value: &[u8],
    ) -> Result<(), SyncError> {
        let owned_key = key.to_string();
        let applied = self.store.call(move |store| store.applied()).await?;
        let previous = applied.iter().find(|a| a.key == owned_key);
        let applied_version = previous.map(|a| a.version).unwrap_or(0);
        let document = match fleet::verify(
            value,
            &self.trusted,
            &self.targets(),
            applied_version,
            now_unix(),
        ) {
            Ok(document) => document,
            Err(rejection) => {
                // Seeing the applied document again on reconnect is not news.
                if matches!(rejection, fleet::Rejection::Stale { version, applied } if version == applied)
                {
                    return Ok(());
                }
                self.reject(key, &rejection.to_string()).await?;
                return Ok(());
            }
        };
        let plan = precedence::plan(&self.targets(), key, &document.apps, &applied);
        // Every artifact first (shadowed apps too, so a later handover works offline): nothing
        // changes unless all of them are here.
        for digest in plan.artifacts() {
            if let Err(error) = self.fetch_artifact(context, digest).await {
                // Not applied; the next attempt tries again.
                self.set_link(|link| link.last_error = error.to_string());
                self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": "artifact", "key": key, "error": error.to_string()})).await;
                return Err(error);
            }
        }
        for (app, by) in &plan.shadowed {
            tracing::info!(app = %app.name, key, by, "fleet app shadowed by a key that wins it");
            self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": "shadowed", "key": key, "app": app.name.to_string(), "by": by})).await;
        }
        let mut problems = Vec::new();
        for (from, app) in plan.deploys {
            if from != key {
                tracing::info!(app = %app.name, key, from, "handing a fleet app to the next key that lists it");
            }
            let name = app.name.clone();
            match self
                .reconciler
                .deploy(app, crate::store::Owner::Fleet)
                .await
            {
                Ok(_) => {}
                Err(error @ ReconcileError::OwnedElsewhere { .. }) => {
                    problems.push(format!("conflict: {error}"))
                }
                Err(error) => problems.push(format!("app `{name}`: {error}")),
            }
        }
        for gone in plan.removals {
            if let Ok(name) = gone.parse::<AppName>() {
                if let Err(error) = self
                    .reconciler
                    .remove_owned(&name, crate::store::Owner::Fleet)
                    .await
                {
                    problems.push(format!("removing `{gone}`: {error}"));
                }
            }
        }
        let (record_key, version, specs) =
            (key.to_string(), document.version, document.apps.clone());
        self.store
            .call(move |store| store.record_applied(&record_key, version, &specs))
            .await?;
        for problem in &problems {
            let (rejection_key, reason) = (key.to_string(), problem.clone());
            self.store
                .call(move |store| store.record_rejection(&rejection_key, &reason))
                .await?;
        }
        tracing::info!(
            key,
            version,
            problems = problems.len(),
            "applied fleet state"
        );
        self.report(OutboxKind::Status, self.status_report().await)
            .await;
        Ok(())
    }

    async fn reject(&self, key: &str, reason: &str) -> Result<(), SyncError> {
        tracing::warn!(key, reason, "refused fleet state");
        let (owned_key, owned_reason) = (key.to_string(), reason.to_string());
        self.store
            .call(move |store| store.record_rejection(&owned_key, &owned_reason))
            .await?;
        self.report(
            OutboxKind::Event,
            serde_json::json!({"device": self.device, "unix": now_unix(), "event": "rejected", "key": key, "reason": reason}),
        )
        .await;
        Ok(())
    }

    /// Makes sure the store holds `digest`: downloaded whole, size-bounded and verified before
    /// it enters the store, so an interrupted download leaves nothing behind.
    async fn fetch_artifact(
        &self,
        context: &jetstream::Context,
        digest: &Digest,
    ) -> Result<(), SyncError> {
        let wanted = digest.clone();
        if self
            .store
            .call(move |store| store.touch_blob(&wanted))
            .await?
        {
            return Ok(());
        }
        let max = self
            .config
            .as_ref()
            .map(|c| c.max_artifact_size.0)
            .unwrap_or(256 << 20);
        let bucket = context
            .get_object_store(fleet::ARTIFACT_BUCKET)
            .await
            .map_err(|e| SyncError::Upstream(format!("no artifact store upstream: {e}")))?;
        let info = bucket.info(digest.to_string()).await.map_err(|e| {
            SyncError::Upstream(format!(
                "artifact {digest} is not in the upstream store: {e}"
            ))
        })?;
        if info.size as u64 > max {
            return Err(SyncError::Upstream(format!(
                "artifact {digest} is {} bytes, over this device's max_artifact_size of {max}",
                info.size
            )));
        }
        let mut object = bucket
            .get(digest.to_string())
            .await
            .map_err(upstream_error)?;
        // Read in chunks, watching the link: when it drops the object reader would wait for
        // a reconnection that may never come, so give up at once (or when nothing arrives for
        // DOWNLOAD_STALL) and start over on the next connection.
        let client = context.client();
        let limit = admission::Limit {
            bytes: max,
            setting: "max_artifact_size",
        };
        let mut intake = admission::Intake::new(limit, Some(info.size as u64));
        let mut chunk = vec![0u8; 256 << 10];
        let mut last_progress = tokio::time::Instant::now();
        loop {
            if client.connection_state() != async_nats::connection::State::Connected {
                return Err(SyncError::Upstream(format!(
                    "downloading {digest} was interrupted after {} of {} bytes: the link dropped; nothing was stored and the download starts over on the next connection",
                    intake.len(),
                    info.size
                )));
            }
            if last_progress.elapsed() > DOWNLOAD_STALL {
                return Err(SyncError::Upstream(format!(
                    "downloading {digest} stalled after {} of {} bytes; nothing was stored and the download starts over on the next connection (`cairnctl sync now` tries at once)",
                    intake.len(),
                    info.size
                )));
            }
            let read =
                match tokio::time::timeout(Duration::from_millis(500), object.read(&mut chunk))
                    .await
                {
                    Err(_) => continue,
                    Ok(read) => read.map_err(|e| {
                        SyncError::Upstream(format!("downloading {digest} was interrupted: {e}"))
                    })?,
                };
            if read == 0 {
                break;
            }
            intake.push(&chunk[..read]).map_err(|e| {
                SyncError::Upstream(format!("artifact {digest} is larger than announced: {e}"))
            })?;
            last_progress = tokio::time::Instant::now();
        }
        let tag = admission::Tag {
            name: "fleet".into(),
            tag: digest.to_string(),
            source: "fleet",
        };
        admission::admit(&self.store, intake, Some(digest), Some(tag))
            .await
            .map_err(|e| match e {
                admission::AdmitError::Store(error) => SyncError::Store(error),
                other => SyncError::Upstream(format!("artifact {digest}: {other}")),
            })?;
        Ok(())
    }
}

/// The device's id in the fleet: configured, else the host name.
pub fn device_id(config: &UpstreamConfig) -> String {
    config.device.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "device".into())
    })
}

/// Exponential backoff with ±25% jitter, so a fleet does not reconnect in lockstep.
fn jittered_backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_CAP);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = (nanos % 500) as f64 / 1000.0 + 0.75; // 0.75 ..= 1.25
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for failures in 1..20 {
            let delay = jittered_backoff(failures);
            let base = BACKOFF_FIRST
                .saturating_mul(1 << (failures - 1).min(10))
                .min(BACKOFF_CAP);
            assert!(
                delay >= base.mul_f64(0.75) && delay <= base.mul_f64(1.25),
                "{failures}: {delay:?}"
            );
        }
        assert!(jittered_backoff(30) <= BACKOFF_CAP.mul_f64(1.25));
    }
}

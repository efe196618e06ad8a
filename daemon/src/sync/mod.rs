//! Fleet sync: the device's link to the upstream NATS JetStream lattice. It never blocks
//! anything local: serving, local deploys and rollbacks go on whether or not a link exists.
//! When one does, it reads the signed desired state for this device and its groups (latest
//! value first, then watching), refuses what it should not trust (`cairn_core::fleet::verify`),
//! fetches missing artifacts by digest, hands apps to the reconciler as fleet-owned, and
//! publishes the reports waiting in the outbox with publish acks and `Nats-Msg-Id`
//! de-duplication (`INSTALLATION-ROW`, unique per store file), deleting each row only after its
//! ack. A document that cannot be realised waits its own backoff (`retry`); the link, the
//! reports and the other keys go on. All NATS access lives here.

mod apply;
mod artifact;
mod keys;
mod precedence;
mod retry;
mod trust;

use crate::config::UpstreamConfig;
use crate::reconcile::Reconciler;
use crate::spec::AppName;
use crate::store::{now_unix, OutboxBounds, OutboxKind, Store};
use async_nats::jetstream;
use cairn_core::fleet;
use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A session that stayed up this long was a success: the connection backoff starts over.
/// One that ends sooner (a refusal right after connecting) keeps growing it, so a device never
/// reconnects in a hot loop.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often a device checks its link, flushes the outbox, retries documents that are due and
/// looks for expired ones.
const TICK: Duration = Duration::from_secs(2);
/// Outbox rows published per batch before waiting for their acks.
const FLUSH_BATCH: u64 = 256;
/// How often a session without the report stream looks for it again.
const STREAM_RETRY: Duration = Duration::from_secs(30);

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
    /// Where `device` came from: `config` or `store` (made at first start).
    device_source: &'static str,
    /// Random per store file: report message ids are `INSTALLATION-ROW`.
    installation: String,
    trust: Mutex<trust::Trusted>,
    store: Arc<Store>,
    reconciler: Arc<Reconciler>,
    link: Mutex<LinkState>,
    /// Where link changes are recorded as events.
    logs: Arc<crate::logs::LogHub>,
    wake: Notify,
    /// Counts finished connection attempts, so `sync now` can wait for the next one.
    attempts: watch::Sender<u64>,
    retries: Mutex<retry::Retries>,
    /// Applied documents whose expiry was reported: (key, version).
    expired: Mutex<std::collections::BTreeSet<(String, u64)>>,
    /// When the last status report was queued (the periodic one waits `report_every` after).
    last_status: Mutex<Option<Instant>>,
    started: Instant,
}

impl Sync {
    /// Starts syncing when an upstream is configured. Bad trusted keys are a config error.
    pub fn start(
        config: Option<UpstreamConfig>,
        store: Arc<Store>,
        reconciler: Arc<Reconciler>,
        logs: Arc<crate::logs::LogHub>,
    ) -> anyhow::Result<Arc<Sync>> {
        let identity = store.identity()?;
        let device_source = match config.as_ref().and_then(|c| c.device.as_ref()) {
            Some(_) => "config",
            None => "store",
        };
        let device = match &config {
            Some(config) => device_id(config, &store)?,
            None => identity.device.clone(),
        };
        let trust = match &config {
            Some(config) => config.trust().map_err(anyhow::Error::msg)?,
            None => Default::default(),
        };
        let trust = trust::Trusted::load(trust, &store)?;
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
            logs,
            config,
            device,
            device_source,
            installation: identity.installation,
            trust: Mutex::new(trust),
            store,
            reconciler,
            wake: Notify::new(),
            attempts,
            retries: Mutex::default(),
            expired: Mutex::default(),
            last_status: Mutex::default(),
            started: Instant::now(),
        });
        if sync.config.is_some() {
            tokio::spawn(Arc::clone(&sync).run());
        }
        Ok(sync)
    }

    /// This device's id in the fleet: the config's `[upstream] device`, else the one made at
    /// first start and kept in the store.
    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn device_source(&self) -> &'static str {
        self.device_source
    }

    pub fn installation(&self) -> &str {
        &self.installation
    }

    /// Why `key` is waiting for a retry, if it is.
    pub fn retry_reason(&self, key: &str) -> Option<String> {
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reason(key)
            .map(str::to_string)
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

    /// Changes the link's state; the link coming up or going down is an event, a failed
    /// retry while offline is not.
    fn set_link(&self, change: impl FnOnce(&mut LinkState)) {
        let (before, after, error) = {
            let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
            let before = link.state;
            change(&mut link);
            (before, link.state, link.last_error.clone())
        };
        // Only coming up and going down are events: retries while offline go through
        // `connecting` and back, which is no news (and would fill the history in days).
        if (before == "connected") != (after == "connected") {
            let text = if after == "connected" {
                "the link to the upstream is up".to_string()
            } else {
                format!("the link to the upstream is down: {error}")
            };
            self.logs.record("", 0, "link", &text);
        }
    }

    /// The keys whose documents are trusted now: `trusted_keys` and the delegated ones.
    fn signers(&self) -> Vec<ed25519_dalek::VerifyingKey> {
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .signers(now_unix())
    }

    /// The delegation held: (serial, expiry), if any.
    pub fn delegation(&self) -> Option<(u64, i64)> {
        self.trust.lock().unwrap_or_else(|p| p.into_inner()).held()
    }

    /// What the device watches: its targets, and the delegation when it trusts roots.
    fn watched(&self) -> Vec<String> {
        let mut keys = self.targets();
        if self
            .trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_roots()
        {
            keys.insert(0, fleet::DELEGATION_KEY.to_string());
        }
        keys
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
        if kind == OutboxKind::Status {
            *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
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

    /// Whether the periodic status report is due (`report_every` since the last one).
    fn status_due(&self) -> bool {
        let every = self
            .config
            .as_ref()
            .map_or(Duration::from_secs(300), |c| c.report_every.0);
        self.last_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= every)
    }

    /// A snapshot of this device for the upstream: apps with their figures (the metrics
    /// endpoint's, since cairnd started), versions, recent errors, the device's own figures.
    async fn status_report(&self) -> serde_json::Value {
        let apps = self.reconciler.list().await;
        let mut app_reports = Vec::with_capacity(apps.len());
        for app in &apps {
            let name: AppName = match app.name.parse() {
                Ok(name) => name,
                Err(_) => continue,
            };
            let figures = match self.reconciler.detail(&name).await {
                Ok(detail) => serde_json::json!({
                    "requests": detail.requests,
                    "in_flight": detail.in_flight,
                    "responses": detail.responses,
                    "rejected": detail.rejected,
                    "timeouts": detail.timeouts,
                    "traps": detail.traps,
                    "restarts": detail.restarts,
                    "oom_kills": detail.oom_kills,
                    "cold_starts": detail.cold_starts,
                    "cold_start_seconds": detail.cold_start_seconds,
                    "latency_seconds_sum": detail.latency.0,
                    "log_lines_dropped": detail.log_lines_dropped,
                    "outbound_denied": detail.outbound_denied,
                    "memory_bytes": detail.usage.memory_bytes,
                    "cpu_seconds": detail.usage.cpu_nanos as f64 / 1e9,
                    "kv_bytes": self.reconciler.kv_usage(&name),
                }),
                // Removed since it was listed.
                Err(_) => serde_json::Value::Null,
            };
            app_reports.push(serde_json::json!({
                "name": app.name, "generation": app.generation, "status": app.status,
                "owner": app.owner, "digest": app.digest.to_string(), "error": app.error,
                "figures": figures,
            }));
        }
        let store = Arc::clone(&self.store);
        let (applied, rejections, usage, outbox, components) = store
            .call(|store| {
                Ok((
                    store.applied()?,
                    store.rejections(10)?,
                    store.usage()?,
                    store.outbox_stats()?,
                    store.components()?.len(),
                ))
            })
            .await
            .map(|(a, r, u, o, c)| (a, r, Some(u), Some(o), c))
            .unwrap_or_default();
        let now = now_unix();
        serde_json::json!({
            "device": self.device,
            "installation": self.installation,
            "unix": now,
            "apps": app_reports,
            "figures": {
                "uptime_seconds": self.started.elapsed().as_secs(),
                "apps": apps.len(),
                "components": components,
                "store_bytes": usage.as_ref().map(|u| u.file_bytes),
                "store_budget": usage.as_ref().and_then(|u| u.budget),
                "store_disk_free": usage.as_ref().map(|u| u.disk_free),
                "outbox_reports": outbox.map(|o| o.waiting),
                "outbox_bytes": outbox.map(|o| o.bytes),
                "outbox_dropped": outbox.map(|o| o.dropped),
                "log_lines_dropped": self.reconciler.pool_log_lines_dropped().await,
            },
            "applied": applied.iter().map(|a| serde_json::json!({
                "key": a.key, "version": a.version, "expires_unix": a.expires_unix,
                "expired": a.expires_unix > 0 && a.expires_unix <= now, "complete": a.complete,
            })).collect::<Vec<_>>(),
            "delegation_serial": self.delegation().map_or(0, |(serial, _)| serial),
            "errors": rejections.iter().map(|r| format!("{}: {}", r.key, r.reason)).collect::<Vec<_>>(),
        })
    }

    async fn run(self: Arc<Self>) {
        // Groups taken out of the config: their apps go now, link or not.
        if let Err(error) = self.leave_unfollowed().await {
            tracing::warn!(%error, "could not let go of the keys this device no longer follows");
        }
        self.queue_incomplete().await;
        artifact::remove_abandoned(&self.downloads());
        let mut failures: u32 = 0;
        loop {
            self.set_link(|link| link.state = "connecting");
            let mut connected = None;
            let result = self.session(&mut connected).await;
            let error = match result {
                Ok(()) => "the session ended".to_string(),
                Err(error) => error.to_string(),
            };
            if connected.is_some_and(|at: Instant| at.elapsed() >= HEALTHY_SESSION) {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            tracing::info!(%error, "upstream unavailable; local operation goes on");
            self.set_link(|link| {
                link.state = "offline";
                link.last_error = error;
            });
            self.attempts.send_modify(|count| *count += 1);
            let until =
                tokio::time::Instant::now() + retry::backoff(failures, BACKOFF_FIRST, BACKOFF_CAP);
            // Offline, documents whose artifacts are here are still retried, and expiry watched.
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.wake.notified() => break,
                    _ = tick.tick() => {
                        if let Err(error) = self.retry_due(None).await {
                            tracing::warn!(%error, "a retry failed");
                        }
                        self.check_expiry().await;
                    }
                }
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
        // Replies (publish acks, reads, watches) come to an inbox named for the device, so its
        // NATS user can be allowed to subscribe to its own replies and nobody else's.
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("cairnd {}", self.device))
            .custom_inbox_prefix(format!("_INBOX_{}", self.device))
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
        let servers = fleet::server_addrs(&config.nats).map_err(connect_error)?;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(servers))
            .await
            .map_err(|_| connect_error("no answer".into()))?
            .map_err(|e| connect_error(connect_failure(&e)))
    }

    /// One connected session: report, apply the latest desired state, then watch until the
    /// link breaks.
    async fn session(&self, connected: &mut Option<Instant>) -> Result<(), SyncError> {
        let client = self.connect().await?;
        let context = jetstream::new(client.clone());
        *connected = Some(Instant::now());
        self.set_link(|link| {
            link.state = "connected";
            link.last_success_unix = now_unix();
            link.last_error.clear();
        });
        self.attempts.send_modify(|count| *count += 1);
        // Without the report stream reports wait in the outbox; desired state still applies.
        let mut stream_ready = self.ensure_report_stream(&context).await;
        let mut stream_checked = Instant::now();
        self.report(OutboxKind::Status, self.status_report().await)
            .await;
        if stream_ready {
            self.flush(&context).await?;
        }

        let keys = self.watched();
        let mut bucket = match context.get_key_value(fleet::DESIRED_BUCKET).await {
            Ok(bucket) => Some(bucket),
            Err(error) => {
                tracing::info!(%error, "no desired state published yet; reports still go up");
                None
            }
        };
        // Watch first, then read the current values: a document published in between is then
        // seen by the watch (seeing one twice is harmless: the same version is not news).
        let mut changes = match &bucket {
            Some(_) => Some(keys::watch(&context, &self.device, &keys).await?),
            None => None,
        };
        if let Some(bucket) = &bucket {
            self.apply_latest(&context, bucket, &keys).await?;
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                change = async { changes.as_mut().expect("guarded").next().await }, if changes.is_some() => match change {
                    Some(Ok((key, Some(value)))) => {
                        let bucket = bucket.as_ref().expect("a watch has its bucket");
                        self.on_value(&context, bucket, &keys, &key, &value).await?;
                    }
                    Some(Ok((_, None))) => {}
                    Some(Err(error)) => return Err(error),
                    None => return Err(SyncError::Lost),
                },
                _ = tick.tick() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return Err(SyncError::Lost);
                    }
                    if !stream_ready && stream_checked.elapsed() >= STREAM_RETRY {
                        stream_ready = self.ensure_report_stream(&context).await;
                        stream_checked = Instant::now();
                    }
                    if stream_ready {
                        self.flush(&context).await?;
                    }
                    self.retry_due(Some(&context)).await?;
                    self.check_expiry().await;
                    if self.status_due() {
                        let report = self.status_report().await;
                        if !(stream_ready && self.publish_at_once(&context, &report).await) {
                            self.report(OutboxKind::Status, report).await;
                            if stream_ready {
                                self.flush(&context).await?;
                            }
                        }
                    }
                    self.set_link(|link| link.last_success_unix = now_unix());
                    if bucket.is_none() {
                        // Nothing published yet: stay connected, keep reporting, look again.
                        if let Ok(found) = context.get_key_value(fleet::DESIRED_BUCKET).await {
                            changes = Some(keys::watch(&context, &self.device, &keys).await?);
                            self.apply_latest(&context, &found, &keys).await?;
                            bucket = Some(found);
                        }
                    }
                }
                _ = self.wake.notified() => {
                    // `sync now` while connected: read the latest state again and report.
                    if let Some(bucket) = &bucket {
                        self.apply_latest(&context, bucket, &keys).await?;
                    }
                    self.report(OutboxKind::Status, self.status_report().await).await;
                    if !stream_ready {
                        stream_ready = self.ensure_report_stream(&context).await;
                        stream_checked = Instant::now();
                    }
                    if stream_ready {
                        self.flush(&context).await?;
                    }
                    self.attempts.send_modify(|count| *count += 1);
                }
            }
        }
    }

    /// Applies the current value of each watched key, the delegation first (on connect, on
    /// `sync now`, and when the bucket first appears).
    async fn apply_latest(
        &self,
        context: &jetstream::Context,
        bucket: &jetstream::kv::Store,
        keys: &[String],
    ) -> Result<(), SyncError> {
        for key in keys {
            if let Some(value) = bucket.get(key.as_str()).await.map_err(upstream_error)? {
                if key == fleet::DELEGATION_KEY {
                    self.apply_delegation(&value).await?;
                } else {
                    self.apply(Some(context), key, &value).await?;
                }
            }
        }
        Ok(())
    }

    /// A new value of one watched key. A new delegation may make documents refused before
    /// trusted now: they are read again.
    async fn on_value(
        &self,
        context: &jetstream::Context,
        bucket: &jetstream::kv::Store,
        keys: &[String],
        key: &str,
        value: &[u8],
    ) -> Result<(), SyncError> {
        if key != fleet::DELEGATION_KEY {
            return self.apply(Some(context), key, value).await;
        }
        if self.apply_delegation(value).await? {
            let documents: Vec<String> = keys
                .iter()
                .filter(|k| k.as_str() != fleet::DELEGATION_KEY)
                .cloned()
                .collect();
            self.apply_latest(context, bucket, &documents).await?;
        }
        Ok(())
    }

    /// Finds the report stream, or makes it (`cairnctl fleet init` makes it upstream; a
    /// device whose credentials may not create it waits for that). False, with the reason in
    /// the link's last error, when there is none: reports then wait in the outbox.
    async fn ensure_report_stream(&self, context: &jetstream::Context) -> bool {
        let found = self.find_report_stream(context).await;
        if found {
            self.set_link(|link| {
                if link.last_error.starts_with("reports wait") {
                    link.last_error.clear();
                }
            });
        }
        found
    }

    async fn find_report_stream(&self, context: &jetstream::Context) -> bool {
        if context.get_stream(fleet::REPORT_STREAM).await.is_ok() {
            return true;
        }
        let replicas = self.config.as_ref().map_or(1, |c| c.replicas);
        match context
            .create_stream(fleet::report_stream_config(replicas))
            .await
        {
            Ok(_) => true,
            // It exists (its info did not answer: a cluster electing the stream's leader):
            // publishing will tell.
            Err(error)
                if matches!(error.kind(), jetstream::context::CreateStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
            {
                true
            }
            Err(error) => {
                let message = format!(
                    "reports wait in the outbox: the stream {} is missing upstream and this device could not make it ({error}); `cairnctl fleet init` makes it",
                    fleet::REPORT_STREAM
                );
                tracing::warn!("{message}");
                self.set_link(|link| link.last_error = message);
                false
            }
        }
    }

    /// Publishes waiting reports, oldest first; a row goes only after the stream acked it.
    /// Its message id (`installation-row`: the store file's random id, so no two devices and
    /// no re-flash share one) makes a re-send after a crash a duplicate the stream drops.
    /// Publishes a periodic status report straight to the stream, without writing it to the
    /// outbox (and so to the flash) first, when nothing older waits there; whether the stream
    /// acknowledged it. Otherwise the caller queues it as any report. A report stored upstream
    /// whose ack was lost is queued again under another id: a status report is a snapshot, so
    /// a second copy changes nothing.
    async fn publish_at_once(
        &self,
        context: &jetstream::Context,
        report: &serde_json::Value,
    ) -> bool {
        let waiting = self
            .store
            .call(|store| store.outbox_stats())
            .await
            .map_or(1, |stats| stats.waiting);
        if waiting > 0 {
            return false;
        }
        let mut headers = async_nats::HeaderMap::new();
        let id = format!(
            "{}-status-{}",
            self.installation,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        headers.insert("Nats-Msg-Id", id.as_str());
        let payload = serde_json::to_vec(report).expect("reports serialise");
        let subject = fleet::report_subject(&self.device, OutboxKind::Status.as_str());
        let published = async {
            context
                .publish_with_headers(subject, headers, payload.into())
                .await
                .ok()?
                .await
                .ok()
        };
        let acked = tokio::time::timeout(Duration::from_secs(10), published)
            .await
            .ok()
            .flatten()
            .is_some();
        if acked {
            *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        acked
    }

    async fn flush(&self, context: &jetstream::Context) -> Result<(), SyncError> {
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
                    format!("{}-{}", self.installation, row.id).as_str(),
                );
                let subject = fleet::report_subject(&self.device, &row.kind);
                let ack = context
                    .publish_with_headers(subject, headers, row.payload.clone().into())
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
}

/// The device's id in the fleet: the config's `[upstream] device`, else the one made when the
/// store was (never the host name: every device flashed from one image shares that).
pub fn device_id(
    config: &UpstreamConfig,
    store: &Store,
) -> Result<String, crate::store::StoreError> {
    match &config.device {
        Some(device) => Ok(device.clone()),
        None => Ok(store.identity()?.device),
    }
}

//! The control server: gRPC (tonic) on a unix socket. It authorises every call from the peer's
//! credentials (`SO_PEERCRED`), turns requests into typed values, hands changes to the
//! reconciler and answers with proper status codes. It never changes what runs by itself.
//!
//! Who may do what: root, the daemon's own user and members of the control group may change
//! state; with `read_access = "any"` everyone else may read (ls, status, components, logs).

mod access;
mod errors;
pub mod metrics;
mod socket;
mod views;

pub use access::Access;
pub use errors::status_of;
pub use socket::{bind_socket, check_socket_free};

use crate::admission;
use crate::config::Config;
use crate::digest::Digest;
use crate::engine::Compiler;
use crate::logs::LogHub;
use crate::pool_users::PoolUsers;
use crate::reconcile::{AppView, Reconciler};
use crate::spec::{AppName, AppSpec, SpecError};
use crate::store::{Owner, Store};
use cairn_core::proto::control_server::{Control, ControlServer};
use cairn_core::proto::{self, push_chunk::Part, status_reply::Detail};
use errors::{admission_status, store_status};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct ControlService {
    store: Arc<Store>,
    reconciler: Arc<Reconciler>,
    compiler: Arc<Compiler>,
    logs: Arc<LogHub>,
    access: Access,
    max_component_size: u64,
    state_dir: PathBuf,
    socket: PathBuf,
    limits_note: String,
    pool_users: Arc<PoolUsers>,
    sync: Arc<crate::sync::Sync>,
    import: crate::import::ImportReport,
    scheduler: Option<Arc<crate::schedule::Scheduler>>,
    started: Instant,
}

impl ControlService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        reconciler: Arc<Reconciler>,
        compiler: Arc<Compiler>,
        logs: Arc<LogHub>,
        config: &Config,
        socket: PathBuf,
        limits_note: String,
        pool_users: Arc<PoolUsers>,
        sync: Arc<crate::sync::Sync>,
    ) -> ControlService {
        ControlService {
            store,
            reconciler,
            compiler,
            logs,
            access: Access::from_config(config, Arc::clone(&pool_users)),
            max_component_size: config.max_component_size.0,
            state_dir: config.state_dir.clone(),
            socket,
            limits_note,
            pool_users,
            sync,
            import: crate::import::ImportReport::default(),
            scheduler: None,
            started: Instant::now(),
        }
    }

    /// What the start-up import did, for `status`.
    pub fn with_import(mut self, report: crate::import::ImportReport) -> ControlService {
        self.import = report;
        self
    }

    /// The scheduler whose runs `status APP` shows.
    pub fn with_scheduler(mut self, scheduler: Arc<crate::schedule::Scheduler>) -> ControlService {
        self.scheduler = Some(scheduler);
        self
    }

    pub fn into_server(self: Arc<Self>) -> ControlServer<ControlService> {
        ControlServer::from_arc(self).max_decoding_message_size(8 << 20)
    }
}

impl ControlService {
    async fn sync_reply(&self) -> Result<proto::SyncStatusReply, Status> {
        let link = self.sync.link();
        let (applied, rejections, outbox) = self
            .store
            .call(|store| {
                Ok((
                    store.applied()?,
                    store.rejections(20)?,
                    store.outbox_stats()?,
                ))
            })
            .await
            .map_err(|e| store_status(&e))?;
        Ok(proto::SyncStatusReply {
            state: link.state.to_string(),
            upstream: self.sync.upstream(),
            device: self.sync.device().to_string(),
            installation: self.sync.installation().to_string(),
            device_source: self.sync.device_source().to_string(),
            delegation_serial: self.sync.delegation().map_or(0, |d| d.0),
            delegation_expires_unix: self.sync.delegation().map_or(0, |d| d.1),
            last_success_unix: link.last_success_unix,
            last_error: link.last_error,
            backlog: outbox.waiting,
            backlog_bytes: outbox.bytes,
            dropped: outbox.dropped,
            applied: applied
                .into_iter()
                .map(|a| proto::AppliedVersion {
                    retry: self.sync.retry_reason(&a.key).unwrap_or_default(),
                    key: a.key,
                    version: a.version,
                    applied_unix: a.applied_unix,
                    expires_unix: a.expires_unix,
                    complete: a.complete,
                })
                .collect(),
            rejections: rejections
                .into_iter()
                .map(|r| proto::SyncRejection {
                    key: r.key,
                    reason: r.reason,
                    unix: r.unix,
                })
                .collect(),
        })
    }
}

fn summary(view: &AppView) -> proto::AppSummary {
    proto::AppSummary {
        name: view.name.clone(),
        generation: view.generation,
        status: view.status.to_string(),
        // A command app listens nowhere.
        listen: view.listen.map(|addr| addr.to_string()).unwrap_or_default(),
        digest: view.digest.to_string(),
        owner: view.owner.to_string(),
        error: view.error.clone(),
    }
}

fn app_name(text: &str) -> Result<AppName, Status> {
    text.parse()
        .map_err(|e: SpecError| Status::invalid_argument(e.to_string()))
}

type LogStream = Pin<Box<dyn Stream<Item = Result<proto::LogLine, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;
type RunStream = Pin<Box<dyn Stream<Item = Result<proto::RunOutput, Status>> + Send>>;

/// The most of a run's output held for its caller, not yet taken by the transport; past it,
/// output is counted and not sent (the app's log has it all).
const RUN_STREAM_BYTES: usize = 1 << 20;

#[tonic::async_trait]
impl Control for ControlService {
    async fn push(
        &self,
        request: Request<Streaming<proto::PushChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        self.access.check(&request, "push components", true)?;
        let mut stream = request.into_inner();
        let meta = match stream.message().await? {
            Some(proto::PushChunk {
                part: Some(Part::Meta(meta)),
            }) => meta,
            _ => {
                return Err(Status::invalid_argument(
                    "a push must start with its metadata message",
                ))
            }
        };
        let limit = admission::Limit {
            bytes: self.max_component_size,
            setting: "max_component_size",
        };
        if meta.size > limit.bytes {
            return Err(Status::resource_exhausted(format!(
                "the component is {} bytes, over this device's limit of {} bytes (max_component_size in the config)",
                meta.size, limit.bytes
            )));
        }
        let declared: Option<Digest> = if meta.digest.is_empty() {
            None
        } else {
            Some(
                meta.digest
                    .parse()
                    .map_err(|e: crate::digest::DigestParseError| {
                        Status::invalid_argument(e.to_string())
                    })?,
            )
        };
        let mut intake = admission::Intake::new(limit, Some(meta.size));
        while let Some(chunk) = stream.message().await? {
            let Some(Part::Data(data)) = chunk.part else {
                return Err(Status::invalid_argument(
                    "only data may follow the push metadata",
                ));
            };
            if intake.len() + data.len() as u64 > meta.size {
                return Err(Status::invalid_argument(format!(
                    "the upload is longer than the {} bytes it announced",
                    meta.size
                )));
            }
            intake.push(&data).map_err(|e| admission_status(&e))?;
        }
        if intake.len() != meta.size {
            return Err(Status::invalid_argument(format!(
                "the upload ended after {} of the {} bytes it announced; nothing was stored",
                intake.len(),
                meta.size
            )));
        }
        // An unnamed push (what `deploy FILE` makes) is not tagged: it is kept only while a
        // generation uses it.
        let name = meta.name;
        let tag = if meta.tag.is_empty() {
            "latest".to_string()
        } else {
            meta.tag
        };
        let naming = (!name.is_empty()).then(|| admission::Tag {
            name: name.clone(),
            tag: tag.clone(),
            source: "local",
        });
        let admitted = admission::admit(&self.store, intake, declared.as_ref(), naming)
            .await
            .map_err(|e| admission_status(&e))?;
        let (digest, size, inserted) = (admitted.digest, admitted.size, admitted.inserted);
        Ok(Response::new(proto::PushReply {
            digest: digest.to_string(),
            size,
            already_present: !inserted,
            name,
            tag,
        }))
    }

    async fn deploy(
        &self,
        request: Request<proto::DeployRequest>,
    ) -> Result<Response<proto::DeployReply>, Status> {
        let caller = self.access.check(&request, "deploy apps", true)?;
        let spec = AppSpec::from_manifest(&request.get_ref().manifest)
            .map_err(|e| status_of(&e.into()))?;
        // Whoever deploys an app chooses its code: an app naming device secrets would hand
        // them to its deployer. Only root and cairnd's own user may (the fleet's documents are
        // signed by the operator, and the import folder is root's).
        if !spec.device_secrets.is_empty() && !caller.owns_device {
            return Err(Status::permission_denied(
                "only root or cairnd's own user may deploy an app with device_secrets: its code would read the device's secrets, which members of the control group may not",
            ));
        }
        let digest = spec.component.clone();
        let (view, unchanged) = match self.reconciler.deploy(spec, Owner::Local).await {
            Ok(deployed) => deployed,
            Err(error) => {
                // A failed deploy leaves no trace: an upload made only for it goes again.
                let dropped = self
                    .store
                    .call(move |store| store.drop_blob_if_unused(&digest))
                    .await;
                if let Err(drop_error) = dropped {
                    tracing::warn!(%drop_error, "an unused upload could not be dropped");
                }
                return Err(status_of(&error));
            }
        };
        Ok(Response::new(proto::DeployReply {
            app: Some(summary(&view)),
            unchanged,
        }))
    }

    async fn rollback(
        &self,
        request: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::DeployReply>, Status> {
        self.access.check(&request, "roll back apps", true)?;
        let name = app_name(&request.get_ref().app)?;
        let to = Some(request.get_ref().to_generation).filter(|g| *g != 0);
        let view = self
            .reconciler
            .rollback(&name, to)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::DeployReply {
            app: Some(summary(&view)),
            unchanged: false,
        }))
    }

    async fn remove(
        &self,
        request: Request<proto::RemoveRequest>,
    ) -> Result<Response<proto::RemoveReply>, Status> {
        self.access.check(&request, "remove apps", true)?;
        let name = app_name(&request.get_ref().app)?;
        let (data_deleted, data_only) = self
            .reconciler
            .remove(&name, request.get_ref().keep_data)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::RemoveReply {
            data_deleted,
            data_only,
        }))
    }

    async fn list_apps(
        &self,
        request: Request<proto::ListAppsRequest>,
    ) -> Result<Response<proto::ListAppsReply>, Status> {
        self.access.check(&request, "list apps", false)?;
        let apps = self.reconciler.list().await.iter().map(summary).collect();
        Ok(Response::new(proto::ListAppsReply { apps }))
    }

    async fn list_components(
        &self,
        request: Request<proto::ListComponentsRequest>,
    ) -> Result<Response<proto::ListComponentsReply>, Status> {
        self.access.check(&request, "list components", false)?;
        let records = self
            .store
            .call(|store| store.components())
            .await
            .map_err(|e| store_status(&e))?;
        let mut used_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for app in self.reconciler.list().await {
            used_by
                .entry(app.digest.to_string())
                .or_default()
                .push(app.name);
        }
        let components = records
            .into_iter()
            .map(|record| proto::ComponentInfo {
                used_by: used_by
                    .get(&record.digest.to_string())
                    .cloned()
                    .unwrap_or_default(),
                digest: record.digest.to_string(),
                size: record.size,
                name: record.name,
                tag: record.tag,
                source: record.source,
                created_unix: record.created_unix,
            })
            .collect();
        Ok(Response::new(proto::ListComponentsReply { components }))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let caller = self.access.check(&request, "read status", false)?;
        let app = request.get_ref().app.clone();
        let detail = if app.is_empty() {
            Detail::Daemon(self.daemon_status().await?)
        } else {
            // `[env]` values are often secrets: only those who could change them see them.
            let env = if caller.may_change_state {
                views::Env::Values
            } else {
                views::Env::KeysOnly
            };
            Detail::App(self.app_detail(&app_name(&app)?, env).await?)
        };
        Ok(Response::new(proto::StatusReply {
            detail: Some(detail),
        }))
    }

    async fn sync_status(
        &self,
        request: Request<proto::SyncStatusRequest>,
    ) -> Result<Response<proto::SyncStatusReply>, Status> {
        self.access.check(&request, "read sync status", false)?;
        self.sync_reply().await.map(Response::new)
    }

    async fn sync_now(
        &self,
        request: Request<proto::SyncNowRequest>,
    ) -> Result<Response<proto::SyncStatusReply>, Status> {
        self.access.check(&request, "trigger a sync", true)?;
        self.sync.now().await;
        self.sync_reply().await.map(Response::new)
    }

    async fn kv(
        &self,
        request: Request<proto::KvRequest>,
    ) -> Result<Response<proto::KvReply>, Status> {
        use crate::pool::services::{Answer, Op};
        use proto::kv_request::Op as Asked;
        let asked = request.get_ref().op.clone().ok_or_else(|| {
            Status::invalid_argument(
                "a key-value request names no operation (list, get, set or delete)",
            )
        })?;
        // Values are the app's data, often private: reading them is for those who may change
        // state, as `[env]` and `[config]` values are. Readers list keys.
        let (action, writes) = match &asked {
            Asked::List(_) => ("list an app's keys", false),
            Asked::Get(_) => ("read an app's key-value data", true),
            Asked::Set(_) | Asked::Delete(_) => ("change an app's key-value data", true),
        };
        self.access.check(&request, action, writes)?;
        let name = app_name(&request.get_ref().app)?;
        let quota = self.reconciler.kv_quota(&name);
        let store = self
            .reconciler
            .kv_store(&name)
            .map_err(|error| errors::kv_status(&error))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "{name} has no key-value data: no app of that name has a [keyvalue] table, and no data of one was kept"
                ))
            })?;
        let asked_keys = match &asked {
            Asked::Get(get) => get.keys.clone(),
            _ => Vec::new(),
        };
        let op = match asked {
            Asked::List(list) => Op::ListKeys {
                cursor: list.cursor,
            },
            Asked::Get(get) => Op::GetMany { keys: get.keys },
            Asked::Delete(delete) => Op::DeleteMany { keys: delete.keys },
            Asked::Set(set) => Op::SetMany {
                pairs: set
                    .pairs
                    .into_iter()
                    .map(|pair| (pair.key, pair.value.unwrap_or_default()))
                    .collect(),
            },
        };
        if matches!(op, Op::SetMany { .. }) && quota.is_none() {
            let why = if self.reconciler.detail(&name).await.is_ok() {
                format!("{name} runs without a [keyvalue] table, so it has no quota to write within: deploy it with one first")
            } else {
                format!("{name} is not an app (its key-value data was kept): deploy it with a [keyvalue] table to write")
            };
            return Err(Status::failed_precondition(why));
        }
        let answer = store
            .run(op, quota.unwrap_or(0))
            .await
            .map_err(|error| errors::kv_status(&error))?;
        let mut reply = proto::KvReply {
            used: store.used(),
            quota: quota.unwrap_or(0),
            ..Default::default()
        };
        match answer {
            Answer::Keys { keys, cursor } => {
                reply.keys = keys;
                reply.cursor = cursor;
            }
            Answer::Values(values) => {
                reply.values = asked_keys
                    .into_iter()
                    .zip(values)
                    .map(|(key, found)| proto::KvPair {
                        key,
                        value: found.map(|(_, value)| value),
                    })
                    .collect();
            }
            _ => {}
        }
        Ok(Response::new(reply))
    }

    async fn collect(
        &self,
        request: Request<proto::CollectRequest>,
    ) -> Result<Response<proto::CollectReply>, Status> {
        self.access.check(&request, "collect unused data", true)?;
        // Lines gathered for the store go in first, so what is collected and the size said
        // afterwards are the store's as of this call.
        self.logs.flush().await;
        let (collected, usage) = self
            .store
            .call(|store| Ok((store.collect()?, store.usage()?)))
            .await
            .map_err(|e| store_status(&e))?;
        tracing::info!(?collected, "collected on request");
        Ok(Response::new(proto::CollectReply {
            generations: collected.generations,
            components: collected.components,
            component_bytes: collected.component_bytes,
            compiled: collected.compiled,
            compiled_bytes: collected.compiled_bytes,
            log_lines: collected.log_lines,
            file_bytes_freed: collected.file_bytes_freed,
            store_bytes: usage.file_bytes,
            store_budget: usage.budget.unwrap_or(0),
        }))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<proto::EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.access.check(&request, "read events", false)?;
        let proto::EventsRequest {
            app,
            follow,
            since_unix_millis,
            tail,
        } = request.into_inner();
        if !app.is_empty() {
            app_name(&app)?;
        }
        // Subscribe before reading what is kept, so no event falls between the two.
        let mut live = self.logs.subscribe_events();
        let of = app.clone();
        let limit = if tail == 0 { u64::MAX >> 1 } else { tail };
        let kept = self
            .store
            .call(move |store| store.events(&of, since_unix_millis, limit))
            .await
            .map_err(|e| store_status(&e))?;
        let last_seen = kept.last().map(|e| e.id).unwrap_or(0);
        let event = |record: crate::store::EventRecord| proto::Event {
            id: record.id,
            unix_millis: record.unix_millis,
            app: record.app,
            generation: record.generation,
            kind: record.kind,
            text: record.text,
        };
        let backlog = tokio_stream::iter(kept.into_iter().map(event).map(Ok));
        if !follow {
            return Ok(Response::new(Box::pin(backlog)));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // A follower that went away is noticed at once, not at the next event.
                let received = tokio::select! {
                    received = live.recv() => received,
                    () = sender.closed() => return,
                };
                let record = match received {
                    Ok(record) => record,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        crate::store::EventRecord {
                            id: 0,
                            app: String::new(),
                            generation: 0,
                            unix_millis: 0,
                            kind: "skipped".into(),
                            text: format!(
                                "{missed} events were skipped because this reader fell behind"
                            ),
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let wanted = record.id == 0
                    || (record.id > last_seen
                        && (app.is_empty() || record.app == app || record.app.is_empty()));
                if wanted && sender.send(Ok(event(record))).await.is_err() {
                    return;
                }
            }
        });
        let live_stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(backlog.chain(live_stream))))
    }

    type RunStream = RunStream;

    async fn run(
        &self,
        request: Request<proto::RunRequest>,
    ) -> Result<Response<RunStream>, Status> {
        // A run executes the app's code with its grants: as a deploy does.
        self.access.check(&request, "run an app", true)?;
        let proto::RunRequest { app, args } = request.into_inner();
        let name = app_name(&app)?;
        crate::spec::check_run_args(&args).map_err(Status::invalid_argument)?;
        let (output, mut chunks) = tokio::sync::mpsc::channel(256);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tap = crate::spawn::Tap {
            output,
            dropped: Arc::clone(&dropped),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        // Output bytes sent towards the caller and not yet taken by the transport.
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let taken = Arc::clone(&queued);
        let (reconciler, logs) = (Arc::clone(&self.reconciler), Arc::clone(&self.logs));
        tokio::spawn(async move {
            let run = reconciler.run(&name, &args, Some(tap), "cairnctl run");
            tokio::pin!(run);
            let mut ended = None;
            // Until the run has ended and its pool's last output is read (the tap's senders
            // are gone). Output is never waited for: what a caller that reads slowly (or went
            // away) has no room for is counted, so the run and its slot never wait on it.
            loop {
                tokio::select! {
                    end = &mut run, if ended.is_none() => ended = Some(end),
                    chunk = chunks.recv() => match chunk {
                        Some(crate::pool::protocol::LogChunk { stream, .. })
                            if stream == crate::reconcile::STARTED =>
                        {
                            let _ = sender.try_send(Ok(proto::RunOutput {
                                started: true,
                                ..Default::default()
                            }));
                        }
                        Some(crate::pool::protocol::LogChunk { stream, text }) => {
                            use std::sync::atomic::Ordering::Relaxed;
                            let bytes = text.len();
                            let output = proto::RunOutput {
                                stream,
                                text,
                                ..Default::default()
                            };
                            // Counted before it is sent, so the transport's take never
                            // comes first.
                            let before = queued.fetch_add(bytes, Relaxed);
                            if before + bytes > RUN_STREAM_BYTES
                                || sender.try_send(Ok(output)).is_err()
                            {
                                queued.fetch_sub(bytes, Relaxed);
                                dropped.fetch_add(bytes as u64, Relaxed);
                            }
                        }
                        None if ended.is_some() => break,
                        None => ended = Some((&mut run).await),
                    },
                }
            }
            let last = match ended.expect("the loop ends once the run has") {
                Ok(end) => {
                    if !end.removed {
                        logs.note(
                            name.as_str(),
                            end.generation,
                            &format!(
                                "run (cairnctl run): {} after {} ms",
                                end.outcome,
                                end.duration.as_millis()
                            ),
                        );
                    }
                    Ok(proto::RunOutput {
                        finished: true,
                        exit_code: end.code,
                        outcome: end.outcome,
                        dropped_bytes: dropped.load(std::sync::atomic::Ordering::Relaxed),
                        generation: end.generation,
                        duration_ms: end.duration.as_millis() as u64,
                        ..Default::default()
                    })
                }
                Err(error) => Err(status_of(&error)),
            };
            // A caller that never reads is given a minute for the last message.
            let _ = tokio::time::timeout(Duration::from_secs(60), sender.send(last)).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver).map(move |output| {
            if let Ok(output) = &output {
                taken.fetch_sub(output.text.len(), std::sync::atomic::Ordering::Relaxed);
            }
            output
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type LogsStream = LogStream;

    async fn logs(
        &self,
        request: Request<proto::LogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        self.access.check(&request, "read logs", false)?;
        let proto::LogsRequest {
            app,
            follow,
            tail,
            level,
            since_unix_millis,
        } = request.into_inner();
        let name = app_name(&app)?;
        let min_rank = match level.as_str() {
            "" => 0,
            named => cairn_core::levels::level(named)
                .map(cairn_core::levels::rank)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "`{named}` is not a log level: use one of {}",
                        cairn_core::levels::LEVELS.join(", ")
                    ))
                })?,
        };
        self.reconciler
            .detail(&name)
            .await
            .map_err(|e| status_of(&e))?;
        // Subscribe before reading the tail so no line falls between the two; have what the
        // writer gathers written first, so the tail has every line emitted before this call.
        let mut live = self.logs.subscribe();
        self.logs.flush().await;
        let tail_of = app.clone();
        let recorded = self
            .store
            .call(move |store| store.tail_logs(&tail_of, tail, min_rank, since_unix_millis))
            .await
            .map_err(|e| store_status(&e))?;
        let last_seen = recorded.last().map(|r| r.id).unwrap_or(0);
        let line = |record: crate::store::LogRecord| proto::LogLine {
            id: record.id,
            unix_millis: record.unix_millis,
            stream: record.stream,
            line: record.line,
            generation: record.generation,
        };
        let backlog = tokio_stream::iter(recorded.into_iter().map(line).map(Ok));
        if !follow {
            return Ok(Response::new(Box::pin(backlog)));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                match live.recv().await {
                    Ok(record)
                        if record.app == app
                            && record.id > last_seen
                            && cairn_core::levels::rank(&record.stream) >= min_rank =>
                    {
                        if sender.send(Ok(line(record))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let note = proto::LogLine {
                            id: 0,
                            unix_millis: 0,
                            stream: "cairn".into(),
                            line: format!(
                                "[{missed} lines were skipped because this reader fell behind]"
                            ),
                            generation: 0,
                        };
                        if sender.send(Ok(note)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let live_stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(backlog.chain(live_stream))))
    }
}

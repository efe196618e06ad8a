//! The control server: gRPC (tonic) on a unix socket. It authorises every call from the peer's
//! credentials (`SO_PEERCRED`), turns requests into typed values, hands changes to the
//! reconciler and answers with proper status codes. It never changes what runs by itself.
//!
//! Who may do what: root, the daemon's own user and members of the control group may change
//! state; with `read_access = "any"` everyone else may read (ls, status, components, logs).

use crate::admission::{self, AdmitError};
use crate::config::{Config, ReadAccess};
use crate::digest::Digest;
use crate::engine::Compiler;
use crate::logs::LogHub;
use crate::reconcile::{AppView, ReconcileError, Reconciler};
use crate::spec::{AppName, AppSpec, SpecError};
use crate::store::{Owner, Store, StoreError};
use cairn_core::proto::control_server::{Control, ControlServer};
use cairn_core::proto::{self, push_chunk::Part, status_reply::Detail};
use nix::unistd::{Gid, Group, Uid, User};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

/// Maps every internal error to the status a client can act on. One place, tested below.
pub fn status_of(error: &ReconcileError) -> Status {
    let message = error.to_string();
    match error {
        ReconcileError::Spec(_)
        | ReconcileError::Component { .. }
        | ReconcileError::Load { .. } => Status::invalid_argument(message),
        ReconcileError::UnknownApp(_)
        | ReconcileError::UnknownComponent(_)
        | ReconcileError::UnknownGeneration { .. } => Status::not_found(message),
        ReconcileError::NoPreviousGeneration(_)
        | ReconcileError::AddressTaken { .. }
        | ReconcileError::AddressUnavailable { .. }
        | ReconcileError::OwnedElsewhere { .. }
        | ReconcileError::Pool(_)
        | ReconcileError::Unhealthy { .. }
        | ReconcileError::Limits(_) => Status::failed_precondition(message),
        ReconcileError::Store(error) => store_status(error),
        ReconcileError::Internal(_) => Status::internal(message),
    }
}

fn store_status(error: &StoreError) -> Status {
    let message = error.to_string();
    match error {
        StoreError::Full { .. } => Status::resource_exhausted(message),
        StoreError::Corrupt { .. } => Status::data_loss(message),
        StoreError::Open { .. } | StoreError::Sqlite(_) => Status::internal(message),
    }
}

/// Why a component was not admitted, as a status.
fn admission_status(error: &AdmitError) -> Status {
    let message = error.to_string();
    match error {
        AdmitError::TooLarge { .. } => Status::resource_exhausted(message),
        AdmitError::File(_) | AdmitError::Mismatch { .. } | AdmitError::Invalid(_) => {
            Status::invalid_argument(message)
        }
        AdmitError::Store(error) => store_status(error),
        AdmitError::Internal(_) => Status::internal(message),
    }
}

/// Who may change state and who may read.
pub struct Access {
    daemon_uid: Uid,
    group: Option<(String, Gid)>,
    read_access: ReadAccess,
}

impl Access {
    pub fn from_config(config: &Config) -> Access {
        let group = Group::from_name(&config.control.group)
            .ok()
            .flatten()
            .map(|group| (group.name, group.gid));
        Access {
            daemon_uid: Uid::effective(),
            group,
            read_access: config.control.read_access,
        }
    }

    fn in_group(&self, uid: Uid, gid: Gid) -> bool {
        let Some((_, group_gid)) = &self.group else {
            return false;
        };
        if gid == *group_gid {
            return true;
        }
        // SO_PEERCRED carries the primary group only; supplementary groups come from the
        // user database.
        let Some(user) = User::from_uid(uid).ok().flatten() else {
            return false;
        };
        let Ok(name) = CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.contains(group_gid))
            .unwrap_or(false)
    }

    fn check<T>(
        &self,
        request: &Request<T>,
        action: &str,
        changes_state: bool,
    ) -> Result<(), Status> {
        let credentials = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| {
                Status::permission_denied(
                    "the caller's credentials could not be read from the socket",
                )
            })?;
        let uid = Uid::from_raw(credentials.uid());
        let gid = Gid::from_raw(credentials.gid());
        if uid.is_root() || uid == self.daemon_uid || self.in_group(uid, gid) {
            return Ok(());
        }
        if !changes_state && self.read_access == ReadAccess::Any {
            return Ok(());
        }
        let group_hint = match &self.group {
            Some((name, _)) => {
                format!("members of group `{name}` (add the user with `usermod -aG {name} USER`)")
            }
            None => "members of the control group (none is configured on this device)".to_string(),
        };
        Err(Status::permission_denied(format!(
            "uid {uid} may not {action}: only root, the daemon's user and {group_hint} may"
        )))
    }
}

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
    pool_user: String,
    sync: Arc<crate::sync::Sync>,
    import: crate::import::ImportReport,
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
        pool_user: String,
        sync: Arc<crate::sync::Sync>,
    ) -> ControlService {
        ControlService {
            store,
            reconciler,
            compiler,
            logs,
            access: Access::from_config(config),
            max_component_size: config.max_component_size.0,
            state_dir: config.state_dir.clone(),
            socket,
            limits_note,
            pool_user,
            sync,
            import: crate::import::ImportReport::default(),
            started: Instant::now(),
        }
    }

    /// What the start-up import did, for `status`.
    pub fn with_import(mut self, report: crate::import::ImportReport) -> ControlService {
        self.import = report;
        self
    }

    pub fn into_server(self) -> ControlServer<ControlService> {
        ControlServer::new(self).max_decoding_message_size(8 << 20)
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
            last_success_unix: link.last_success_unix,
            last_error: link.last_error,
            backlog: outbox.waiting,
            dropped: outbox.dropped,
            applied: applied
                .into_iter()
                .map(|a| proto::AppliedVersion {
                    key: a.key,
                    version: a.version,
                    applied_unix: a.applied_unix,
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
        listen: view.listen.to_string(),
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
        self.access.check(&request, "deploy apps", true)?;
        let spec = AppSpec::from_manifest(&request.get_ref().manifest)
            .map_err(|e| status_of(&e.into()))?;
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
        self.reconciler
            .remove(&name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::RemoveReply {}))
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
        self.access.check(&request, "read status", false)?;
        let app = request.get_ref().app.clone();
        if app.is_empty() {
            let apps = self.reconciler.list().await;
            let components = self
                .store
                .call(|store| store.components())
                .await
                .map_err(|e| store_status(&e))?;
            let distinct: std::collections::BTreeSet<String> =
                components.iter().map(|c| c.digest.to_string()).collect();
            let fingerprint = self
                .compiler
                .fingerprint(&Default::default())
                .unwrap_or_else(|e| format!("unavailable: {e}"));
            return Ok(Response::new(proto::StatusReply {
                detail: Some(Detail::Daemon(proto::DaemonStatus {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    state_dir: self.state_dir.display().to_string(),
                    socket: self.socket.display().to_string(),
                    apps: apps.len() as u64,
                    apps_running: apps.iter().filter(|a| a.status == "running").count() as u64,
                    components: distinct.len() as u64,
                    uptime_seconds: self.started.elapsed().as_secs(),
                    engine_fingerprint: fingerprint,
                    compiled: self.compiler.compiled.load(Ordering::Relaxed),
                    cache_hits: self.compiler.cache_hits.load(Ordering::Relaxed),
                    limits: self.limits_note.clone(),
                    pool_user: self.pool_user.clone(),
                    import_dir: self
                        .import
                        .dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                    import_lines: self.import.lines.clone(),
                    import_problems: self.import.problems.clone(),
                    log_lines_dropped: self.logs.dropped()
                        + self.reconciler.pool_log_lines_dropped().await,
                })),
            }));
        }
        let name = app_name(&app)?;
        let detail = self
            .reconciler
            .detail(&name)
            .await
            .map_err(|e| status_of(&e))?;
        let generations_of = name.clone();
        let generations = self
            .store
            .call(move |store| store.generations(&generations_of))
            .await
            .map_err(|e| store_status(&e))?;
        let limits = &detail.spec.limits;
        let mut limit_rows = vec![
            proto::Limit {
                name: "memory".into(),
                value: limits.memory.to_string(),
                enforcement: "per instance, by wasmtime (linear memory cap)".into(),
            },
            proto::Limit {
                name: "instances".into(),
                value: limits.instances.to_string(),
                enforcement: "concurrent requests; more are answered 503".into(),
            },
            proto::Limit {
                name: "timeout".into(),
                value: limits.timeout.to_string(),
                enforcement: "per request, by epoch interruption".into(),
            },
        ];
        let enforced = !detail.cgroup.starts_with("not enforced");
        let by_cgroup = |what: &str| {
            if enforced {
                format!("for the whole pool, by its cgroup ({what})")
            } else {
                detail.cgroup.clone()
            }
        };
        limit_rows.push(proto::Limit {
            name: "memory_total".into(),
            value: limits.pool_memory().to_string(),
            enforcement: by_cgroup("memory limit"),
        });
        limit_rows.push(proto::Limit {
            name: "cpu".into(),
            value: match limits.cpu {
                Some(cores) => format!("{cores} cores"),
                None => "no cap".into(),
            },
            enforcement: by_cgroup("CFS quota"),
        });
        limit_rows.push(proto::Limit {
            name: "pids".into(),
            value: limits.pool_pids().to_string(),
            enforcement: by_cgroup("pids limit"),
        });
        Ok(Response::new(proto::StatusReply {
            detail: Some(Detail::App(proto::AppDetail {
                summary: Some(summary(&detail.view)),
                limits: limit_rows,
                generations: generations
                    .iter()
                    .map(|g| proto::GenerationInfo {
                        generation: g.generation,
                        digest: g.digest.to_string(),
                        created_unix: g.created_unix,
                        current: g.generation == detail.view.generation,
                    })
                    .collect(),
                env: detail.spec.env.clone().into_iter().collect(),
                allocator: detail.allocator,
                requests: detail.requests,
                in_flight: detail.in_flight,
                traps: detail.traps,
                timeouts: detail.timeouts,
                rejected: detail.rejected,
                health: String::new(),
                started_unix: detail.started_unix,
                pid: detail.pid,
                restarts: detail.restarts,
                last_exit: detail.last_exit,
                cgroup: detail.cgroup.clone(),
                memory_bytes: detail.usage.memory_bytes,
                cpu_usage_nanos: detail.usage.cpu_nanos,
                pids: detail.usage.pids,
            })),
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

    type LogsStream = LogStream;

    async fn logs(
        &self,
        request: Request<proto::LogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        self.access.check(&request, "read logs", false)?;
        let proto::LogsRequest { app, follow, tail } = request.into_inner();
        let name = app_name(&app)?;
        self.reconciler
            .detail(&name)
            .await
            .map_err(|e| status_of(&e))?;
        // Subscribe before reading the tail so no line falls between the two.
        let mut live = self.logs.subscribe();
        let tail_of = app.clone();
        let recorded = self
            .store
            .call(move |store| store.tail_logs(&tail_of, tail))
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
                    Ok(record) if record.app == app && record.id > last_seen => {
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

/// Refuses to go on when a live daemon already serves `path` (checked before anything else is
/// set up, so a second daemon changes nothing).
pub fn check_socket_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another cairnd is already serving {}; stop it first or give this one --socket",
            path.display()
        );
    }
    Ok(())
}

/// Binds the control socket: refuses to steal one a live daemon holds, removes a stale one,
/// and sets its mode and group.
pub fn bind_socket(path: &Path, config: &Config) -> anyhow::Result<UnixListenerStream> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    check_socket_free(path)?;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))?;
    let mode = match config.control.read_access {
        ReadAccess::Group => 0o660,
        ReadAccess::Any => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Ok(Some(group)) = Group::from_name(&config.control.group) {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| {
            anyhow::anyhow!(
                "cannot give {} to group {}: {e}",
                path.display(),
                group.name
            )
        })?;
    }
    Ok(UnixListenerStream::new(listener))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tonic::Code;

    #[test]
    fn every_error_maps_to_a_status_a_client_can_act_on() {
        let digest = Digest::of(b"x");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let table: Vec<(ReconcileError, Code)> = vec![
            (
                ReconcileError::Spec(SpecError::Invalid("x".into())),
                Code::InvalidArgument,
            ),
            (
                ReconcileError::Component {
                    digest: digest.clone(),
                    source: crate::engine::RuntimeError::CoreModule,
                },
                Code::InvalidArgument,
            ),
            (ReconcileError::UnknownApp("a".into()), Code::NotFound),
            (ReconcileError::UnknownComponent(digest), Code::NotFound),
            (
                ReconcileError::UnknownGeneration {
                    app: "a".into(),
                    generation: 9,
                    available: "1".into(),
                },
                Code::NotFound,
            ),
            (
                ReconcileError::NoPreviousGeneration("a".into()),
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::AddressTaken {
                    addr,
                    app: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::AddressUnavailable {
                    addr,
                    reason: "in use".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::OwnedElsewhere {
                    app: "a".into(),
                    owner: "fleet",
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::Store(StoreError::Full { path: "/x".into() }),
                Code::ResourceExhausted,
            ),
            (
                ReconcileError::Store(StoreError::Corrupt {
                    what: "x".into(),
                    detail: "y".into(),
                }),
                Code::DataLoss,
            ),
            (
                ReconcileError::Store(StoreError::Sqlite("x".into())),
                Code::Internal,
            ),
            (ReconcileError::Internal("x".into()), Code::Internal),
            (
                ReconcileError::Load {
                    digest: Digest::of(b"y"),
                    message: "link".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ReconcileError::Pool("died".into()),
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::Unhealthy {
                    path: "/health".into(),
                    answer: "answered 500".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in table {
            let status = status_of(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }

    #[test]
    fn every_refused_component_maps_to_a_status_a_client_can_act_on() {
        let table: Vec<(AdmitError, Code)> = vec![
            (
                AdmitError::TooLarge {
                    limit: 1,
                    setting: "max_component_size",
                },
                Code::ResourceExhausted,
            ),
            (
                AdmitError::Mismatch {
                    actual: Digest::of(b"a"),
                    expected: Digest::of(b"b"),
                },
                Code::InvalidArgument,
            ),
            (
                AdmitError::Invalid(crate::engine::RuntimeError::NotWasm),
                Code::InvalidArgument,
            ),
            (
                AdmitError::File(crate::regular_file::FileError::NotRegular {
                    path: "/dev/zero".into(),
                    kind: "a character device",
                }),
                Code::InvalidArgument,
            ),
            (
                AdmitError::Store(StoreError::Full { path: "/x".into() }),
                Code::ResourceExhausted,
            ),
            (AdmitError::Internal("x".into()), Code::Internal),
        ];
        for (error, code) in table {
            let status = admission_status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }
}

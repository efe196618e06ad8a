//! The pool process (`cairnd pool`, started only by the supervisor): hosts one app's wasmtime
//! engine, accepts on the listener the supervisor bound and passed down, and serves every
//! request itself. It never touches the store, the control socket or the fleet: everything it
//! needs arrives on its control socket (fd 3): the `Start` message and, with it, the app's
//! listener, code and counters page (see `protocol`); everything it reports goes back over the
//! control socket (logs) or the shared counters page.
//!
//! Lifecycle: no_new_privs, runtime built → (a spare waits here for an app) → Start → the
//! app's user (every thread), before anything of the app is read or run → load (link, one probe instance unless the code is proven) → `Loaded`/`Failed` → wait for
//! `Serve` (a new generation) or serve at once (a resumed one) → accept until `Drain` (or the
//! supervisor goes away) → drain → exit 0.

pub mod connect;
mod connection;
mod host;
mod http;
mod interfaces;
pub mod outgoing;
pub mod protocol;
mod runtime;
pub mod seccomp;
pub mod services;

use crate::counters::{Counter, Counters};
use http::{HttpServer, Serving};
use protocol::{FromPool, LogChunk, ToPool};
use runtime::{Outcome, RequestReport, Runtime};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Log chunks queued towards the supervisor before new ones are dropped (and counted)…
const LOG_QUEUE: usize = 4096;
/// …and the bytes of text they may hold together. A request's output is at most 64 KiB per
/// stream (`host::OUTPUT_LIMIT`).
pub const LOG_QUEUE_BYTES: usize = 4 << 20;
/// Text bytes in one `Logs` frame at most: JSON writes a control character in six bytes, so a
/// frame stays well under `protocol::MAX_FRAME`.
const LOG_FRAME_BYTES: usize = 64 << 10;

/// The pool's side of its log queue: what is queued, in chunks and in bytes.
#[derive(Clone)]
struct LogQueue {
    chunks: mpsc::Sender<LogChunk>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl LogQueue {
    fn new() -> (
        LogQueue,
        mpsc::Receiver<LogChunk>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (chunks, receiver) = mpsc::channel(LOG_QUEUE);
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            LogQueue {
                chunks,
                bytes: Arc::clone(&bytes),
            },
            receiver,
            bytes,
        )
    }

    /// Queues `chunk` unless the queue is full (in chunks or bytes); false when dropped.
    fn offer(&self, chunk: LogChunk) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        let size = chunk.text.len();
        if self.bytes.fetch_add(size, AcqRel) + size > LOG_QUEUE_BYTES
            || self.chunks.try_send(chunk).is_err()
        {
            self.bytes.fetch_sub(size, AcqRel);
            return false;
        }
        true
    }
}

/// Switches to the app's user and group with no supplementary groups, once the spare knows
/// its app (a spare is made before it is known whose it will be). The process has threads by
/// then (tokio, the epoch ticker): glibc applies each of these calls to every thread, and a
/// switch from root to another uid in all its ids empties every capability set. No new
/// privileges ever (no setuid binaries, no file capabilities) was set at start.
fn switch_user(ids: Option<(u32, u32)>) -> Result<(), PrivilegeError> {
    let failed = |step: &'static str| move |errno| PrivilegeError::Failed { step, errno };
    if let Some((uid, gid)) = ids {
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(gid),
        );
        nix::unistd::setgroups(&[]).map_err(failed("drop supplementary groups"))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(failed("switch to the pool's gid"))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(failed("switch to the pool's uid"))?;
        if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            return Err(PrivilegeError::RootRegained);
        }
    }
    Ok(())
}

/// As root, keeps only CAP_SETUID and CAP_SETGID in the effective and permitted sets (and
/// nothing inheritable); without root there is nothing to drop. Raw `capset`: nix does not
/// wrap it.
fn keep_only_switch_capabilities() -> Result<(), nix::errno::Errno> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Sets {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    let keep = (1 << CAP_SETGID) | (1 << CAP_SETUID);
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Version 3 takes two sets of 32 bits each; the second (capabilities 32-63) is emptied.
    let sets = [
        Sets {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        },
        Sets::default(),
    ];
    // SAFETY: capset reads one header and two set structs of the layout above for version 3.
    let result = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_capset,
            &header as *const Header,
            sets.as_ptr(),
        )
    };
    nix::errno::Errno::result(result).map(drop)
}

#[derive(Debug, thiserror::Error)]
enum PrivilegeError {
    #[error("cannot {step}: {errno}")]
    Failed {
        step: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("root could be regained after dropping it")]
    RootRegained,
}

/// Runs the pool; returns the process exit code.
pub fn run() -> i32 {
    // Before the switch to the app's user, which makes this process's /proc files root's.
    // First, while the process has one thread: of root's capabilities only the two the switch
    // to the app's user needs are kept. So the page map below is opened without
    // CAP_SYS_ADMIN, and its reads never show physical addresses to an escaped guest.
    if let Err(errno) = keep_only_switch_capabilities() {
        eprintln!("cairnd pool: cannot drop capabilities: {errno}");
        return 77;
    }
    runtime::open_page_map();
    // A spare until it is given an app (then `cairn:APP`).
    name_process("(spare)");
    if let Err(errno) = nix::sys::prctl::set_no_new_privs() {
        eprintln!("cairnd pool: cannot set no_new_privs: {errno}");
        return 77;
    }
    // SAFETY: the supervisor started this process with its control socket open at this number
    // (see `spawn`), and nothing else in this process owns it.
    let control =
        std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(protocol::CONTROL_FD) });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cairnd pool: cannot start tokio: {error}");
            return 70;
        }
    };
    // The epoch ticker too: everything up to here is what a spare has done before it is
    // given an app; with a `Prepare` hint it builds the engine for the likeliest app as well.
    let wasm = Runtime::new();
    let title = title_area();
    let mut prepared = None;
    let (start, fds) = loop {
        let (mut messages, fds) = match protocol::receive_with_fds::<ToPool>(&control) {
            Ok(Some(read)) => read,
            // The supervisor went away (or stopped) before it had work for this process.
            Ok(None) => return 0,
            Err(error) => {
                eprintln!("cairnd pool: cannot read Start: {error}");
                return 71;
            }
        };
        let last = messages.pop();
        // Hints that came in the same read as Start are of no more use.
        if let Some(other) = messages
            .iter()
            .find(|message| !matches!(message, ToPool::Prepare { .. }))
        {
            eprintln!("cairnd pool: expected Start first, got {other:?}");
            return 71;
        }
        match last {
            Some(ToPool::Prepare { limits, facts }) if fds.is_empty() => {
                // Best effort: a Start that finds no engine builds its own (and reports why).
                prepared = wasm.prepare_engine(&limits, &facts).ok();
            }
            Some(start @ ToPool::Start { .. }) if fds.len() == protocol::START_FDS => {
                break (start, fds)
            }
            other => {
                eprintln!(
                    "cairnd pool: expected Start with {} descriptors first, got {other:?} with {}",
                    protocol::START_FDS,
                    fds.len()
                );
                return 71;
            }
        }
    };
    let [listener, code, counters, services, connect, roots]: [OwnedFd; protocol::START_FDS] =
        fds.try_into().expect("the count was checked above");
    let counters = match Counters::map(counters) {
        Ok(counters) => Arc::new(counters),
        Err(error) => {
            eprintln!("cairnd pool: cannot map the counters page: {error}");
            return 71;
        }
    };
    if let ToPool::Start { spec, user, .. } = &start {
        if let Err(error) = switch_user(*user) {
            eprintln!("cairnd pool: {error}");
            return 77;
        }
        if let Some(title) = &title {
            title.write(spec.name.as_str());
        }
        name_process(spec.name.as_str());
    }
    // Installed by `Runtime::load` once the code is mapped, before any of it is linked or run.
    let filter = match &start {
        ToPool::Start {
            spec, filter: true, ..
        } => {
            // The page stays mapped for the process's life: the handler may count at any time.
            let kept: &'static Arc<Counters> = Box::leak(Box::new(Arc::clone(&counters)));
            Some(seccomp::Filter::new(
                spec.name.as_str(),
                kept.slot(Counter::SyscallsDenied),
            ))
        }
        _ => None,
    };
    let given = Given {
        listener,
        control,
        code,
        counters,
        services,
        connect,
        roots,
        filter,
    };
    match runtime.block_on(serve(wasm, prepared, start, given)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cairnd pool: {error:#}");
            71
        }
    }
}

/// What a pool was given with `Start`, and the filter it is to install.
struct Given {
    listener: OwnedFd,
    control: std::os::unix::net::UnixStream,
    code: OwnedFd,
    counters: Arc<Counters>,
    /// The host-services socket (`services`): the app's key-value store.
    services: OwnedFd,
    /// The connect socket (`connect`): connections for outgoing requests.
    connect: OwnedFd,
    /// A memfd of PEM certificate authorities for HTTPS calls (empty: none).
    roots: OwnedFd,
    filter: Option<seccomp::Filter>,
}

async fn serve(
    runtime: Arc<Runtime>,
    prepared: Option<runtime::PreparedEngine>,
    start: ToPool,
    given: Given,
) -> anyhow::Result<i32> {
    let Given {
        listener,
        control,
        code,
        counters,
        services,
        connect,
        roots,
        filter,
    } = given;
    control.set_nonblocking(true)?;
    let (mut reader, writer) = tokio::net::UnixStream::from_std(control)?.into_split();

    let ToPool::Start {
        spec,
        generation,
        facts,
        probe,
        serve: serve_at_once,
        confined: confined_at_start,
        run,
        ..
    } = start
    else {
        anyhow::bail!("the supervisor did not send Start first");
    };
    let code = std::fs::File::from(code);

    // One writer task owns the socket's sending half; everything else queues to it.
    let (outgoing, queue) = mpsc::channel::<FromPool>(64);
    let (log_sender, log_queue, log_bytes) = LogQueue::new();
    let writer_task = tokio::spawn(write_messages(writer, queue, log_queue, log_bytes));

    let budget = LogBudget::new(spec.limits.log_rate().0);
    let reporter = reporter(log_sender, budget, Arc::clone(&counters));
    let run_reporter = Arc::clone(&reporter);
    let env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config = host::GuestConfig::of(&spec);
    // An app without `[keyvalue]` never asks: its guests are refused in the pool.
    let kv = match &spec.keyvalue {
        Some(_) => {
            let socket = std::os::unix::net::UnixStream::from(services);
            socket.set_nonblocking(true)?;
            Some(services::Client::start(tokio::net::UnixStream::from_std(
                socket,
            )?))
        }
        None => None,
    };
    let outbound = match outbound_access(&spec, connect, roots) {
        Ok(outbound) => outbound,
        Err(error) => {
            let _ = outgoing.send(FromPool::Failed { error }).await;
            drop(outgoing);
            let _ = writer_task.await;
            return Ok(2);
        }
    };
    let (name, limits) = (spec.name.clone(), spec.limits.clone());
    let command = spec.is_command();
    let handle = tokio::runtime::Handle::current();
    // On this thread (the runtime's `block_on`, not a worker): it built the prepared engine,
    // and a blocking-pool thread would have to be started first.
    let loaded = tokio::task::block_in_place(move || {
        let _entered = handle.enter();
        runtime.load(
            &name,
            &code,
            &facts,
            &limits,
            env,
            config,
            kv,
            outbound,
            reporter,
            probe,
            command,
            prepared,
            filter.as_ref(),
        )
    });
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            let _ = outgoing
                .send(FromPool::Failed {
                    error: error.to_string(),
                })
                .await;
            drop(outgoing);
            let _ = writer_task.await;
            return Ok(2);
        }
    };
    outgoing
        .send(FromPool::Loaded {
            allocator: loaded.allocator.clone(),
        })
        .await?;
    if let Some(args) = run {
        if !confined_at_start {
            anyhow::bail!("asked to run a command before the pool was in its cgroup");
        }
        let end = tokio::select! {
            end = run_command(&loaded, &args, &run_reporter) => end,
            // The supervisor is gone: nobody is left to hear how the run ends, or to bound
            // it, so it ends now (as a serving pool stops).
            _ = supervisor_gone(&mut reader) => return Ok(0),
        };
        outgoing
            .send(FromPool::Finished {
                code: end.code,
                outcome: end.outcome,
            })
            .await?;
        drop(outgoing);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        return Ok(0);
    }
    let Some(http) = &spec.http else {
        // A command's deploy: the proving instance was made at load; nothing is served.
        if let Some(ToPool::Drain { .. }) = protocol::receive(&mut reader).await.ok().flatten() {
            let _ = outgoing.send(FromPool::Draining).await;
        }
        drop(outgoing);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        return Ok(0);
    };
    let serving = Arc::new(Serving::new(
        loaded,
        spec.limits.instances,
        http.connection_limits(),
        Arc::clone(&counters),
    ));

    // Before serving: health checks on request, then Serve (or Drain, if the supervisor
    // decided against this generation).
    if !told_to_serve(
        &mut reader,
        &outgoing,
        &serving,
        serve_at_once,
        confined_at_start,
    )
    .await?
    {
        drop(outgoing);
        let _ = writer_task.await;
        return Ok(0);
    }
    tracing::debug!(app = %spec.name, generation, "pool serving");
    let exit_code = accept_until_told(listener, &serving, &mut reader, &outgoing, &spec).await?;
    drop(outgoing);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    Ok(exit_code)
}

/// Returns once the supervisor has closed the control socket (or it broke); messages before
/// that are ignored.
async fn supervisor_gone(reader: &mut tokio::net::unix::OwnedReadHalf) {
    loop {
        match protocol::receive::<_, ToPool>(reader).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// How often a command's output is sent on while it runs.
const RUN_OUTPUT_EVERY: Duration = Duration::from_millis(100);

/// Runs the command once, sending its output on every `RUN_OUTPUT_EVERY` as it comes (through
/// `reporter`, within the app's log rate, as a request's output).
async fn run_command(
    loaded: &runtime::LoadedApp,
    args: &[String],
    reporter: &runtime::Reporter,
) -> runtime::RunEnd {
    let (stdout, stderr) = (host::OutputCapture::new(), host::OutputCapture::new());
    let run = loaded.run(args, &stdout, &stderr);
    tokio::pin!(run);
    let mut tick = tokio::time::interval(RUN_OUTPUT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            end = &mut run => return end,
            _ = tick.tick() => {
                let (out, err) = (stdout.take(), stderr.take());
                if !out.is_empty() || !err.is_empty() {
                    reporter(RequestReport {
                        outcome: Outcome::Ok,
                        stdout: out,
                        stderr: err,
                        logged: Default::default(),
                        outbound: Default::default(),
                        method: "run".to_string(),
                        path: String::new(),
                    });
                }
            }
        }
    }
}

/// What the app's guests may call out to (`None`: it has no `[outbound]`, every call is
/// refused in the pool). `roots` is a memfd cairnd filled: reading it opens no file.
fn outbound_access(
    spec: &crate::spec::AppSpec,
    connect: OwnedFd,
    roots: OwnedFd,
) -> Result<Option<Arc<outgoing::OutboundAccess>>, String> {
    let Some(outbound) = &spec.outbound else {
        return Ok(None);
    };
    // From the start: cairnd's writes left the shared offset at the end.
    let mut pem = Vec::new();
    let mut file = std::fs::File::from(roots);
    std::io::Seek::rewind(&mut file)
        .and_then(|()| std::io::Read::read_to_end(&mut file, &mut pem))
        .map_err(|e| format!("cannot read the certificate authorities cairnd sent: {e}"))?;
    let connector = connect::Connector::start(connect)
        .map_err(|e| format!("cannot use the connect socket: {e}"))?;
    Ok(Some(Arc::new(outgoing::OutboundAccess {
        connector,
        allowed: outbound.allowed_hosts.clone(),
        timeout: outbound.call_timeout(&spec.limits),
        max_response: outbound.max_response.0,
        tls: outgoing::OutboundAccess::tls(&pem)?,
    })))
}

/// Accepts and serves on `listener` until the supervisor says to drain (or goes away), or
/// the app has been idle for its idle time; then drains. Returns the exit code.
async fn accept_until_told(
    listener: OwnedFd,
    serving: &Arc<Serving>,
    reader: &mut tokio::net::unix::OwnedReadHalf,
    outgoing: &mpsc::Sender<FromPool>,
    spec: &crate::spec::AppSpec,
) -> anyhow::Result<i32> {
    let listener = std::net::TcpListener::from(listener);
    listener.set_nonblocking(true)?;
    let mut server = HttpServer::start(
        tokio::net::TcpListener::from_std(listener)?,
        Arc::clone(serving),
    );

    let idle = spec.limits.idle.map(|idle| idle.0);
    let (grace, exit_code) = loop {
        tokio::select! {
            message = protocol::receive(reader) => match message {
                Ok(Some(ToPool::Drain { grace_ms })) => {
                    // Say so once nothing new can arrive here: the supervisor returns a
                    // deploy only then, so a request after it reaches the new generation.
                    server.stop_accepting().await;
                    outgoing.send(FromPool::Draining).await?;
                    break (Duration::from_millis(grace_ms), 0);
                }
                Ok(Some(other)) => tracing::warn!(?other, "ignored while serving"),
                // The supervisor is gone: stop soon rather than serve unsupervised.
                Ok(None) | Err(_) => break (Duration::from_secs(1), 0),
            },
            _ = idle_for(idle, serving) => break (Duration::from_secs(1), protocol::IDLE_EXIT),
        }
    };
    server.shutdown(grace).await;
    Ok(exit_code)
}

/// The one task that owns the control socket's sending half: messages first, log lines
/// batched behind them, and what is left of the logs flushed before the socket closes.
async fn write_messages(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut queue: mpsc::Receiver<FromPool>,
    mut log_queue: mpsc::Receiver<LogChunk>,
    log_bytes: Arc<std::sync::atomic::AtomicUsize>,
) {
    let taken = |chunk: &LogChunk| {
        log_bytes.fetch_sub(chunk.text.len(), std::sync::atomic::Ordering::AcqRel);
    };
    loop {
        let message = tokio::select! {
            biased;
            message = queue.recv() => match message {
                Some(message) => message,
                None => break,
            },
            Some(first) = log_queue.recv() => {
                taken(&first);
                let mut size = first.text.len();
                let mut lines = vec![first];
                // A chunk is at most 64 KiB, so a frame ends under 128 KiB of text: 768 KiB
                // of JSON at worst, under protocol::MAX_FRAME.
                while lines.len() < 256 && size < LOG_FRAME_BYTES {
                    match log_queue.try_recv() {
                        Ok(line) => {
                            taken(&line);
                            size += line.text.len();
                            lines.push(line);
                        }
                        Err(_) => break,
                    }
                }
                FromPool::Logs { lines }
            }
        };
        if protocol::send(&mut writer, &message).await.is_err() {
            break;
        }
    }
    // Flush what is left of the logs before the socket closes, a frame at a time.
    let mut lines = Vec::new();
    let mut size = 0;
    while let Ok(line) = log_queue.try_recv() {
        size += line.text.len();
        lines.push(line);
        if size >= LOG_FRAME_BYTES {
            let batch = FromPool::Logs {
                lines: std::mem::take(&mut lines),
            };
            if protocol::send(&mut writer, &batch).await.is_err() {
                return;
            }
            size = 0;
        }
    }
    if !lines.is_empty() {
        let _ = protocol::send(&mut writer, &FromPool::Logs { lines }).await;
    }
}

/// Waits, before serving, until the supervisor says to serve and the pool is in its cgroup,
/// answering health checks meanwhile. False: told to drain instead (or the supervisor left).
async fn told_to_serve(
    reader: &mut tokio::net::unix::OwnedReadHalf,
    outgoing: &mpsc::Sender<FromPool>,
    serving: &Serving,
    serve_at_once: bool,
    confined_at_start: bool,
) -> anyhow::Result<bool> {
    let (mut told_to_serve, mut confined) = (serve_at_once, confined_at_start);
    while !(told_to_serve && confined) {
        match protocol::receive(reader).await? {
            Some(ToPool::Confined) => confined = true,
            Some(ToPool::Probe { .. }) if !confined => {
                anyhow::bail!("asked to run guest code before the pool was in its cgroup")
            }
            Some(ToPool::Probe { path }) => {
                let answer = serving.probe(&path).await;
                let (status, error) = match answer {
                    Ok(status) => (Some(status), String::new()),
                    Err(error) => (None, error),
                };
                outgoing.send(FromPool::Probed { status, error }).await?;
            }
            Some(ToPool::Serve) => told_to_serve = true,
            Some(ToPool::Drain { .. }) | None => return Ok(false),
            Some(ToPool::Start { .. }) => anyhow::bail!("Start sent twice"),
            Some(ToPool::Prepare { .. }) => anyhow::bail!("Prepare sent after Start"),
        }
    }
    Ok(true)
}

/// Names this process after its app where `top` and `ps -o comm` look (the kernel keeps 15
/// bytes: `cairn:` and the app name, cut), instead of `exe` (pools are exec'd through
/// /proc/self/exe). Best effort.
fn name_process(app: &str) {
    let mut name = format!("cairn:{app}").into_bytes();
    name.truncate(15);
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}

/// Where a spare's placeholder title is in this process's command line (the memory the
/// kernel shows as /proc/PID/cmdline), found before the spare is given an app so that naming
/// it costs no reads then. `None` where the kernel does not say where that memory is
/// (qemu-user's emulated /proc) or it does not hold the placeholder.
fn title_area() -> Option<TitleArea> {
    let placeholder = protocol::spare_title();
    let (start, end) = argument_area()?;
    let cmdline = std::fs::read("/proc/self/cmdline").ok()?;
    if cmdline.len() as u64 != end - start {
        return None;
    }
    let mut wanted = placeholder.clone().into_bytes();
    wanted.push(0);
    let offset = cmdline
        .windows(wanted.len())
        .position(|window| window == wanted.as_slice())
        .filter(|offset| *offset > 0 && cmdline[offset - 1] == 0)?;
    Some(TitleArea {
        at: start as usize + offset,
        placeholder,
    })
}

/// The placeholder's address in this process's arguments (`title_area`).
struct TitleArea {
    at: usize,
    placeholder: String,
}

impl TitleArea {
    /// Writes the app's name over the placeholder, so `ps` says whose pool this is.
    fn write(&self, name: &str) {
        let length = self.placeholder.len();
        let mut title = name.as_bytes().to_vec();
        title.truncate(length);
        title.resize(length, 0);
        let at = self.at as *mut u8;
        // SAFETY: the kernel said this process's arguments live at `start..end` of its own
        // address space and /proc/self/cmdline (read from that very memory) matched them in
        // length and held the placeholder at `at` (`title_area`); the bytes written stay
        // inside the placeholder. Nothing in this process reads its original argv after
        // argument parsing.
        unsafe {
            if std::slice::from_raw_parts(at, length) == self.placeholder.as_bytes() {
                std::ptr::copy_nonoverlapping(title.as_ptr(), at, length);
            }
        }
    }
}

/// Where this process's arguments are (`arg_start`, `arg_end`, fields 48 and 49 of
/// /proc/self/stat), if the kernel says.
fn argument_area() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let start: u64 = fields.get(45)?.parse().ok()?;
    let end: u64 = fields.get(46)?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}

/// Resolves once no request has run for `idle` (never, without an idle time). The supervisor
/// keeps the listener and starts a new pool when the next connection arrives.
async fn idle_for(idle: Option<Duration>, serving: &Serving) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if serving.idle_for().is_some_and(|quiet| quiet >= idle) {
            return;
        }
    }
}

/// Turns what a request left behind into log chunks and counters.
/// The first 256 bytes of `text` (at a character boundary), marked when cut.
fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    const MOST: usize = 256;
    if text.len() <= MOST {
        return text.into();
    }
    let mut clipped = text.to_string();
    cairn_core::text::cut(&mut clipped, MOST, "…");
    clipped.into()
}

/// The app's `log_rate`: a token bucket of output bytes, refilled at the rate and holding at
/// most `LOG_BURST_SECONDS` of it. Output beyond it is dropped at the source, before it costs
/// a copy, a frame or a row; a note says so at most once per `NOTE_EVERY`.
struct LogBudget {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, std::time::Instant, Option<std::time::Instant>)>,
}

impl LogBudget {
    const NOTE_EVERY: Duration = Duration::from_secs(10);

    fn new(rate: u64) -> LogBudget {
        let burst = rate.saturating_mul(crate::spec::LOG_BURST_SECONDS) as f64;
        LogBudget {
            rate: rate as f64,
            burst,
            state: std::sync::Mutex::new((burst, std::time::Instant::now(), None)),
        }
    }

    /// Takes `bytes` from the budget if it holds them. `Err(true)`: refused, and a note about
    /// it is due.
    fn take(&self, bytes: usize) -> Result<(), bool> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, refilled, noted) = &mut *state;
        *tokens =
            (*tokens + now.duration_since(*refilled).as_secs_f64() * self.rate).min(self.burst);
        *refilled = now;
        if *tokens >= bytes as f64 {
            *tokens -= bytes as f64;
            return Ok(());
        }
        let due = noted.is_none_or(|at| now.duration_since(at) >= Self::NOTE_EVERY);
        if due {
            *noted = Some(now);
        }
        Err(due)
    }
}

fn reporter(logs: LogQueue, budget: LogBudget, counters: Arc<Counters>) -> runtime::Reporter {
    Arc::new(move |report: RequestReport| {
        let send = |stream: &str, text: String| {
            let lines = text.lines().count().max(1) as u64;
            let chunk = LogChunk {
                stream: stream.to_string(),
                text,
            };
            if !logs.offer(chunk) {
                counters.add(Counter::LogLinesDropped, lines);
            }
        };
        // Within the app's log_rate, else dropped and counted (cairn's own notes on its
        // requests too: a guest that traps on every request must not flood either).
        let budgeted = |stream: &str, output: &[u8]| match budget.take(output.len()) {
            Ok(()) => send(stream, String::from_utf8_lossy(output).into_owned()),
            Err(note) => {
                let newlines = output.iter().filter(|byte| **byte == b'\n').count();
                let lines = (newlines + usize::from(!output.ends_with(b"\n"))).max(1);
                counters.add(Counter::LogLinesDropped, lines as u64);
                if note {
                    send(
                        "cairn",
                        format!(
                            "output beyond log_rate ({}/s) is being dropped (cairnctl status APP counts the lines)",
                            crate::spec::ByteSize(budget.rate as u64)
                        ),
                    );
                }
            }
        };
        for (stream, output) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
            if !output.is_empty() {
                budgeted(stream, output);
            }
        }
        for (level, line) in &report.logged.lines {
            budgeted(level, line.as_bytes());
        }
        if report.outbound.denied > 0 {
            counters.add(Counter::OutboundDenied, report.outbound.denied);
            let mut note = format!(
                "{} {}: outgoing HTTP refused: {}",
                clip(&report.method),
                clip(&report.path),
                report.outbound.noted.join(", ")
            );
            let more = report.outbound.denied - report.outbound.noted.len() as u64;
            if more > 0 {
                note.push_str(&format!(" and {more} more"));
            }
            budgeted("cairn", note.as_bytes());
        }
        if report.logged.cut {
            budgeted(
                "cairn",
                b"[cairn: wasi:logging lines of this request cut at 64KiB]",
            );
        }
        // A method or path can be as long as the head allows (up to 1 MiB): only its start is
        // worth a log line, and the frame bound must hold.
        let (method, path) = (clip(&report.method), clip(&report.path));
        match &report.outcome {
            Outcome::Ok => {}
            Outcome::Trap(message) => {
                counters.add(Counter::Traps, 1);
                budgeted(
                    "cairn",
                    format!("{method} {path} trapped: {message}").as_bytes(),
                );
            }
            Outcome::Timeout => {
                counters.add(Counter::Timeouts, 1);
                budgeted(
                    "cairn",
                    format!("{method} {path} stopped at its timeout").as_bytes(),
                );
            }
            Outcome::NoResponse => budgeted(
                "cairn",
                format!("{method} {path} returned without a response").as_bytes(),
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_allows_a_burst_then_its_rate_and_notes_a_refusal_once() {
        let budget = LogBudget::new(1000);
        // A full bucket: four seconds of the rate at once.
        assert_eq!(budget.take(4000), Ok(()));
        assert_eq!(budget.take(500), Err(true), "the first refusal is noted");
        assert_eq!(
            budget.take(500),
            Err(false),
            "the next ones within 10 s are not"
        );
        std::thread::sleep(Duration::from_millis(60));
        // About 60 bytes came back; never more than the burst.
        assert_eq!(budget.take(40), Ok(()));
        assert_eq!(budget.take(4000), Err(false));
    }
}

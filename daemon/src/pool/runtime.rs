//! The pool's side of wasmtime: it builds one `Engine` per app with the pooling allocator
//! sized from the app's limits (settings from `engine`), loads the code the supervisor
//! compiled, links WASI and `wasi:http` with every capability the app was not granted denied,
//! and serves one HTTP request on a fresh instance made from a cached pre-instantiated
//! component. One epoch-ticker thread drives every deadline.
//!
//! Invariants: a request never compiles (code is loaded when an app is prepared); every
//! request gets its own `Store`, so no state leaks between requests; each request is bounded
//! by an epoch deadline and a memory cap, and a guest failure is reported, never fatal to the
//! host. This module knows nothing of the store, the reconciler or the control API.

use super::host::{GuestConfig, Host, KvAccess, OutputCapture};
use super::outgoing::{Denials, OutboundAccess, OutgoingHttp};
use super::seccomp;
use super::services::Client;
use crate::counters::InFlight;
use crate::engine::{
    code_config, memory_reservation, pooled_config, CodeFacts, RuntimeError, Sizing,
    POOLING_ALLOCATOR,
};
use crate::spec::{AppName, Limits};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Engine, EngineWeak, PoolingAllocationConfig, Store, StoreLimitsBuilder, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

/// How often the epoch advances; request deadlines are measured in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The outcome of one request, reported when its instance is gone.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok,
    Trap(String),
    Timeout,
    /// The guest returned without ever setting a response.
    NoResponse,
}

/// What one request left behind, for logs and counters.
pub struct RequestReport {
    pub outcome: Outcome,
    pub stdout: Bytes,
    pub stderr: Bytes,
    /// What it logged through `wasi:logging`.
    pub logged: super::host::GuestLog,
    /// The outgoing requests it was refused.
    pub outbound: Denials,
    pub method: String,
    pub path: String,
}

pub type Reporter = Arc<dyn Fn(RequestReport) + Send + Sync>;

/// The pool's runtime state: the epoch ticker and the engines it drives.
pub struct Runtime {
    engines: Arc<Mutex<Vec<EngineWeak>>>,
}

impl Runtime {
    /// Starts the one epoch-ticker thread that drives every app's request deadlines.
    pub fn new() -> Arc<Runtime> {
        let engines: Arc<Mutex<Vec<EngineWeak>>> = Arc::default();
        let ticked = Arc::clone(&engines);
        std::thread::Builder::new()
            .name("cairn-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                let mut engines = ticked.lock().unwrap_or_else(|p| p.into_inner());
                engines.retain(|weak| match weak.upgrade() {
                    Some(engine) => {
                        engine.increment_epoch();
                        true
                    }
                    None => false,
                });
            })
            .expect("the epoch thread starts");
        Arc::new(Runtime { engines })
    }

    /// Builds, ahead of any app, what loading an app of these limits and code sizes starts
    /// with: its engine (pooling allocator) and a linker holding every host interface. A spare
    /// pool process does this while it waits, for the sizing of the last app started (the
    /// likeliest next one); `load` uses it when the app's sizing is the same.
    pub fn prepare_engine(
        &self,
        limits: &Limits,
        facts: &CodeFacts,
    ) -> Result<PreparedEngine, RuntimeError> {
        let engine = Engine::new(&pooled_config(limits, facts))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let linker = host_linker(&engine)?;
        Ok(PreparedEngine {
            sizing: Sizing::of(limits, facts),
            engine,
            linker,
        })
    }

    /// The pooled engine and linker for an app: `prepared` when it was built for the same
    /// sizing, else new ones.
    fn pooled_engine(
        &self,
        limits: &Limits,
        facts: &CodeFacts,
        prepared: Option<PreparedEngine>,
    ) -> Result<PreparedEngine, RuntimeError> {
        match prepared.filter(|p| p.sizing == Sizing::of(limits, facts)) {
            Some(prepared) => Ok(prepared),
            None => self.prepare_engine(limits, facts),
        }
    }

    /// Loads precompiled code (a file, mapped rather than copied) into an engine of the app's
    /// own (`prepared`, when it fits) and links it; with `probe`, also proves that one
    /// instance can be made (skipped only where this code already ran with the pooling
    /// allocator under the same limits). Errors here mean the app cannot run and nothing was
    /// changed. Call it where blocking is allowed, inside the tokio runtime's context.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        &self,
        app: &AppName,
        code: &std::fs::File,
        facts: &CodeFacts,
        limits: &Limits,
        env: Vec<(String, String)>,
        config: GuestConfig,
        kv: Option<Arc<Client>>,
        outbound: Option<Arc<OutboundAccess>>,
        reporter: Reporter,
        probe: bool,
        command: bool,
        prepared: Option<PreparedEngine>,
        filter: Option<&seccomp::Filter>,
    ) -> Result<LoadedApp, RuntimeError> {
        let settings = AppSettings {
            name: app.clone(),
            env,
            config: Arc::new(config),
            kv,
            outbound,
            memory: memory_reservation(limits) as usize,
            timeout: limits.timeout.0,
            reporter,
            command,
        };
        // Where the pooling allocator cannot be had (its engine or its first instance), the
        // app still runs, with on-demand allocation.
        let (pooled_attempt, fallback_reason) = match self.pooled_engine(limits, facts, prepared) {
            Ok(pooled) => {
                match self.prepare(
                    &pooled.engine,
                    pooled.linker,
                    code,
                    &settings,
                    probe,
                    filter,
                ) {
                    Ok(loaded) => (Some(loaded), None),
                    Err(RuntimeError::Instantiate(reason)) => (None, Some(reason)),
                    Err(other) => return Err(other),
                }
            }
            Err(RuntimeError::Engine(reason)) => (None, Some(reason)),
            Err(other) => return Err(other),
        };
        let mut loaded = match pooled_attempt {
            Some(loaded) => loaded,
            None => {
                let engine = Engine::new(&code_config(limits))
                    .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
                let linker = host_linker(&engine)?;
                // Without `probe` no instance is made here either: the pool may not be in its cgroup yet.
                let mut loaded = self.prepare(&engine, linker, code, &settings, probe, filter)?;
                loaded.allocator = format!(
                    "on-demand (the pooling allocator was refused: {})",
                    fallback_reason.unwrap_or_default()
                );
                loaded
            }
        };
        loaded.timeout = Some(limits.timeout.0);
        self.engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(loaded.engine.weak());
        Ok(loaded)
    }

    /// Deserialises in `engine`, installs `filter` (from then on the process opens no files),
    /// and links with `linker` (of that engine); with `probe`, instantiates once.
    fn prepare(
        &self,
        engine: &Engine,
        linker: Linker<Host>,
        code: &std::fs::File,
        settings: &AppSettings,
        probe: bool,
        filter: Option<&seccomp::Filter>,
    ) -> Result<LoadedApp, RuntimeError> {
        let component = deserialize_file(engine, code)?;
        if let Some(filter) = filter {
            filter
                .install()
                .map_err(|error| RuntimeError::Sandbox(error.to_string()))?;
        }
        let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
            RuntimeError::Link(format!(
                "{e:#}; cairn provides wasi:cli, wasi:clocks, wasi:random, wasi:io, wasi:filesystem, \
                 wasi:sockets and wasi:http at 0.2.x, and {}",
                super::interfaces::PROVIDED
            ))
        })?;
        let pre = if settings.command {
            CommandPre::new(instance_pre).map(Entry::Command)
        } else {
            ProxyPre::new(instance_pre).map(Entry::Proxy)
        }
        .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        let loaded = LoadedApp {
            engine: engine.clone(),
            pre,
            allocator: POOLING_ALLOCATOR.to_string(),
            timeout: None,
            settings: Arc::new(AppSettings {
                name: settings.name.clone(),
                env: settings.env.clone(),
                config: Arc::clone(&settings.config),
                kv: settings.kv.clone(),
                outbound: settings.outbound.clone(),
                memory: settings.memory,
                timeout: settings.timeout,
                reporter: Arc::clone(&settings.reporter),
                command: settings.command,
            }),
        };
        if probe {
            loaded.probe()?;
        }
        Ok(loaded)
    }
}

/// A linker with every host interface an app may import (what it was not granted is denied
/// per request, in `Host`).
fn host_linker(engine: &Engine) -> Result<Linker<Host>, RuntimeError> {
    let mut linker: Linker<Host> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
    super::interfaces::add_to_linker(&mut linker)
        .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
    Ok(linker)
}

/// An engine and linker built before the app was known (`Runtime::prepare_engine`).
pub struct PreparedEngine {
    sizing: Sizing,
    engine: Engine,
    linker: Linker<Host>,
}

/// Deserialises the code in `file`, mapping it through its /proc path (wasmtime maps what it
/// opens, so nothing is copied); where that cannot work (no /proc, a policy against executable
/// file mappings, the system-call filter already on: the second engine of a fallback to
/// on-demand allocation), from a copy of its bytes.
fn deserialize_file(engine: &Engine, file: &std::fs::File) -> Result<Component, RuntimeError> {
    let error = if seccomp::installed() {
        wasmtime::Error::msg("the pool opens no files once filtered")
    } else {
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        // SAFETY: as in `Runtime::inspect`; the supervisor hands the pool a sealed memfd of
        // code it checked, which nothing can change after.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(error) => error,
        }
    };
    let copy = (|| {
        let length = file.metadata()?.len() as usize;
        let mut bytes = vec![0; length];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, 0)?;
        Ok::<_, std::io::Error>(bytes)
    })()
    .map_err(|e| RuntimeError::Invalid(format!("{error:#}; reading the code failed too: {e}")))?;
    // SAFETY: as above.
    unsafe { Component::deserialize(engine, copy) }
        .map_err(|e| RuntimeError::Invalid(format!("{e:#}")))
}

/// One line for the log: the trap itself when there is one (the wasm backtrace of an app built
/// without names is noise to an operator), else the error chain.
fn describe_failure(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

/// Opens this process's page map for the pooling allocator, which resets a freed instance
/// slot by asking the kernel which pages the guest wrote (`PAGEMAP_SCAN`, Linux 6.7+) and
/// resetting only those. Call it before a pool switches to its unprivileged user: from then on
/// the process is not dumpable, its /proc files belong to root, the open is refused, and every
/// freed slot would be reset by memset of its whole memory (and a fresh pool would fault in
/// every page of it). wasmtime keeps the file open for the life of the process; where the
/// kernel does not answer the scan (older kernels, qemu-user) slots are reset by memset.
pub fn open_page_map() {
    PoolingAllocationConfig::is_pagemap_scan_available();
}

struct AppSettings {
    name: AppName,
    env: Vec<(String, String)>,
    config: Arc<GuestConfig>,
    /// The app's key-value store, when it has `[keyvalue]`.
    kv: Option<Arc<Client>>,
    /// What the app's guests may call, when it has `[outbound]`.
    outbound: Option<Arc<OutboundAccess>>,
    memory: usize,
    timeout: Duration,
    reporter: Reporter,
    /// Run the code as a command (`wasi:cli/run`), not as an HTTP handler.
    command: bool,
}

/// An app ready to serve: its engine, its linked pre-instance and its per-request settings.
pub struct LoadedApp {
    engine: Engine,
    pre: Entry,
    /// `pooling`, or `on-demand (why)`.
    pub allocator: String,
    /// Each request's deadline; `None` while the proving instance is made (at load).
    timeout: Option<Duration>,
    settings: Arc<AppSettings>,
}

/// The code's linked entry point: the HTTP handler, or a command's `run`.
#[derive(Clone)]
enum Entry {
    Proxy(ProxyPre<Host>),
    Command(CommandPre<Host>),
}

/// How a command's run ended (`LoadedApp::run`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    /// The exit code `cairnctl run` ends with: the guest's own, or 124 when it was stopped
    /// at its timeout, 134 when it trapped.
    pub code: i32,
    /// `exit N`, `timeout`, `trap: why`.
    pub outcome: String,
}

/// The exit code of a run stopped at its timeout (as `timeout(1)` says)…
pub const RUN_TIMEOUT_CODE: i32 = 124;
/// …and of one that trapped (128 + SIGABRT, as a native program that aborts).
pub const RUN_TRAP_CODE: i32 = 134;

/// Why a request got no response from the guest.
#[derive(Debug)]
pub enum RequestFailure {
    Guest(Outcome),
    /// The guest answered with an error code instead of a response.
    ErrorCode(String),
    /// The request could not be handed to the guest (malformed request).
    Host(String),
}

impl LoadedApp {
    fn new_store(
        &self,
        stdout: &OutputCapture,
        stderr: &OutputCapture,
        args: &[String],
    ) -> Store<Host> {
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.settings.env)
            .arg(self.settings.name.as_str())
            .args(args)
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let host = Host {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.settings.memory)
                .build(),
            hooks: OutgoingHttp::new(self.settings.outbound.clone()),
            config: Arc::clone(&self.settings.config),
            logged: Default::default(),
            kv: KvAccess::new(self.settings.kv.clone()),
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|host| &mut host.limits);
        match self.timeout {
            // Guest code that runs on without waiting gives its thread back at every epoch
            // tick, so the pool's few threads still serve other connections (and the 503s
            // past the instance limit) while every instance spins; at its deadline it is
            // stopped (a trap, `Trap::Interrupt`).
            Some(timeout) => {
                let deadline = std::time::Instant::now() + timeout;
                store.set_epoch_deadline(1);
                store.epoch_deadline_callback(move |_| {
                    Ok(if std::time::Instant::now() >= deadline {
                        UpdateDeadline::Interrupt
                    } else {
                        UpdateDeadline::Yield(1)
                    })
                });
            }
            None => {
                store.set_epoch_deadline(u64::MAX);
                store.epoch_deadline_trap();
            }
        }
        store
    }

    /// Makes one instance and drops it: proves linking and pool sizing work before serving.
    fn probe(&self) -> Result<(), RuntimeError> {
        let capture = OutputCapture::new();
        let mut store = self.new_store(&capture, &capture, &[]);
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        // `load` runs on a blocking thread (compiling is CPU work), so blocking here is fine.
        let made = match &self.pre {
            Entry::Proxy(pre) => handle.block_on(pre.instantiate_async(&mut store)).map(drop),
            Entry::Command(pre) => handle.block_on(pre.instantiate_async(&mut store)).map(drop),
        };
        made.map_err(|e| RuntimeError::Instantiate(format!("{e:#}")))
    }

    /// Runs the command once with `args` (after the app's name) on a fresh instance, its
    /// output captured in `stdout` and `stderr` (which the caller empties as it goes), bounded
    /// by the app's timeout. What it logged through `wasi:logging` and the outgoing calls it
    /// was refused are reported as a request's are.
    pub async fn run(
        &self,
        args: &[String],
        stdout: &OutputCapture,
        stderr: &OutputCapture,
    ) -> RunEnd {
        let Entry::Command(pre) = &self.pre else {
            return RunEnd {
                code: RUN_TRAP_CODE,
                outcome: "the code was loaded to serve HTTP, not to run".to_string(),
            };
        };
        let mut store = self.new_store(stdout, stderr, args);
        let run = async {
            let command = pre.instantiate_async(&mut store).await?;
            command.wasi_cli_run().call_run(&mut store).await
        };
        let timeout = self.settings.timeout;
        let end = match tokio::time::timeout(timeout + EPOCH_TICK * 2, run).await {
            Ok(Ok(Ok(()))) => RunEnd {
                code: 0,
                outcome: "exit 0".to_string(),
            },
            Ok(Ok(Err(()))) => RunEnd {
                code: 1,
                outcome: "exit 1".to_string(),
            },
            Ok(Err(error)) => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => RunEnd {
                    code: exit.0,
                    outcome: format!("exit {}", exit.0),
                },
                None if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => RunEnd {
                    code: RUN_TIMEOUT_CODE,
                    outcome: format!("stopped at its timeout ({timeout:?})"),
                },
                None => RunEnd {
                    code: RUN_TRAP_CODE,
                    outcome: format!("trapped: {}", describe_failure(&error)),
                },
            },
            Err(_elapsed) => RunEnd {
                code: RUN_TIMEOUT_CODE,
                outcome: format!("stopped at its timeout ({timeout:?})"),
            },
        };
        let logged = std::mem::take(&mut store.data_mut().logged);
        let outbound = store.data_mut().hooks.take();
        drop(store);
        (self.settings.reporter)(RequestReport {
            outcome: Outcome::Ok,
            stdout: stdout.take(),
            stderr: stderr.take(),
            logged,
            outbound,
            method: "run".to_string(),
            path: String::new(),
        });
        end
    }

    /// Serves one request on a fresh instance. `permit` is the request's concurrency slot; it is
    /// held until the instance is gone, even if the response was sent earlier.
    pub async fn handle<B>(
        &self,
        request: hyper::Request<B>,
        permit: OwnedSemaphorePermit,
        in_flight: InFlight,
    ) -> Result<hyper::Response<HyperOutgoingBody>, RequestFailure>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let stdout = OutputCapture::new();
        let stderr = OutputCapture::new();
        let Entry::Proxy(pre) = &self.pre else {
            return Err(RequestFailure::Host(
                "the app is a command; it serves no HTTP".to_string(),
            ));
        };
        let pre = pre.clone();
        let mut store = self.new_store(&stdout, &stderr, &[]);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(
                wasmtime_wasi_http::p2::bindings::http::types::Scheme::Http,
                request,
            )
            .map_err(|e| RequestFailure::Host(format!("{e:#}")))?;
        let outparam = store
            .data_mut()
            .http()
            .new_response_outparam(sender)
            .map_err(|e| RequestFailure::Host(format!("{e:#}")))?;
        let settings = Arc::clone(&self.settings);
        let guest = async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
            };
            // The epoch deadline stops guest code; this stops a guest parked on host I/O.
            let outcome = match tokio::time::timeout(settings.timeout + EPOCH_TICK * 2, run).await {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(error)) if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                    Outcome::Timeout
                }
                Ok(Err(error)) => Outcome::Trap(describe_failure(&error)),
                Err(_elapsed) => Outcome::Timeout,
            };
            let logged = std::mem::take(&mut store.data_mut().logged);
            let outbound = store.data_mut().hooks.take();
            drop(store);
            (settings.reporter)(RequestReport {
                outcome: outcome.clone(),
                stdout: stdout.take(),
                stderr: stderr.take(),
                logged,
                outbound,
                method,
                path,
            });
            // Only now, so a drain that waits for the slots finds the report queued.
            drop(permit);
            drop(in_flight);
            outcome
        };
        // The guest runs right here, in the connection's task: most guests answer and finish
        // in one go, and a task of its own would cost a spawn and a hand-off per request. Only
        // a guest still running once it has answered (a streamed body) moves to a task, so
        // that hyper can send its answer meanwhile.
        enum First<A> {
            Finished(Outcome),
            /// Answered (or gave up its outparam unanswered) and still running.
            Answered(A),
        }
        let mut guest = Detached::new(guest);
        let mut receiver = receiver;
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(outcome) = guest.poll(cx) {
                return Poll::Ready(First::Finished(outcome));
            }
            Pin::new(&mut receiver).poll(cx).map(First::Answered)
        })
        .await;
        // The answer, or the outcome of a guest that gave none.
        let answer = match first {
            First::Answered(Ok(answer)) => {
                guest.detach();
                Ok(answer)
            }
            // The guest dropped its outparam unanswered and runs on: its outcome says why.
            First::Answered(Err(_unanswered)) => {
                Err(std::future::poll_fn(|cx| guest.poll(cx)).await)
            }
            First::Finished(outcome) => receiver.try_recv().map_err(|_| outcome),
        };
        match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(RequestFailure::ErrorCode(format!("{code:?}"))),
            Err(Outcome::Ok) => Err(RequestFailure::Guest(Outcome::NoResponse)),
            Err(outcome) => Err(RequestFailure::Guest(outcome)),
        }
    }
}

/// A guest's run, polled in place until it is finished or detached. Dropped unfinished (the
/// client went away, the connection closed) it is detached too: a guest always runs to its
/// end, so its slot is freed, and its output and outcome reported, as if it had a task of its
/// own from the start.
struct Detached<F: Future<Output = Outcome> + Send + 'static> {
    run: Option<Pin<Box<F>>>,
}

impl<F: Future<Output = Outcome> + Send + 'static> Detached<F> {
    fn new(run: F) -> Self {
        Detached {
            run: Some(Box::pin(run)),
        }
    }

    /// Polls the run; a panic in it ends it as a trap would (a task would have caught it).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Pending;
        };
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.as_mut().poll(cx)));
        let outcome = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(outcome)) => outcome,
            Err(panic) => Outcome::Trap(format!(
                "the host panicked while running it: {}",
                panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or(panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)")
            )),
        };
        self.run = None;
        Poll::Ready(outcome)
    }

    /// Lets the run go on in a task of its own.
    fn detach(&mut self) {
        if let Some(run) = self.run.take() {
            // Outside a runtime (it is shutting down) there is nothing left to run it on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(run);
            }
        }
    }
}

impl<F: Future<Output = Outcome> + Send + 'static> Drop for Detached<F> {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_panic_while_running_a_guest_ends_it_as_a_trap() {
        let mut run = Detached::new(async { panic!("a host function broke") });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match run.poll(&mut cx) {
            Poll::Ready(Outcome::Trap(message)) => assert_eq!(
                message,
                "the host panicked while running it: a host function broke"
            ),
            Poll::Ready(_) => panic!("a panic must end the run as a trap"),
            Poll::Pending => panic!("a run that panicked is finished"),
        }
        // Finished: polled again it stays quiet instead of polling a panicked future.
        assert!(run.poll(&mut cx).is_pending());
    }

    #[test]
    fn a_run_dropped_unfinished_goes_on_to_its_end() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        runtime.block_on(async move {
            let mut run = Detached::new(async move {
                let _ = wait.await;
                let _ = done.send(());
                Outcome::Ok
            });
            // Started, waiting; then the connection that ran it goes away.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(run.poll(&mut cx).is_pending());
            drop(run);
            go.send(())
                .expect("the dropped run is still alive, moved to a task");
            tokio::time::timeout(Duration::from_secs(10), finished)
                .await
                .expect("the run reaches its end")
                .expect("the run finished rather than being dropped");
        });

        // Outside a runtime there is nothing to run it on: it is dropped, without a panic.
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut run = Detached::new(async move {
            let _ = wait.await;
            Outcome::Ok
        });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(run.poll(&mut cx).is_pending());
        drop(run);
        assert!(
            go.send(()).is_err(),
            "the run was dropped with its receiver"
        );
    }

    #[test]
    fn a_prepared_engine_is_used_only_for_its_own_sizing() {
        let runtime = Runtime::new();
        let limits = Limits::default();
        let facts = CodeFacts {
            memories: 1,
            tables: 1,
            max_initial_table_size: Some(100),
            http: true,
            command: false,
        };
        let prepared = runtime.prepare_engine(&limits, &facts).unwrap();
        let engine = prepared.engine.clone();
        let used = runtime
            .pooled_engine(&limits, &facts, Some(prepared))
            .unwrap();
        assert!(
            Engine::same(&used.engine, &engine),
            "the prepared engine fits and is used"
        );

        // Any difference that changes the engine's settings gets an engine of its own.
        let more_instances = Limits {
            instances: limits.instances + 1,
            ..limits.clone()
        };
        let more_memory = Limits {
            memory: crate::spec::ByteSize(limits.memory.0 * 2),
            ..limits.clone()
        };
        let two_memories = CodeFacts {
            memories: 2,
            ..facts
        };
        for (other_limits, other_facts) in [
            (&more_instances, &facts),
            (&more_memory, &facts),
            (&limits, &two_memories),
        ] {
            let prepared = runtime.prepare_engine(&limits, &facts).unwrap();
            let engine = prepared.engine.clone();
            let used = runtime
                .pooled_engine(other_limits, other_facts, Some(prepared))
                .unwrap();
            assert!(!Engine::same(&used.engine, &engine));
        }
        // Limits that only the cgroup enforces do not change the engine.
        let capped = Limits {
            cpu: Some(0.5),
            pids: Some(10),
            ..limits.clone()
        };
        let prepared = runtime.prepare_engine(&limits, &facts).unwrap();
        let engine = prepared.engine.clone();
        let used = runtime
            .pooled_engine(&capped, &facts, Some(prepared))
            .unwrap();
        assert!(Engine::same(&used.engine, &engine));
    }
}

//! Starting pool processes. The supervisor re-executes its own binary as `cairnd pool` with a
//! control socketpair at a fixed descriptor number; the process drops its privileges, builds its
//! runtime and waits. One such process is kept ready as a spare. To start an app's pool the
//! supervisor takes the spare (or starts a process), moves it into the app's cgroup, sends
//! `Start` with the app's listener, its precompiled code (a sealed memfd) and its counters page
//! attached, and waits until it has loaded. After that it forwards the pool's log output to
//! the log pipeline and reports the pool's exit.
//!
//! Raw `dup2` is called between fork and exec (`pre_exec`) because that is the only place the
//! child's descriptor table can be arranged; nothing else happens there.

use crate::counters::Counters;
use crate::engine::CodeFacts;
use crate::limits::{AppCgroup, Cgroups, PoolLimits};
use crate::logs::LogHub;
use crate::pool::protocol::{self, FromPool, ToPool};
use crate::spec::{AppName, AppSpec, Limits};
use std::fmt;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch, Mutex};

/// How long a pool may take to load its component before it is considered stuck.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
/// How long a pool asked to drain may take to say it stopped accepting (it only has to end its
/// accept loop; a pool that does not answer is killed later if it does not exit either).
const DRAIN_ACK_DEADLINE: Duration = Duration::from_secs(2);
/// How long after handing out the spare the next one is started: its exec would otherwise
/// compete for the cores with the pool just started, which is serving its first request.
const SPARE_REFILL_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start a pool process: {0}")]
    Io(#[from] std::io::Error),
    /// The pool could not load the component (link error, bad code, …).
    #[error("{0}")]
    Load(String),
    #[error("the pool process ended while starting ({0})")]
    Died(ExitReason),
    #[error("the pool process did not finish loading within {0:?}")]
    Stuck(Duration),
    /// What the device gives the pool (its device secrets, its certificate authorities)
    /// could not be had; no process was taken.
    #[error("{0}")]
    Device(String),
    /// The pool said something out of turn while loading (it is killed).
    #[error("{0}")]
    OutOfTurn(String),
}

/// Why a pool process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Code(i32),
    Signal(i32),
    /// Killed by the kernel's OOM killer in its cgroup.
    Oom,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Code(code) => write!(f, "exit {code}"),
            ExitReason::Signal(signal) => write!(f, "signal {signal}"),
            ExitReason::Oom => f.write_str("oom"),
        }
    }
}

impl ExitReason {
    /// Whether the pool ended because it had been idle for its idle time.
    pub fn is_idle(&self) -> bool {
        *self == ExitReason::Code(protocol::IDLE_EXIT)
    }

    fn of(status: std::process::ExitStatus) -> ExitReason {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitReason::Code(code),
            (None, Some(signal)) => ExitReason::Signal(signal),
            (None, None) => ExitReason::Code(-1),
        }
    }
}

/// A pool's exit, as told to the reconciler.
#[derive(Debug)]
pub struct PoolExit {
    pub app: AppName,
    pub pid: u32,
    pub reason: ExitReason,
}

/// How a pool goes from loaded to serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new generation: make one instance to prove it, then wait for the supervisor's probe
    /// (health check) and `serve`.
    Prepare,
    /// A generation that already served (a restart, a wake from idle, a boot): serve as soon
    /// as loaded. `proven`: this code already ran here with the pooling allocator under the
    /// same limits, so the proving instance is skipped.
    Resume { proven: bool },
}

/// Everything a pool is started with.
pub struct Launch<'a> {
    pub spec: &'a AppSpec,
    pub generation: u64,
    pub code: &'a Code,
    pub start: Start,
    /// `None`: a command's run, which serves nothing.
    pub listener: Option<&'a std::net::TcpListener>,
    pub counters: &'a Counters,
    /// The cgroup the pool is moved into before it is told what to run, and its limits.
    pub cgroup: Option<&'a AppCgroup>,
    pub limits: PoolLimits,
    pub logs: Arc<LogHub>,
    pub exits: mpsc::Sender<PoolExit>,
    /// The uid and gid the pool switches to before it runs any of the app's code (`None`:
    /// it stays cairnd's user).
    pub user: Option<(u32, u32)>,
    /// The app's key-value store and quota, served on the pool's host-services socket
    /// (`None`: the app has no `[keyvalue]` and every call is refused).
    pub kv: Option<crate::kv::Grant>,
    /// Run the app's command with these arguments instead of serving (the pool exits after
    /// `Pool::finished`); with `start` `Prepare`, it is confined before it is told.
    pub run: Option<&'a [String]>,
    /// Where a copy of the pool's output goes too, as it comes (a `cairnctl run` client).
    pub tap: Option<Tap>,
}

/// A copy of a pool's output for someone watching it run: what does not fit the channel
/// (a client slower than the pool) is counted, not waited for.
#[derive(Clone)]
pub struct Tap {
    pub output: mpsc::Sender<protocol::LogChunk>,
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// A running pool process, loaded and waiting for `serve` (or serving).
pub struct Pool {
    pub pid: u32,
    pub allocator: String,
    control: Mutex<OwnedWriteHalf>,
    exited: watch::Receiver<Option<ExitReason>>,
    /// Answers to `Probe`, routed here by the task that reads the pool's messages.
    probes: Mutex<mpsc::Receiver<(Option<u16>, String)>>,
    /// How the run ended, once the pool says (`FromPool::Finished`).
    finished: watch::Receiver<Option<(i32, String)>>,
    /// Set when the pool says it has stopped accepting (`FromPool::Draining`).
    draining: watch::Receiver<bool>,
}

impl Pool {
    /// Runs the health check `GET path` in the pool (before it serves). `Ok(status)` when the
    /// guest answered, else why not.
    pub async fn probe(&self, path: &str, deadline: Duration) -> Result<u16, String> {
        let mut probes = self.probes.lock().await;
        protocol::send(
            &mut *self.control.lock().await,
            &ToPool::Probe {
                path: path.to_string(),
            },
        )
        .await
        .map_err(|e| format!("the pool went away: {e}"))?;
        match tokio::time::timeout(deadline, probes.recv()).await {
            Ok(Some((Some(status), _))) => Ok(status),
            Ok(Some((None, error))) => Err(error),
            Ok(None) => Err("the pool ended during the health check".into()),
            Err(_) => Err(format!("no answer within {deadline:?}")),
        }
    }

    /// Tells the pool to start accepting (after `Start::Prepare`).
    pub async fn serve(&self) -> std::io::Result<()> {
        protocol::send(&mut *self.control.lock().await, &ToPool::Serve).await
    }

    /// Asks the pool to stop accepting and finish what is in flight within `grace`, and waits
    /// (briefly) until it says it no longer accepts, or has ended. Returns whether the pool got
    /// the request. After this, a new connection is not accepted by this pool.
    pub async fn drain(&self, grace: Duration) -> bool {
        let asked = {
            let mut control = self.control.lock().await;
            protocol::send(
                &mut *control,
                &ToPool::Drain {
                    grace_ms: grace.as_millis() as u64,
                },
            )
            .await
            .is_ok()
        };
        if asked {
            let mut draining = self.draining.clone();
            let mut exited = self.exited.clone();
            let _ = tokio::time::timeout(DRAIN_ACK_DEADLINE, async {
                tokio::select! {
                    _ = draining.wait_for(|draining| *draining) => {}
                    _ = exited.wait_for(Option::is_some) => {}
                }
            })
            .await;
        }
        asked
    }

    /// Waits for a pool that was asked to `drain` (`asked`) to end, a little longer than
    /// `grace`; kills it if it has not. Returns how it ended.
    pub async fn finish(&self, grace: Duration, asked: bool) -> Option<ExitReason> {
        let deadline = if asked {
            grace + Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        if !self.wait_exit(deadline).await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            self.wait_exit(Duration::from_secs(5)).await;
        }
        self.exited.borrow().clone()
    }

    /// `drain`, then `finish`.
    pub async fn stop(&self, grace: Duration) -> Option<ExitReason> {
        let asked = self.drain(grace).await;
        self.finish(grace, asked).await
    }

    /// Waits up to `deadline` for a run's pool to exit (it does once its run ended and its
    /// output is sent), killing it past that; how the run ended (`None`: the pool said
    /// nothing, it died or was killed) and how the process ended.
    pub async fn run_end(&self, deadline: Duration) -> (Option<(i32, String)>, Option<ExitReason>) {
        self.finish(deadline, true).await;
        let exit = self.exited.borrow().clone();
        // The exit can be seen before the task reading the pool's messages has read the
        // last: it sets `finished`, or ends at the socket's end without (then the wait
        // returns at once, the sender gone).
        let mut finished = self.finished.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), finished.wait_for(Option::is_some)).await;
        let finished = self.finished.borrow().clone();
        (finished, exit)
    }

    /// Whether the pool exited within `deadline`.
    async fn wait_exit(&self, deadline: Duration) -> bool {
        let mut exited = self.exited.clone();
        let waited = tokio::time::timeout(deadline, exited.wait_for(Option::is_some)).await;
        waited.is_ok()
    }
}

/// Precompiled code ready to hand to pools: a sealed memfd (each pool maps it, no copy, and
/// nobody can change it after), with what the runtime knows about it.
pub struct Code {
    fd: OwnedFd,
    pub facts: CodeFacts,
    pub len: usize,
}

impl Code {
    pub fn new(code: &[u8], facts: CodeFacts) -> std::io::Result<Code> {
        Ok(Code {
            fd: code_memfd(code)?,
            facts,
            len: code.len(),
        })
    }
}

fn code_memfd(code: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    // Executable on purpose: where `vm.memfd_noexec` is 1 a memfd without MFD_EXEC could not be
    // mapped executable. Kernels before 6.3 do not know the flag (EINVAL): plain is executable
    // there.
    let fd = match memfd_create(c"cairn-code", flags | MFdFlags::from_bits_retain(MFD_EXEC)) {
        Err(nix::errno::Errno::EINVAL) => memfd_create(c"cairn-code", flags)?,
        other => other?,
    };
    fill_and_seal(fd, code)
}

/// A memfd holding `pem` (the certificate authorities of an app's HTTPS calls), sealed.
fn roots_memfd(pem: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"cairn-roots",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    fill_and_seal(fd, pem)
}

/// Writes `bytes` into the memfd `fd` and seals it: the pool given it can change nothing.
fn fill_and_seal(fd: OwnedFd, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag};
    std::fs::File::from(fd.try_clone()?).write_all(bytes)?;
    nix::fcntl::fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// `MFD_EXEC` (Linux 6.3), which nix does not name.
const MFD_EXEC: nix::libc::c_uint = 0x0010;

/// A pool process that has dropped its privileges and built its runtime, waiting on its
/// control socket for `Start`.
struct Process {
    child: tokio::process::Child,
    pid: u32,
    control: std::os::unix::net::UnixStream,
    /// A spare's own cgroup (v1), which becomes the app's (`AppCgroup::take_over`).
    cgroup: Option<AppCgroup>,
    /// The limits that cgroup holds already, if any (only with `cgroup`).
    limits: Option<PoolLimits>,
}

/// Starts pool processes. It keeps one spare process ready (exec'd, privileges dropped,
/// runtime built: most of what a pool start costs before it loads code), hands it the next
/// app to start and starts the next spare in the background, so starting a pool, a wake from
/// idle above all, does not wait for an exec.
pub struct Spawner {
    cgroups: Arc<Cgroups>,
    spare: std::sync::Mutex<Option<Process>>,
    refilling: AtomicBool,
    /// Set at shutdown: no more spares.
    closed: AtomicBool,
    /// What the last pool started was given: a new spare is made ready for the same (the
    /// likeliest next start), see `refill`.
    last_start: std::sync::Mutex<Option<LastStart>>,
    /// Where apps' `device_secrets` are read from (`crate::secrets`).
    secrets_dir: std::path::PathBuf,
}

/// The limits and code sizes of the last pool started.
#[derive(Clone)]
struct LastStart {
    limits: Limits,
    facts: CodeFacts,
    cgroup: PoolLimits,
}

impl Spawner {
    pub fn new(cgroups: Arc<Cgroups>, secrets_dir: std::path::PathBuf) -> Arc<Spawner> {
        cgroups.remove_stale_spares();
        Arc::new(Spawner {
            cgroups,
            spare: std::sync::Mutex::new(None),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_start: std::sync::Mutex::new(None),
            secrets_dir,
        })
    }

    /// Ends the spare (at shutdown) and starts no other.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut spare) = spare {
            let _ = spare.child.start_kill();
            let _ = spare.child.wait().await;
            if let Some(cgroup) = spare.cgroup {
                cgroup.remove();
            }
        }
    }

    /// Starts a pool process for `app`, or a spare one (no app yet).
    fn start_process(&self, app: Option<&AppName>) -> std::io::Result<Process> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        // Above the number the child needs, so the dup2 in the child cannot clobber it.
        let source = nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64))?;
        let title = match app {
            Some(app) => app.as_str().to_string(),
            None => protocol::spare_title(),
        };
        let mut command = tokio::process::Command::new("/proc/self/exe");
        command
            .arg0("cairnd")
            .args(["pool", "--app", &title])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false);
        // SAFETY: only an async-signal-safe dup2 runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::dup2(source, protocol::CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = command.spawn();
        // SAFETY: `source` came from fcntl above and nothing else closes it.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(source) });
        drop(theirs);
        let child = spawned?;
        let pid = child.id().unwrap_or_default();
        Ok(Process {
            child,
            pid,
            control: ours,
            cgroup: None,
            limits: None,
        })
    }

    /// The spare, if there is one and it is still alive.
    fn take_spare(&self) -> Option<Process> {
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        match spare.child.try_wait() {
            Ok(None) => Some(spare),
            _ => {
                if let Some(cgroup) = spare.cgroup {
                    cgroup.remove();
                }
                None
            }
        }
    }

    /// Starts a spare after `delay` unless there is one (or one is being started).
    pub fn refill(self: &Arc<Self>, delay: Duration) {
        if self.closed.load(Ordering::Acquire) || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spawner = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let missing = spawner
                .spare
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none();
            if missing && !spawner.closed.load(Ordering::Acquire) {
                match spawner.start_process(None) {
                    Ok(mut process) => {
                        spawner.make_ready(&mut process).await;
                        *spawner.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(process)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot start a spare pool process; pools start without one")
                    }
                }
            }
            spawner.refilling.store(false, Ordering::Release);
        });
    }

    /// Makes a new spare ready for what the last start was given (the likeliest next start):
    /// its engine built (`ToPool::Prepare`), and a cgroup of its own, off any pool start's path
    /// (see `Cgroups::for_spare`), holding the same limits.
    async fn make_ready(&self, process: &mut Process) {
        let last = self
            .last_start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(last) = &last {
            // A few hundred bytes into an empty socket: it does not block.
            let hint = ToPool::Prepare {
                limits: last.limits.clone(),
                facts: last.facts,
            };
            if let Err(error) = protocol::send_with_fds(&process.control, &hint, &[]) {
                tracing::debug!(%error, "cannot send a spare its Prepare hint");
            }
        }
        let (cgroups, pid) = (Arc::clone(&self.cgroups), process.pid);
        let limits = last.map(|last| last.cgroup);
        let confined = tokio::task::spawn_blocking(move || {
            let cgroup = cgroups.for_spare(pid)?;
            let held = limits.filter(|limits| cgroup.apply(limits).is_ok());
            match cgroup.add(pid) {
                Ok(()) => Some((cgroup, held)),
                Err(error) => {
                    tracing::debug!(%error, "a spare pool process stays in the supervisor's cgroup");
                    cgroup.remove();
                    None
                }
            }
        })
        .await
        .ok()
        .flatten();
        if let Some((cgroup, held)) = confined {
            process.cgroup = Some(cgroup);
            process.limits = held;
        }
    }

    /// Starts a pool (on the spare when there is one) and waits until it has loaded the
    /// component.
    // Over 100 lines: one start's steps in the order the protocol needs them, each a few lines.
    pub async fn launch(self: &Arc<Self>, launch: Launch<'_>) -> Result<Pool, SpawnError> {
        let app = launch.spec.name.clone();
        // What the pool is given from the device's files, read before any process is taken:
        // a problem here (an unreadable ca_file, a device secret missing) fails the start
        // with its reason, and nothing is left to clean up.
        let (spec, dir) = (launch.spec.clone(), self.secrets_dir.clone());
        let given = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let secrets = crate::secrets::read(&dir, &spec)?;
            let roots = crate::outbound::tls_roots(&spec)?;
            let roots = roots_memfd(&roots)
                .map_err(|e| format!("cannot pass the certificate authorities: {e}"))?;
            Ok((secrets, roots))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let (device_secrets, roots) = given.map_err(SpawnError::Device)?;
        *self.last_start.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastStart {
            limits: launch.spec.limits.clone(),
            facts: launch.code.facts,
            cgroup: launch.limits.clone(),
        });
        let process = match self.take_spare() {
            Some(spare) => spare,
            None => self.start_process(Some(&app))?,
        };
        // The next spare starts once this pool has had the cores to itself for a moment.
        self.refill(SPARE_REFILL_DELAY);
        let Process {
            mut child,
            pid,
            control,
            cgroup: spare_cgroup,
            limits: spare_limits,
        } = process;

        let kill = move || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        // Into its cgroup before any guest code runs. A start that makes no instance while
        // loading (a proven resume) is told what to load first and confined meanwhile (a move
        // between cgroups can wait for an RCU grace period); it serves only after `Confined`.
        // Any other start is confined before it is told what to run.
        let overlap = launch.start == Start::Resume { proven: true } && launch.cgroup.is_some();
        let confine = || {
            let confined = match (launch.cgroup, &spare_cgroup) {
                (Some(cgroup), Some(spare)) => {
                    cgroup.take_over(spare, pid, &launch.limits, spare_limits.as_ref())
                }
                (Some(cgroup), None) => cgroup.add(pid),
                (None, _) => Ok(()),
            };
            confined.map_err(|error| {
                kill();
                if let Some(spare) = &spare_cgroup {
                    spare.remove();
                }
                SpawnError::Io(std::io::Error::other(error.to_string()))
            })
        };
        if !overlap {
            if let Err(error) = confine() {
                let _ = child.wait().await;
                return Err(error);
            }
        }
        let exited = watch_exit(child, pid, app.clone(), launch.exits.clone());

        let mut spec = Box::new(launch.spec.clone());
        spec.secrets.0.extend(device_secrets);
        let start = ToPool::Start {
            spec,
            generation: launch.generation,
            facts: launch.code.facts,
            probe: launch.start != Start::Resume { proven: true } && launch.run.is_none(),
            serve: launch.start != Start::Prepare,
            confined: !overlap,
            user: launch.user,
            filter: crate::pool::seccomp::unavailable().is_none(),
            run: launch.run.map(<[String]>::to_vec),
        };
        // A run serves nothing: /dev/null stands in the listener's place.
        let no_listener = match launch.listener {
            Some(_) => None,
            None => match std::fs::File::open("/dev/null") {
                Ok(file) => Some(file),
                Err(error) => {
                    kill();
                    return Err(SpawnError::Io(error));
                }
            },
        };
        let listener_fd = match (launch.listener, &no_listener) {
            (Some(listener), _) => listener.as_raw_fd(),
            (None, Some(file)) => file.as_raw_fd(),
            (None, None) => unreachable!("opened above"),
        };
        let (services, pool_services) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(error) => {
                kill();
                return Err(SpawnError::Io(error));
            }
        };
        let (connector, pool_connector) = match crate::pool::connect::pair() {
            Ok(pair) => pair,
            Err(error) => {
                kill();
                return Err(SpawnError::Io(error));
            }
        };
        let fds = [
            listener_fd,
            launch.code.fd.as_raw_fd(),
            launch.counters.raw_fd(),
            pool_services.as_raw_fd(),
            pool_connector.as_raw_fd(),
            roots.as_raw_fd(),
        ];
        if let Err(error) = protocol::send_with_fds(&control, &start, &fds) {
            kill();
            return Err(SpawnError::Io(error));
        }
        drop((pool_services, pool_connector, roots, no_listener));
        // Served until the pool closes its end (it exits, or is killed).
        services.set_nonblocking(true)?;
        tokio::spawn(crate::kv::serve(
            tokio::net::UnixStream::from_std(services)?,
            launch.kv.clone(),
            app.clone(),
        ));
        tokio::spawn(crate::outbound::serve(
            connector,
            crate::outbound::Grant::of(launch.spec),
            app.clone(),
        ));
        if overlap {
            confine()?;
        }
        control.set_nonblocking(true)?;
        let (reader, mut writer) = tokio::net::UnixStream::from_std(control)?.into_split();
        if overlap {
            protocol::send(&mut writer, &ToPool::Confined).await?;
        }

        let mut reader = PoolReader {
            reader,
            logs: Arc::clone(&launch.logs),
            app,
            generation: launch.generation,
            intake: Intake::new(&launch.spec.limits),
            tap: launch.tap.clone(),
        };
        let allocator = match await_loaded(&mut reader, &exited).await {
            Ok(allocator) => allocator,
            Err(error) => {
                if !matches!(error, SpawnError::Load(_) | SpawnError::Died(_)) {
                    kill();
                }
                return Err(error);
            }
        };

        let (probes, draining, finished) = route_messages(reader);
        Ok(Pool {
            pid,
            allocator,
            control: Mutex::new(writer),
            exited,
            probes: Mutex::new(probes),
            draining,
            finished,
        })
    }
}

/// Reports the pool's exit, when it comes, to the returned watch and to the reconciler.
fn watch_exit(
    mut child: tokio::process::Child,
    pid: u32,
    app: AppName,
    exits: mpsc::Sender<PoolExit>,
) -> watch::Receiver<Option<ExitReason>> {
    let (exit_sender, exited) = watch::channel(None);
    tokio::spawn(async move {
        let reason = match child.wait().await {
            Ok(status) => ExitReason::of(status),
            Err(_) => ExitReason::Code(-1),
        };
        let _ = exit_sender.send(Some(reason.clone()));
        let _ = exits.send(PoolExit { app, pid, reason }).await;
    });
    exited
}

/// Waits (up to `LOAD_DEADLINE`) for the pool to say it loaded, forwarding its log lines
/// meanwhile; its allocator, or why it did not load. On `Stuck` or a message out of turn
/// the caller kills the pool.
async fn await_loaded(
    reader: &mut PoolReader,
    exited: &watch::Receiver<Option<ExitReason>>,
) -> Result<String, SpawnError> {
    let first = tokio::time::timeout(LOAD_DEADLINE, reader.next()).await;
    match first {
        Ok(Ok(Some(FromPool::Loaded { allocator }))) => Ok(allocator),
        Ok(Ok(Some(FromPool::Failed { error }))) => Err(SpawnError::Load(error)),
        Ok(Ok(Some(FromPool::Logs { .. }))) => unreachable!("log frames are forwarded by next"),
        Ok(Ok(Some(
            unasked @ (FromPool::Probed { .. } | FromPool::Draining | FromPool::Finished { .. }),
        ))) => Err(SpawnError::OutOfTurn(format!(
            "the pool sent {unasked:?} before it had loaded"
        ))),
        Ok(Ok(None)) | Ok(Err(_)) => {
            let mut exited = exited.clone();
            let reason =
                tokio::time::timeout(Duration::from_secs(5), exited.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|r| r.clone()))
                    .unwrap_or(ExitReason::Code(-1));
            Err(SpawnError::Died(reason))
        }
        Err(_) => Err(SpawnError::Stuck(LOAD_DEADLINE)),
    }
}

/// Reads a loaded pool's messages for as long as it runs: log lines to the log pipeline,
/// health-check answers and the drain acknowledgement to the returned channels.
#[allow(clippy::type_complexity)] // three receivers, each named where it is kept (`Pool`)
fn route_messages(
    mut reader: PoolReader,
) -> (
    mpsc::Receiver<(Option<u16>, String)>,
    watch::Receiver<bool>,
    watch::Receiver<Option<(i32, String)>>,
) {
    let (probe_answers, probes) = mpsc::channel(1);
    let (draining_sender, draining) = watch::channel(false);
    let (finished_sender, finished) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(FromPool::Probed { status, error })) => {
                    let _ = probe_answers.send((status, error)).await;
                }
                Ok(Some(FromPool::Draining)) => {
                    let _ = draining_sender.send(true);
                }
                Ok(Some(FromPool::Finished { code, outcome })) => {
                    let _ = finished_sender.send(Some((code, outcome)));
                }
                Ok(Some(other)) => tracing::warn!(?other, "unexpected message from a pool"),
                Ok(None) | Err(_) => return,
            }
        }
    });
    (probes, draining, finished)
}

/// A pool's messages as the supervisor reads them: log lines go to the log pipeline and a
/// refused frame (read past) is noted there, both paced by `Intake`; the rest is returned.
struct PoolReader {
    reader: tokio::net::unix::OwnedReadHalf,
    logs: Arc<LogHub>,
    app: AppName,
    generation: u64,
    intake: Intake,
    tap: Option<Tap>,
}

impl PoolReader {
    async fn next(&mut self) -> std::io::Result<Option<FromPool>> {
        loop {
            let bytes = match protocol::receive::<_, FromPool>(&mut self.reader).await {
                Ok(Some(FromPool::Logs { lines })) => {
                    let bytes = lines.iter().map(|line| line.text.len()).sum();
                    if let Some(tap) = &self.tap {
                        for line in &lines {
                            if tap.output.try_send(line.clone()).is_err() {
                                tap.dropped
                                    .fetch_add(line.text.len() as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    forward(&self.logs, &self.app, self.generation, lines);
                    bytes
                }
                // Read past, reported, and the pool's next messages still arrive.
                Err(error) if protocol::refused(&error).is_some() => {
                    self.note(&format!("cairn refused {error} from this app's pool"));
                    protocol::MAX_FRAME as usize
                }
                other => return other,
            };
            if let Some(wait) = self.intake.take(bytes) {
                if !self.intake.noted {
                    self.intake.noted = true;
                    self.note(&format!(
                        "this app's pool sent more than {}/s of output: cairn reads it more slowly \
                         from now on (the pool itself drops output beyond log_rate, so only a guest \
                         that escaped its sandbox can)",
                        crate::spec::ByteSize(self.intake.rate as u64)
                    ));
                }
                tokio::time::sleep(wait).await;
            }
        }
    }

    fn note(&self, text: &str) {
        self.logs.note(self.app.as_str(), self.generation, text);
    }
}

/// How fast the supervisor takes a pool's log text: twice the app's `log_rate`, in bursts of
/// what the pool may send at once (its own burst and its queue, twice over). A pool keeps
/// within that by itself; one that does not waits, its writes held in the socket, so the
/// supervisor's work for it stays bounded whatever the pool does.
struct Intake {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: std::time::Instant,
    noted: bool,
}

impl Intake {
    fn new(limits: &Limits) -> Intake {
        let rate = 2.0 * limits.log_rate().0 as f64;
        let burst = rate * crate::spec::LOG_BURST_SECONDS as f64
            + 2.0 * crate::pool::LOG_QUEUE_BYTES as f64;
        Intake {
            rate,
            burst,
            tokens: burst,
            refilled: std::time::Instant::now(),
            noted: false,
        }
    }

    /// Takes `bytes`; how long to wait before reading more, when the budget ran out.
    fn take(&mut self, bytes: usize) -> Option<Duration> {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate)
            .min(self.burst);
        self.refilled = now;
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

fn forward(logs: &LogHub, app: &AppName, generation: u64, lines: Vec<protocol::LogChunk>) {
    for chunk in lines {
        let stream = match chunk.stream.as_str() {
            "stdout" => "stdout",
            "stderr" => "stderr",
            other => cairn_core::levels::level(other).unwrap_or("cairn"),
        };
        logs.emit(app.as_str(), generation, stream, chunk.text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intake_takes_a_pools_burst_then_paces_it_at_twice_its_log_rate() {
        let limits = Limits {
            log_rate: Some(crate::spec::ByteSize(1 << 20)),
            ..Limits::default()
        };
        let mut intake = Intake::new(&limits);
        // Four seconds of twice the rate, and the pool's queue twice over.
        let burst = (8 << 20) + (8 << 20);
        assert_eq!(intake.take(burst), None);
        let wait = intake.take(2 << 20).expect("past the burst, it waits");
        assert!(
            (0.9..=1.0).contains(&wait.as_secs_f64()),
            "two MiB more at two MiB a second: {wait:?}"
        );
    }
}

//! The pool's system-call filter. Once a pool has switched to its app's user, built its
//! engine and mapped the app's compiled code (the one file it opens, through /proc/self/fd, so
//! that wasmtime maps rather than copies it; cairnd compiled that code itself), and before any
//! of the app is linked or run, every thread of the process is bound to a seccomp filter that
//! allows only what serving needs: memory, threads, signals, time, reading and writing the
//! descriptors it holds, accepting on the listener it was given. No new sockets (an app's
//! outgoing connections are made by cairnd and passed in, `pool::connect`), no files opened, no processes, no
//! signals to other processes, no tracing, no namespaces, no io_uring.
//!
//! A call outside the list does not kill the pool: it traps (SIGSYS), and the handler here
//! makes the call fail with EPERM, counts it in the app's counters page (`cairnctl status APP`)
//! and writes the call's name to stderr (the daemon's journal), the first `NAMED_DENIALS`
//! times. An escaped guest gains nothing by retrying; a code path we missed fails loudly, with
//! the name of the call to review, instead of taking the app down. Except where the calling
//! thread has SIGSYS blocked (the C library blocks every signal around thread creation, and
//! since glibc 2.41 around fork): there the kernel kills the process, and the supervisor
//! restarts it. clone3 is answered by the filter itself for that reason.
//!
//! `available` is the supervisor's side: whether this kernel takes filters at all (qemu-user
//! does not), which decides whether pools must install one or `cairnctl status` says they run
//! without.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use syscalls::Sysno;

/// Denials written to stderr with their name; later ones are only counted.
const NAMED_DENIALS: u32 = 32;

/// Why pools cannot have a filter here, or `None` when they can. Cached: asked by the status
/// view and by every spawn.
pub fn unavailable() -> Option<&'static str> {
    static ANSWER: OnceLock<Option<&'static str>> = OnceLock::new();
    *ANSWER.get_or_init(probe)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn probe() -> Option<&'static str> {
    const SECCOMP_GET_ACTION_AVAIL: nix::libc::c_ulong = 2;
    let trap: u32 = nix::libc::SECCOMP_RET_TRAP;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 (the action) and changes nothing.
    let result = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0 as nix::libc::c_ulong,
            &trap as *const u32,
        )
    };
    if result == 0 {
        return None;
    }
    Some(match nix::errno::Errno::last() {
        nix::errno::Errno::EPERM | nix::errno::Errno::EACCES => {
            "a filter around cairnd refuses the seccomp system call (with systemd, add `seccomp` to the unit's SystemCallFilter)"
        }
        nix::errno::Errno::EOPNOTSUPP => {
            "this kernel's seccomp cannot trap a denied system call (SECCOMP_RET_TRAP)"
        }
        nix::errno::Errno::EINVAL => {
            "this kernel's seccomp is older than 4.14 and cannot say which actions it takes"
        }
        _ => "this kernel (or the emulator cairnd runs under, such as qemu-user) does not take seccomp filters",
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn probe() -> Option<&'static str> {
    Some("cairn has no system-call list for this processor architecture")
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot build the system-call filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the handler for denied system calls: {0}")]
    Handler(nix::errno::Errno),
    #[error("cannot install the system-call filter on every thread: {0}")]
    Install(seccompiler::Error),
}

/// What the SIGSYS handler needs, set once before the filter is installed.
static APP: OnceLock<String> = OnceLock::new();
static DENIED_COUNTER: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static DENIALS: AtomicU32 = AtomicU32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The filter a pool is to install, once, when its code is mapped (`Runtime::load`).
pub struct Filter {
    app: String,
    /// A slot of the app's shared counters page, mapped for the rest of the process's life.
    denied: &'static AtomicU64,
}

impl Filter {
    pub fn new(app: &str, denied: &'static AtomicU64) -> Filter {
        Filter {
            app: app.to_string(),
            denied,
        }
    }

    /// Installs the filter unless it already is (see `install`).
    pub fn install(&self) -> Result<(), FilterError> {
        if installed() {
            return Ok(());
        }
        install(&self.app, self.denied)?;
        INSTALLED.store(true, Ordering::Release);
        Ok(())
    }
}

/// Whether this process is filtered (then it opens no files).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Installs the filter on every thread of this process (TSYNC), with the handler that makes a
/// denied call fail with EPERM. `denied` counts denials. Needs no_new_privs, which the pool
/// set at start.
fn install(app: &str, denied: &'static AtomicU64) -> Result<(), FilterError> {
    let program = program().map_err(FilterError::Build)?;
    let _ = APP.set(app.to_string());
    DENIED_COUNTER.store(std::ptr::from_ref(denied).cast_mut(), Ordering::Release);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigAction(on_denied),
        // SA_NODEFER: a denied call inside the handler (there is none) would trap again
        // rather than wait; the handler is async-signal-safe.
        nix::sys::signal::SaFlags::SA_SIGINFO | nix::sys::signal::SaFlags::SA_NODEFER,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: `on_denied` only reads statics, does atomic arithmetic and calls write(2).
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGSYS, &action) }
        .map_err(FilterError::Handler)?;
    seccompiler::apply_filter_all_threads(&program).map_err(FilterError::Install)
}

/// The allowlist, compiled for this architecture. Exposed for tests.
pub(crate) fn program() -> Result<BpfProgram, seccompiler::BackendError> {
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Err(seccompiler::BackendError::InvalidTargetArch(
        std::env::consts::ARCH.to_string(),
    ));

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for call in ALWAYS {
            rules.insert(*call as i64, Vec::new());
        }
        let argument_is = |index: u8, value: u64| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                .and_then(|condition| SeccompRule::new(vec![condition]))
        };
        // Threads only: a clone without CLONE_THREAD would be a new process. clone3 passes
        // its flags in memory a filter cannot read: it fails as unknown (below), and the C
        // library falls back to clone.
        let thread = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(nix::libc::CLONE_THREAD as u64),
            nix::libc::CLONE_THREAD as u64,
        )?;
        rules.insert(Sysno::clone as i64, vec![SeccompRule::new(vec![thread])?]);
        // Naming threads and mappings, nothing else of prctl.
        rules.insert(
            Sysno::prctl as i64,
            vec![
                argument_is(0, nix::libc::PR_SET_NAME as u64)?,
                argument_is(0, nix::libc::PR_GET_NAME as u64)?,
                argument_is(0, PR_SET_VMA)?,
            ],
        );
        // Non-blocking and close-on-exec switches, and the page-map scan with which wasmtime
        // finds an instance's dirty pages (on the /proc/self/pagemap the pool opened at
        // start); nothing else of ioctl.
        rules.insert(
            Sysno::ioctl as i64,
            vec![
                argument_is(1, nix::libc::FIONBIO)?,
                argument_is(1, nix::libc::FIOCLEX)?,
                argument_is(1, PAGEMAP_SCAN)?,
            ],
        );
        // Descriptor flags, duplicates and memfd seals; not F_SETOWN or F_SETSIG, with which a
        // socket's owner could be made any process, to be signalled.
        rules.insert(
            Sysno::fcntl as i64,
            [
                nix::libc::F_GETFD,
                nix::libc::F_SETFD,
                nix::libc::F_GETFL,
                nix::libc::F_SETFL,
                nix::libc::F_DUPFD_CLOEXEC,
                nix::libc::F_ADD_SEALS,
                nix::libc::F_GET_SEALS,
            ]
            .into_iter()
            .map(|command| argument_is(1, command as u64))
            .collect::<Result<_, _>>()?,
        );
        // Signals to this process's own threads only (abort, pthread_kill).
        let own = std::process::id() as u64;
        rules.insert(Sysno::tgkill as i64, vec![argument_is(0, own)?]);
        let allowlist: BpfProgram =
            SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)?
                .try_into()?;
        // clone3 first, answered ENOSYS by the filter itself: the C library starts threads
        // with every signal blocked, so a trap there would kill the process.
        const LOAD_NUMBER: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
        const JUMP_IF_EQUAL: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
        const RETURN: u16 = 0x06; // BPF_RET | BPF_K
        let instruction = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
        let mut program = vec![
            instruction(LOAD_NUMBER, 0, 0, 0),
            instruction(JUMP_IF_EQUAL, 0, 1, Sysno::clone3 as u32),
            instruction(
                RETURN,
                0,
                0,
                nix::libc::SECCOMP_RET_ERRNO | nix::libc::ENOSYS as u32,
            ),
        ];
        program.extend(allowlist);
        Ok(program)
    }
}

const PR_SET_VMA: u64 = 0x5356_4d41;
/// `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes), the same on x86_64 and aarch64.
const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// Allowed whatever their arguments.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const ALWAYS: &[Sysno] = &[
    // Memory: the allocator, wasmtime's pooling allocator and its copy-on-write images,
    // compiled code turned executable, instruction-cache barriers (aarch64).
    Sysno::brk,
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mremap,
    Sysno::mprotect,
    Sysno::madvise,
    Sysno::process_madvise,
    Sysno::membarrier,
    Sysno::memfd_create,
    Sysno::ftruncate,
    // Threads and waiting.
    Sysno::futex,
    Sysno::set_robust_list,
    Sysno::rseq,
    Sysno::sched_yield,
    Sysno::sched_getaffinity,
    Sysno::nanosleep,
    Sysno::clock_nanosleep,
    Sysno::clock_gettime,
    Sysno::clock_getres,
    Sysno::gettimeofday,
    Sysno::getpid,
    Sysno::gettid,
    Sysno::getrandom,
    Sysno::getcpu,
    Sysno::restart_syscall,
    Sysno::exit,
    Sysno::exit_group,
    // Signals: wasmtime's trap handlers, the guard-page stack, this filter's handler.
    Sysno::rt_sigaction,
    Sysno::rt_sigprocmask,
    Sysno::rt_sigreturn,
    Sysno::sigaltstack,
    // The descriptors it holds: its control socket, the listener and accepted connections,
    // the code, the counters page, tokio's epoll and wakers.
    Sysno::read,
    Sysno::readv,
    Sysno::pread64,
    Sysno::write,
    Sysno::writev,
    Sysno::pwrite64,
    Sysno::lseek,
    Sysno::close,
    Sysno::fstat,
    Sysno::statx,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_pwait,
    Sysno::epoll_pwait2,
    Sysno::eventfd2,
    Sysno::ppoll,
    Sysno::accept4,
    Sysno::recvfrom,
    Sysno::recvmsg,
    Sysno::sendto,
    Sysno::sendmsg,
    Sysno::shutdown,
    Sysno::getsockopt,
    Sysno::setsockopt,
    Sysno::getsockname,
    Sysno::getpeername,
    #[cfg(target_arch = "x86_64")]
    Sysno::newfstatat,
    #[cfg(target_arch = "aarch64")]
    Sysno::fstatat,
    #[cfg(target_arch = "x86_64")]
    Sysno::epoll_wait,
    #[cfg(target_arch = "x86_64")]
    Sysno::poll,
];

/// SIGSYS from the filter: the call fails with EPERM, is counted, and is named on stderr. Async-signal-safe: statics, atomics and write(2) only.
extern "C" fn on_denied(
    _signal: nix::libc::c_int,
    info: *mut nix::libc::siginfo_t,
    context: *mut nix::libc::c_void,
) {
    /// The SIGSYS members of siginfo_t on 64-bit Linux (after signo, errno, code and padding).
    #[repr(C)]
    struct SysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        _call_addr: *mut nix::libc::c_void,
        syscall: i32,
        _arch: u32,
    }
    const SYS_SECCOMP: i32 = 1;
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO); its SIGSYS layout is SysInfo.
    let info = unsafe { &*info.cast::<SysInfo>() };
    if info.signo != nix::libc::SIGSYS || info.code != SYS_SECCOMP {
        return;
    }
    let call = Sysno::new(info.syscall as usize);
    // SAFETY: `context` is this thread's ucontext_t, as the kernel passed it; the return
    // register is set to -EPERM, which the interrupted call then returns.
    unsafe { set_return(context.cast(), -(nix::libc::EPERM as i64)) };
    let counter = DENIED_COUNTER.load(Ordering::Acquire);
    if !counter.is_null() {
        // SAFETY: set by `install` from a &'static AtomicU64.
        unsafe { &*counter }.fetch_add(1, Ordering::Relaxed);
    }
    let seen = DENIALS.fetch_add(1, Ordering::Relaxed);
    if seen >= NAMED_DENIALS {
        return;
    }
    let mut line = Line::default();
    line.push(b"cairnd pool ");
    line.push(APP.get().map_or("?", String::as_str).as_bytes());
    line.push(b": the seccomp filter denied system call ");
    line.push(call.map_or("unknown", |call| call.name()).as_bytes());
    line.push(b" (");
    line.number(info.syscall as u64);
    line.push(b"); it failed with EPERM");
    if seen + 1 == NAMED_DENIALS {
        line.push(b"; further denials are only counted (cairnctl status APP)");
    }
    line.push(b"\n");
    // SAFETY: write(2) of a stack buffer to stderr; its result does not matter here.
    unsafe { nix::libc::write(2, line.bytes.as_ptr().cast(), line.len) };
}

/// A line built on the stack (no allocation in a signal handler), cut at its capacity.
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - 1 - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text[..take]);
        self.len += take;
    }

    fn number(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn set_return(context: *mut nix::libc::ucontext_t, value: i64) {
    // SAFETY: the caller passes the handler's ucontext.
    unsafe { (*context).uc_mcontext.gregs[nix::libc::REG_RAX as usize] = value };
}

#[cfg(target_arch = "aarch64")]
unsafe fn set_return(context: *mut nix::libc::ucontext_t, value: i64) {
    // SAFETY: the caller passes the handler's ucontext.
    unsafe { (*context).uc_mcontext.regs[0] = value as u64 };
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn set_return(_context: *mut nix::libc::ucontext_t, _value: i64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    /// Set in the child process that `a_filtered_process_...` starts.
    const CHILD: &str = "CAIRN_SECCOMP_TEST_CHILD";

    #[test]
    fn a_filtered_process_keeps_its_threads_and_fails_every_escape_with_a_named_denial() {
        if std::env::var_os(CHILD).is_some() || std::env::var_os(REFUSED_CHILD).is_some() {
            return;
        }
        // The filter binds the whole process, so it is tried in a child.
        let Some(stderr) = in_child("filtered_child", CHILD) else {
            return;
        };
        for call in [
            "socket", "execve", "kill", "ptrace", "openat", "clone", "prctl", "tgkill", "ioctl",
            "fcntl",
        ] {
            assert!(
                stderr.contains(&format!(
                    "cairnd pool filter-test: the seccomp filter denied system call {call} ("
                )),
                "no denial named {call}: {stderr}"
            );
        }
        assert!(
            !stderr.contains("clone3"),
            "clone3 is denied quietly: {stderr}"
        );
    }

    /// Runs only as the child of the test above.
    #[test]
    fn filtered_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        static DENIED: AtomicU64 = AtomicU64::new(0);
        let filter = Filter::new("filter-test", &DENIED);
        filter.install().expect("the filter installs");
        assert!(installed());
        filter.install().expect("a second install does nothing");
        let denied = |result: nix::Result<()>| assert_eq!(result, Err(Errno::EPERM));
        let socket = |family| {
            nix::sys::socket::socket(
                family,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .map(drop)
        };
        denied(socket(nix::sys::socket::AddressFamily::Inet));
        denied(socket(nix::sys::socket::AddressFamily::Unix));
        let program = c"/bin/true";
        denied(nix::unistd::execv(program, &[program]).map(drop));
        denied(nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), None));
        // SAFETY: PTRACE_ATTACH takes a pid and no memory.
        let attach = unsafe {
            nix::libc::ptrace(
                nix::libc::PTRACE_ATTACH,
                1 as nix::libc::pid_t,
                0usize,
                0usize,
            )
        };
        denied(Errno::result(attach).map(drop));
        denied(
            std::fs::File::open("/etc/hostname")
                .map(drop)
                .map_err(|error| Errno::from_raw(error.raw_os_error().unwrap())),
        );
        // A new process (clone without CLONE_THREAD).
        // SAFETY: SIGCHLD as the only flag asks for a plain fork; it is denied, so no child.
        let fork = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_clone,
                nix::libc::SIGCHLD as usize,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        denied(Errno::result(fork).map(drop));
        denied(nix::sys::prctl::set_dumpable(true));
        // Arguments outside the list: a signal to another process's thread, a terminal
        // ioctl, making some process a socket's owner (to be signalled).
        // SAFETY: tgkill takes numbers only; signal 0 checks without sending.
        let tgkill = unsafe { nix::libc::syscall(nix::libc::SYS_tgkill, 1, 1, 0) };
        denied(Errno::result(tgkill).map(drop));
        let mut size = std::mem::MaybeUninit::<nix::libc::winsize>::uninit();
        // SAFETY: TIOCGWINSZ writes one winsize; it is refused before that.
        let ioctl = unsafe { nix::libc::ioctl(2, nix::libc::TIOCGWINSZ, size.as_mut_ptr()) };
        denied(Errno::result(ioctl).map(drop));
        // SAFETY: F_SETOWN takes a pid.
        let owner = unsafe { nix::libc::fcntl(2, nix::libc::F_SETOWN, 1) };
        denied(Errno::result(owner).map(drop));
        // SAFETY: F_GETFD reads the descriptor's flags only.
        let flags = unsafe { nix::libc::fcntl(2, nix::libc::F_GETFD) };
        assert!(flags >= 0, "F_GETFD stays allowed");
        // clone3 fails as unknown, so that the C library falls back to clone...
        // SAFETY: clone3 with a null argument is refused before it reads anything.
        let clone3 = unsafe { nix::libc::syscall(nix::libc::SYS_clone3, 0usize, 0usize) };
        assert_eq!(Errno::result(clone3).map(drop), Err(Errno::ENOSYS));
        // ...and threads, pipes of its own descriptors and time keep working.
        let thread = std::thread::spawn(|| std::time::Instant::now().elapsed());
        thread.join().expect("a thread runs under the filter");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("tokio starts under the filter");
        runtime.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            tokio::task::spawn_blocking(|| 7).await.unwrap()
        });
        assert_eq!(DENIED.load(Ordering::Relaxed), 11);
    }

    /// Set in the child process that `a_filter_around_cairnd_...` starts.
    const REFUSED_CHILD: &str = "CAIRN_SECCOMP_TEST_REFUSED_CHILD";

    #[test]
    fn a_filter_around_cairnd_that_refuses_seccomp_is_named_with_the_fix() {
        if std::env::var_os(REFUSED_CHILD).is_some() || std::env::var_os(CHILD).is_some() {
            return;
        }
        in_child("refused_child", REFUSED_CHILD);
    }

    /// Runs this test binary again with only the test `name` (of this module), `marker` set
    /// so that it runs for real there; asserts that it passed and returns its stderr. `None`
    /// (having said so) where no filter can be tried: only an emulator (qemu-user runs the
    /// aarch64 tests) may lack filters, so a native x86_64 kernel that says it has none fails.
    fn in_child(name: &str, marker: &str) -> Option<String> {
        if let Some(why) = unavailable() {
            assert_ne!(std::env::consts::ARCH, "x86_64", "{why}");
            eprintln!("SKIPPED: no seccomp filter can be tested here: {why}");
            return None;
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("pool::seccomp::tests::{name}"),
                "--nocapture",
            ])
            .env(marker, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the child {name} failed: {stdout}\n{stderr}"
        );
        Some(stderr)
    }

    /// Runs only as the child of the test above: a filter such as systemd's SystemCallFilter
    /// without `seccomp` answers EPERM to the probe.
    #[test]
    fn refused_child() {
        if std::env::var_os(REFUSED_CHILD).is_none() {
            return;
        }
        let rules = BTreeMap::from([(Sysno::seccomp as i64, vec![])]);
        let outer: BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(nix::libc::EPERM as u32),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap()
        .try_into()
        .unwrap();
        seccompiler::apply_filter_all_threads(&outer).unwrap();
        let why = probe().expect("seccomp is refused now");
        assert!(why.contains("SystemCallFilter"), "{why}");
    }

    #[test]
    fn the_line_is_cut_at_its_capacity_and_numbers_are_written_in_decimal() {
        let mut line = Line::default();
        line.number(0);
        line.push(b" ");
        line.number(18_446_744_073_709_551_615);
        assert_eq!(&line.bytes[..line.len], b"0 18446744073709551615");
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, 255);
    }
}

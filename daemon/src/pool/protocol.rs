//! What the supervisor and a pool process say to each other, and how. Messages are JSON frames
//! (a 4-byte big-endian length, then the body) on a unix socketpair the pool inherits. Request
//! counters are not messages: they live in a small shared memory page both sides map, so the
//! request path never talks to the supervisor.
//!
//! The file descriptors a pool inherits sit at fixed numbers, so neither side has to say them.

use crate::runtime::CodeFacts;
use crate::spec::AppSpec;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The app's listening socket, bound by the supervisor.
pub const LISTENER_FD: RawFd = 3;
/// The control socketpair.
pub const CONTROL_FD: RawFd = 4;
/// A memfd holding the precompiled component.
pub const CODE_FD: RawFd = 5;
/// A memfd holding the shared counters.
/// (The counters page also carries the time of the last request, see `Counter::LastActive`.)
pub const COUNTERS_FD: RawFd = 6;

/// Largest frame either side accepts; a log batch is the biggest thing sent.
const MAX_FRAME: u32 = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum ToPool {
    /// The first message: what to run. `facts` size the pooling allocator; `probe`: make one
    /// instance before saying `Loaded`; `serve`: start accepting right after, without waiting
    /// for `Serve` (a generation that already served: restart, wake, boot).
    Start {
        spec: Box<AppSpec>,
        generation: u64,
        facts: CodeFacts,
        probe: bool,
        serve: bool,
    },
    /// Run one GET of `path` through the guest (the health check) and say what it answered.
    Probe { path: String },
    /// Start accepting connections (after the supervisor has recorded the generation).
    Serve,
    /// Stop accepting, finish requests in flight within `grace_ms`, then exit.
    Drain { grace_ms: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FromPool {
    /// The component is loaded, linked and instantiated once; the pool waits for `Serve`.
    Loaded { allocator: String },
    /// The component cannot run here; the pool exits after saying why.
    Failed { error: String },
    /// Output and notes for the app's log.
    Logs { lines: Vec<LogChunk> },
    /// The answer to `Probe`: the status, or why there was none.
    Probed { status: Option<u16>, error: String },
    /// The answer to `Drain`: the pool no longer accepts (its copy of the listener is closed)
    /// and is finishing the requests in flight.
    Draining,
}

/// The exit code of a pool that ended because it had no traffic for its idle time.
pub const IDLE_EXIT: i32 = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChunk {
    pub stream: String,
    pub text: String,
}

/// Writes one frame.
pub async fn send<W, M>(writer: &mut W, message: &M) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    M: Serialize,
{
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    writer.write_u32(body.len() as u32).await?;
    writer.write_all(&body).await?;
    writer.flush().await
}

/// Reads one frame; `None` when the other side closed the socket.
pub async fn receive<R, M>(reader: &mut R) -> std::io::Result<Option<M>>
where
    R: tokio::io::AsyncRead + Unpin,
    M: for<'de> Deserialize<'de>,
{
    let length = match reader.read_u32().await {
        Ok(length) => length,
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    };
    if length > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a {length}-byte frame is over the {MAX_FRAME}-byte bound"
        )));
    }
    let mut body = vec![0u8; length as usize];
    reader.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Request counters of one app, in a shared page: the pool adds, the supervisor reads. They
/// survive pool restarts because the supervisor keeps the page and hands it to each new pool.
pub struct Counters {
    base: *mut AtomicU64,
    fd: OwnedFd,
}

// SAFETY: the mapping is only ever accessed through atomics and lives as long as `Counters`.
unsafe impl Send for Counters {}
unsafe impl Sync for Counters {}

#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Counter {
    Requests = 0,
    Traps = 1,
    Timeouts = 2,
    Rejected = 3,
    InFlight = 4,
    LogLinesDropped = 5,
    /// Milliseconds since the pool's start when a request last finished.
    LastActive = 6,
}

const PAGE: usize = 4096;

impl Counters {
    /// A new, zeroed page (supervisor side).
    pub fn create(name: &str) -> std::io::Result<Counters> {
        let label = std::ffi::CString::new(format!("cairn-counters-{name}"))
            .map_err(std::io::Error::other)?;
        let fd = nix::sys::memfd::memfd_create(
            label.as_c_str(),
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        nix::unistd::ftruncate(&fd, PAGE as i64)?;
        Counters::map(fd)
    }

    /// Maps an inherited page (pool side).
    pub fn map(fd: OwnedFd) -> std::io::Result<Counters> {
        // SAFETY: a fresh shared mapping of a PAGE-sized memfd; nothing else aliases it in this
        // process, and other processes only touch it through atomic operations too.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(PAGE).expect("PAGE is not zero"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(Counters {
            base: base.as_ptr().cast(),
            fd,
        })
    }

    fn slot(&self, counter: Counter) -> &AtomicU64 {
        // SAFETY: every Counter index is inside the page, and the page is 8-byte aligned.
        unsafe { &*self.base.add(counter as usize) }
    }

    pub fn add(&self, counter: Counter, value: u64) {
        self.slot(counter).fetch_add(value, Ordering::Relaxed);
    }

    pub fn sub(&self, counter: Counter, value: u64) {
        self.slot(counter).fetch_sub(value, Ordering::Relaxed);
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.slot(counter).load(Ordering::Relaxed)
    }

    pub fn set(&self, counter: Counter, value: u64) {
        self.slot(counter).store(value, Ordering::Relaxed);
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe {
            let _ =
                nix::sys::mman::munmap(std::ptr::NonNull::new_unchecked(self.base.cast()), PAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        send(&mut a, &ToPool::Serve).await.unwrap();
        send(&mut a, &ToPool::Drain { grace_ms: 7 }).await.unwrap();
        drop(a);
        assert!(matches!(
            receive::<_, ToPool>(&mut b).await.unwrap(),
            Some(ToPool::Serve)
        ));
        assert!(matches!(
            receive::<_, ToPool>(&mut b).await.unwrap(),
            Some(ToPool::Drain { grace_ms: 7 })
        ));
        assert!(receive::<_, ToPool>(&mut b).await.unwrap().is_none());
    }

    #[test]
    fn counters_are_shared_through_the_page() {
        let counters = Counters::create("test").unwrap();
        let duplicate = nix::unistd::dup(&counters.fd).unwrap();
        let other_view = Counters::map(duplicate).unwrap();
        counters.add(Counter::Requests, 3);
        other_view.add(Counter::Requests, 1);
        other_view.set(Counter::InFlight, 2);
        assert_eq!(counters.get(Counter::Requests), 4);
        assert_eq!(counters.get(Counter::InFlight), 2);
    }
}

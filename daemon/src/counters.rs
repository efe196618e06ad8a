//! An app's request counters, in a page of shared memory: the pool adds, the supervisor
//! reads, and the request path never talks to the supervisor. The page travels to a pool with
//! `Start` (a memfd) and survives pool restarts because the supervisor keeps it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// System calls the pool's seccomp filter denied (`pool::seccomp`).
    SyscallsDenied = 7,
    /// Outgoing HTTP requests refused (`pool::outgoing`).
    OutboundDenied = 8,
    /// Responses by status class (what the pool answered, the guest's or its own).
    Status1xx = 9,
    Status2xx = 10,
    Status3xx = 11,
    Status4xx = 12,
    Status5xx = 13,
    /// The sum of the times to the response head, in microseconds; the buckets follow.
    LatencySumMicros = 14,
    /// The first of `LATENCY_BUCKETS.len() + 1` slots: responses whose head came within each
    /// bound (not cumulative), the last past every bound.
    LatencyBucket0 = 15,
}

/// The latency histogram's upper bounds, in seconds (what Prometheus' defaults cover, from a
/// millisecond up: an edge request is usually fast).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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

    pub fn slot(&self, counter: Counter) -> &AtomicU64 {
        // SAFETY: every Counter index is inside the page, and the page is 8-byte aligned.
        unsafe { &*self.base.add(counter as usize) }
    }

    /// Counts one response: its status class and how long its head took.
    pub fn response(&self, status: u16, took: std::time::Duration) {
        let class = match status {
            100..=199 => Counter::Status1xx,
            200..=299 => Counter::Status2xx,
            300..=399 => Counter::Status3xx,
            400..=499 => Counter::Status4xx,
            _ => Counter::Status5xx,
        };
        self.add(class, 1);
        self.add(Counter::LatencySumMicros, took.as_micros() as u64);
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        // SAFETY: the buckets' slots end well inside the page (15 + 14 of 512).
        unsafe { &*self.base.add(Counter::LatencyBucket0 as usize + bucket) }
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The latency histogram: the sum of the times in seconds, and each bucket's count (not
    /// cumulative), the last past every bound.
    pub fn latency(&self) -> (f64, Vec<u64>) {
        let sum = self.get(Counter::LatencySumMicros) as f64 / 1e6;
        let buckets = (0..=LATENCY_BUCKETS.len())
            // SAFETY: as in `response`.
            .map(|i| {
                unsafe { &*self.base.add(Counter::LatencyBucket0 as usize + i) }
                    .load(Ordering::Relaxed)
            })
            .collect();
        (sum, buckets)
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

/// Counts a request as in flight from the moment it holds a slot until its instance is gone
/// (which may be after the response was sent).
pub struct InFlight(Arc<Counters>);

impl InFlight {
    pub fn enter(counters: Arc<Counters>) -> InFlight {
        counters.add(Counter::InFlight, 1);
        InFlight(counters)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.sub(Counter::InFlight, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn responses_are_counted_by_class_and_latency_bucket() {
        let counters = Counters::create("test").unwrap();
        let ms = std::time::Duration::from_millis;
        counters.response(200, ms(0));
        counters.response(204, ms(3));
        counters.response(503, ms(30_000));
        counters.response(404, ms(1));
        assert_eq!(counters.get(Counter::Status2xx), 2);
        assert_eq!(
            (
                counters.get(Counter::Status4xx),
                counters.get(Counter::Status5xx)
            ),
            (1, 1)
        );
        let (sum, buckets) = counters.latency();
        assert!((sum - 30.004).abs() < 1e-9, "{sum}");
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!((buckets[0], buckets[2], buckets[13]), (2, 1, 1));
        assert_eq!(buckets.iter().sum::<u64>(), 4);
    }

    #[test]
    fn a_request_is_in_flight_until_its_guard_is_gone() {
        let counters = Arc::new(Counters::create("test").unwrap());
        let first = InFlight::enter(Arc::clone(&counters));
        let second = InFlight::enter(Arc::clone(&counters));
        assert_eq!(counters.get(Counter::InFlight), 2);
        drop(first);
        assert_eq!(counters.get(Counter::InFlight), 1);
        drop(second);
        assert_eq!(counters.get(Counter::InFlight), 0);
    }
}

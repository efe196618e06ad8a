//! What one client connection may hold, and for how long (the app's `[http]` connection
//! limits): a deadline for the request head, one for a kept-alive connection waiting for its
//! next request, one for a response the client stops taking, and a cap on the request body.
//!
//! hyper's own header timer also runs while a kept-alive connection waits, so the two waits
//! could not have their own values; and it has no timer for a client that stops reading. A
//! `Clock` per connection keeps the phase instead: the IO wrapper (`Guarded`) moves it from
//! idle to head on the first byte of a request and notes writes that stall, the service moves
//! it to busy when a head is complete, and the response body (`Tracked`) back to idle when
//! hyper is done with it. `Deadlined` polls the connection and closes it when the phase's
//! deadline passes. Everything here runs in the connection's own task, so the lock is never
//! contended.

use bytes::Bytes;
use cairn_core::spec::ConnectionLimits;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is between requests, and so which deadline holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Receiving a request head (or, on a new connection, waiting for its first byte).
    Head { since: Instant },
    /// A request is being handled: the guest's own timeout bounds it.
    Busy,
    /// Kept alive after a response, waiting for the next request.
    Idle { since: Instant },
}

/// Why a connection was closed by its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive within `header_timeout`.
    Head,
    /// No next request within `idle_timeout`.
    Idle,
    /// The client took nothing of the response for `send_timeout`.
    Send,
}

struct State {
    phase: Phase,
    /// When the current write first found the socket full, if it still is.
    stalled: Option<Instant>,
}

/// One connection's phase and deadlines.
pub struct Clock {
    state: Mutex<State>,
    limits: ConnectionLimits,
}

impl Clock {
    pub fn new(limits: ConnectionLimits) -> Arc<Clock> {
        Arc::new(Clock {
            state: Mutex::new(State {
                phase: Phase::Head {
                    since: Instant::now(),
                },
                stalled: None,
            }),
            limits,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A complete request head arrived.
    pub fn request_started(&self) {
        self.state().phase = Phase::Busy;
    }

    /// hyper is done with a response's body.
    fn response_done(&self) {
        let mut state = self.state();
        if state.phase == Phase::Busy {
            state.phase = Phase::Idle {
                since: Instant::now(),
            };
        }
    }

    fn read(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = self.state();
        if let Phase::Idle { .. } = state.phase {
            state.phase = Phase::Head {
                since: Instant::now(),
            };
        }
    }

    fn wrote(&self, progressed: bool) {
        let mut state = self.state();
        if progressed {
            state.stalled = None;
            // The tail of a response can still be going out after hyper is done with its
            // body: a connection is idle only from its last byte sent.
            if let Phase::Idle { since } = &mut state.phase {
                *since = Instant::now();
            }
        } else if state.stalled.is_none() {
            state.stalled = Some(Instant::now());
        }
    }

    /// The earliest deadline now in force, and what passing it means.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        let state = self.state();
        let phase = match state.phase {
            Phase::Head { since } => Some((since + self.limits.header_timeout, Expired::Head)),
            Phase::Idle { since } => Some((since + self.limits.idle_timeout, Expired::Idle)),
            Phase::Busy => None,
        };
        let send = state
            .stalled
            .map(|since| (since + self.limits.send_timeout, Expired::Send));
        match (phase, send) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The connection's socket, telling the clock what moves. It also gives up the core after
/// each write that sent something: a response written on loopback wakes the client, and on a
/// device its clients often share the cores with the pool. The kernel lets a busy thread run
/// on to the end of its time slice before a woken one gets the core, so the client would read
/// the response up to a tick later (4 ms at HZ=250). Yielding lets it run now; with no one else
/// runnable the call returns at once. Measured under wrk sharing the cores: p99 at -c32 ~14%
/// lower, req/s no lower (BENCHMARKS.md, session 11).
pub struct Guarded {
    stream: tokio::net::TcpStream,
    clock: Arc<Clock>,
}

impl Guarded {
    pub fn new(stream: tokio::net::TcpStream, clock: Arc<Clock>) -> Guarded {
        Guarded { stream, clock }
    }

    fn after_write(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match &written {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.clock.wrote(true);
                std::thread::yield_now();
            }
            Poll::Pending => self.clock.wrote(false),
            _ => {}
        }
        written
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            self.clock.read(buf.filled().len() - before);
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How often a connection's clock is looked at when no deadline is nearer.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A connection future that ends (`Err(Expired)`) when its clock's deadline passes. The timer
/// is not moved per request (moving a tokio timer earlier takes the timer driver's lock and
/// can wake a parked thread, which a one-connection client measured at tens of microseconds
/// per request): it fires every `CHECK_EVERY`, or at the deadline when that is nearer, and
/// the clock is read then.
pub struct Deadlined<F> {
    inner: Pin<Box<F>>,
    clock: Arc<Clock>,
    sleep: Pin<Box<Sleep>>,
}

impl<F: Future> Deadlined<F> {
    pub fn new(inner: F, clock: Arc<Clock>) -> Deadlined<F> {
        let first = next_check(&clock, Instant::now());
        Deadlined {
            inner: Box::pin(inner),
            clock,
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// The wrapped connection (to ask it to shut down gracefully).
    pub fn inner(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<F: Future> Future for Deadlined<F> {
    type Output = Result<F::Output, Expired>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.inner.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if let Some((deadline, expired)) = self.clock.deadline() {
                if now >= deadline {
                    return Poll::Ready(Err(expired));
                }
            }
            let next = next_check(&self.clock, now);
            self.sleep.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// When the clock is next looked at: its deadline, or `CHECK_EVERY` from `now` if sooner.
fn next_check(clock: &Clock, now: Instant) -> Instant {
    let check = now + CHECK_EVERY;
    match clock.deadline() {
        Some((deadline, _)) => deadline.min(check),
        None => check,
    }
}

/// A response body that tells the clock when hyper is done with it (finished or dropped).
pub struct Tracked<B> {
    inner: B,
    clock: Arc<Clock>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, clock: Arc<Clock>) -> Tracked<B> {
        Tracked { inner, clock }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.clock.response_done();
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body cut off at `limit` bytes: past it the guest's read fails with the
/// `wasi:http` error for a body too large, and hyper closes the connection after the response
/// (the rest is never read).
pub struct Capped {
    inner: hyper::body::Incoming,
    left: u64,
    limit: u64,
}

impl Capped {
    pub fn new(inner: hyper::body::Incoming, limit: u64) -> Capped {
        Capped {
            inner,
            left: limit,
            limit,
        }
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |data| data.len() as u64);
                if len > self.left {
                    self.left = 0;
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(
                        Some(self.limit),
                    ))));
                }
                self.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(20),
            max_header_size: 16 << 10,
            max_body: 1 << 20,
            max_connections: 8,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_the_phase() {
        let clock = Clock::new(limits());
        let start = Instant::now();
        // A new connection must send its head within header_timeout.
        assert_eq!(
            clock.deadline(),
            Some((start + Duration::from_secs(10), Expired::Head))
        );
        clock.request_started();
        assert_eq!(
            clock.deadline(),
            None,
            "a request in progress has no deadline"
        );
        // Bytes read while busy (the body) change nothing.
        clock.read(100);
        assert_eq!(clock.deadline(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        clock.response_done();
        let idle = Instant::now();
        assert_eq!(
            clock.deadline(),
            Some((idle + Duration::from_secs(30), Expired::Idle))
        );
        // Nothing read is nothing; the first byte of the next request starts its head timer.
        clock.read(0);
        assert_eq!(clock.deadline().unwrap().1, Expired::Idle);
        tokio::time::advance(Duration::from_secs(2)).await;
        clock.read(1);
        assert_eq!(
            clock.deadline(),
            Some((Instant::now() + Duration::from_secs(10), Expired::Head))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_sets_the_send_deadline_until_it_moves() {
        let clock = Clock::new(limits());
        clock.request_started();
        let stalled = Instant::now();
        clock.wrote(false);
        tokio::time::advance(Duration::from_secs(5)).await;
        // A second stall keeps the first one's start.
        clock.wrote(false);
        assert_eq!(
            clock.deadline(),
            Some((stalled + Duration::from_secs(20), Expired::Send))
        );
        clock.wrote(true);
        assert_eq!(clock.deadline(), None);
        // While idle, the earlier of the two deadlines holds.
        clock.response_done();
        clock.wrote(false);
        assert_eq!(clock.deadline().unwrap().1, Expired::Send);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlined_ends_when_the_deadline_passes_and_not_before() {
        let clock = Clock::new(limits());
        let never = std::future::pending::<()>();
        let mut guarded = Deadlined::new(never, Arc::clone(&clock));
        let early = tokio::time::timeout(Duration::from_secs(9), &mut guarded).await;
        assert!(early.is_err(), "ended before the head deadline");
        assert_eq!(guarded.await, Err(Expired::Head));
    }
}

//! The HTTP front of one app, inside its pool process: an accept loop on the listener the
//! supervisor passed down, and hyper serving HTTP/1.1. Each request takes a concurrency slot or
//! is answered 503 at once (no unbounded queue), then runs on a fresh instance. Shutdown stops
//! accepting (closing the listener at once) and drains requests in flight.

use super::runtime::{LoadedApp, Outcome, RequestFailure};
use crate::counters::{Counter, Counters, InFlight};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// How long a connection accepted just before a drain may take to send its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// What the listener serves: one generation of the app, its concurrency slots, its counters.
pub struct Serving {
    pub app: LoadedApp,
    slots: Arc<Semaphore>,
    instances: u32,
    counters: Arc<Counters>,
    started: std::time::Instant,
}

impl Serving {
    pub fn new(app: LoadedApp, instances: u32, counters: Arc<Counters>) -> Serving {
        // The page outlives pools; this pool's idle clock starts now.
        counters.set(Counter::LastActive, 0);
        Serving {
            app,
            slots: Arc::new(Semaphore::new(instances as usize)),
            instances,
            counters,
            started: std::time::Instant::now(),
        }
    }

    /// Runs `GET path` through the guest, as the health check does, and returns the status.
    pub async fn probe(&self, path: &str) -> Result<u16, String> {
        let request = hyper::Request::get(format!("http://localhost{path}"))
            .header(hyper::header::HOST, "localhost")
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| -> wasmtime_wasi_http::Error { match never {} }),
            )
            .map_err(|e| format!("`{path}` is not a usable path: {e}"))?;
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|e| e.to_string())?;
        let in_flight = InFlight::enter(Arc::clone(&self.counters));
        match self.app.handle(request, permit, in_flight).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                Ok(status)
            }
            Err(RequestFailure::Guest(Outcome::Timeout)) => {
                Err("it did not answer within the request timeout".into())
            }
            Err(RequestFailure::Guest(outcome)) => Err(format!("it failed: {outcome:?}")),
            Err(RequestFailure::ErrorCode(code)) => {
                Err(format!("it answered with an error: {code}"))
            }
            Err(RequestFailure::Host(reason)) => Err(reason),
        }
    }

    /// How long since a request last finished (or since the pool started), when none is running.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.counters.get(Counter::InFlight) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.counters.get(Counter::LastActive));
        let since_start = self.started.elapsed();
        Some(since_start.saturating_sub(last.min(since_start)))
    }

    /// Returns once no guest runs: every slot is back. A guest whose client left, or that runs
    /// on after its answer was sent, holds its slot to its end without a connection.
    async fn guests_finished(&self) {
        let _all = self.slots.acquire_many(self.instances).await;
    }
}

pub struct HttpServer {
    stop: CancellationToken,
    accepting: tokio::task::JoinHandle<()>,
    connections: TaskTracker,
    serving: Arc<Serving>,
}

impl HttpServer {
    pub fn start(listener: TcpListener, serving: Arc<Serving>) -> HttpServer {
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let accepting = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&serving),
            stop.clone(),
            connections.clone(),
        ));
        HttpServer {
            stop,
            accepting,
            connections,
            serving,
        }
    }

    /// Stops accepting: once this returns, the accept loop has ended and this process's copy
    /// of the listener is closed, so every new connection goes to whoever else accepts on it
    /// (the next generation's pool, or the supervisor). Open connections are asked to close
    /// after their current request.
    pub async fn stop_accepting(&mut self) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stop.cancel();
        // The accept loop may have just accepted a connection it has not handed to the tracker
        // yet; only once it has returned is an empty tracker really empty.
        let _ = (&mut self.accepting).await;
        self.connections.close();
    }

    /// Stops accepting and waits up to `grace` for the requests in flight: their connections,
    /// then guests still running without one, so their output and outcome are reported.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop_accepting().await;
        let deadline = tokio::time::Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, self.connections.wait()).await;
        let _ = tokio::time::timeout_at(deadline, self.serving.guests_finished()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    serving: Arc<Serving>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let serving = Arc::clone(&serving);
        let stop = stop.clone();
        connections.spawn(async move {
            let requests = Arc::new(AtomicU64::new(0));
            let counted = Arc::clone(&requests);
            let service = service_fn(move |request| {
                counted.fetch_add(1, Ordering::Relaxed);
                let serving = Arc::clone(&serving);
                async move { Ok::<_, std::convert::Infallible>(handle(serving, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(YieldAfterWrite(stream)), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.cancelled() => {}
            }
            // A connection accepted just before the stop may not have sent its request yet,
            // and hyper closes a connection with no request in progress at once: the client
            // would see a reset. Give it a moment to send its first request.
            let first_request = async {
                while requests.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = tokio::time::timeout(FIRST_REQUEST_GRACE, first_request) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
}

async fn handle(
    serving: Arc<Serving>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    let counters = &serving.counters;
    counters.add(Counter::Requests, 1);
    let Ok(permit) = Arc::clone(&serving.slots).try_acquire_owned() else {
        counters.add(Counter::Rejected, 1);
        return plain(
            503,
            "the app is serving as many requests as its [limits] instances allow; retry shortly\n",
        );
    };
    let in_flight = InFlight::enter(Arc::clone(counters));
    let handled = serving.app.handle(request, permit, in_flight).await;
    counters.set(
        Counter::LastActive,
        serving.started.elapsed().as_millis() as u64,
    );
    match handled {
        Ok(response) => response,
        Err(RequestFailure::Guest(Outcome::Timeout)) => {
            plain(500, "the app did not finish within its [limits] timeout\n")
        }
        Err(RequestFailure::Guest(_)) => plain(
            500,
            "the app failed while handling this request; see `cairnctl logs`\n",
        ),
        Err(RequestFailure::ErrorCode(code)) => {
            plain(500, &format!("the app answered with an error: {code}\n"))
        }
        Err(RequestFailure::Host(reason)) => plain(400, &format!("bad request: {reason}\n")),
    }
}

fn plain(status: u16, text: &str) -> hyper::Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(text.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == 503 {
        response.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
    }
    response
}

/// A connection that gives up its core after each write that sent something.
///
/// A response written on loopback wakes the client, and on a device its clients often share
/// the cores with the pool. The kernel lets a busy thread run on to the end of its time slice
/// before a woken one gets the core, so the client would read the response up to a tick
/// later (4 ms at HZ=250). Yielding lets it run now; with no one else runnable the call
/// returns at once. Measured under wrk sharing the cores: p99 at -c32 ~14% lower, req/s no
/// lower (BENCHMARKS.md, session 11).
struct YieldAfterWrite(tokio::net::TcpStream);

impl YieldAfterWrite {
    fn after(written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            std::thread::yield_now();
        }
        written
    }
}

impl AsyncRead for YieldAfterWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for YieldAfterWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Self::after(Pin::new(&mut self.0).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Self::after(Pin::new(&mut self.0).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

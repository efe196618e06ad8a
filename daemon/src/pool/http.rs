//! The HTTP front of one app, inside its pool process: an accept loop on the listener the
//! supervisor passed down, and hyper serving HTTP/1.1. At most `max_connections` connections
//! are open at once (further ones wait in the listen backlog), each under the deadlines of
//! `connection`. Each request takes a concurrency slot or is answered 503 at once (no
//! unbounded queue), then runs on a fresh instance. Shutdown stops accepting (closing the
//! listener at once) and drains requests in flight.

use super::connection::{Capped, Clock, Deadlined, Expired, Guarded, Tracked};
use super::runtime::{LoadedApp, Outcome, RequestFailure};
use crate::counters::{Counter, Counters, InFlight};
use bytes::Bytes;
use cairn_core::spec::ConnectionLimits;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    limits: ConnectionLimits,
    counters: Arc<Counters>,
    started: std::time::Instant,
}

impl Serving {
    pub fn new(
        app: LoadedApp,
        instances: u32,
        limits: ConnectionLimits,
        counters: Arc<Counters>,
    ) -> Serving {
        // The page outlives pools; this pool's idle clock starts now.
        counters.set(Counter::LastActive, 0);
        Serving {
            app,
            slots: Arc::new(Semaphore::new(instances as usize)),
            instances,
            limits,
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

/// How often a failing accept is logged: the first failure at once, then one line per
/// interval saying how many there were.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The longest wait between accept attempts while they fail (out of file descriptors and the
/// like); it starts at a millisecond and doubles.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    serving: Arc<Serving>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let open = Arc::new(Semaphore::new(serving.limits.max_connections as usize));
    let mut failures = AcceptFailures::default();
    loop {
        // At the cap, new connections wait in the listen backlog until one closes.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = Arc::clone(&open).acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                failures.succeeded();
                stream
            }
            Err(error) => {
                let pause = failures.failed(&error);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let serving = Arc::clone(&serving);
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(stream, serving, stop).await;
            drop(permit);
        });
    }
}

/// Accept failures in a row: how long to pause before the next attempt and when to log.
#[derive(Default)]
struct AcceptFailures {
    in_a_row: u32,
    unlogged: u64,
    last_logged: Option<Instant>,
}

impl AcceptFailures {
    fn succeeded(&mut self) {
        self.in_a_row = 0;
    }

    /// Notes a failure (logging it when the interval allows) and says how long to pause.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.unlogged += 1;
        let due = self
            .last_logged
            .is_none_or(|last| last.elapsed() >= ACCEPT_LOG_INTERVAL);
        if due {
            tracing::warn!(
                %error,
                failures = self.unlogged,
                "accepting connections fails; retrying with backoff (out of file descriptors: raise LimitNOFILE or lower [http] max_connections)"
            );
            self.unlogged = 0;
            self.last_logged = Some(Instant::now());
        }
        let exponent = self.in_a_row.min(11) - 1;
        (Duration::from_millis(1) * (1u32 << exponent)).min(ACCEPT_BACKOFF_MAX)
    }
}

/// Serves one connection under its clock's deadlines until it closes, expires, or the pool
/// stops accepting (then it gets a moment for a first request and closes after the current one).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    serving: Arc<Serving>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let limits = serving.limits;
    let clock = Clock::new(limits);
    let requests = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&requests);
    let service_clock = Arc::clone(&clock);
    let service = service_fn(move |request| {
        counted.fetch_add(1, Ordering::Relaxed);
        service_clock.request_started();
        let serving = Arc::clone(&serving);
        let clock = Arc::clone(&service_clock);
        async move {
            let response = handle(serving, request).await;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, clock)))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_header_size(limits.max_header_size)
        // What hyper buffers per connection, each way: a head and some body.
        .max_buf_size(limits.max_header_size.max(8 << 10) + (64 << 10))
        .serve_connection(
            TokioIo::new(Guarded::new(stream, Arc::clone(&clock))),
            service,
        );
    let mut connection = Deadlined::new(connection, clock);
    tokio::select! {
        ended = &mut connection => return log_expiry(ended),
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
        ended = &mut connection => return log_expiry(ended),
        _ = tokio::time::timeout(FIRST_REQUEST_GRACE, first_request) => {}
    }
    connection.inner().graceful_shutdown();
    log_expiry(connection.await);
}

fn log_expiry<T>(ended: Result<T, Expired>) {
    if let Err(expired) = ended {
        tracing::debug!(?expired, "closed a connection at its deadline");
    }
}

async fn handle(
    serving: Arc<Serving>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    let started = std::time::Instant::now();
    let response = answer(&serving, request).await;
    serving
        .counters
        .response(response.status().as_u16(), started.elapsed());
    response
}

async fn answer(
    serving: &Arc<Serving>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    let counters = &serving.counters;
    counters.add(Counter::Requests, 1);
    let max_body = serving.limits.max_body;
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_body) {
        let mut response = plain(
            413,
            &format!("the request body is larger than this app takes ([http] max_body = {max_body} bytes)\n"),
        );
        // The body is not read: the connection cannot carry another request.
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return response;
    }
    let request = request.map(|body| Capped::new(body, max_body));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_accepts_back_off_to_a_second_and_log_once_per_interval() {
        let mut failures = AcceptFailures::default();
        let error = std::io::Error::from_raw_os_error(24); // EMFILE
        let pauses: Vec<Duration> = (0..14).map(|_| failures.failed(&error)).collect();
        assert_eq!(pauses[0], Duration::from_millis(1));
        assert_eq!(pauses[1], Duration::from_millis(2));
        assert_eq!(pauses[9], Duration::from_millis(512));
        assert!(pauses[10..].iter().all(|p| *p == ACCEPT_BACKOFF_MAX));
        // The first failure was logged; the 13 since wait for the interval to pass.
        assert_eq!(failures.unlogged, 13);
        failures.succeeded();
        assert_eq!(failures.failed(&error), Duration::from_millis(1));
    }
}

//! The HTTP front of one app: a bound listener, an accept loop and hyper serving HTTP/1.1.
//! Each request takes a concurrency slot or is answered 503 at once (no unbounded queue), then
//! runs on a fresh instance. A new generation is swapped in under the same listener without
//! dropping connections; shutdown stops accepting and drains requests in flight.

use crate::runtime::{LoadedApp, Outcome, RequestFailure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// Request counters of one app, kept across generations for the life of the daemon.
#[derive(Default)]
pub struct AppStats {
    pub requests: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub rejected: AtomicU64,
}

/// What a listener serves right now: one generation of the app and its concurrency slots.
pub struct Serving {
    pub app: LoadedApp,
    pub instances: u32,
    slots: Arc<Semaphore>,
}

impl Serving {
    pub fn new(app: LoadedApp, instances: u32) -> Serving {
        Serving {
            app,
            instances,
            slots: Arc::new(Semaphore::new(instances as usize)),
        }
    }

    pub fn in_flight(&self) -> u64 {
        (self.instances as usize).saturating_sub(self.slots.available_permits()) as u64
    }
}

pub struct HttpServer {
    pub addr: SocketAddr,
    current: Arc<RwLock<Arc<Serving>>>,
    stop: CancellationToken,
    connections: TaskTracker,
}

/// Binds `addr`, saying plainly when it is taken.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

impl HttpServer {
    pub fn start(listener: TcpListener, serving: Serving, stats: Arc<AppStats>) -> HttpServer {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let current = Arc::new(RwLock::new(Arc::new(serving)));
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&current),
            stats,
            stop.clone(),
            connections.clone(),
        ));
        HttpServer {
            addr,
            current,
            stop,
            connections,
        }
    }

    /// Serves `serving` from now on; requests already running finish on the old generation.
    pub fn swap(&self, serving: Serving) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(serving);
    }

    pub fn serving(&self) -> Arc<Serving> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops accepting, asks open connections to close after their current request, and waits
    /// up to `grace` for them.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.connections.close();
        let _ = tokio::time::timeout(grace, self.connections.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    current: Arc<RwLock<Arc<Serving>>>,
    stats: Arc<AppStats>,
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
        let current = Arc::clone(&current);
        let stats = Arc::clone(&stats);
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let serving = Arc::clone(&current.read().unwrap_or_else(|p| p.into_inner()));
                let stats = Arc::clone(&stats);
                async move { Ok::<_, std::convert::Infallible>(handle(serving, stats, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

async fn handle(
    serving: Arc<Serving>,
    stats: Arc<AppStats>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(permit) = Arc::clone(&serving.slots).try_acquire_owned() else {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        return plain(
            503,
            "the app is serving as many requests as its [limits] instances allow; retry shortly\n",
        );
    };
    match serving.app.handle(request, permit).await {
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

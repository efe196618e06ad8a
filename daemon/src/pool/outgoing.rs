//! A guest's outgoing HTTP requests (`wasi:http/outgoing-handler`), the pool's side: each is
//! checked against the app's `[outbound] allowed_hosts` (a refusal is the interface's
//! `HTTP-request-denied`, counted and named in the app's log), its connection comes from
//! cairnd (`pool::connect`), HTTPS is spoken here with the authorities cairnd sent, and the
//! whole call, from connecting to the last byte of the response, is bounded by the app's
//! outbound timeout and its response by `max_response`.

use super::connect::{ConnectError, Connector};
use bytes::Bytes;
use cairn_core::outbound::{self, AllowedHost};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Refused URLs named per request; more are only counted.
pub const DENIALS_NOTED: usize = 8;
/// Outgoing calls one instance may have open at once (from its start until its response
/// body's connection closes); past it a call fails with `connection-limit-reached`.
pub const MAX_OPEN_CALLS: usize = 16;

/// What an app's pool may reach, built once at load.
pub struct OutboundAccess {
    pub connector: Arc<Connector>,
    pub allowed: Vec<AllowedHost>,
    pub timeout: Duration,
    pub max_response: u64,
    /// `None` when the app may not use HTTPS.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

impl OutboundAccess {
    /// The TLS client of an app, trusting the PEM certificates in `roots` (cairnd sends the
    /// system's and the app's `ca_file`). Certificates that do not parse are skipped, as a
    /// system bundle may hold some rustls does not take.
    pub fn tls(roots: &[u8]) -> Result<Option<tokio_rustls::TlsConnector>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        if roots.is_empty() {
            return Ok(None);
        }
        let mut store = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(roots).flatten() {
            let _ = store.add(certificate);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
    }
}

/// The outgoing requests one guest request was refused.
#[derive(Default)]
pub struct Denials {
    /// The URLs refused (and why, when cairnd refused them), up to `DENIALS_NOTED`.
    pub noted: Vec<String>,
    /// How many were refused in all.
    pub denied: u64,
}

impl Denials {
    fn note(&mut self, url: String) {
        self.denied += 1;
        if self.noted.len() < DENIALS_NOTED {
            self.noted.push(url);
        }
    }
}

/// The hooks of one request's `Store`.
#[derive(Default)]
pub struct OutgoingHttp {
    access: Option<Arc<OutboundAccess>>,
    /// Refused here, before any call to cairnd.
    denials: Denials,
    /// Refused by cairnd (the address rule), noted by the call's own task; made at the first
    /// call sent, so a request that sends none allocates nothing.
    late: Option<Arc<Mutex<Denials>>>,
    /// The calls of this instance still open (`MAX_OPEN_CALLS`), made with `late`.
    open: Option<Arc<AtomicUsize>>,
}

/// One open call, counted in its instance's `open` until dropped (with its connection).
struct OpenCall(Arc<AtomicUsize>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OutgoingHttp {
    pub fn new(access: Option<Arc<OutboundAccess>>) -> OutgoingHttp {
        OutgoingHttp {
            access,
            ..Default::default()
        }
    }

    /// Every refusal of the request, once its instance is gone.
    pub fn take(&mut self) -> Denials {
        let mut all = std::mem::take(&mut self.denials);
        if let Some(late) = self.late.take() {
            let late = std::mem::take(&mut *late.lock().unwrap_or_else(|p| p.into_inner()));
            all.denied += late.denied;
            for url in late.noted {
                if all.noted.len() < DENIALS_NOTED {
                    all.noted.push(url);
                }
            }
        }
        all
    }
}

/// The URL without its query, which may carry credentials; cut to a line's worth.
fn describe(request: &http::Request<WasiBody>) -> String {
    let uri = request.uri();
    // Host and port only: an authority may carry `user:password@`.
    let port = uri.port().map(|p| format!(":{p}")).unwrap_or_default();
    let mut url = format!(
        "{} {}://{}{port}{}",
        request.method(),
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or(""),
        uri.path()
    );
    cairn_core::text::cut(&mut url, 200, "…");
    url
}

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type Sent = Result<(http::Response<WasiBody>, IoFuture), Error>;

impl WasiHttpHooks for OutgoingHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let allowed = match (&self.access, uri.host()) {
            (Some(access), Some(host)) => {
                outbound::find(&access.allowed, https, host, port).is_some()
            }
            _ => false,
        };
        let access = match &self.access {
            Some(access) if allowed => Arc::clone(access),
            _ => {
                let why = if self.access.is_some() {
                    "not in [outbound] allowed_hosts"
                } else {
                    "the app has no [outbound] table"
                };
                self.denials.note(format!("{} ({why})", describe(&request)));
                return Box::new(async { Err(Error::HttpRequestDenied) });
            }
        };
        let open = Arc::clone(self.open.get_or_insert_with(Default::default));
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_OPEN_CALLS {
            open.fetch_sub(1, Ordering::Relaxed);
            return Box::new(async { Err(Error::ConnectionLimitReached) });
        }
        let call = OpenCall(open);
        let late = Arc::clone(self.late.get_or_insert_with(Default::default));
        Box::new(async move {
            let url = describe(&request);
            let sent = send(&access, request, options, https, port, call).await;
            if let Err(Refusal::Denied(why)) = &sent {
                late.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .note(format!("{url} ({why})"));
            }
            sent.map_err(Refusal::into_error)
        })
    }
}

/// Why a call failed: cairnd's refusal is told apart, to be noted.
enum Refusal {
    Denied(String),
    Failed(Error),
}

impl Refusal {
    fn into_error(self) -> Error {
        match self {
            Refusal::Denied(_) => Error::HttpRequestDenied,
            Refusal::Failed(error) => error,
        }
    }
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Refusal {
        Refusal::Failed(error)
    }
}

async fn send(
    access: &OutboundAccess,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    https: bool,
    port: u16,
    call: OpenCall,
) -> Result<(http::Response<WasiBody>, IoFuture), Refusal> {
    let deadline = Instant::now() + access.timeout;
    let bound = |asked: Option<Duration>| asked.map_or(access.timeout, |d| d.min(access.timeout));
    let options = options.unwrap_or_default();
    let host = request
        .uri()
        .host()
        .ok_or(Error::HttpRequestUriInvalid)?
        .to_string();
    // Waiting for one of the pool's connection slots counts against the call's time too.
    let connect_by = deadline.min(Instant::now() + bound(options.connect_timeout));
    let connecting = access
        .connector
        .connect(https, &host, port, bound(options.connect_timeout));
    let fd = tokio::time::timeout_at(connect_by, connecting)
        .await
        .map_err(|_| Refusal::Failed(Error::ConnectionTimeout))?
        .map_err(|error| match error {
            ConnectError::Denied(why) => Refusal::Denied(why),
            ConnectError::Dns(_) => Refusal::Failed(Error::DnsError {
                rcode: None,
                info_code: None,
            }),
            ConnectError::DnsTimeout => Refusal::Failed(Error::DnsTimeout),
            ConnectError::Timeout => Refusal::Failed(Error::ConnectionTimeout),
            ConnectError::Refused(_) => Refusal::Failed(Error::ConnectionRefused),
            ConnectError::Unreachable(_) => Refusal::Failed(Error::DestinationUnavailable),
            ConnectError::Other(why) => Refusal::Failed(Error::InternalError(Some(why))),
        })?;
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true).map_err(Error::Connect)?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(Error::Connect)?;
    let remaining = || deadline.saturating_duration_since(Instant::now());

    type Io = Box<dyn Stream>;
    let io: Io = if https {
        let Some(tls) = &access.tls else {
            return Err(Refusal::Failed(Error::TlsCertificateError));
        };
        // The name checked is the URL's host, never the address cairnd connected to.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        match tokio::time::timeout(remaining(), tls.connect(name, stream)).await {
            Err(_) => return Err(Error::ConnectionTimeout.into()),
            Ok(Err(error)) => return Err(tls_error(error).into()),
            Ok(Ok(stream)) => Box::new(stream),
        }
    } else {
        Box::new(stream)
    };
    let handshake =
        hyper::client::conn::http1::Builder::new().handshake(hyper_util::rt::TokioIo::new(io));
    let (mut sender, connection) = match tokio::time::timeout(remaining(), handshake).await {
        Err(_) => return Err(Error::ConnectionTimeout.into()),
        Ok(result) => result.map_err(Error::from)?,
    };
    // The request line holds the path only: the scheme and authority are for proxies.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;

    // The connection is driven while the response head is awaited, and afterwards by the
    // future handed back (wasmtime spawns it for as long as the body is read).
    let mut connection = Some(Box::pin(connection));
    let first_byte = bound(options.first_byte_timeout).min(remaining());
    let response = {
        let mut response = Box::pin(tokio::time::timeout(
            first_byte,
            sender.send_request(request),
        ));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            if let Some(driving) = connection.as_mut() {
                if let Poll::Ready(ended) = driving.as_mut().poll(cx) {
                    // Done with it either way; a failure fails the request future too, which
                    // says why.
                    connection = None;
                    if let Err(error) = ended {
                        tracing::debug!(%error, "outgoing connection ended before the response");
                    }
                    return response.as_mut().poll(cx);
                }
            }
            Poll::Pending
        })
        .await
    };
    let response = match response {
        Err(_) => return Err(Error::ConnectionReadTimeout.into()),
        Ok(result) => result.map_err(Error::from)?,
    };
    let between = bound(options.between_bytes_timeout);
    let limited = response.map(|incoming| {
        Limited {
            incoming,
            read: 0,
            max: access.max_response,
            between,
            idle: Box::pin(tokio::time::sleep(between)),
            waiting: false,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
        .boxed_unsync()
    });
    let driver: IoFuture = Box::new(async move {
        let _open = call;
        let Some(connection) = connection else {
            return Ok(());
        };
        connection.await.map_err(|error| {
            if error.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(error)
            }
        })
    });
    Ok((limited, driver))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T> Stream for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

fn tls_error(error: std::io::Error) -> Error {
    let certificate = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
    if certificate {
        Error::TlsCertificateError
    } else {
        Error::Tls(error)
    }
}

/// A response body cut at `max` bytes, at the call's deadline, and when no data comes for
/// `between`: each cut is an error the guest reads where the body would go on.
struct Limited {
    incoming: hyper::body::Incoming,
    read: u64,
    max: u64,
    between: Duration,
    idle: Pin<Box<Sleep>>,
    /// The guest is waiting for data since `idle` was last set: a guest that reads slowly is
    /// not taken for a silent server.
    waiting: bool,
    deadline: Pin<Box<Sleep>>,
}

impl Body for Limited {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            let next = Instant::now() + this.between;
            this.idle.as_mut().reset(next);
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        if polled.is_ready() {
            this.waiting = false;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if this.read > this.max {
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(this.max)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Error::from(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Error::HttpResponseTimeout)));
                }
                if this.idle.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

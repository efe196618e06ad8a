//! Outgoing HTTP, cairnd's side: the connections a pool asks for on its connect socket
//! (`pool::connect`), and the certificate authorities it is given to check HTTPS servers with.
//!
//! The pool checks `[outbound] allowed_hosts` before it asks; cairnd checks again here against
//! the list it was bound to at spawn, because a pool whose guest escaped could ask for
//! anything. Only cairnd resolves names, so only cairnd can apply the address rule: an
//! address that is loopback, link-local, unspecified, multicast or broadcast is connected to
//! only when an entry that allows the request names it (`cairn_core::outbound`).

use crate::pool::connect::{self, ConnectCall, ConnectError, ConnectReply, MAX_CONNECTING};
use crate::spec::{AppName, AppSpec};
use cairn_core::outbound::{self, AllowedHost, Target};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Where Debian (and most distributions) keep the system's certificate authorities.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The largest system bundle read (Debian's is about 220 KB).
const MAX_SYSTEM_ROOTS: u64 = 2 << 20;
/// The largest `[outbound] ca_file` read.
pub const MAX_CA_FILE: u64 = 1 << 20;

/// What a pool may connect to: its app's list, and the longest a call may take.
pub struct Grant {
    pub allowed: Vec<AllowedHost>,
    pub timeout: Duration,
}

impl Grant {
    /// The grant of `spec` (`None`: the app has no `[outbound]`, every call is refused).
    pub fn of(spec: &AppSpec) -> Option<Arc<Grant>> {
        let outbound = spec.outbound.as_ref()?;
        Some(Arc::new(Grant {
            allowed: outbound.allowed_hosts.clone(),
            timeout: outbound.call_timeout(&spec.limits),
        }))
    }
}

/// The certificate authorities a pool checks HTTPS servers with, as PEM text: the system's
/// and the app's `ca_file`. Empty when the app may not use HTTPS. An unreadable `ca_file` is
/// an error (the app does not start: it would fail every call); missing system roots are not
/// (a device may trust only its own CA).
pub fn tls_roots(spec: &AppSpec) -> Result<Vec<u8>, String> {
    let Some(outbound) = spec.outbound.as_ref().filter(|o| o.allows_https()) else {
        return Ok(Vec::new());
    };
    let mut roots = match crate::regular_file::read(SYSTEM_ROOTS.as_ref(), MAX_SYSTEM_ROOTS) {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(app = %spec.name, %error, "no system certificate authorities for HTTPS calls");
            Vec::new()
        }
    };
    if let Some(path) = &outbound.ca_file {
        let extra = crate::regular_file::read(path.as_ref(), MAX_CA_FILE)
            .map_err(|error| format!("[outbound] ca_file: {error}"))?;
        let certificates = certificate_blocks(&String::from_utf8_lossy(&extra));
        if certificates.is_empty() {
            return Err(format!(
                "[outbound] ca_file: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            ));
        }
        roots.push(b'\n');
        roots.extend_from_slice(certificates.as_bytes());
    }
    Ok(roots)
}

/// Only the certificate blocks of a PEM text: a file that also holds a private key (a
/// combined certificate and key) gives the pool its certificates and nothing else.
fn certificate_blocks(pem: &str) -> String {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = String::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(length) = rest[start..].find(END) else {
            break;
        };
        let end = start + length + END.len();
        blocks.push_str(&rest[start..end]);
        blocks.push('\n');
        rest = &rest[end..];
    }
    blocks
}

/// Serves one pool's connect socket until the pool closes it: at most `MAX_CONNECTING`
/// connections are made at once (a pool asking for more waits, unread). A pool that breaks
/// the protocol is hung up on.
pub async fn serve(socket: OwnedFd, grant: Option<Arc<Grant>>, app: AppName) {
    let socket = match connect::register(socket) {
        Ok(socket) => Arc::new(socket),
        Err(error) => {
            tracing::warn!(app = %app, %error, "cannot serve a pool's connect socket");
            return;
        }
    };
    let connecting = Arc::new(Semaphore::new(MAX_CONNECTING));
    let mut buffer = [0u8; connect::MAX_MESSAGE];
    loop {
        // Descriptors a pool sends are dropped (closed) with the message: none is expected.
        let call = match connect::receive(&socket, &mut buffer).await {
            Ok(Some((bytes, _fds))) => postcard::from_bytes::<ConnectCall>(&buffer[..bytes]),
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(app = %app, %error, "a pool broke the connect protocol; hanging up");
                break;
            }
        };
        let Ok(call) = call else {
            tracing::warn!(app = %app, "a pool sent a connect call that does not parse; hanging up");
            break;
        };
        // The call's time runs from now, however long it waits for a slot.
        let deadline = Instant::now()
            + Duration::from_millis(call.timeout_ms)
                .min(grant.as_ref().map_or(Duration::ZERO, |g| g.timeout));
        let Ok(permit) = Arc::clone(&connecting).acquire_owned().await else {
            break;
        };
        let (socket, grant) = (Arc::clone(&socket), grant.clone());
        tokio::spawn(async move {
            let result = match &grant {
                Some(grant) => open(grant, &call, deadline).await,
                None => Err(ConnectError::Denied(
                    "the app has no [outbound] table".to_string(),
                )),
            };
            let (result, stream) = match result {
                Ok(stream) => (Ok(()), Some(stream)),
                Err(error) => (Err(error), None),
            };
            let reply = ConnectReply {
                id: call.id,
                result: result.map_err(ConnectError::clipped),
            };
            if let Ok(body) = postcard::to_stdvec(&reply) {
                let pass = stream.as_ref().map(|s| s.as_raw_fd());
                let _ = connect::send(&socket, &body, pass).await;
            }
            // Our copy of the connection closes here; the pool holds its own.
            drop(stream);
            drop(permit);
        });
    }
}

/// Name lookups running at once in cairnd, for all pools. `getaddrinfo` cannot be cancelled:
/// a lookup whose call gave up still holds its thread (and its permit) until the resolver
/// answers, so slow or unanswerable names never take more than this many of the runtime's
/// blocking threads, which the store and admission also use.
const MAX_LOOKUPS: usize = 8;

static LOOKUPS: Semaphore = Semaphore::const_new(MAX_LOOKUPS);

/// The addresses of `name`, within `deadline`.
async fn resolve(
    name: &str,
    port: u16,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let permit = tokio::time::timeout_at(deadline.into(), LOOKUPS.acquire())
        .await
        .map_err(|_| ConnectError::DnsTimeout)?
        .map_err(|_| ConnectError::Other("name lookups are closed".into()))?;
    let target = (name.to_string(), port);
    let lookup = tokio::task::spawn_blocking(move || {
        let _held = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&target).map(|found| found.take(16).collect())
    });
    match tokio::time::timeout_at(deadline.into(), lookup).await {
        Err(_) => Err(ConnectError::DnsTimeout),
        Ok(Err(error)) => Err(ConnectError::Other(error.to_string())),
        Ok(Ok(Err(error))) => Err(ConnectError::Dns(format!("cannot resolve {name}: {error}"))),
        Ok(Ok(Ok(found))) => Ok(found),
    }
}

/// Checks `call` against the grant, resolves, applies the address rule and connects, all
/// by `deadline`.
async fn open(
    grant: &Grant,
    call: &ConnectCall,
    deadline: Instant,
) -> Result<OwnedFd, ConnectError> {
    let denied = |why: &str| ConnectError::Denied(why.to_string());
    let target = Target::of(&call.host);
    let entries: Vec<&AllowedHost> = grant
        .allowed
        .iter()
        .filter(|entry| entry.allows(call.https, &target, call.port))
        .collect();
    if entries.is_empty() {
        return Err(denied("not in [outbound] allowed_hosts"));
    }
    let addresses: Vec<SocketAddr> = match target {
        Target::Address(address) => vec![SocketAddr::new(address, call.port)],
        Target::Name(name) => resolve(&name, call.port, deadline).await?,
        // No entry allows it (`allows`), so it never gets here.
        Target::Unusable => return Err(denied("not a usable host name")),
    };
    let usable: Vec<SocketAddr> = addresses
        .iter()
        .copied()
        .filter(|address| {
            !outbound::is_special(address.ip())
                || entries.iter().any(|entry| entry.names(address.ip()))
        })
        .collect();
    if usable.is_empty() {
        return Err(match addresses.first() {
            Some(address) => denied(&format!(
                "{} is a loopback, link-local or other special address, which only an allowed_hosts entry naming it reaches",
                address.ip()
            )),
            None => ConnectError::Dns(format!("{} has no address", call.host)),
        });
    }
    let mut last = None;
    for address in usable {
        match tokio::time::timeout_at(deadline.into(), tokio::net::TcpStream::connect(address))
            .await
        {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let stream = stream
                    .into_std()
                    .map_err(|e| ConnectError::Other(e.to_string()))?;
                return Ok(OwnedFd::from(stream));
            }
            Ok(Err(error)) => last = Some((address, error)),
        }
    }
    let (address, error) = last.expect("one address at least was tried");
    Err(match error.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            ConnectError::Refused(format!("{address} refused the connection"))
        }
        _ => ConnectError::Unreachable(format!("cannot connect to {address}: {error}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::unix::AsyncFd;

    /// Speaks to `serve` as a pool would, or as a pool whose guest escaped: any call at all.
    async fn ask(pool: &AsyncFd<OwnedFd>, call: &ConnectCall) -> (ConnectReply, Vec<OwnedFd>) {
        connect::send(pool, &postcard::to_stdvec(call).unwrap(), None)
            .await
            .unwrap();
        let mut buffer = [0u8; connect::MAX_MESSAGE];
        let (bytes, fds) = connect::receive(pool, &mut buffer).await.unwrap().unwrap();
        (postcard::from_bytes(&buffer[..bytes]).unwrap(), fds)
    }

    fn call(id: u32, host: &str, port: u16) -> ConnectCall {
        ConnectCall {
            id,
            https: false,
            host: host.to_string(),
            port,
            timeout_ms: 5_000,
        }
    }

    #[tokio::test]
    async fn cairnd_checks_every_call_itself_whatever_the_pool_asks() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let entries = [format!("http://127.0.0.1:{port}"), "http://*:*".to_string()];
        let grant = Arc::new(Grant {
            allowed: entries.iter().map(|e| e.parse().unwrap()).collect(),
            timeout: Duration::from_secs(5),
        });
        let (cairnd, pool) = connect::pair().unwrap();
        let served = tokio::spawn(serve(cairnd, Some(grant), "caller".parse().unwrap()));
        let pool = connect::register(pool).unwrap();

        // The listed address: a connected socket comes back, and it reaches the listener.
        let (reply, fds) = ask(&pool, &call(1, "127.0.0.1", port)).await;
        assert_eq!((reply.id, reply.result), (1, Ok(())));
        assert_eq!(fds.len(), 1);
        let (_, from) = listener.accept().unwrap();
        let stream = std::net::TcpStream::from(fds.into_iter().next().unwrap());
        assert_eq!(stream.local_addr().unwrap(), from);

        // Loopback through the wildcard, by address or by a name that resolves to it, and
        // the cloud metadata address: refused, nothing connected.
        for (id, host, p) in [
            (2, "127.0.0.1", port + 1),
            (3, "localhost", port),
            (4, "169.254.169.254", 80),
            (5, "[::1]", port),
            (6, "0.0.0.0", port),
        ] {
            let (reply, fds) = ask(&pool, &call(id, host, p)).await;
            assert!(
                matches!(&reply.result, Err(ConnectError::Denied(why)) if why.contains("special address")),
                "{host}:{p}: {:?}",
                reply.result
            );
            assert_eq!((reply.id, fds.len()), (id, 0));
        }
        // HTTPS is not allowed by any entry.
        let mut https = call(7, "127.0.0.1", port);
        https.https = true;
        let (reply, _) = ask(&pool, &https).await;
        assert_eq!(
            reply.result,
            Err(ConnectError::Denied(
                "not in [outbound] allowed_hosts".into()
            ))
        );

        // A host name longer than DNS takes: refused, and the socket still serves.
        let (reply, fds) = ask(&pool, &call(8, &"a".repeat(1900), port)).await;
        assert!(
            matches!(reply.result, Err(ConnectError::Denied(_))),
            "{:?}",
            reply.result
        );
        assert!(fds.is_empty());
        let (reply, fds) = ask(&pool, &call(9, "127.0.0.1", port)).await;
        assert_eq!((reply.id, reply.result, fds.len()), (9, Ok(()), 1));

        // A message that is not a call: cairnd hangs up.
        connect::send(&pool, b"\xff\xff\xff\xff\xff", None)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("serve returns")
            .unwrap();
    }

    #[test]
    fn only_certificates_of_a_ca_file_reach_the_pool() {
        let pem = "junk\n-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n\
                   -----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----\nmore junk\n\
                   -----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nCUT";
        let blocks = certificate_blocks(pem);
        assert_eq!(
            blocks,
            "-----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----\n"
        );
        assert!(certificate_blocks("-----BEGIN PRIVATE KEY-----\nX\n").is_empty());
    }

    #[tokio::test]
    async fn an_app_without_outbound_gets_nothing() {
        let (cairnd, pool) = connect::pair().unwrap();
        tokio::spawn(serve(cairnd, None, "closed".parse().unwrap()));
        let pool = connect::register(pool).unwrap();
        let (reply, fds) = ask(&pool, &call(9, "127.0.0.1", 80)).await;
        assert!(matches!(reply.result, Err(ConnectError::Denied(_))));
        assert!(fds.is_empty());
    }
}

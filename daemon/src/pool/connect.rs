//! The connect socket: how a pool gets a TCP connection for a guest's outgoing request. A
//! pool cannot resolve names or open sockets (its system-call filter refuses `socket` and
//! `connect`), so it asks cairnd, which checks the app's `[outbound] allowed_hosts` again,
//! resolves the name, applies the address rule (`cairn_core::outbound`), connects, and passes
//! the connected socket back (SCM_RIGHTS).
//!
//! The socket is a `SOCK_SEQPACKET` pair, so each message and the descriptor sent with it
//! arrive together and whole. Messages are postcard bodies of at most `MAX_MESSAGE` bytes: a
//! `ConnectCall` from the pool, a `ConnectReply` with the same `id` from cairnd (with the
//! socket when it is `Ok`), in any order.

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Semaphore};

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 2048;
/// Connections one pool may be waiting for at once; more calls wait their turn.
pub const MAX_CONNECTING: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectCall {
    pub id: u32,
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// How long cairnd may take to resolve and connect (it is bounded by the app's own
    /// outbound timeout too).
    pub timeout_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectReply {
    pub id: u32,
    pub result: Result<(), ConnectError>,
}

/// Why no connection came; each maps to a `wasi:http` error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ConnectError {
    /// Not in the app's list, or only reachable at an address the list does not name.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Dns(String),
    #[error("resolving the name took longer than the call's timeout")]
    DnsTimeout,
    #[error("connecting took longer than the call's timeout")]
    Timeout,
    #[error("{0}")]
    Refused(String),
    /// No route, host down, and other failures to reach the address.
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Other(String),
}

impl ConnectError {
    /// The error with its text cut to `MAX_TEXT` bytes, so a reply always fits one message.
    pub fn clipped(self) -> ConnectError {
        let clip = |mut text: String| {
            cairn_core::text::cut(&mut text, MAX_TEXT, "…");
            text
        };
        match self {
            ConnectError::Denied(t) => ConnectError::Denied(clip(t)),
            ConnectError::Dns(t) => ConnectError::Dns(clip(t)),
            ConnectError::Refused(t) => ConnectError::Refused(clip(t)),
            ConnectError::Unreachable(t) => ConnectError::Unreachable(clip(t)),
            ConnectError::Other(t) => ConnectError::Other(clip(t)),
            other => other,
        }
    }
}

/// The longest text a reply carries.
const MAX_TEXT: usize = 512;

/// A connected pair for `Start`: (cairnd's end, the pool's end), both non-blocking.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(std::io::Error::from)
}

/// `socket` registered with the runtime's reactor (on the current runtime).
pub fn register(socket: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, which stays open, and is the same descriptor,
    // until the `AsyncFd` drops it.
    unsafe { AsyncFd::register(socket) }.map_err(|error| error.into_parts().1)
}

/// Sends one message, with `pass` when given.
pub async fn send(
    socket: &AsyncFd<OwnedFd>,
    body: &[u8],
    pass: Option<RawFd>,
) -> std::io::Result<()> {
    let fds = pass.map(|fd| [fd]);
    loop {
        let mut guard = socket.writable().await?;
        let iov = [std::io::IoSlice::new(body)];
        let control: Vec<ControlMessage> = fds
            .iter()
            .map(|fds| ControlMessage::ScmRights(fds))
            .collect();
        match guard.try_io(|inner| {
            sendmsg::<()>(
                inner.as_raw_fd(),
                &iov,
                &control,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(result) => return result.map(drop),
            Err(_would_block) => continue,
        }
    }
}

/// Receives one message into `buffer` and the descriptors that came with it; `None` when the
/// other side has closed. A message longer than the buffer is an error (it was cut).
pub async fn receive(
    socket: &AsyncFd<OwnedFd>,
    buffer: &mut [u8],
) -> std::io::Result<Option<(usize, Vec<OwnedFd>)>> {
    loop {
        let mut guard = socket.readable().await?;
        let received = guard.try_io(|inner| {
            let mut iov = [std::io::IoSliceMut::new(buffer)];
            // Room for the most descriptors one message can carry (the kernel's SCM_MAX_FD), so
            // none the kernel installs is left unparsed, and so unclosed.
            let mut space = nix::cmsg_space!([RawFd; 253]);
            let message = recvmsg::<()>(
                inner.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for control in message.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(raw) = control {
                    // SAFETY: the kernel just installed these descriptors in this process for
                    // this message; nothing else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let cut = message
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            Ok((message.bytes, fds, cut))
        });
        match received {
            Ok(Ok((0, _, _))) => return Ok(None),
            Ok(Ok((_, _, true))) => {
                return Err(std::io::Error::other(format!(
                    "a message over the {MAX_MESSAGE}-byte bound, or with too many descriptors"
                )))
            }
            Ok(Ok((bytes, fds, false))) => return Ok(Some((bytes, fds))),
            Ok(Err(error)) => return Err(error),
            Err(_would_block) => continue,
        }
    }
}

type Waiting = HashMap<u32, oneshot::Sender<Result<OwnedFd, ConnectError>>>;

/// The pool's end: asks for connections from any request and routes each answer to its
/// caller.
pub struct Connector {
    socket: Arc<AsyncFd<OwnedFd>>,
    /// `None` once the socket has failed: no answer will come.
    waiting: Arc<Mutex<Option<Waiting>>>,
    next_id: AtomicU32,
    connecting: Semaphore,
}

impl Connector {
    /// Starts the task that reads answers (on the current runtime).
    pub fn start(socket: OwnedFd) -> std::io::Result<Arc<Connector>> {
        let socket = Arc::new(register(socket)?);
        let waiting: Arc<Mutex<Option<Waiting>>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (reader, answers) = (Arc::clone(&socket), Arc::clone(&waiting));
        tokio::spawn(async move {
            let mut buffer = [0u8; MAX_MESSAGE];
            while let Ok(Some((bytes, mut fds))) = receive(&reader, &mut buffer).await {
                let Ok(reply) = postcard::from_bytes::<ConnectReply>(&buffer[..bytes]) else {
                    break;
                };
                let caller = answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|waiting| waiting.remove(&reply.id));
                let answer = match reply.result {
                    Ok(()) if fds.len() == 1 => Ok(fds.remove(0)),
                    Ok(()) => Err(ConnectError::Other(
                        "cairnd answered without a connection".into(),
                    )),
                    Err(error) => Err(error),
                };
                if let Some(caller) = caller {
                    let _ = caller.send(answer);
                }
            }
            // Every caller still waiting hears the service is gone (its sender drops).
            answers.lock().unwrap_or_else(|p| p.into_inner()).take();
        });
        Ok(Arc::new(Connector {
            socket,
            waiting,
            next_id: AtomicU32::new(0),
            connecting: Semaphore::new(MAX_CONNECTING),
        }))
    }

    /// Asks cairnd for a connection to `host:port`.
    pub async fn connect(
        &self,
        https: bool,
        host: &str,
        port: u16,
        timeout: std::time::Duration,
    ) -> Result<OwnedFd, ConnectError> {
        let gone = || ConnectError::Other("cairnd's connection service is not answering".into());
        let _permit = self.connecting.acquire().await.map_err(|_| gone())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let call = ConnectCall {
            id,
            https,
            host: host.to_string(),
            port,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        };
        let body = postcard::to_stdvec(&call).map_err(|e| ConnectError::Other(e.to_string()))?;
        if body.len() > MAX_MESSAGE {
            return Err(ConnectError::Denied("the host name is too long".into()));
        }
        let (answer, answered) = oneshot::channel();
        match self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(waiting) => waiting.insert(id, answer),
            None => return Err(gone()),
        };
        // Forgets the call if this future is dropped before the answer (the guest's request
        // ended): a connection that arrives later is closed by the reader.
        struct Forget<'a>(&'a Connector, u32);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                if let Some(waiting) = self
                    .0
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                {
                    waiting.remove(&self.1);
                }
            }
        }
        let _forget = Forget(self, id);
        send(&self.socket, &body, None).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

//! What the supervisor and a pool process say to each other, and how. Messages are JSON frames
//! (a 4-byte big-endian length, then the body) on a unix socketpair the pool inherits. Request
//! counters are not messages: they live in a small shared memory page both sides map, so the
//! request path never talks to the supervisor.
//!
//! A pool process inherits one descriptor, the control socket, at a fixed number. The rest
//! (the app's listener, its code, its counters page) arrive with `Start`, passed over that
//! socket (SCM_RIGHTS), because a pool process may be started before anyone knows which app it
//! will run: the supervisor keeps one spare process ready and hands it the next app to start.

use crate::engine::CodeFacts;
use crate::spec::{AppSpec, Limits};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The control socketpair, the only descriptor a pool process inherits.
pub const CONTROL_FD: RawFd = 3;
/// How many descriptors travel with `Start`, in this order: the app's listening socket (bound
/// by the supervisor), a sealed memfd with the precompiled component, the memfd of the
/// shared counters (which also carries the time of the last request, `Counter::LastActive`),
/// the pool's end of its host-services socket (`pool::services`), the pool's end of its
/// connect socket (`pool::connect`), and a memfd of the certificate authorities its HTTPS
/// calls trust (empty when it makes none).
pub const START_FDS: usize = 6;

/// What a spare pool process carries as its app's name until it is given an app, padded to
/// the longest app name so the real name can be written over it (`ps` then says whose pool
/// it is).
pub fn spare_title() -> String {
    format!("{:<width$}", "(spare)", width = crate::spec::MAX_APP_NAME)
}

/// Largest frame either side accepts; a log batch is the biggest thing sent (under 1 MiB
/// even when every character needs escaping, see `pool::LOG_FRAME_BYTES`). A bigger one is read
/// past and refused (`RefusedFrame`).
pub const MAX_FRAME: u32 = 1 << 20;

/// A frame read whole but refused (over `MAX_FRAME`, or not a message of the protocol): the
/// stream is still in step, so the reader can report it and go on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RefusedFrame(pub String);

/// The refused frame `error` is, if it is one.
pub fn refused(error: &std::io::Error) -> Option<&RefusedFrame> {
    error.get_ref()?.downcast_ref::<RefusedFrame>()
}

fn refuse(reason: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, RefusedFrame(reason))
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToPool {
    /// A hint to a spare, before any `Start`: the next app will likely have these limits and
    /// code sizes (the last one started did), so the spare builds its engine for them while it
    /// waits. A `Start` of another sizing builds its own.
    Prepare { limits: Limits, facts: CodeFacts },
    /// The first message: what to run. `facts` size the pooling allocator; `probe`: make one
    /// instance before saying `Loaded`; `serve`: start accepting right after, without waiting
    /// for `Serve` (a generation that already served: restart, wake, boot); `confined`: the
    /// process is in the app's cgroup already, else it loads but runs no guest code until
    /// `Confined` (only with `probe` false).
    Start {
        spec: Box<AppSpec>,
        generation: u64,
        facts: CodeFacts,
        probe: bool,
        serve: bool,
        confined: bool,
        /// The uid and gid to switch to, with no supplementary groups, before anything of the
        /// app runs (`None`: stay as started).
        user: Option<(u32, u32)>,
        /// Install the system-call filter (`pool::seccomp`) right after the switch, or exit:
        /// false only where the kernel takes no filters (then `cairnctl status` says so).
        filter: bool,
        /// Run the app's command once with these arguments, say `Finished` and exit,
        /// instead of serving (only with `confined`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<Vec<String>>,
    },
    /// The process is now in the app's cgroup (after a `Start` that said it was not).
    Confined,
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
    /// The run `Start` asked for ended: its exit code and how it ended (`exit 3`, `timeout`,
    /// `trapped: …`). The pool exits after its output.
    Finished { code: i32, outcome: String },
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
    writer.write_all(&frame(message)?).await?;
    writer.flush().await
}

/// Encodes one frame.
fn frame<M: Serialize>(message: &M) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Sends `message` with `fds` attached, on a blocking socket (the supervisor, before it turns
/// the socket over to tokio).
pub fn send_with_fds<M: Serialize>(
    socket: &std::os::unix::net::UnixStream,
    message: &M,
    fds: &[RawFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::Write;
    let frame = frame(message)?;
    if fds.is_empty() {
        return (&*socket).write_all(&frame);
    }
    let rights = [ControlMessage::ScmRights(fds)];
    let sent = loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[std::io::IoSlice::new(&frame)],
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    // A stream socket may take part of the frame; the descriptors went with that part.
    (&*socket).write_all(&frame[sent..])
}

/// Receives what one read brings, on a blocking socket (the pool, before it starts its
/// runtime's work): every frame the read began, completed, and the descriptors that came with
/// them. The kernel ends a read right after the data descriptors were sent with, so they
/// belong to the last frame; frames sent before it without descriptors may come in the same
/// read. `None` when the other side closed the socket first.
pub fn receive_with_fds<M>(
    socket: &std::os::unix::net::UnixStream,
) -> std::io::Result<Option<(Vec<M>, Vec<OwnedFd>)>>
where
    M: for<'de> Deserialize<'de>,
{
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut first = vec![0u8; 64 << 10];
    let mut space = nix::cmsg_space!([RawFd; START_FDS]);
    let (received, fds) = loop {
        let mut iov = [std::io::IoSliceMut::new(&mut first)];
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
            Ok(message) => {
                let mut fds = Vec::new();
                for control in message.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = control {
                        // SAFETY: the kernel just installed these descriptors in this process
                        // for this message; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (message.bytes, fds);
            }
        }
    };
    if received == 0 {
        return Ok(None);
    }
    let mut bytes = first[..received].to_vec();
    // Reads exactly up to `end`, never into a frame this read did not begin.
    let fill = |bytes: &mut Vec<u8>, end: usize| -> std::io::Result<()> {
        if bytes.len() < end {
            let mut rest = vec![0u8; end - bytes.len()];
            (&*socket).read_exact(&mut rest)?;
            bytes.extend_from_slice(&rest);
        }
        Ok(())
    };
    let mut messages = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        fill(&mut bytes, at + 4)?;
        let length = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("four bytes")) as usize;
        if length > MAX_FRAME as usize {
            return Err(std::io::Error::other(format!(
                "a {length}-byte frame is over the {MAX_FRAME}-byte bound"
            )));
        }
        fill(&mut bytes, at + 4 + length)?;
        messages.push(
            serde_json::from_slice(&bytes[at + 4..at + 4 + length])
                .map_err(std::io::Error::other)?,
        );
        at += 4 + length;
    }
    Ok(Some((messages, fds)))
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
        // Read past it in small pieces, so the next frame is read in step.
        let skipped = tokio::io::copy(
            &mut (&mut *reader).take(length as u64),
            &mut tokio::io::sink(),
        )
        .await?;
        if skipped < length as u64 {
            return Ok(None);
        }
        return Err(refuse(format!(
            "a {length}-byte message, over the {MAX_FRAME}-byte bound"
        )));
    }
    let mut body = vec![0u8; length as usize];
    reader.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|error| refuse(format!("a message that does not parse ({error})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;

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

    #[tokio::test]
    async fn an_oversized_or_garbled_frame_is_refused_and_the_next_one_read() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            // A frame far over the bound (its body streamed, never held whole by the reader)…
            let length = MAX_FRAME * 3;
            a.write_all(&length.to_be_bytes()).await.unwrap();
            let zeros = vec![0u8; 64 << 10];
            let mut left = length as usize;
            while left > 0 {
                let n = left.min(zeros.len());
                a.write_all(&zeros[..n]).await.unwrap();
                left -= n;
            }
            // …one that is not a message…
            a.write_all(&5u32.to_be_bytes()).await.unwrap();
            a.write_all(b"{oops").await.unwrap();
            // …and a good one.
            send(&mut a, &ToPool::Serve).await.unwrap();
        });
        let oversized = receive::<_, ToPool>(&mut b).await.unwrap_err();
        assert!(refused(&oversized).is_some(), "{oversized}");
        assert!(oversized.to_string().contains("over the"), "{oversized}");
        let garbled = receive::<_, ToPool>(&mut b).await.unwrap_err();
        assert!(refused(&garbled).is_some(), "{garbled}");
        assert!(matches!(
            receive::<_, ToPool>(&mut b).await.unwrap(),
            Some(ToPool::Serve)
        ));
        writer.await.unwrap();
    }

    #[test]
    fn start_travels_with_its_descriptors() {
        let (supervisor, pool) = std::os::unix::net::UnixStream::pair().unwrap();
        let files: Vec<OwnedFd> = (0..START_FDS)
            .map(|i| {
                let fd =
                    nix::sys::memfd::memfd_create(c"test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                        .unwrap();
                nix::unistd::ftruncate(&fd, 100 + i as i64).unwrap();
                fd
            })
            .collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        // A frame larger than one read, so the rest follows the part the descriptors rode on.
        let big = ToPool::Probe {
            path: "x".repeat(200 << 10),
        };
        let sender = std::thread::spawn(move || {
            send_with_fds(&supervisor, &big, &raw).unwrap();
            drop(files);
            supervisor
        });
        let (messages, fds) = receive_with_fds::<ToPool>(&pool).unwrap().unwrap();
        assert!(matches!(&messages[..], [ToPool::Probe { path }] if path.len() == 200 << 10));
        assert_eq!(fds.len(), START_FDS);
        for (i, fd) in fds.into_iter().enumerate() {
            let size = std::fs::File::from(fd).metadata().unwrap().len();
            assert_eq!(size, 100 + i as u64, "descriptors arrive in order");
        }
        drop(sender.join().unwrap());
        assert!(receive_with_fds::<ToPool>(&pool).unwrap().is_none());
    }

    #[test]
    fn a_hint_read_with_start_comes_before_it_and_later_frames_wait() {
        let (supervisor, pool) = std::os::unix::net::UnixStream::pair().unwrap();
        let counters = Counters::create("test").unwrap();
        // The hint and Start are both sent before the pool reads (a spare taken at once), and
        // a message after Start is already waiting too.
        let facts = CodeFacts {
            memories: 1,
            tables: 1,
            max_initial_table_size: None,
            http: true,
            command: false,
        };
        let hint = ToPool::Prepare {
            limits: Limits::default(),
            facts,
        };
        send_with_fds(&supervisor, &hint, &[]).unwrap();
        send_with_fds(&supervisor, &ToPool::Serve, &[counters.raw_fd()]).unwrap();
        send_with_fds(&supervisor, &ToPool::Confined, &[]).unwrap();
        let (messages, fds) = receive_with_fds::<ToPool>(&pool).unwrap().unwrap();
        assert!(
            matches!(&messages[..], [ToPool::Prepare { .. }, ToPool::Serve]),
            "{messages:?}"
        );
        assert_eq!(fds.len(), 1);
        let (messages, fds) = receive_with_fds::<ToPool>(&pool).unwrap().unwrap();
        assert!(matches!(&messages[..], [ToPool::Confined]), "{messages:?}");
        assert!(fds.is_empty());
    }
}

//! The host-services socket: how a pool reaches what the supervisor keeps for its app (today
//! the app's key-value store, `crate::kv`). A pool runs as another uid behind seccomp and
//! cannot open any file, so it asks over a socketpair it is given with `Start`.
//!
//! Frames are a 4-byte big-endian length and a postcard body: a `Call` from the pool, a
//! `Reply` with the same `id` from the supervisor, in any order. Every bound below is checked
//! on the supervisor's side, which trusts nothing the pool says; the pool checks them too, so a
//! guest gets a precise error without a round trip.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The longest key, in bytes.
pub const MAX_KEY: usize = 1 << 10;
/// The largest value, in bytes.
pub const MAX_VALUE: usize = 1 << 20;
/// The most keys one batch call names.
pub const MAX_BATCH_KEYS: usize = 1000;
/// The most bytes (keys and values) one batch call carries or one answer returns.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Keys per page of `list-keys`.
pub const LIST_PAGE: usize = 1000;
/// Calls one pool may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;
/// Stores one guest instance may hold open at once.
pub const MAX_OPEN_STORES: usize = 16;
/// The largest frame either side accepts: a whole batch and its framing.
pub const MAX_FRAME: usize = MAX_BATCH_BYTES + (64 << 10);

#[derive(Debug, Serialize, Deserialize)]
pub struct Call {
    pub id: u32,
    pub op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub id: u32,
    pub result: Result<Answer, KvError>,
}

/// One key-value operation on the app's store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    Get {
        key: String,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Exists {
        key: String,
    },
    /// A page of up to `LIST_PAGE` keys after `cursor` (`None`: from the start).
    ListKeys {
        cursor: Option<u64>,
    },
    /// Adds `delta` to the decimal number stored at `key` (0 when absent).
    Increment {
        key: String,
        delta: u64,
    },
    GetMany {
        keys: Vec<String>,
    },
    SetMany {
        pairs: Vec<(String, Vec<u8>)>,
    },
    DeleteMany {
        keys: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Done,
    Value(Option<Vec<u8>>),
    Exists(bool),
    /// A page of keys and the cursor of the next page, if there is one.
    Keys {
        keys: Vec<String>,
        cursor: Option<u64>,
    },
    Counter(u64),
    Values(Vec<Option<(String, Vec<u8>)>>),
}

/// Why an operation failed: each interface maps these to its own error type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// The app has no `[keyvalue]` table.
    #[error("this app has no key-value store: its manifest has no [keyvalue] table")]
    AccessDenied,
    /// The write would take the store past its quota.
    #[error("the key-value store is full: this write needs {needed} more bytes, {used} of its {quota}-byte quota are used ([keyvalue] quota)")]
    Quota { quota: u64, used: u64, needed: u64 },
    /// A key, value or batch over its bound, or a key that is not usable.
    #[error("{0}")]
    Refused(String),
    /// Anything else: the store failed, or the service is gone.
    #[error("{0}")]
    Other(String),
}

impl Op {
    /// Checks every bound of the call; the same check runs on both sides.
    pub fn check(&self) -> Result<(), KvError> {
        let key = |key: &str| {
            if key.len() > MAX_KEY {
                Err(KvError::Refused(format!(
                    "a {}-byte key is over the {MAX_KEY}-byte bound",
                    key.len()
                )))
            } else {
                Ok(())
            }
        };
        let value = |value: &[u8]| {
            if value.len() > MAX_VALUE {
                Err(KvError::Refused(format!(
                    "a {}-byte value is over the {MAX_VALUE}-byte bound",
                    value.len()
                )))
            } else {
                Ok(())
            }
        };
        let batch = |count: usize, bytes: usize| {
            if count > MAX_BATCH_KEYS {
                Err(KvError::Refused(format!(
                    "a batch of {count} keys is over the {MAX_BATCH_KEYS}-key bound"
                )))
            } else if bytes > MAX_BATCH_BYTES {
                Err(KvError::Refused(format!(
                    "a batch of {bytes} bytes is over the {MAX_BATCH_BYTES}-byte bound"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Op::Get { key: k }
            | Op::Delete { key: k }
            | Op::Exists { key: k }
            | Op::Increment { key: k, .. } => key(k),
            Op::Set { key: k, value: v } => key(k).and(value(v)),
            Op::ListKeys { .. } => Ok(()),
            Op::GetMany { keys } | Op::DeleteMany { keys } => {
                batch(keys.len(), keys.iter().map(String::len).sum())?;
                keys.iter().try_for_each(|k| key(k))
            }
            Op::SetMany { pairs } => {
                batch(
                    pairs.len(),
                    pairs.iter().map(|(k, v)| k.len() + v.len()).sum(),
                )?;
                pairs.iter().try_for_each(|(k, v)| key(k).and(value(v)))
            }
        }
    }
}

/// Writes one frame.
pub async fn send<W, M>(writer: &mut W, message: &M) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    M: Serialize,
{
    let body = postcard::to_stdvec(message).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await
}

/// Reads one frame; `None` when the other side closed. A frame over `MAX_FRAME`, or one that
/// does not parse, is an error: the peer is not speaking the protocol and is hung up on.
pub async fn receive<R, M>(reader: &mut R) -> std::io::Result<Option<(M, usize)>>
where
    R: tokio::io::AsyncRead + Unpin,
    M: for<'de> Deserialize<'de>,
{
    let length = match reader.read_u32().await {
        Ok(length) => length as usize,
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    };
    if length > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a {length}-byte frame is over the {MAX_FRAME}-byte bound"
        )));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    let message = postcard::from_bytes(&body)
        .map_err(|error| std::io::Error::other(format!("a frame that does not parse: {error}")))?;
    Ok(Some((message, length)))
}

/// The pool's end: calls from any request, answered in any order.
pub struct Client {
    calls: mpsc::Sender<(Op, oneshot::Sender<Result<Answer, KvError>>)>,
    in_flight: Arc<Semaphore>,
}

impl Client {
    /// Starts the task that owns `socket` (on the current runtime).
    pub fn start(socket: tokio::net::UnixStream) -> Arc<Client> {
        let (calls, queue) = mpsc::channel(MAX_IN_FLIGHT);
        tokio::spawn(run_client(socket, queue));
        Arc::new(Client {
            calls,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Sends `op` and waits for its answer. Bounds are checked here first.
    pub async fn call(&self, op: Op) -> Result<Answer, KvError> {
        op.check()?;
        let gone = || KvError::Other("cairnd's key-value service is not answering".into());
        let _permit = self.in_flight.acquire().await.map_err(|_| gone())?;
        let (answer, answered) = oneshot::channel();
        self.calls.send((op, answer)).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// The calls waiting for answers; `None` once the socket has failed (no answer will come).
type Pending =
    Arc<std::sync::Mutex<Option<HashMap<u32, oneshot::Sender<Result<Answer, KvError>>>>>>;

/// Sends calls in the order they come and reads answers in a task of its own: a read is never
/// cancelled partway (that would lose the frame's place in the stream).
async fn run_client(
    socket: tokio::net::UnixStream,
    mut queue: mpsc::Receiver<(Op, oneshot::Sender<Result<Answer, KvError>>)>,
) {
    let (mut reader, mut writer) = socket.into_split();
    let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
    let answers = Arc::clone(&pending);
    let reading = tokio::spawn(async move {
        // A closed or broken socket ends every call waiting (their senders drop).
        while let Ok(Some((reply, _))) = receive::<_, Reply>(&mut reader).await {
            let waiting = answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|pending| pending.remove(&reply.id));
            if let Some(answer) = waiting {
                let _ = answer.send(reply.result);
            }
        }
        answers.lock().unwrap_or_else(|p| p.into_inner()).take();
    });
    let mut next_id: u32 = 0;
    while let Some((op, answer)) = queue.recv().await {
        next_id = next_id.wrapping_add(1);
        {
            let mut waiting = pending.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.as_mut() {
                Some(waiting) => waiting.insert(next_id, answer),
                None => break, // the answer drops: the caller hears the service is gone
            };
        }
        if send(&mut writer, &Call { id: next_id, op }).await.is_err() {
            break;
        }
    }
    pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    reading.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_by_key_value_and_batch() {
        let long = "k".repeat(MAX_KEY + 1);
        assert!(Op::Get { key: long.clone() }.check().is_err());
        assert!(Op::Get {
            key: "k".repeat(MAX_KEY)
        }
        .check()
        .is_ok());
        assert!(Op::Set {
            key: "k".into(),
            value: vec![0; MAX_VALUE + 1]
        }
        .check()
        .is_err());
        let keys: Vec<String> = (0..=MAX_BATCH_KEYS).map(|i| i.to_string()).collect();
        assert!(Op::GetMany { keys }.check().is_err());
        let pairs = (0..5)
            .map(|i| (i.to_string(), vec![0; MAX_VALUE]))
            .collect();
        let refused = Op::SetMany { pairs }.check().unwrap_err();
        assert!(refused.to_string().contains("byte bound"), "{refused}");
        assert!(Op::DeleteMany { keys: vec![long] }.check().is_err());
    }

    #[tokio::test]
    async fn a_frame_over_the_bound_is_refused_without_reading_it() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let error = receive::<_, Call>(&mut b).await.unwrap_err();
        assert!(error.to_string().contains("over the"), "{error}");
    }

    #[tokio::test]
    async fn large_answers_stay_whole_while_new_calls_are_sent() {
        // Answers far larger than the socket's buffer arrive in pieces while other calls are
        // still being sent: every caller must get exactly its own value.
        let (pool, mut supervisor) = tokio::net::UnixStream::pair().unwrap();
        let client = Client::start(pool);
        let server = tokio::spawn(async move {
            let (mut reader, mut writer) = supervisor.split();
            let mut calls = Vec::new();
            for _ in 0..32 {
                calls.push(receive::<_, Call>(&mut reader).await.unwrap().unwrap().0);
                if calls.len() % 4 == 0 {
                    for call in calls.drain(..).rev() {
                        let Op::Get { key } = call.op else { panic!() };
                        let byte: u8 = key.parse().unwrap();
                        let reply = Reply {
                            id: call.id,
                            result: Ok(Answer::Value(Some(vec![byte; 600 << 10]))),
                        };
                        send(&mut writer, &reply).await.unwrap();
                    }
                }
            }
        });
        let gets = (0..32u8).map(|i| {
            let client = &client;
            async move { (i, client.call(Op::Get { key: i.to_string() }).await) }
        });
        for (i, answer) in futures_util::future::join_all(gets).await {
            let Ok(Answer::Value(Some(value))) = answer else {
                panic!("{i}: {answer:?}")
            };
            assert!(
                value.len() == 600 << 10 && value.iter().all(|b| *b == i),
                "{i}"
            );
        }
        server.await.unwrap();
    }

    #[tokio::test]
    async fn answers_reach_their_callers_in_any_order_and_a_gone_service_says_so() {
        let (pool, mut supervisor) = tokio::net::UnixStream::pair().unwrap();
        let client = Client::start(pool);
        let server = tokio::spawn(async move {
            // Two calls read, answered in the reverse order, then the service goes away.
            let (first, _) = receive::<_, Call>(&mut supervisor).await.unwrap().unwrap();
            let (second, _) = receive::<_, Call>(&mut supervisor).await.unwrap().unwrap();
            for call in [second, first] {
                let Op::Increment { delta, .. } = call.op else {
                    panic!("{call:?}")
                };
                let reply = Reply {
                    id: call.id,
                    result: Ok(Answer::Counter(delta)),
                };
                send(&mut supervisor, &reply).await.unwrap();
            }
            let _ = receive::<_, Call>(&mut supervisor).await;
        });
        let increment = |delta| Op::Increment {
            key: "k".into(),
            delta,
        };
        let (one, two) = tokio::join!(client.call(increment(1)), client.call(increment(2)));
        assert_eq!((one, two), (Ok(Answer::Counter(1)), Ok(Answer::Counter(2))));
        let gone = client.call(increment(3)).await;
        server.await.unwrap();
        assert!(matches!(gone, Err(KvError::Other(_))), "{gone:?}");
    }
}

//! Apps' key-value data: one SQLite file per app, `STATE/kv/APP.db`, owned by the supervisor.
//! A pool never opens it (it runs as another uid, behind seccomp, and the directory is 0700):
//! it asks over its host-services socket (`pool::services`), served here by `serve`, bound at
//! spawn to its one app and quota. The operator's `cairnctl kv` reaches the same store.
//!
//! Durability is the store's: WAL with `synchronous = FULL`, and an answer is sent only after
//! its transaction committed, so a write a guest saw succeed survives kill -9 of the pool or
//! of cairnd. One worker thread per open store commits in groups (up to `GROUP_OPS` operations
//! or `GROUP_BYTES`): a write-heavy app pays about one fsync per group, not one per key.
//!
//! The data belongs to the app, not a generation: it survives restarts, rollbacks and
//! upgrades, and goes only with `cairnctl rm` (unless `--keep-data`).

use crate::pool::services::{self, Answer, Call, KvError, Op, Reply};
use crate::spec::AppName;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Most operations committed in one transaction.
const GROUP_OPS: usize = 128;
/// Most bytes of keys and values written in one transaction.
const GROUP_BYTES: usize = 8 << 20;
/// Operations queued for one store's worker before callers wait.
const QUEUE: usize = 256;
/// Bytes of calls one pool may have in flight (besides `services::MAX_IN_FLIGHT` calls).
const IN_FLIGHT_BYTES: usize = 16 << 20;

/// What each key costs the quota beyond its bytes: SQLite keeps the key twice (the table and
/// its index) and a row's own bookkeeping, so a store of tiny keys is bounded on disk too.
pub const KEY_OVERHEAD: u64 = 64;

/// Every app's store, opened on first use and kept open until its data is removed or cairnd
/// stops: opening counts the bytes stored (a scan of the table), which a wake from idle should
/// not pay.
pub struct Stores {
    dir: PathBuf,
    open: Mutex<HashMap<AppName, Slot>>,
}

enum Slot {
    Open(Arc<AppStore>),
    /// Its data is being deleted: nothing opens it meanwhile.
    Removing,
}

/// What a pool may do with its app's store: which store, and its quota (`None`: the app has
/// no `[keyvalue]`, every call is refused).
#[derive(Clone)]
pub struct Grant {
    pub store: Arc<AppStore>,
    pub quota: u64,
}

/// One app's open store: a queue to its worker thread.
pub struct AppStore {
    jobs: mpsc::Sender<Job>,
    used: Arc<AtomicU64>,
    /// Writes committed and the transactions (each one fsync) they took, since it was opened.
    stats: Arc<Stats>,
    /// Set when the app's data is deleted: nothing more is done with this handle.
    removed: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub commits: AtomicU64,
}

/// Where one operation's outcome goes.
type Answering = oneshot::Sender<Result<Answer, KvError>>;

enum Job {
    Run {
        op: Op,
        quota: u64,
        answer: Answering,
    },
    /// Close the database now (the data is about to be deleted) and refuse everything after.
    Close(oneshot::Sender<()>),
}

impl Stores {
    /// The stores under `state/kv` (made 0700 if missing, and made 0700 if it is not).
    pub fn new(state: &Path) -> std::io::Result<Arc<Stores>> {
        let dir = state.join("kv");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Arc::new(Stores {
            dir,
            open: Mutex::new(HashMap::new()),
        }))
    }

    fn path(&self, app: &AppName) -> PathBuf {
        self.dir.join(format!("{app}.db"))
    }

    /// The app's store, opened (and created, unless `existing`) if it is not open yet.
    fn get(&self, app: &AppName, existing: bool) -> Result<Option<Arc<AppStore>>, KvError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get(app) {
            Some(Slot::Open(store)) => return Ok(Some(Arc::clone(store))),
            Some(Slot::Removing) => {
                return Err(KvError::Other(format!(
                    "{app}'s key-value data is being deleted"
                )))
            }
            None => {}
        }
        let path = self.path(app);
        if existing && !path.exists() {
            return Ok(None);
        }
        let store = Arc::new(AppStore::open(app, &path)?);
        open.insert(app.clone(), Slot::Open(Arc::clone(&store)));
        Ok(Some(store))
    }

    /// The app's store, opened (and created) if it is not open yet: for a pool's start.
    pub fn open(&self, app: &AppName) -> Result<Arc<AppStore>, KvError> {
        self.get(app, false)
            .map(|store| store.expect("a store is created when missing"))
    }

    /// The app's store if it has data on disk (never creating it): for the operator.
    pub fn existing(&self, app: &AppName) -> Result<Option<Arc<AppStore>>, KvError> {
        self.get(app, true)
    }

    /// The bytes the app's data takes (keys plus values and `KEY_OVERHEAD` per key), if it
    /// has any.
    pub fn usage(&self, app: &AppName) -> Result<Option<u64>, KvError> {
        Ok(self.existing(app)?.map(|store| store.used()))
    }

    /// The app's writes and commits since its store was opened, if it is open.
    pub fn stats(&self, app: &AppName) -> (u64, u64) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get(app) {
            Some(Slot::Open(store)) => store.stats(),
            _ => (0, 0),
        }
    }

    /// Deletes the app's data: its worker closes the database first (SQLite deletes a WAL by
    /// name when it closes, which must not be a later store's), and nothing opens it meanwhile.
    /// Anything still holding the store gets errors from then on. Returns whether there was any.
    pub async fn remove(&self, app: &AppName) -> std::io::Result<bool> {
        let previous = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.clone(), Slot::Removing);
        if let Some(Slot::Open(store)) = previous {
            store.removed.store(true, Ordering::Release);
            let (closed, done) = oneshot::channel();
            if store.jobs.send(Job::Close(closed)).await.is_ok() {
                let _ = done.await;
            }
        }
        let path = self.path(app);
        let existed = path.exists();
        let mut outcome = Ok(existed);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => outcome = Err(error),
            }
        }
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
        outcome
    }
}

impl AppStore {
    fn open(app: &AppName, path: &Path) -> Result<AppStore, KvError> {
        let failed = |error: &dyn std::fmt::Display| {
            KvError::Other(format!("cannot open {app}'s key-value store: {error}"))
        };
        // Made 0600 before SQLite opens it; its -wal and -shm take the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| failed(&e))?;
        let connection = Connection::open(path).map_err(|e| failed(&e))?;
        connection
            .execute_batch(
                "PRAGMA auto_vacuum = INCREMENTAL;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA cache_size = -512;
                 CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
                 PRAGMA incremental_vacuum;",
            )
            .map_err(|e| failed(&e))?;
        let used: i64 = connection
            .query_row(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value) + ?1), 0) FROM kv",
                [KEY_OVERHEAD as i64],
                |row| row.get(0),
            )
            .map_err(|e| failed(&e))?;
        let used = Arc::new(AtomicU64::new(used as u64));
        let removed = Arc::new(AtomicBool::new(false));
        let (jobs, queue) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            connection: Some(connection),
            stats: Arc::clone(&stats),
            used: Arc::clone(&used),
            removed: Arc::clone(&removed),
        };
        std::thread::Builder::new()
            .name(format!("cairn-kv-{app}").chars().take(15).collect())
            .spawn(move || worker.run(queue))
            .map_err(|e| failed(&e))?;
        Ok(AppStore {
            jobs,
            used,
            stats,
            removed,
        })
    }

    /// The bytes of keys plus values stored.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Writes committed and the transactions they took since the store was opened.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.writes.load(Ordering::Relaxed),
            self.stats.commits.load(Ordering::Relaxed),
        )
    }

    /// Runs `op` (checked against every bound first) and waits for it to be committed.
    pub async fn run(&self, op: Op, quota: u64) -> Result<Answer, KvError> {
        op.check()?;
        let gone = || KvError::Other("the app's key-value store was closed".into());
        if self.removed.load(Ordering::Acquire) {
            return Err(gone());
        }
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job::Run { op, quota, answer })
            .await
            .map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// The most bytes an answer to `op` can take, so a call's reservation covers its answer too.
fn answer_bound(op: &Op) -> usize {
    match op {
        Op::Get { .. } => services::MAX_VALUE + (1 << 10),
        Op::GetMany { .. } => services::MAX_BATCH_BYTES + (64 << 10),
        Op::ListKeys { .. } => services::LIST_PAGE * (services::MAX_KEY + 16),
        _ => 1 << 10,
    }
}

/// Serves one pool's host-services socket until the pool closes it: every call is run against
/// `grant`'s store (or refused when there is none), at most `MAX_IN_FLIGHT` calls at once, and
/// at most `IN_FLIGHT_BYTES` of calls and their answers, each reservation held until its answer
/// has been written: a pool that asks and never reads stops being read. A pool that breaks the
/// protocol is hung up on.
pub async fn serve(socket: tokio::net::UnixStream, grant: Option<Grant>, app: AppName) {
    type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);
    let (mut reader, mut writer) = socket.into_split();
    let (replies, mut outgoing) = mpsc::channel::<(Reply, Permits)>(services::MAX_IN_FLIGHT);
    let writing = tokio::spawn(async move {
        while let Some((reply, permits)) = outgoing.recv().await {
            if services::send(&mut writer, &reply).await.is_err() {
                return;
            }
            drop(permits);
        }
    });
    let calls = Arc::new(Semaphore::new(services::MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES >> 10));
    loop {
        let (call, size) = match services::receive::<_, Call>(&mut reader).await {
            Ok(Some(read)) => read,
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(app = %app, %error, "a pool broke the host-services protocol; hanging up");
                break;
            }
        };
        let reserve = size.max(answer_bound(&call.op));
        let (Ok(call_permit), Ok(byte_permit)) = (
            Arc::clone(&calls).acquire_owned().await,
            Arc::clone(&bytes)
                .acquire_many_owned((reserve >> 10) as u32 + 1)
                .await,
        ) else {
            break;
        };
        let grant = grant.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let result = match grant {
                Some(grant) => grant.store.run(call.op, grant.quota).await,
                None => Err(KvError::AccessDenied),
            };
            let reply = Reply {
                id: call.id,
                result,
            };
            let _ = replies.send((reply, (call_permit, byte_permit))).await;
        });
    }
    drop(replies);
    let _ = writing.await;
}

/// The thread that owns one store's connection.
struct Worker {
    /// `None` once closed for the data's removal.
    connection: Option<Connection>,
    stats: Arc<Stats>,
    used: Arc<AtomicU64>,
    removed: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        while let Some(first) = queue.blocking_recv() {
            let mut group = Vec::new();
            let mut bytes = 0;
            let mut close = None;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Close(done) => {
                        close = Some(done);
                        break;
                    }
                    Job::Run { op, quota, answer } => {
                        bytes += written_bytes(&op);
                        group.push(((op, quota), answer));
                    }
                }
                if group.len() >= GROUP_OPS || bytes >= GROUP_BYTES {
                    break;
                }
                next = queue.try_recv().ok();
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if let Some(done) = close {
                // Closed here, before the files go: SQLite removes the WAL by name on close.
                self.connection = None;
                let _ = done.send(());
            }
        }
    }

    /// Runs a group in one transaction, each operation in its own savepoint (one that fails
    /// leaves no trace), and answers only after the commit.
    fn commit(&mut self, group: Vec<((Op, u64), Answering)>) {
        let removed = self.removed.load(Ordering::Acquire);
        let Some(connection) = self.connection.as_mut().filter(|_| !removed) else {
            for (_, answer) in group {
                let _ = answer.send(Err(KvError::Other(
                    "the app's key-value data was removed".into(),
                )));
            }
            return;
        };
        let before = self.used.load(Ordering::Acquire);
        let mut used = before;
        let (work, answers): (Vec<(Op, u64)>, Vec<_>) = group.into_iter().unzip();
        let outcome = (|| -> rusqlite::Result<Vec<Result<Answer, KvError>>> {
            let mut transaction = connection.transaction()?;
            let mut results = Vec::with_capacity(work.len());
            for (op, quota) in &work {
                let mut savepoint = transaction.savepoint()?;
                let mut trial = used;
                let result = apply(&savepoint, op, &mut trial, *quota);
                if result.is_ok() {
                    savepoint.commit()?;
                    used = trial;
                } else {
                    savepoint.rollback()?;
                }
                results.push(result);
            }
            // A read-only group commits nothing and costs no fsync.
            transaction.commit()?;
            Ok(results)
        })();
        match outcome {
            Ok(results) => {
                self.used.store(used, Ordering::Release);
                let written = work
                    .iter()
                    .zip(&results)
                    .filter(|((op, _), result)| writes(op) && result.is_ok())
                    .count() as u64;
                if written > 0 {
                    self.stats.writes.fetch_add(written, Ordering::Relaxed);
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
            Err(error) => {
                // Nothing of the group was committed (a full disk, an I/O error): every
                // caller hears why, and the count stays what the file holds.
                self.used.store(before, Ordering::Release);
                tracing::warn!(%error, "a key-value transaction failed");
                let why = other(error);
                for answer in answers {
                    let _ = answer.send(Err(why.clone()));
                }
            }
        }
    }
}

/// Whether `op` changes the store.
fn writes(op: &Op) -> bool {
    !matches!(
        op,
        Op::Get { .. } | Op::Exists { .. } | Op::ListKeys { .. } | Op::GetMany { .. }
    )
}

fn written_bytes(op: &Op) -> usize {
    match op {
        Op::Set { key, value } => key.len() + value.len(),
        Op::SetMany { pairs } => pairs.iter().map(|(k, v)| k.len() + v.len()).sum(),
        _ => 0,
    }
}

fn other(error: rusqlite::Error) -> KvError {
    KvError::Other(format!("the key-value store failed: {error}"))
}

/// The size an existing key takes (key plus value), if it is there.
fn size_of(db: &Connection, key: &str) -> Result<Option<u64>, KvError> {
    db.query_row(
        "SELECT length(CAST(key AS BLOB)) + length(value) + ?2 FROM kv WHERE key = ?1",
        params![key, KEY_OVERHEAD as i64],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map(|size| size.map(|s| s as u64))
    .map_err(other)
}

/// Charges a write that takes the store from `old` to `new` bytes for one key.
fn charge(used: &mut u64, old: u64, new: u64, quota: u64) -> Result<(), KvError> {
    let after = *used - old.min(*used) + new;
    if new > old && after > quota {
        return Err(KvError::Quota {
            quota,
            used: *used,
            needed: new - old,
        });
    }
    *used = after;
    Ok(())
}

fn put(
    db: &Connection,
    used: &mut u64,
    quota: u64,
    key: &str,
    value: &[u8],
) -> Result<(), KvError> {
    let old = size_of(db, key)?.unwrap_or(0);
    charge(
        used,
        old,
        (key.len() + value.len()) as u64 + KEY_OVERHEAD,
        quota,
    )?;
    db.execute(
        "INSERT INTO kv (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map_err(other)?;
    Ok(())
}

fn delete(db: &Connection, used: &mut u64, key: &str) -> Result<(), KvError> {
    if let Some(old) = size_of(db, key)? {
        db.execute("DELETE FROM kv WHERE key = ?1", [key])
            .map_err(other)?;
        *used -= old.min(*used);
    }
    Ok(())
}

fn get(db: &Connection, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    db.query_row("SELECT value FROM kv WHERE key = ?1", [key], |row| {
        row.get(0)
    })
    .optional()
    .map_err(other)
}

fn apply(db: &Connection, op: &Op, used: &mut u64, quota: u64) -> Result<Answer, KvError> {
    match op {
        Op::Get { key } => get(db, key).map(Answer::Value),
        Op::Exists { key } => size_of(db, key).map(|size| Answer::Exists(size.is_some())),
        Op::Set { key, value } => put(db, used, quota, key, value).map(|()| Answer::Done),
        Op::Delete { key } => delete(db, used, key).map(|()| Answer::Done),
        Op::ListKeys { cursor } => list(db, *cursor),
        Op::Increment { key, delta } => {
            let current = match get(db, key)? {
                None => 0,
                Some(bytes) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .ok_or_else(|| {
                        KvError::Other(format!(
                            "the value at {key:?} is not a decimal number, so it cannot be incremented"
                        ))
                    })?,
            };
            let next = current.checked_add(*delta).ok_or_else(|| {
                KvError::Other(format!("incrementing {key:?} by {delta} overflows a u64"))
            })?;
            put(db, used, quota, key, next.to_string().as_bytes())?;
            Ok(Answer::Counter(next))
        }
        Op::GetMany { keys } => {
            let mut values = Vec::with_capacity(keys.len());
            let mut bytes = 0;
            for key in keys {
                let value = get(db, key)?;
                bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                if bytes > services::MAX_BATCH_BYTES {
                    return Err(KvError::Refused(format!(
                        "the values asked for come to more than {} bytes: ask for fewer keys at once",
                        services::MAX_BATCH_BYTES
                    )));
                }
                values.push(value.map(|value| (key.clone(), value)));
            }
            Ok(Answer::Values(values))
        }
        Op::SetMany { pairs } => {
            // A batch past the quota is reported as a whole, against what was stored before it.
            let before = *used;
            for (key, value) in pairs {
                if let Err(KvError::Quota {
                    used: at, needed, ..
                }) = put(db, used, quota, key, value)
                {
                    return Err(KvError::Quota {
                        quota,
                        used: before,
                        needed: at + needed - before,
                    });
                }
            }
            Ok(Answer::Done)
        }
        Op::DeleteMany { keys } => {
            for key in keys {
                delete(db, used, key)?;
            }
            Ok(Answer::Done)
        }
    }
}

/// A page of keys in the order they were first written (their rowid), after `cursor`.
fn list(db: &Connection, cursor: Option<u64>) -> Result<Answer, KvError> {
    let mut statement = db
        .prepare_cached("SELECT rowid, key FROM kv WHERE rowid > ?1 ORDER BY rowid LIMIT ?2")
        .map_err(other)?;
    let rows = statement
        .query_map(
            params![cursor.unwrap_or(0) as i64, services::LIST_PAGE as i64 + 1],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
        )
        .map_err(other)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(other)?;
    let more = rows.len() > services::LIST_PAGE;
    let page: Vec<(i64, String)> = rows.into_iter().take(services::LIST_PAGE).collect();
    let cursor = if more {
        page.last().map(|(rowid, _)| *rowid as u64)
    } else {
        None
    };
    Ok(Answer::Keys {
        keys: page.into_iter().map(|(_, key)| key).collect(),
        cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> AppName {
        name.parse().unwrap()
    }

    fn set(key: &str, value: &[u8]) -> Op {
        Op::Set {
            key: key.into(),
            value: value.to_vec(),
        }
    }

    fn get(key: &str) -> Op {
        Op::Get { key: key.into() }
    }

    #[tokio::test]
    async fn data_survives_reopening_and_apps_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(dir.path()).unwrap();
        let (a, b) = (
            stores.open(&app("a")).unwrap(),
            stores.open(&app("b")).unwrap(),
        );
        assert_eq!(a.run(set("k", b"one"), 1 << 20).await, Ok(Answer::Done));
        assert_eq!(b.run(get("k"), 1 << 20).await, Ok(Answer::Value(None)));
        drop((a, b, stores));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("kv")), 0o700);
        assert_eq!(mode(&dir.path().join("kv/a.db")), 0o600);

        let stores = Stores::new(dir.path()).unwrap();
        let a = stores.open(&app("a")).unwrap();
        assert_eq!(
            a.run(get("k"), 1 << 20).await,
            Ok(Answer::Value(Some(b"one".to_vec())))
        );
        assert_eq!(a.used(), 4 + KEY_OVERHEAD);
        assert_eq!(stores.usage(&app("b")).unwrap(), Some(0));
        assert_eq!(stores.usage(&app("c")).unwrap(), None);
    }

    #[tokio::test]
    async fn the_quota_refuses_a_write_past_it_and_keeps_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(dir.path()).unwrap();
        let store = stores.open(&app("a")).unwrap();
        let quota = 1024;
        store.run(set("a", &[1; 500]), quota).await.unwrap();
        let refused = store.run(set("b", &[2; 600]), quota).await.unwrap_err();
        assert!(
            matches!(
                refused,
                KvError::Quota {
                    quota: 1024,
                    used: 565,
                    needed: 665
                }
            ),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("[keyvalue] quota"),
            "{refused}"
        );
        // A batch past the quota leaves nothing of itself behind.
        let pairs = vec![
            ("c".to_string(), vec![3; 300]),
            ("d".to_string(), vec![4; 300]),
        ];
        assert!(store.run(Op::SetMany { pairs }, quota).await.is_err());
        assert_eq!(store.run(get("c"), quota).await, Ok(Answer::Value(None)));
        assert_eq!(store.used(), 501 + KEY_OVERHEAD);
        // Shrinking a value and deleting give room back.
        store.run(set("a", &[1; 10]), quota).await.unwrap();
        store.run(set("b", &[2; 600]), quota).await.unwrap();
        store
            .run(Op::Delete { key: "b".into() }, quota)
            .await
            .unwrap();
        assert_eq!(store.used(), 11 + KEY_OVERHEAD);
    }

    #[tokio::test]
    async fn increments_batches_and_pages_behave_as_the_interfaces_say() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(dir.path()).unwrap();
        let store = stores.open(&app("a")).unwrap();
        let quota = 1 << 30;
        let increment = |delta| Op::Increment {
            key: "n".into(),
            delta,
        };
        assert_eq!(store.run(increment(5), quota).await, Ok(Answer::Counter(5)));
        assert_eq!(store.run(increment(2), quota).await, Ok(Answer::Counter(7)));
        store.run(set("text", b"seven"), quota).await.unwrap();
        let not_a_number = Op::Increment {
            key: "text".into(),
            delta: 1,
        };
        assert!(store.run(not_a_number, quota).await.is_err());
        let pairs = (0..2500)
            .map(|i| (format!("k{i}"), vec![0; 1]))
            .collect::<Vec<_>>();
        for chunk in pairs.chunks(1000) {
            let op = Op::SetMany {
                pairs: chunk.to_vec(),
            };
            store.run(op, quota).await.unwrap();
        }
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let Ok(Answer::Keys {
                keys: page,
                cursor: next,
            }) = store.run(Op::ListKeys { cursor }, quota).await
            else {
                panic!()
            };
            assert!(page.len() <= services::LIST_PAGE);
            keys.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(keys.len(), 2502);
        let many = Op::GetMany {
            keys: vec!["n".into(), "missing".into()],
        };
        assert_eq!(
            store.run(many, quota).await,
            Ok(Answer::Values(vec![
                Some(("n".into(), b"7".to_vec())),
                None
            ]))
        );
    }

    #[tokio::test]
    async fn writes_arriving_together_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(dir.path()).unwrap();
        let store = stores.open(&app("a")).unwrap();
        let writes = (0..500).map(|i| store.run(set(&format!("k{i}"), b"v"), 1 << 20));
        let results = futures_util::future::join_all(writes).await;
        assert!(results.iter().all(|r| *r == Ok(Answer::Done)));
        let (written, commits) = store.stats();
        assert_eq!(written, 500);
        // At most GROUP_OPS per transaction; with 500 queued at once, far fewer than 500.
        assert!(
            commits >= 500 / GROUP_OPS as u64 && commits < 100,
            "{commits} commits"
        );
        // Reads cost no commit.
        store.run(get("k1"), 1 << 20).await.unwrap();
        assert_eq!(store.stats(), (500, commits));
    }

    #[tokio::test]
    async fn removed_data_is_gone_and_its_old_handle_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(dir.path()).unwrap();
        let store = stores.open(&app("a")).unwrap();
        store.run(set("k", b"v"), 1024).await.unwrap();
        assert!(stores.remove(&app("a")).await.unwrap());
        assert!(store.run(get("k"), 1024).await.is_err());
        assert!(!dir.path().join("kv/a.db").exists());
        let again = stores.open(&app("a")).unwrap();
        assert_eq!(again.run(get("k"), 1024).await, Ok(Answer::Value(None)));
        // The old handle going last must not take the new store's WAL with it (SQLite deletes
        // the WAL by name when a connection closes): its database was closed before removal.
        again.run(set("new", b"kept"), 1024).await.unwrap();
        let wal = dir.path().join("kv/a.db-wal");
        assert!(wal.exists());
        drop(store);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(wal.exists(), "the new store's WAL was deleted");
        // Once removed, the operator's side finds nothing (and creates nothing).
        assert!(stores.remove(&app("a")).await.unwrap());
        assert!(stores.existing(&app("a")).unwrap().is_none());
        assert!(!dir.path().join("kv/a.db").exists());
    }
}

//! The store: the one SQLite database that holds everything the device must remember. All
//! SQL lives here, one file per section: `blobs` (component bytes and their names), `compiled`
//! (precompiled code), `apps` (apps and generations), `logs`, `imports` (the import folder's
//! memory), `fleet` (applied documents, refusals), `outbox` (reports waiting for the
//! upstream); `migrations` numbers the schema.
//!
//! Invariants: blobs are content-addressed; `admission` hashed them as they came in, and they
//! are checked against their digest whenever read; a generation is never changed once
//! written; every state change is a transaction in WAL mode with `synchronous=FULL`, so a kill
//! -9 at any instant leaves a database that opens with every acknowledged change present.
//!
//! The API is synchronous; async callers go through [`Store::call`], which runs the work on
//! tokio's blocking pool so SQLite never blocks the runtime.

mod apps;
mod blobs;
mod collect;
mod compiled;
mod events;
mod fleet;
mod imports;
mod logs;
mod migrations;
mod outbox;
mod pool_ids;
mod reserve;
mod schedules;

pub use collect::{Collected, Policy};
pub use compiled::Compiled;
pub use events::{EventRecord, NewEvent};
pub use fleet::{Applied, AppliedRecord};
pub use logs::{LogRecord, NewLogLine};
pub use outbox::{OutboxBounds, OutboxKind};

use crate::spec::ByteSize;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the disk holding {path} is full: free some space, then retry")]
    Full { path: PathBuf },
    #[error("cannot open the state database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("stored data for {what} is corrupt ({detail}); it was not used")]
    Corrupt { what: String, detail: String },
    #[error(
        "the store would pass its budget of {} (it holds {}; this adds {}), even after \
         collecting what nothing uses: remove apps or components you no longer need, or raise \
         [store] budget",
        ByteSize(*budget), ByteSize(*used), ByteSize(*incoming)
    )]
    OverBudget {
        budget: u64,
        used: u64,
        incoming: u64,
    },
    #[error(
        "the disk holding {path} has {} free: this needs {} and cairn keeps {} aside for the \
         store's own writes; free some space, then retry",
        mebibytes(*free), mebibytes(*incoming), ByteSize(reserve::RESERVE_BYTES)
    )]
    NoRoom {
        path: PathBuf,
        free: u64,
        incoming: u64,
    },
    #[error("{0} is no longer stored (older than the generations kept)")]
    Gone(String),
    #[error("state database error: {0}")]
    Sqlite(String),
}

/// `1.2MiB`: sizes in messages, where exact bytes would only be noise.
fn mebibytes(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The owner of an app: who may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Local,
    Fleet,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Local => "local",
            Owner::Fleet => "fleet",
        }
    }

    fn parse(text: &str) -> Owner {
        if text == "fleet" {
            Owner::Fleet
        } else {
            Owner::Local
        }
    }
}

pub struct Store {
    connection: Mutex<Connection>,
    path: PathBuf,
    policy: Mutex<Policy>,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// The folder the database lives in (the state directory).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// When that fails and a reserve was set aside (`reserve`), the reserve is given back and
    /// the database opened again: a full disk does not stop cairnd from starting.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let store = match Store::open_once(path) {
            Err(error) if reserve::release(path) => {
                tracing::warn!(%error, "the state database could not be opened; the space set aside for this was given back");
                Store::open_once(path)
            }
            other => other,
        }
        .map_err(|error| match error {
            StoreError::Open { path, message }
                if reserve::free_bytes(&path).is_some_and(|free| free < reserve::RESERVE_BYTES) =>
            {
                StoreError::Open {
                    path,
                    message: format!(
                        "{message}; its disk is full: free some space (cairn then keeps {} \
                         aside so that this does not stop it again)",
                        ByteSize(reserve::RESERVE_BYTES)
                    ),
                }
            }
            other => other,
        })?;
        store.keep_reserve();
        Ok(store)
    }

    /// Sets space aside for the next start if it is missing and the disk has room again.
    pub fn keep_reserve(&self) {
        match reserve::keep(&self.path) {
            Ok(true) => tracing::info!(
                "set {} aside beside the state database, so that a full disk cannot stop cairnd from starting",
                ByteSize(reserve::RESERVE_BYTES)
            ),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "could not set space aside beside the state database"),
        }
    }

    fn open_once(path: &Path) -> Result<Store, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        let mut connection = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        let fresh = migrations::applied(&connection).map_err(|e| open_error(e.to_string()))? == 0;
        if fresh {
            // Before the first table: freed pages can then be given back to the file system
            // (`collect`). A store made by an older cairnd is converted by `convert_to_incremental`.
            connection
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
                .map_err(|e| open_error(e.to_string()))?;
        }
        // The WAL is cut back to 8 MiB after a checkpoint, whatever one big write grew it to.
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;
                 PRAGMA journal_size_limit = 8388608;",
            )
            .map_err(|e| open_error(e.to_string()))?;
        migrations::run(&mut connection)
            .map_err(|e| open_error(format!("schema migration failed: {e}")))?;
        Ok(Store {
            connection: Mutex::new(connection),
            path: path.to_path_buf(),
            policy: Mutex::new(Policy::default()),
        })
    }

    /// What the store keeps and how big it may grow.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn policy(&self) -> Policy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A store made before cairn used incremental vacuum is rewritten once (VACUUM) so that
    /// its freed pages can be given back. Needs free space about the database's size; when
    /// that fails the store works as before and the next start tries again. Returns whether
    /// it converted.
    pub fn convert_to_incremental(&self) -> Result<bool, StoreError> {
        let mode: i64 = self
            .lock()
            .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        if mode == 2 {
            return Ok(false);
        }
        // VACUUM writes a whole copy: without room for it (and the reserve) it is left for a
        // start with more room, rather than filling the disk and failing.
        let used = self.usage()?.used_bytes;
        if reserve::free_bytes(&self.path)
            .is_some_and(|free| free < 2 * used + reserve::RESERVE_BYTES)
        {
            tracing::info!(
                "the store is not rewritten to shrink yet: that needs twice its {} free",
                ByteSize(used)
            );
            return Ok(false);
        }
        self.lock()
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
            .map_err(|e| self.error(e))?;
        Ok(true)
    }

    /// Runs `work` against the store on the blocking pool.
    pub async fn call<R, F>(self: &Arc<Self>, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| StoreError::Sqlite(format!("store task failed: {e}")))?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is still safe to use.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, err: rusqlite::Error) -> StoreError {
        if let rusqlite::Error::SqliteFailure(code, _) = &err {
            if code.code == rusqlite::ErrorCode::DiskFull {
                return StoreError::Full {
                    path: self.path.clone(),
                };
            }
        }
        StoreError::Sqlite(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::spec::{AppName, AppSpec};

    fn spec(name: &str, digest: &Digest, greeting: &str) -> AppSpec {
        AppSpec::from_manifest(&format!(
            "name = \"{name}\"\ncomponent = \"{digest}\"\n[http]\nlisten = \"127.0.0.1:8080\"\n[env]\nGREETING = \"{greeting}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn blobs_are_stored_once_and_verified_on_read() {
        // (Bytes are verified on their way in by `admission`, the only caller of
        // put_component.)
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let digest = Digest::of(b"component bytes");
        assert!(store
            .put_component(&digest, b"component bytes", None)
            .unwrap());
        assert!(!store
            .put_component(&digest, b"component bytes", None)
            .unwrap());
        assert_eq!(
            store.get_blob(&digest).unwrap().unwrap(),
            b"component bytes"
        );

        // Damage the row behind the store's back: a read must refuse it.
        store
            .lock()
            .execute(
                "UPDATE blobs SET data = x'00' WHERE digest = ?1",
                [digest.to_string()],
            )
            .unwrap();
        let err = store.get_blob(&digest).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn generations_survive_reopen_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cairn.db");
        let digest = Digest::of(b"x");
        {
            let store = Store::open(&path).unwrap();
            store.put_component(&digest, b"x", None).unwrap();
            assert_eq!(
                store
                    .commit_generation(&spec("web", &digest, "one"), Owner::Local)
                    .unwrap(),
                1
            );
            assert_eq!(
                store
                    .commit_generation(&spec("web", &digest, "two"), Owner::Local)
                    .unwrap(),
                2
            );
        }
        let store = Store::open(&path).unwrap();
        let name: AppName = "web".parse().unwrap();
        let app = store.app(&name).unwrap().unwrap();
        assert_eq!(app.generation, 2);
        assert_eq!(app.spec.unwrap().env["GREETING"], "two");
        store.set_current_generation(&name, 1).unwrap();
        assert_eq!(
            store.app(&name).unwrap().unwrap().spec.unwrap().env["GREETING"],
            "one"
        );
        assert_eq!(store.generations(&name).unwrap().len(), 2);
        // A new deploy after a rollback gets a new number, never reuses one.
        assert_eq!(
            store
                .commit_generation(&spec("web", &digest, "three"), Owner::Local)
                .unwrap(),
            3
        );
        // A blob in use, or named, is kept; one nothing refers to goes.
        assert!(!store.drop_blob_if_unused(&digest).unwrap());
        let loose = Digest::of(b"loose");
        store.put_component(&loose, b"loose", None).unwrap();
        store.put_compiled(&loose, "engine", b"code", "{}").unwrap();
        assert!(store.drop_blob_if_unused(&loose).unwrap());
        assert!(!store.has_blob(&loose).unwrap());
        assert!(store.get_compiled(&loose, "engine").unwrap().is_none());
        assert!(store.remove_app(&name).unwrap());
        assert!(store.app(&name).unwrap().is_none());
        assert!(store.generations(&name).unwrap().is_empty());
        assert!(store.has_blob(&digest).unwrap());
    }

    #[test]
    fn a_spec_this_cairnd_cannot_read_fails_its_app_not_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let digest = Digest::of(b"x");
        store.put_component(&digest, b"x", None).unwrap();
        for app in ["newer", "fine"] {
            store
                .commit_generation(&spec(app, &digest, "one"), Owner::Local)
                .unwrap();
        }
        store
            .commit_generation(&spec("newer", &digest, "two"), Owner::Local)
            .unwrap();
        // A newer cairn wrote generation 2 with a field this one does not know.
        store
            .lock()
            .execute(
                "UPDATE generations SET spec = json_set(spec, '$.webhooks', 'hourly')
                 WHERE app = 'newer' AND generation = 2",
                [],
            )
            .unwrap();
        let apps = store.apps().unwrap();
        assert_eq!(apps.len(), 2);
        let unreadable = apps[1].spec.as_ref().unwrap_err();
        assert_eq!((apps[1].name.as_str(), apps[1].generation), ("newer", 2));
        assert!(
            unreadable.reason.contains("generation 2")
                && unreadable.reason.contains("unknown field `webhooks`"),
            "{}",
            unreadable.reason
        );
        assert_eq!(
            unreadable.stand_in.listen().unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(unreadable.stand_in.component, digest);
        assert!(apps[0].spec.is_ok());
        let generations = store.generations(&apps[1].name).unwrap();
        assert!(generations[0].spec.is_ok() && generations[1].spec.is_err());
        assert_eq!(generations[1].digest, digest);
    }

    /// A component of `size` bytes whose digest is right (the store does not validate).
    fn blob(store: &Store, size: usize, seed: u8, tag: Option<(&str, &str, &str)>) -> Digest {
        let bytes: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let digest = Digest::of(&bytes);
        store.put_component(&digest, &bytes, tag).unwrap();
        digest
    }

    fn file_bytes(path: &Path) -> u64 {
        let wal = path.with_extension("db-wal");
        std::fs::metadata(path).unwrap().len()
            + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn collection_keeps_what_is_used_named_or_recent_and_the_file_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cairn.db");
        let store = Store::open(&path).unwrap();
        store.set_policy(Policy {
            grace_secs: 0,
            keep_generations: 2,
            ..Policy::default()
        });
        let name: AppName = "web".parse().unwrap();
        // Five generations, each with its own 1 MiB component.
        let digests: Vec<Digest> = (0..5u8)
            .map(|seed| {
                let digest = blob(&store, 1 << 20, seed, None);
                store
                    .commit_generation(&spec("web", &digest, "x"), Owner::Local)
                    .unwrap();
                store
                    .put_compiled(&digest, "engine", &[seed; 4096], "{}")
                    .unwrap();
                digest
            })
            .collect();
        // Rolled back to the first: it stays, with the newest two.
        store.set_current_generation(&name, 1).unwrap();
        let named = blob(&store, 1 << 20, 10, Some(("kept", "v1", "local")));
        let fleet_used = blob(&store, 1 << 20, 11, Some(("fleet", "a", "fleet")));
        let fleet_loose = blob(&store, 1 << 20, 12, Some(("fleet", "b", "fleet")));
        store
            .record_applied(&Applied {
                key: "device.a",
                version: 1,
                specs: &[spec("pump", &fleet_used, "x")],
                expires_unix: 0,
                complete: true,
                value_sha256: "",
            })
            .unwrap();
        // A record whose specs do not parse (damage) does not stop collection.
        store
            .lock()
            .execute(
                "INSERT INTO sync_applied (key, version, applied_unix, apps, specs)
                 VALUES ('group.x', 1, 0, '[]', 'not json')",
                [],
            )
            .unwrap();
        let big = file_bytes(&path);
        let collected = store.collect().unwrap();
        assert_eq!(collected.generations, 2, "{collected:?}");
        assert_eq!(
            (collected.components, collected.component_bytes),
            (3, 3 << 20),
            "{collected:?}"
        );
        assert_eq!((collected.compiled, collected.compiled_bytes), (2, 8192));
        let kept: Vec<u64> = store
            .generations(&name)
            .unwrap()
            .iter()
            .map(|g| g.generation)
            .collect();
        assert_eq!(kept, [1, 4, 5]);
        for (digest, expected) in [
            (&digests[0], true),
            (&digests[1], false),
            (&digests[2], false),
            (&digests[3], true),
            (&digests[4], true),
            (&named, true),
            (&fleet_used, true),
            (&fleet_loose, false),
        ] {
            assert_eq!(store.has_blob(digest).unwrap(), expected, "{digest}");
        }
        assert!(store.get_compiled(&digests[1], "engine").unwrap().is_none());
        assert!(store.get_compiled(&digests[0], "engine").unwrap().is_some());
        assert!(
            collected.file_bytes_freed >= 3 << 20 && file_bytes(&path) <= big - (3 << 20),
            "{collected:?}: {big} -> {}",
            file_bytes(&path)
        );
        // A collected generation cannot be made current.
        let gone = store.set_current_generation(&name, 2).unwrap_err();
        assert!(gone.to_string().contains("no longer stored"), "{gone}");
        // Within the grace period an unused component stays.
        store.set_policy(Policy {
            grace_secs: 3600,
            ..Policy::default()
        });
        let recent = blob(&store, 1000, 13, None);
        store.collect().unwrap();
        assert!(store.has_blob(&recent).unwrap());
        // An old unused component that a deploy or a push is about to use again (touched)
        // gets its grace period again; one left alone goes.
        let (old, wanted) = (blob(&store, 1000, 14, None), blob(&store, 1000, 15, None));
        store
            .lock()
            .execute("UPDATE blobs SET created_unix = 0", [])
            .unwrap();
        assert!(store.touch_blob(&wanted).unwrap());
        assert!(!store.touch_blob(&Digest::of(b"never stored")).unwrap());
        store.collect().unwrap();
        assert!(store.has_blob(&wanted).unwrap());
        assert!(!store.has_blob(&old).unwrap());
    }

    #[test]
    fn a_store_made_before_incremental_vacuum_is_converted_once_keeping_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cairn.db");
        let digest = {
            let store = Store::open(&path).unwrap();
            let digest = blob(&store, 1000, 1, Some(("kept", "v1", "local")));
            store
                .lock()
                .execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;")
                .unwrap();
            digest
        };
        let store = Store::open(&path).unwrap();
        let mode = |store: &Store| -> i64 {
            store
                .lock()
                .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode(&store), 0);
        assert!(store.convert_to_incremental().unwrap());
        assert_eq!(mode(&store), 2);
        assert!(!store.convert_to_incremental().unwrap());
        assert!(store.get_blob(&digest).unwrap().is_some());
    }

    #[test]
    fn past_its_budget_the_store_collects_then_refuses_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        store.set_policy(Policy {
            grace_secs: 0,
            budget: Some(4 << 20),
            ..Policy::default()
        });
        // Unused: collected to make room.
        let loose = blob(&store, 3 << 20, 1, None);
        let kept = blob(&store, 3 << 20, 2, Some(("kept", "v1", "local")));
        assert!(!store.has_blob(&loose).unwrap());
        assert!(store.has_blob(&kept).unwrap());
        let digest = Digest::of(&[7u8; 3 << 20]);
        let refused = store
            .put_component(&digest, &[7u8; 3 << 20], None)
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::OverBudget { budget, incoming, .. } if budget == 4 << 20 && incoming == 3 << 20),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("raise [store] budget"),
            "{refused}"
        );
        assert!(!store.has_blob(&digest).unwrap());
        // What is present already needs no room.
        assert!(!store
            .put_component(&kept, &[], Some(("again", "v1", "local")))
            .unwrap());
        let usage = store.usage().unwrap();
        assert!(usage.used_bytes <= 4 << 20, "{usage:?}");
        assert_eq!(usage.budget, Some(4 << 20));
    }

    #[test]
    fn log_text_of_all_apps_is_kept_within_the_total() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        store.set_policy(Policy {
            log_bytes_total: 25,
            ..Policy::default()
        });
        let lines: Vec<NewLogLine> = (0..10)
            .map(|i| NewLogLine {
                app: format!("app{}", i % 3),
                generation: 1,
                unix_millis: i,
                stream: "stdout",
                line: format!("line {i}"),
            })
            .collect();
        store.append_logs(&lines).unwrap();
        // 6 bytes a line: the newest four fit in 25.
        assert_eq!(store.prune_all_logs().unwrap(), 6);
        let left: Vec<String> = (0..3)
            .flat_map(|i| store.tail_logs(&format!("app{i}"), 0, 0, 0).unwrap())
            .map(|l| l.line)
            .collect();
        assert_eq!(left, ["line 6", "line 9", "line 7", "line 8"]);
    }

    #[test]
    fn compiled_code_is_keyed_by_fingerprint_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let digest = Digest::of(b"x");
        store
            .put_compiled(&digest, "engine-a", b"native", "facts")
            .unwrap();
        assert_eq!(
            store.get_compiled(&digest, "engine-a").unwrap().unwrap(),
            Compiled {
                code: b"native".to_vec(),
                facts: Some("facts".to_string())
            }
        );
        // Code cached before facts were kept has none until they are recorded.
        store
            .lock()
            .execute("UPDATE compiled SET facts = NULL", [])
            .unwrap();
        assert_eq!(
            store
                .get_compiled(&digest, "engine-a")
                .unwrap()
                .unwrap()
                .facts,
            None
        );
        store
            .set_compiled_facts(&digest, "engine-a", "later")
            .unwrap();
        assert_eq!(
            store
                .get_compiled(&digest, "engine-a")
                .unwrap()
                .unwrap()
                .facts,
            Some("later".to_string())
        );
        assert!(store.get_compiled(&digest, "engine-b").unwrap().is_none());
        store
            .lock()
            .execute("UPDATE compiled SET data = x'01'", [])
            .unwrap();
        assert!(store.get_compiled(&digest, "engine-a").unwrap().is_none());
        store
            .put_compiled(&digest, "engine-a", b"native", "{}")
            .unwrap();
        store
            .put_compiled(&digest, "engine-old", b"native", "{}")
            .unwrap();
        assert_eq!(
            store
                .drop_compiled_except(&["engine-a".to_string()])
                .unwrap(),
            1
        );
        assert!(store.get_compiled(&digest, "engine-a").unwrap().is_some());
    }

    #[test]
    fn the_outbox_drops_logs_first_and_status_last() {
        // Every row here is 100 bytes.
        let stats = |waiting, dropped| outbox::OutboxStats {
            waiting,
            bytes: waiting * 100,
            dropped,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let bounds = OutboxBounds {
            max_bytes: 300,
            max_age_secs: 3600,
        };
        store
            .outbox_push(OutboxKind::Status, &[b's'; 100], bounds)
            .unwrap();
        store
            .outbox_push(OutboxKind::Log, &[b'l'; 100], bounds)
            .unwrap();
        store
            .outbox_push(OutboxKind::Event, &[b'e'; 100], bounds)
            .unwrap();
        assert_eq!(store.outbox_stats().unwrap(), stats(3, 0));
        // Over the bound: the log goes first.
        assert_eq!(
            store
                .outbox_push(OutboxKind::Status, &[b't'; 100], bounds)
                .unwrap(),
            1
        );
        let kinds: Vec<u8> = store
            .outbox_peek(10)
            .unwrap()
            .iter()
            .map(|row| row.payload[0])
            .collect();
        assert_eq!(kinds, [b's', b'e', b't']);
        // Then the event, then the oldest status.
        store
            .outbox_push(OutboxKind::Status, &[b'u'; 100], bounds)
            .unwrap();
        store
            .outbox_push(OutboxKind::Status, &[b'v'; 100], bounds)
            .unwrap();
        let kinds: Vec<u8> = store
            .outbox_peek(10)
            .unwrap()
            .iter()
            .map(|row| row.payload[0])
            .collect();
        assert_eq!(kinds, [b't', b'u', b'v']);
        assert_eq!(store.outbox_stats().unwrap(), stats(3, 3));
        let ids: Vec<u64> = store
            .outbox_peek(2)
            .unwrap()
            .iter()
            .map(|row| row.id)
            .collect();
        store.outbox_delete(&ids).unwrap();
        assert_eq!(store.outbox_stats().unwrap(), stats(1, 3));
    }

    #[test]
    fn applied_versions_and_rejections_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let web = spec("web", &Digest::of(b"web"), "hi");
        store
            .record_applied(&Applied {
                key: "device.a",
                version: 3,
                specs: std::slice::from_ref(&web),
                expires_unix: 99,
                complete: false,
                value_sha256: "",
            })
            .unwrap();
        let applied = store.applied().unwrap();
        assert_eq!(applied[0].apps, ["web"]);
        assert_eq!(applied[0].specs, [web]);
        assert_eq!((applied[0].expires_unix, applied[0].complete), (99, false));
        store
            .record_applied(&Applied {
                key: "device.a",
                version: 4,
                specs: &[],
                expires_unix: 100,
                complete: true,
                value_sha256: "",
            })
            .unwrap();
        let applied = store.applied().unwrap();
        assert_eq!((applied[0].version, applied[0].apps.len()), (4, 0));
        assert!(applied[0].complete);
        for i in 0..120 {
            store
                .record_rejection("device.a", &format!("reason {i}"))
                .unwrap();
        }
        let rejections = store.rejections(500).unwrap();
        assert_eq!(rejections.len(), 100);
        assert_eq!(rejections[0].reason, "reason 119");
    }

    #[test]
    fn logs_tail_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let lines: Vec<NewLogLine> = (0..10)
            .map(|i| NewLogLine {
                app: "web".into(),
                generation: 1,
                unix_millis: i,
                stream: "stdout",
                line: format!("line {i}"),
            })
            .collect();
        let ids = store.append_logs(&lines).unwrap();
        assert_eq!(ids.len(), 10);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let tail = store.tail_logs("web", 3, 0, 0).unwrap();
        assert_eq!(
            tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["line 7", "line 8", "line 9"]
        );
        assert_eq!(store.tail_logs("web", 0, 0, 0).unwrap().len(), 10);
        assert_eq!(store.prune_logs("web", 4, u64::MAX).unwrap(), 6);
        assert_eq!(
            store
                .tail_logs("web", 0, 0, 0)
                .unwrap()
                .first()
                .unwrap()
                .line,
            "line 6"
        );
        // Each line is 6 bytes: a 13-byte budget keeps the newest two.
        assert_eq!(store.prune_logs("web", 100, 13).unwrap(), 2);
        assert_eq!(
            store
                .tail_logs("web", 0, 0, 0)
                .unwrap()
                .iter()
                .map(|l| l.line.as_str())
                .collect::<Vec<_>>(),
            ["line 8", "line 9"]
        );
    }

    #[test]
    fn logs_filtered_by_level_rank_as_the_levels_module_says() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let streams = [
            "trace", "debug", "info", "warn", "error", "critical", "stdout", "stderr", "cairn",
        ];
        let lines: Vec<NewLogLine> = streams
            .iter()
            .enumerate()
            .map(|(i, stream)| NewLogLine {
                app: "web".into(),
                generation: 1,
                unix_millis: i as i64,
                stream,
                line: stream.to_string(),
            })
            .collect();
        store.append_logs(&lines).unwrap();
        for (min, _) in cairn_core::levels::LEVELS.iter().enumerate() {
            let kept: Vec<String> = store
                .tail_logs("web", 0, min, 0)
                .unwrap()
                .into_iter()
                .map(|l| l.line)
                .collect();
            let expected: Vec<String> = streams
                .iter()
                .filter(|s| cairn_core::levels::rank(s) >= min)
                .map(|s| s.to_string())
                .collect();
            assert_eq!(kept, expected, "at rank {min}");
        }
        // `tail` counts the lines kept, not the lines scanned.
        let last_two: Vec<String> = store
            .tail_logs("web", 2, 3, 0)
            .unwrap()
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(last_two, ["critical", "cairn"]);
    }
}

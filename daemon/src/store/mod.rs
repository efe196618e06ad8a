//! The store: the one SQLite database that holds everything the device must remember
//! (component bytes, precompiled code, apps and their generations, logs). All SQL lives here.
//!
//! Invariants: blobs are content-addressed and checked against their digest when written and
//! when read; a generation is never changed once written; every state change is a transaction
//! in WAL mode with `synchronous=FULL`, so a kill -9 at any instant leaves a database that opens
//! with every acknowledged change present.
//!
//! The API is synchronous; async callers go through [`Store::call`], which runs the work on
//! tokio's blocking pool so SQLite never blocks the runtime.

mod migrations;

use crate::digest::Digest;
use crate::spec::{AppName, AppSpec};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Names a digest `name:tag`, moving the tag if it named another digest.
const TAG_COMPONENT: &str =
    "INSERT INTO components (name, tag, digest, source, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (name, tag) DO UPDATE SET digest = excluded.digest, source = excluded.source,
     created_unix = excluded.created_unix";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the disk holding {path} is full: free some space, then retry")]
    Full { path: PathBuf },
    #[error("cannot open the state database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("stored data for {what} is corrupt ({detail}); it was not used")]
    Corrupt { what: String, detail: String },
    #[error("state database error: {0}")]
    Sqlite(String),
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

/// An app's desired state: its current generation's spec.
#[derive(Debug, Clone)]
pub struct AppRecord {
    pub name: AppName,
    pub owner: Owner,
    pub generation: u64,
    pub spec: AppSpec,
}

#[derive(Debug, Clone)]
pub struct GenerationRecord {
    pub generation: u64,
    pub digest: Digest,
    pub created_unix: i64,
    pub spec: AppSpec,
}

#[derive(Debug, Clone)]
pub struct ComponentRecord {
    pub digest: Digest,
    pub size: u64,
    pub name: String,
    pub tag: String,
    pub source: String,
    pub created_unix: i64,
}

#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub app: String,
    pub generation: u64,
    pub unix_millis: i64,
    pub stream: &'static str,
    pub line: String,
}

#[derive(Debug, Clone)]
pub struct LogRecord {
    pub id: u64,
    pub app: String,
    pub generation: u64,
    pub unix_millis: i64,
    pub stream: String,
    pub line: String,
}

/// Precompiled code and what the runtime recorded about it (text it wrote; absent for code
/// cached by an older cairnd).
pub type Compiled = (Vec<u8>, Option<String>);

pub struct Store {
    connection: Mutex<Connection>,
    path: PathBuf,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        let mut connection = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(|e| open_error(e.to_string()))?;
        migrations::run(&mut connection)
            .map_err(|e| open_error(format!("schema migration failed: {e}")))?;
        Ok(Store {
            connection: Mutex::new(connection),
            path: path.to_path_buf(),
        })
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

    // ---- blobs and components ----

    /// Stores a component's `bytes` under `digest` and, with `tag` (name, tag, source), names
    /// it, in one transaction. `digest` must be of these very bytes: only `admission` calls
    /// this, having hashed them as they arrived. Returns false if the bytes were present.
    pub fn put_component(
        &self,
        digest: &Digest,
        bytes: &[u8],
        tag: Option<(&str, &str, &str)>,
    ) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let inserted = transaction
            .execute(
                "INSERT OR IGNORE INTO blobs (digest, size, data, created_unix) VALUES (?1, ?2, ?3, ?4)",
                params![digest.to_string(), bytes.len() as i64, bytes, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        if let Some((name, tag, source)) = tag {
            transaction
                .execute(
                    TAG_COMPONENT,
                    params![name, tag, digest.to_string(), source, now_unix()],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(inserted == 1)
    }

    pub fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT 1 FROM blobs WHERE digest = ?1",
                [digest.to_string()],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(|e| self.error(e))
    }

    /// The bytes stored under `digest`, checked against it.
    pub fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let bytes: Option<Vec<u8>> = {
            let connection = self.lock();
            connection
                .query_row(
                    "SELECT data FROM blobs WHERE digest = ?1",
                    [digest.to_string()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| self.error(e))?
        };
        match bytes {
            Some(bytes) if !digest.verify(&bytes) => Err(StoreError::Corrupt {
                what: format!("component {digest}"),
                detail: format!(
                    "its {} stored bytes hash to {}",
                    bytes.len(),
                    Digest::of(&bytes)
                ),
            }),
            other => Ok(other),
        }
    }

    /// Deletes a blob (and its precompiled code) that no name and no generation refers to.
    pub fn drop_blob_if_unused(&self, digest: &Digest) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let deleted = transaction
            .execute(
                "DELETE FROM blobs WHERE digest = ?1
                   AND NOT EXISTS (SELECT 1 FROM components WHERE digest = ?1)
                   AND NOT EXISTS (SELECT 1 FROM generations WHERE digest = ?1)",
                [digest.to_string()],
            )
            .map_err(|e| self.error(e))?;
        if deleted == 1 {
            transaction
                .execute(
                    "DELETE FROM compiled WHERE digest = ?1",
                    [digest.to_string()],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(deleted == 1)
    }

    /// Names `digest` as `name:tag` (moving the tag if it named another digest).
    pub fn tag_component(
        &self,
        name: &str,
        tag: &str,
        digest: &Digest,
        source: &str,
    ) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                TAG_COMPONENT,
                params![name, tag, digest.to_string(), source, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    // ---- imports from the import folder ----

    /// The hash of what was last imported from `file`, if it ever was.
    pub fn import_source(&self, file: &str) -> Result<Option<String>, StoreError> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT source FROM imports WHERE file = ?1",
                [file],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// Records that `file` (hashing to `source`) was imported as `app`.
    pub fn record_import(&self, file: &str, source: &str, app: &str) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "INSERT INTO imports (file, source, app, imported_unix) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (file) DO UPDATE SET source = excluded.source, app = excluded.app,
                 imported_unix = excluded.imported_unix",
                params![file, source, app, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Every stored blob with the names that point at it (one row per name, or one unnamed row).
    pub fn components(&self) -> Result<Vec<ComponentRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT b.digest, b.size, COALESCE(c.name, ''), COALESCE(c.tag, ''), COALESCE(c.source, ''),
                        COALESCE(c.created_unix, b.created_unix)
                 FROM blobs b LEFT JOIN components c ON c.digest = b.digest
                 ORDER BY b.created_unix, c.name, c.tag",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (digest, size, name, tag, source, created_unix) = row.map_err(|e| self.error(e))?;
            records.push(ComponentRecord {
                digest: digest
                    .parse()
                    .map_err(|e: crate::digest::DigestParseError| StoreError::Corrupt {
                        what: "the components table".into(),
                        detail: e.to_string(),
                    })?,
                size: size as u64,
                name,
                tag,
                source,
                created_unix,
            });
        }
        Ok(records)
    }

    // ---- precompiled code ----

    /// Precompiled code for `digest` made by an engine with `fingerprint`, if present and intact,
    /// with the facts the runtime recorded about it (absent for code cached before they were).
    /// A damaged entry is deleted and reported as absent, so the caller recompiles.
    pub fn get_compiled(
        &self,
        digest: &Digest,
        fingerprint: &str,
    ) -> Result<Option<Compiled>, StoreError> {
        let connection = self.lock();
        let row: Option<(Vec<u8>, String, Option<String>)> = connection
            .query_row(
                "SELECT data, checksum, facts FROM compiled WHERE digest = ?1 AND fingerprint = ?2",
                params![digest.to_string(), fingerprint],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()
            .map_err(|e| self.error(e))?;
        match row {
            Some((data, checksum, facts)) if Digest::of(&data).to_string() == checksum => {
                Ok(Some((data, facts)))
            }
            Some(_) => {
                connection
                    .execute(
                        "DELETE FROM compiled WHERE digest = ?1 AND fingerprint = ?2",
                        params![digest.to_string(), fingerprint],
                    )
                    .map_err(|e| self.error(e))?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    pub fn put_compiled(
        &self,
        digest: &Digest,
        fingerprint: &str,
        data: &[u8],
        facts: &str,
    ) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "INSERT OR REPLACE INTO compiled (digest, fingerprint, data, checksum, created_unix, facts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![digest.to_string(), fingerprint, data, Digest::of(data).to_string(), now_unix(), facts],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Records the facts about code cached before facts were kept (see `get_compiled`).
    pub fn set_compiled_facts(
        &self,
        digest: &Digest,
        fingerprint: &str,
        facts: &str,
    ) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "UPDATE compiled SET facts = ?3 WHERE digest = ?1 AND fingerprint = ?2",
                params![digest.to_string(), fingerprint, facts],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Drops precompiled code made by engines other than those whose fingerprints are given
    /// (a wasmtime upgrade or a CPU change makes old code useless).
    pub fn drop_compiled_except(&self, fingerprints: &[String]) -> Result<usize, StoreError> {
        let connection = self.lock();
        let placeholders = vec!["?"; fingerprints.len()].join(",");
        let sql = if fingerprints.is_empty() {
            "DELETE FROM compiled".to_string()
        } else {
            format!("DELETE FROM compiled WHERE fingerprint NOT IN ({placeholders})")
        };
        connection
            .execute(&sql, rusqlite::params_from_iter(fingerprints))
            .map_err(|e| self.error(e))
    }

    // ---- apps and generations ----

    /// Records `spec` as the app's next generation and makes it current, in one transaction.
    pub fn commit_generation(&self, spec: &AppSpec, owner: Owner) -> Result<u64, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let next: u64 = transaction
            .query_row(
                "SELECT COALESCE(MAX(generation), 0) + 1 FROM generations WHERE app = ?1",
                [spec.name.as_str()],
                |row| row.get::<_, i64>(0),
            )
            .map_err(|e| self.error(e))? as u64;
        transaction
            .execute(
                "INSERT INTO generations (app, generation, spec, digest, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![spec.name.as_str(), next as i64, spec.to_stored_json(), spec.component.to_string(), now_unix()],
            )
            .map_err(|e| self.error(e))?;
        transaction
            .execute(
                "INSERT INTO apps (name, owner, generation, updated_unix) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET generation = excluded.generation, updated_unix = excluded.updated_unix",
                params![spec.name.as_str(), owner.as_str(), next as i64, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(next)
    }

    /// Makes an existing generation current again.
    pub fn set_current_generation(&self, app: &AppName, generation: u64) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "UPDATE apps SET generation = ?2, updated_unix = ?3 WHERE name = ?1",
                params![app.as_str(), generation as i64, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    #[cfg(test)]
    fn app(&self, name: &AppName) -> Result<Option<AppRecord>, StoreError> {
        Ok(self.apps_where(Some(name))?.into_iter().next())
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.apps_where(None)
    }

    fn apps_where(&self, name: Option<&AppName>) -> Result<Vec<AppRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT a.name, a.owner, a.generation, g.spec FROM apps a
                 JOIN generations g ON g.app = a.name AND g.generation = a.generation
                 WHERE ?1 IS NULL OR a.name = ?1 ORDER BY a.name",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([name.map(|n| n.as_str().to_string())], |row| {
                Ok((
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (owner, generation, spec) = row.map_err(|e| self.error(e))?;
            let spec = AppSpec::from_stored_json(&spec).map_err(|e| StoreError::Corrupt {
                what: "an app generation".into(),
                detail: e.to_string(),
            })?;
            records.push(AppRecord {
                name: spec.name.clone(),
                owner: Owner::parse(&owner),
                generation: generation as u64,
                spec,
            });
        }
        Ok(records)
    }

    /// Every generation of `app`, oldest first.
    pub fn generations(&self, app: &AppName) -> Result<Vec<GenerationRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT generation, spec, created_unix FROM generations WHERE app = ?1 ORDER BY generation")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([app.as_str()], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (generation, spec, created_unix) = row.map_err(|e| self.error(e))?;
            let spec = AppSpec::from_stored_json(&spec).map_err(|e| StoreError::Corrupt {
                what: format!("generation {generation} of {app}"),
                detail: e.to_string(),
            })?;
            records.push(GenerationRecord {
                generation: generation as u64,
                digest: spec.component.clone(),
                created_unix,
                spec,
            });
        }
        Ok(records)
    }

    /// Forgets an app: its generations and its logs. Component blobs stay.
    pub fn remove_app(&self, app: &AppName) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let removed = transaction
            .execute("DELETE FROM apps WHERE name = ?1", [app.as_str()])
            .map_err(|e| self.error(e))?;
        for sql in [
            "DELETE FROM generations WHERE app = ?1",
            "DELETE FROM logs WHERE app = ?1",
        ] {
            transaction
                .execute(sql, [app.as_str()])
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(removed == 1)
    }

    // ---- logs ----

    /// Appends lines in one transaction and returns their ids, in order.
    pub fn append_logs(&self, lines: &[NewLogLine]) -> Result<Vec<u64>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let mut ids = Vec::with_capacity(lines.len());
        {
            let mut statement = transaction
                .prepare_cached(
                    "INSERT INTO logs (app, generation, unix_millis, stream, line) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|e| self.error(e))?;
            for line in lines {
                statement
                    .execute(params![
                        line.app,
                        line.generation as i64,
                        line.unix_millis,
                        line.stream,
                        line.line
                    ])
                    .map_err(|e| self.error(e))?;
                ids.push(transaction.last_insert_rowid() as u64);
            }
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(ids)
    }

    /// The last `tail` lines of `app` (all kept lines when `tail` is 0), oldest first.
    pub fn tail_logs(&self, app: &str, tail: u64) -> Result<Vec<LogRecord>, StoreError> {
        let connection = self.lock();
        let limit = if tail == 0 { -1 } else { tail as i64 };
        let mut statement = connection
            .prepare(
                "SELECT id, app, generation, unix_millis, stream, line FROM
                   (SELECT * FROM logs WHERE app = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![app, limit], |row| {
                Ok(LogRecord {
                    id: row.get::<_, i64>(0)? as u64,
                    app: row.get(1)?,
                    generation: row.get::<_, i64>(2)? as u64,
                    unix_millis: row.get(3)?,
                    stream: row.get(4)?,
                    line: row.get(5)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }

    /// Keeps the newest `keep` lines of `app`.
    pub fn prune_logs(&self, app: &str, keep: u64) -> Result<usize, StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "DELETE FROM logs WHERE app = ?1 AND id <= (SELECT id FROM logs WHERE app = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![app, keep as i64],
            )
            .map_err(|e| self.error(e))
    }
}

/// What an outbox row carries; the drop policy sheds logs first and status last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Log,
    Event,
    Status,
}

impl OutboxKind {
    fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Log => "log",
            OutboxKind::Event => "event",
            OutboxKind::Status => "status",
        }
    }
}

/// How much the outbox may hold before it drops rows.
#[derive(Debug, Clone, Copy)]
pub struct OutboxBounds {
    pub max_bytes: u64,
    pub max_age_secs: i64,
}

#[derive(Debug, Clone)]
pub struct AppliedRecord {
    pub key: String,
    pub version: u64,
    pub applied_unix: i64,
    pub apps: Vec<String>,
    /// The apps as the document gave them (empty for records written before schema 3).
    pub specs: Vec<AppSpec>,
}

impl Store {
    // ---- fleet sync ----

    pub fn applied(&self) -> Result<Vec<AppliedRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT key, version, applied_unix, apps, specs FROM sync_applied ORDER BY key",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok(AppliedRecord {
                    key: row.get(0)?,
                    version: row.get::<_, i64>(1)? as u64,
                    applied_unix: row.get(2)?,
                    apps: serde_json::from_str(&row.get::<_, String>(3)?).unwrap_or_default(),
                    specs: serde_json::from_str(&row.get::<_, String>(4)?).unwrap_or_default(),
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }

    pub fn record_applied(
        &self,
        key: &str,
        version: u64,
        specs: &[AppSpec],
    ) -> Result<(), StoreError> {
        let names: Vec<String> = specs.iter().map(|s| s.name.to_string()).collect();
        let connection = self.lock();
        connection
            .execute(
                "INSERT INTO sync_applied (key, version, applied_unix, apps, specs) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, applied_unix = excluded.applied_unix, apps = excluded.apps, specs = excluded.specs",
                params![
                    key,
                    version as i64,
                    now_unix(),
                    serde_json::to_string(&names).expect("names serialise"),
                    serde_json::to_string(specs).expect("specs serialise")
                ],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Records a refused document; keeps the newest 100.
    pub fn record_rejection(&self, key: &str, reason: &str) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "INSERT INTO sync_rejections (key, reason, unix) VALUES (?1, ?2, ?3)",
                params![key, reason, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        connection
            .execute(
                "DELETE FROM sync_rejections WHERE id <= (SELECT id FROM sync_rejections ORDER BY id DESC LIMIT 1 OFFSET 100)",
                [],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The newest `limit` rejections, newest first.
    pub fn rejections(&self, limit: u64) -> Result<Vec<(String, String, i64)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT key, reason, unix FROM sync_rejections ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }

    /// Queues a report, then enforces the bounds (see `outbox_push_many`).
    pub fn outbox_push(
        &self,
        kind: OutboxKind,
        payload: &[u8],
        bounds: OutboxBounds,
    ) -> Result<u64, StoreError> {
        self.outbox_push_many(kind, &[payload.to_vec()], bounds)
    }

    /// Queues reports in one transaction, then enforces the bounds: rows past the age go first,
    /// then, while over the byte bound, the oldest logs, then events, then status. Returns how
    /// many were dropped (also added to the `outbox_dropped` counter).
    pub fn outbox_push_many(
        &self,
        kind: OutboxKind,
        payloads: &[Vec<u8>],
        bounds: OutboxBounds,
    ) -> Result<u64, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let now = now_unix();
        {
            let mut insert = transaction
                .prepare_cached("INSERT INTO outbox (kind, payload, bytes, created_unix) VALUES (?1, ?2, ?3, ?4)")
                .map_err(|e| self.error(e))?;
            for payload in payloads {
                insert
                    .execute(params![kind.as_str(), payload, payload.len() as i64, now])
                    .map_err(|e| self.error(e))?;
            }
        }
        let mut dropped = transaction
            .execute(
                "DELETE FROM outbox WHERE created_unix < ?1",
                [now - bounds.max_age_secs],
            )
            .map_err(|e| self.error(e))? as u64;
        let mut total: i64 = transaction
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM outbox", [], |row| {
                row.get(0)
            })
            .map_err(|e| self.error(e))?;
        for shed in ["log", "event", "status"] {
            while total as u64 > bounds.max_bytes {
                let oldest: Option<(i64, i64)> = transaction
                    .query_row(
                        "SELECT id, bytes FROM outbox WHERE kind = ?1 ORDER BY id LIMIT 1",
                        [shed],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()
                    .map_err(|e| self.error(e))?;
                let Some((id, bytes)) = oldest else { break };
                transaction
                    .execute("DELETE FROM outbox WHERE id = ?1", [id])
                    .map_err(|e| self.error(e))?;
                total -= bytes;
                dropped += 1;
            }
        }
        if dropped > 0 {
            transaction
                .execute(
                    "INSERT INTO counters (name, value) VALUES ('outbox_dropped', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    [dropped as i64],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(dropped)
    }

    /// The oldest `limit` rows: (id, payload).
    pub fn outbox_peek(&self, limit: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT id, payload FROM outbox ORDER BY id LIMIT ?1")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get(1)?))
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }

    /// Removes rows the upstream acknowledged.
    pub fn outbox_delete(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        for id in ids {
            transaction
                .execute("DELETE FROM outbox WHERE id = ?1", [*id as i64])
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))
    }

    /// (rows waiting, rows ever dropped)
    pub fn outbox_stats(&self) -> Result<(u64, u64), StoreError> {
        let connection = self.lock();
        let waiting: i64 = connection
            .query_row("SELECT count(*) FROM outbox", [], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        let dropped: i64 = connection
            .query_row(
                "SELECT COALESCE((SELECT value FROM counters WHERE name = 'outbox_dropped'), 0)",
                [],
                |row| row.get(0),
            )
            .map_err(|e| self.error(e))?;
        Ok((waiting as u64, dropped as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(app.spec.env["GREETING"], "two");
        store.set_current_generation(&name, 1).unwrap();
        assert_eq!(
            store.app(&name).unwrap().unwrap().spec.env["GREETING"],
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
    fn compiled_code_is_keyed_by_fingerprint_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let digest = Digest::of(b"x");
        store
            .put_compiled(&digest, "engine-a", b"native", "facts")
            .unwrap();
        assert_eq!(
            store.get_compiled(&digest, "engine-a").unwrap().unwrap(),
            (b"native".to_vec(), Some("facts".to_string()))
        );
        // Code cached before facts were kept has none until they are recorded.
        store
            .lock()
            .execute("UPDATE compiled SET facts = NULL", [])
            .unwrap();
        assert_eq!(
            store.get_compiled(&digest, "engine-a").unwrap().unwrap().1,
            None
        );
        store
            .set_compiled_facts(&digest, "engine-a", "later")
            .unwrap();
        assert_eq!(
            store.get_compiled(&digest, "engine-a").unwrap().unwrap().1,
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
        assert_eq!(store.outbox_stats().unwrap(), (3, 0));
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
            .map(|(_, p)| p[0])
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
            .map(|(_, p)| p[0])
            .collect();
        assert_eq!(kinds, [b't', b'u', b'v']);
        assert_eq!(store.outbox_stats().unwrap(), (3, 3));
        let ids: Vec<u64> = store
            .outbox_peek(2)
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        store.outbox_delete(&ids).unwrap();
        assert_eq!(store.outbox_stats().unwrap(), (1, 3));
    }

    #[test]
    fn applied_versions_and_rejections_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let web = spec("web", &Digest::of(b"web"), "hi");
        store
            .record_applied("device.a", 3, std::slice::from_ref(&web))
            .unwrap();
        let applied = store.applied().unwrap();
        assert_eq!(applied[0].apps, ["web"]);
        assert_eq!(applied[0].specs, [web]);
        store.record_applied("device.a", 4, &[]).unwrap();
        let applied = store.applied().unwrap();
        assert_eq!((applied[0].version, applied[0].apps.len()), (4, 0));
        for i in 0..120 {
            store
                .record_rejection("device.a", &format!("reason {i}"))
                .unwrap();
        }
        let rejections = store.rejections(500).unwrap();
        assert_eq!(rejections.len(), 100);
        assert_eq!(rejections[0].1, "reason 119");
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
        let tail = store.tail_logs("web", 3).unwrap();
        assert_eq!(
            tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["line 7", "line 8", "line 9"]
        );
        assert_eq!(store.tail_logs("web", 0).unwrap().len(), 10);
        assert_eq!(store.prune_logs("web", 4).unwrap(), 6);
        assert_eq!(
            store.tail_logs("web", 0).unwrap().first().unwrap().line,
            "line 6"
        );
    }
}

//! Fleet sync's memory: which version of each key was applied (with its specs, for a
//! handover with no link) and the recent refusals.

use super::{now_unix, Store, StoreError};
use crate::spec::AppSpec;
use rusqlite::params;

#[derive(Debug, Clone)]
pub struct AppliedRecord {
    pub key: String,
    pub version: u64,
    pub applied_unix: i64,
    pub apps: Vec<String>,
    /// The apps as the document gave them (empty for records written before schema 3).
    pub specs: Vec<AppSpec>,
    /// When the document stops being valid (0: recorded before schema 8, unknown).
    pub expires_unix: i64,
    /// Whether every deploy and removal it asked for succeeded; if not, sync retries.
    pub complete: bool,
    /// SHA-256 (hex) of the value as read from the bucket: the same bytes seen again are not
    /// news ('' for records from before schema 8).
    pub value_sha256: String,
}

/// What one applied document was, for `record_applied`.
pub struct Applied<'a> {
    pub key: &'a str,
    pub version: u64,
    pub specs: &'a [AppSpec],
    pub expires_unix: i64,
    pub complete: bool,
    pub value_sha256: &'a str,
}

/// Who this installation is (schema 8): `installation` is random per store file, `device` the
/// fleet id used when the config names none.
#[derive(Debug, Clone)]
pub struct Identity {
    pub installation: String,
    pub device: String,
}

/// A fleet document (or one of its apps) that was refused, and why.
#[derive(Debug, Clone)]
pub struct RejectionRecord {
    pub key: String,
    pub reason: String,
    pub unix: i64,
}

impl Store {
    pub fn applied(&self) -> Result<Vec<AppliedRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT key, version, applied_unix, apps, specs, expires_unix, complete, value_sha256 FROM sync_applied ORDER BY key",
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
                    expires_unix: row.get(5)?,
                    complete: row.get(6)?,
                    value_sha256: row.get(7)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }

    pub fn record_applied(&self, applied: &Applied<'_>) -> Result<(), StoreError> {
        let names: Vec<String> = applied.specs.iter().map(|s| s.name.to_string()).collect();
        let connection = self.lock();
        connection
            .execute(
                "INSERT INTO sync_applied (key, version, applied_unix, apps, specs, expires_unix, complete, value_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, applied_unix = excluded.applied_unix, apps = excluded.apps, specs = excluded.specs, expires_unix = excluded.expires_unix, complete = excluded.complete, value_sha256 = excluded.value_sha256",
                params![
                    applied.key,
                    applied.version as i64,
                    now_unix(),
                    serde_json::to_string(&names).expect("names serialise"),
                    serde_json::to_string(applied.specs).expect("specs serialise"),
                    applied.expires_unix,
                    applied.complete,
                    applied.value_sha256,
                ],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Marks the applied documents complete (every fleet app at its winning spec).
    pub fn mark_applied_complete(&self) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE sync_applied SET complete = 1 WHERE complete = 0",
                [],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Forgets a key the device no longer reads (a group it left), once its apps are gone.
    pub fn forget_applied(&self, key: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM sync_applied WHERE key = ?1", [key])
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The root's delegation this device holds: (serial, the signed bytes as stored upstream).
    pub fn delegation(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        use rusqlite::OptionalExtension;
        self.lock()
            .query_row(
                "SELECT serial, signed FROM fleet_delegation WHERE id = 1",
                [],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    pub fn record_delegation(&self, serial: u64, signed: &[u8]) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO fleet_delegation (id, serial, signed) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET serial = excluded.serial, signed = excluded.signed",
                params![serial as i64, signed],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    pub fn identity(&self) -> Result<Identity, StoreError> {
        let connection = self.lock();
        let value = |name: &str| {
            connection.query_row(
                "SELECT value FROM identity WHERE name = ?1",
                [name],
                |row| row.get::<_, String>(0),
            )
        };
        Ok(Identity {
            installation: value("installation").map_err(|e| self.error(e))?,
            device: value("device").map_err(|e| self.error(e))?,
        })
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
    pub fn rejections(&self, limit: u64) -> Result<Vec<RejectionRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT key, reason, unix FROM sync_rejections ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok(RejectionRecord {
                    key: row.get(0)?,
                    reason: row.get(1)?,
                    unix: row.get(2)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))
    }
}

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

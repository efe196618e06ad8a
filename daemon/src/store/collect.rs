//! Keeping the store within bounds: old generations beyond what rollback keeps, components
//! and precompiled code nothing uses, and log text over the total are collected; the file then
//! gives the freed pages back (incremental vacuum) and the WAL is truncated. A budget, when
//! set, is checked before new components are stored.

use super::{now_unix, Store, StoreError};
use rusqlite::{params, Connection};

/// What the store keeps (from `[store]` and the log settings).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The most the database may hold, in bytes.
    pub budget: Option<u64>,
    /// Generations kept per app: the newest this many, and always the current one.
    pub keep_generations: u32,
    /// A component nothing uses is kept this long after it was stored.
    pub grace_secs: i64,
    /// Log text kept for all apps together.
    pub log_bytes_total: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            budget: None,
            keep_generations: 5,
            grace_secs: 600,
            log_bytes_total: 128 << 20,
        }
    }
}

/// What one collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    pub generations: u64,
    pub components: u64,
    pub component_bytes: u64,
    pub compiled: u64,
    pub compiled_bytes: u64,
    pub log_lines: u64,
    /// How much smaller the database's files are afterwards.
    pub file_bytes_freed: u64,
}

/// How big the store is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// The database and its WAL, as files.
    pub file_bytes: u64,
    /// The pages holding data (what the budget counts).
    pub used_bytes: u64,
    pub budget: Option<u64>,
    /// Free space on its file system.
    pub disk_free: Option<u64>,
}

/// Digests something still needs: a kept generation, a name given by an operator, or an app
/// of a fleet document this device applied.
const IN_USE: &str = "SELECT d FROM (
         SELECT digest AS d FROM generations
         UNION SELECT digest FROM components WHERE source <> 'fleet'
         UNION SELECT json_extract(spec.value, '$.component')
               FROM sync_applied, json_each(CASE WHEN json_valid(sync_applied.specs)
                                                 THEN sync_applied.specs ELSE '[]' END) AS spec
     ) WHERE d IS NOT NULL";

impl Store {
    /// Collects what the policy no longer keeps (see the module comment).
    pub fn collect(&self) -> Result<Collected, StoreError> {
        let before = self.usage()?.file_bytes;
        let policy = self.policy();
        let mut collected = Collected::default();
        {
            let mut connection = self.lock();
            let transaction = connection.transaction().map_err(|e| self.error(e))?;
            collected.generations = transaction
                .execute(
                    "DELETE FROM generations WHERE rowid IN (
                         SELECT ranked.rowid FROM (
                             SELECT rowid, app, generation,
                                    ROW_NUMBER() OVER (PARTITION BY app ORDER BY generation DESC) AS newer
                             FROM generations
                         ) AS ranked
                         WHERE ranked.newer > ?1
                           AND NOT EXISTS (SELECT 1 FROM apps a
                                           WHERE a.name = ranked.app AND a.generation = ranked.generation))",
                    [policy.keep_generations as i64],
                )
                .map_err(|e| self.error(e))? as u64;
            let unused = format!(
                "SELECT digest FROM blobs
                 WHERE max(created_unix, touched_unix) <= ?1 AND digest NOT IN ({IN_USE})"
            );
            let cutoff = now_unix() - policy.grace_secs;
            let (count, bytes): (i64, i64) = transaction
                .query_row(
                    &format!(
                        "SELECT count(*), COALESCE(SUM(size), 0) FROM blobs WHERE digest IN ({unused})"
                    ),
                    [cutoff],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(|e| self.error(e))?;
            (collected.components, collected.component_bytes) = (count as u64, bytes as u64);
            let (count, bytes): (i64, i64) = transaction
                .query_row(
                    &format!(
                        "SELECT count(*), COALESCE(SUM(length(data)), 0) FROM compiled
                         WHERE digest IN ({unused}) OR digest NOT IN (SELECT digest FROM blobs)"
                    ),
                    [cutoff],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(|e| self.error(e))?;
            (collected.compiled, collected.compiled_bytes) = (count as u64, bytes as u64);
            for sql in [
                format!("DELETE FROM components WHERE digest IN ({unused})"),
                format!("DELETE FROM compiled WHERE digest IN ({unused})"),
                format!("DELETE FROM blobs WHERE digest IN ({unused})"),
            ] {
                transaction
                    .execute(&sql, [cutoff])
                    .map_err(|e| self.error(e))?;
            }
            // Code for a component no longer stored (left by an older cairnd).
            transaction
                .execute(
                    "DELETE FROM compiled WHERE digest NOT IN (SELECT digest FROM blobs)",
                    [],
                )
                .map_err(|e| self.error(e))?;
            transaction.commit().map_err(|e| self.error(e))?;
            collected.log_lines =
                prune_all_logs(&connection, policy.log_bytes_total).map_err(|e| self.error(e))?;
            // What was collected stays collected; giving the pages back may need room the disk
            // lacks (they pass through the WAL), and waits for the next collection then.
            if let Err(error) = shrink(&connection) {
                tracing::warn!(%error, "the store's freed pages could not be given back yet");
            }
        }
        collected.file_bytes_freed = before.saturating_sub(self.usage()?.file_bytes);
        Ok(collected)
    }

    /// Keeps the newest log text of all apps together within the policy's total.
    pub fn prune_all_logs(&self) -> Result<u64, StoreError> {
        let total = self.policy().log_bytes_total;
        prune_all_logs(&self.lock(), total).map_err(|e| self.error(e))
    }

    /// The store's size, and its budget.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let connection = self.lock();
        let pragma = |name: &str| -> Result<u64, StoreError> {
            connection
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, i64>(0))
                .map(|value| value as u64)
                .map_err(|e| self.error(e))
        };
        let page = pragma("page_size")?;
        let used_bytes = (pragma("page_count")? - pragma("freelist_count")?) * page;
        let file = |suffix: &str| {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        };
        Ok(Usage {
            file_bytes: file("") + file("-wal"),
            used_bytes,
            budget: self.policy().budget,
            disk_free: super::reserve::free_bytes(&self.path),
        })
    }

    /// Refuses `incoming` more bytes if they would leave less than a reserve's worth free on
    /// the disk (kept for the store's own writes: commits, logs), or take the store past its
    /// budget, in both cases after collecting what nothing uses.
    pub fn check_room(&self, incoming: u64) -> Result<(), StoreError> {
        let short = || {
            super::reserve::free_bytes(&self.path)
                .filter(|free| *free < incoming + super::reserve::RESERVE_BYTES)
        };
        if short().is_some() {
            let collected = self.collect()?;
            tracing::info!(?collected, "collected to make room on the disk");
        }
        if let Some(free) = short() {
            return Err(if free < incoming {
                StoreError::Full {
                    path: self.path.clone(),
                }
            } else {
                StoreError::NoRoom {
                    path: self.path.clone(),
                    free,
                    incoming,
                }
            });
        }
        let Some(budget) = self.policy().budget else {
            return Ok(());
        };
        if self.usage()?.used_bytes + incoming <= budget {
            return Ok(());
        }
        let collected = self.collect()?;
        tracing::info!(?collected, "collected to stay within the store's budget");
        let used = self.usage()?.used_bytes;
        if used + incoming <= budget {
            return Ok(());
        }
        Err(StoreError::OverBudget {
            budget,
            used,
            incoming,
        })
    }
}

fn prune_all_logs(connection: &Connection, keep_bytes: u64) -> rusqlite::Result<u64> {
    // The newest lines whose text adds up to `keep_bytes` stay; older ones go.
    connection
        .execute(
            "DELETE FROM logs WHERE id <= (
                 SELECT id FROM (
                     SELECT id, SUM(length(CAST(line AS BLOB))) OVER (ORDER BY id DESC) AS newer
                     FROM logs
                 ) WHERE newer > ?1 ORDER BY id DESC LIMIT 1)",
            params![keep_bytes.min(i64::MAX as u64) as i64],
        )
        .map(|n| n as u64)
}

/// Gives freed pages back to the file system and truncates the WAL, 1 MiB of pages at a time
/// (each step's pages pass through the WAL, which the checkpoint then empties), so that it
/// needs little room even after a large collection.
fn shrink(connection: &Connection) -> rusqlite::Result<()> {
    let pages = |c: &Connection| c.query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0));
    let page_size: i64 = connection.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let step = ((1i64 << 20) / page_size).max(1);
    let mut left = pages(connection)?;
    while left > 0 {
        // The pragma frees one page per row it steps: run it to the end.
        let mut vacuum = connection.prepare(&format!("PRAGMA incremental_vacuum({step})"))?;
        let mut freed = vacuum.query([])?;
        while freed.next()?.is_some() {}
        drop(freed);
        drop(vacuum);
        connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let now = pages(connection)?;
        if now >= left {
            break; // not an incremental-vacuum store (its conversion is pending)
        }
        left = now;
    }
    connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

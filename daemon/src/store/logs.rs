//! Apps' log lines, kept per app up to a count and a byte budget (`prune_logs`).

use super::{Store, StoreError};
use rusqlite::params;

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

impl Store {
    /// Appends lines in one transaction and returns their ids, in order.
    #[cfg(test)]
    pub fn append_logs(&self, lines: &[NewLogLine]) -> Result<Vec<u64>, StoreError> {
        self.append_logs_reported(lines, None)
    }

    /// `append_logs`, with `reports` of them queued for the upstream in the same transaction:
    /// a kill stores both or neither, so a stored line always reaches the upstream.
    pub fn append_logs_reported(
        &self,
        lines: &[NewLogLine],
        reports: Option<(&[Vec<u8>], super::OutboxBounds)>,
    ) -> Result<Vec<u64>, StoreError> {
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
        if let Some((payloads, bounds)) = reports {
            super::outbox::push_in(&transaction, super::OutboxKind::Log, payloads, bounds)
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(ids)
    }

    /// The last `tail` lines of `app` (all kept lines when `tail` is 0) whose stream ranks
    /// `min_rank` or above (`cairn_core::levels::rank`; 0 keeps every line), oldest first.
    pub fn tail_logs(
        &self,
        app: &str,
        tail: u64,
        min_rank: usize,
        since_millis: i64,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let connection = self.lock();
        let limit = if tail == 0 { -1 } else { tail as i64 };
        // The ranks of `levels::rank`, in SQL, so that `tail` counts the lines kept.
        let mut statement = connection
            .prepare_cached(
                "SELECT id, app, generation, unix_millis, stream, line FROM
                   (SELECT * FROM logs WHERE app = ?1 AND unix_millis >= ?4
                      AND CASE stream WHEN 'trace' THEN 0 WHEN 'debug' THEN 1 WHEN 'warn' THEN 3
                             WHEN 'cairn' THEN 3 WHEN 'error' THEN 4 WHEN 'critical' THEN 5
                             ELSE 2 END >= ?3
                    ORDER BY id DESC LIMIT ?2) ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![app, limit, min_rank as i64, since_millis], |row| {
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
    pub fn prune_logs(&self, app: &str, keep: u64, keep_bytes: u64) -> Result<usize, StoreError> {
        let connection = self.lock();
        let by_count = connection
            .execute(
                "DELETE FROM logs WHERE app = ?1 AND id <= (SELECT id FROM logs WHERE app = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![app, keep as i64],
            )
            .map_err(|e| self.error(e))?;
        // The newest lines whose text adds up to `keep_bytes` stay; older ones go.
        let by_bytes = connection
            .execute(
                "DELETE FROM logs WHERE app = ?1 AND id <= (
                     SELECT id FROM (
                         SELECT id, SUM(length(CAST(line AS BLOB))) OVER (ORDER BY id DESC) AS newer
                         FROM logs WHERE app = ?1
                     ) WHERE newer > ?2 ORDER BY id DESC LIMIT 1)",
                params![app, keep_bytes.min(i64::MAX as u64) as i64],
            )
            .map_err(|e| self.error(e))?;
        Ok(by_count + by_bytes)
    }
}

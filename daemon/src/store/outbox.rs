//! Reports waiting for the upstream, bounded by bytes and age; a row leaves only after the
//! upstream acked it.

use super::{now_unix, Store, StoreError};
use rusqlite::{params, OptionalExtension};

/// What an outbox row carries; the drop policy sheds logs first and status last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Log,
    Event,
    Status,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
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

/// A report waiting for the upstream; its id makes its message id.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: u64,
    /// `log`, `event` or `status`: the last token of the report's subject.
    pub kind: String,
    pub payload: Vec<u8>,
}

/// Rows waiting, and rows ever dropped by the bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    pub waiting: u64,
    /// The bytes of the reports waiting (what `outbox_max_bytes` bounds).
    pub bytes: u64,
    pub dropped: u64,
}

impl Store {
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
        let dropped = push_in(&transaction, kind, payloads, bounds).map_err(|e| self.error(e))?;
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(dropped)
    }

    /// The oldest `limit` rows: (id, payload).
    pub fn outbox_peek(&self, limit: u64) -> Result<Vec<OutboxRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT id, payload, kind FROM outbox ORDER BY id LIMIT ?1")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok(OutboxRow {
                    id: row.get::<_, i64>(0)? as u64,
                    payload: row.get(1)?,
                    kind: row.get(2)?,
                })
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

    pub fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let connection = self.lock();
        let (waiting, bytes): (i64, i64) = connection
            .query_row(
                "SELECT count(*), COALESCE(sum(bytes), 0) FROM outbox",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| self.error(e))?;
        let dropped: i64 = connection
            .query_row(
                "SELECT COALESCE((SELECT value FROM counters WHERE name = 'outbox_dropped'), 0)",
                [],
                |row| row.get(0),
            )
            .map_err(|e| self.error(e))?;
        Ok(OutboxStats {
            waiting: waiting as u64,
            bytes: bytes as u64,
            dropped: dropped as u64,
        })
    }
}

/// Queues `payloads` within `transaction` (one with what they report, so that a kill commits
/// both or neither), then sheds what the bounds no longer allow: logs first, then events,
/// then status. Returns how many rows were dropped.
pub(super) fn push_in(
    transaction: &rusqlite::Transaction<'_>,
    kind: OutboxKind,
    payloads: &[Vec<u8>],
    bounds: OutboxBounds,
) -> rusqlite::Result<u64> {
    let now = now_unix();
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO outbox (kind, payload, bytes, created_unix) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for payload in payloads {
            insert.execute(params![kind.as_str(), payload, payload.len() as i64, now])?;
        }
    }
    let mut dropped = transaction.execute(
        "DELETE FROM outbox WHERE created_unix < ?1",
        [now - bounds.max_age_secs],
    )? as u64;
    let mut total: i64 =
        transaction.query_row("SELECT COALESCE(SUM(bytes), 0) FROM outbox", [], |row| {
            row.get(0)
        })?;
    for shed in ["log", "event", "status"] {
        while total as u64 > bounds.max_bytes {
            let oldest: Option<(i64, i64)> = transaction
                .query_row(
                    "SELECT id, bytes FROM outbox WHERE kind = ?1 ORDER BY id LIMIT 1",
                    [shed],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let Some((id, bytes)) = oldest else { break };
            transaction.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
            total -= bytes;
            dropped += 1;
        }
    }
    if dropped > 0 {
        transaction.execute(
            "INSERT INTO counters (name, value) VALUES ('outbox_dropped', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            [dropped as i64],
        )?;
    }
    Ok(dropped)
}

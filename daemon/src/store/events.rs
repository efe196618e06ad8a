//! The event history: what happened to apps and to the device (deploys, rollbacks, restarts,
//! OOM kills, crashloops, removals, imports, link changes), each with its time, kept up to
//! `MAX_EVENTS` rows (the oldest go first).

use super::{Store, StoreError};
use rusqlite::params;

/// Events kept, for all apps and the device together.
pub const MAX_EVENTS: i64 = 10_000;

#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The app, or "" for the device.
    pub app: String,
    pub generation: u64,
    pub unix_millis: i64,
    pub kind: &'static str,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: u64,
    pub app: String,
    pub generation: u64,
    pub unix_millis: i64,
    pub kind: String,
    pub text: String,
}

impl Store {
    /// Appends `events` in one transaction, drops what is past `MAX_EVENTS`, and returns the
    /// ids given, in order.
    pub fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let mut ids = Vec::with_capacity(events.len());
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO events (app, generation, unix_millis, kind, text) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|e| self.error(e))?;
            for event in events {
                insert
                    .execute(params![
                        event.app,
                        event.generation as i64,
                        event.unix_millis,
                        event.kind,
                        event.text
                    ])
                    .map_err(|e| self.error(e))?;
                ids.push(transaction.last_insert_rowid() as u64);
            }
        }
        if let Some(last) = ids.last() {
            transaction
                .execute(
                    "DELETE FROM events WHERE id <= ?1",
                    params![*last as i64 - MAX_EVENTS],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(ids)
    }

    /// Events since `since_millis` (0: all kept), of `app` and the device's own ("" for
    /// every app's), the newest `limit` of them, oldest first.
    pub fn events(
        &self,
        app: &str,
        since_millis: i64,
        limit: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, app, generation, unix_millis, kind, text FROM events
                 WHERE unix_millis >= ?1 AND (?2 = '' OR app = ?2 OR app = '')
                 ORDER BY id DESC LIMIT ?3",
            )
            .map_err(|e| self.error(e))?;
        let mut events = statement
            .query_map(params![since_millis, app, limit as i64], |row| {
                Ok(EventRecord {
                    id: row.get::<_, i64>(0)? as u64,
                    app: row.get(1)?,
                    generation: row.get::<_, i64>(2)? as u64,
                    unix_millis: row.get(3)?,
                    kind: row.get(4)?,
                    text: row.get(5)?,
                })
            })
            .map_err(|e| self.error(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))?;
        events.reverse();
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(app: &str, kind: &'static str, at: i64) -> NewEvent {
        NewEvent {
            app: app.into(),
            generation: 1,
            unix_millis: at,
            kind,
            text: format!("{kind} at {at}"),
        }
    }

    #[test]
    fn events_are_kept_bounded_and_read_by_app_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        store
            .append_events(&[
                event("a", "deploy", 10),
                event("b", "deploy", 20),
                event("", "link", 30),
            ])
            .unwrap();
        store.append_events(&[event("a", "restart", 40)]).unwrap();
        let of_a: Vec<_> = store
            .events("a", 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(of_a, ["deploy at 10", "link at 30", "restart at 40"]);
        assert_eq!(store.events("", 25, 100).unwrap().len(), 2);
        assert_eq!(store.events("", 0, 1).unwrap()[0].text, "restart at 40");

        let many: Vec<NewEvent> = (0..MAX_EVENTS + 5)
            .map(|i| event("c", "exit", 100 + i))
            .collect();
        store.append_events(&many).unwrap();
        let kept = store.events("", 0, u64::MAX >> 1).unwrap();
        assert_eq!(kept.len() as i64, MAX_EVENTS);
        assert_eq!(kept.last().unwrap().unix_millis, 100 + MAX_EVENTS + 4);
    }
}

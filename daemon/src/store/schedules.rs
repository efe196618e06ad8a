//! Each `[[schedule]]`'s last due time and the outcome of its last run, kept so that a run
//! missed while cairnd was stopped is known at the next start (`schedule`).

use super::{Store, StoreError};
use rusqlite::{params, OptionalExtension};

impl Store {
    /// When the schedule `name` of `app` was last due (Unix milliseconds), if it ever was.
    pub fn schedule_last_due(&self, app: &str, name: &str) -> Result<Option<i64>, StoreError> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT last_due_ms FROM schedule_state WHERE app = ?1 AND name = ?2",
                [app, name],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// Records the schedules' last due times and last runs, all in one transaction.
    pub fn record_schedules(
        &self,
        states: &[(String, String, i64, String)],
    ) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        for (app, name, last_due_ms, last_run) in states {
            transaction
                .execute(
                    // Only for an app still there: a removed app's state went with it.
                    "INSERT INTO schedule_state (app, name, last_due_ms, last_run)
                     SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM apps WHERE name = ?1)
                     ON CONFLICT (app, name) DO UPDATE SET last_due_ms = excluded.last_due_ms,
                     last_run = excluded.last_run",
                    params![app, name, last_due_ms, last_run],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))
    }

    /// Forgets schedules an app no longer has.
    pub fn forget_schedules(&self, schedules: &[(String, String)]) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        for (app, name) in schedules {
            transaction
                .execute(
                    "DELETE FROM schedule_state WHERE app = ?1 AND name = ?2",
                    [app, name],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))
    }
}

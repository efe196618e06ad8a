//! The user and group id each app's pool runs as (see `pool_users`): given on an app's first
//! start, kept while the app exists, freed by `remove_app`.

use super::{Store, StoreError};
use rusqlite::OptionalExtension;
use std::ops::RangeInclusive;

impl Store {
    /// Frees `app`'s pool id (once the app is removed and its pool has ended).
    pub fn release_pool_id(&self, app: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM pool_ids WHERE app = ?1", [app])
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Frees the ids of apps the store does not have (a first deploy that failed, a removal
    /// cut short): at start-up, before any pool runs. Returns how many.
    pub fn release_orphan_pool_ids(&self) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM pool_ids WHERE app NOT IN (SELECT name FROM apps)",
                [],
            )
            .map_err(|e| self.error(e))
    }

    /// `app`'s pool id, if it has been given one.
    pub fn held_pool_id(&self, app: &str) -> Result<Option<u32>, StoreError> {
        self.lock()
            .query_row("SELECT id FROM pool_ids WHERE app = ?1", [app], |row| {
                row.get::<_, i64>(0)
            })
            .optional()
            .map(|id| id.map(|id| id as u32))
            .map_err(|e| self.error(e))
    }

    /// `app`'s pool id, giving it the lowest id of `range` that no other app holds and `taken`
    /// does not claim when it has none. `None`: every id of the range is taken.
    pub fn pool_id(
        &self,
        app: &str,
        range: RangeInclusive<u32>,
        taken: impl Fn(u32) -> bool,
    ) -> Result<Option<u32>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let held: Option<i64> = transaction
            .query_row("SELECT id FROM pool_ids WHERE app = ?1", [app], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| self.error(e))?;
        match held {
            Some(id) if range.contains(&(id as u32)) => return Ok(Some(id as u32)),
            // Given from a range the config no longer names: a new one from the range, so
            // every pool's uid is one the control socket refuses.
            Some(_) => {
                transaction
                    .execute("DELETE FROM pool_ids WHERE app = ?1", [app])
                    .map_err(|e| self.error(e))?;
            }
            None => {}
        }
        let used: std::collections::HashSet<u32> = {
            let mut statement = transaction
                .prepare("SELECT id FROM pool_ids WHERE id BETWEEN ?1 AND ?2")
                .map_err(|e| self.error(e))?;
            let rows = statement
                .query_map([*range.start() as i64, *range.end() as i64], |row| {
                    row.get::<_, i64>(0)
                })
                .map_err(|e| self.error(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.error(e))?
                .into_iter()
                .map(|id| id as u32)
                .collect()
        };
        let Some(id) = range
            .into_iter()
            .find(|id| !used.contains(id) && !taken(*id))
        else {
            return Ok(None);
        };
        transaction
            .execute(
                "INSERT INTO pool_ids (app, id) VALUES (?1, ?2)",
                rusqlite::params![app, id as i64],
            )
            .map_err(|e| self.error(e))?;
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(Some(id))
    }
}

//! What was last imported from each file of the import folder, so an unchanged file is not
//! deployed again.

use super::{now_unix, Store, StoreError};
use rusqlite::{params, OptionalExtension};

impl Store {
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
}

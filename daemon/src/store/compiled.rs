//! Precompiled code per (component digest, engine fingerprint), checked by its checksum
//! before it is handed out.

use super::{now_unix, Store, StoreError};
use crate::digest::Digest;
use rusqlite::{params, OptionalExtension};

/// Precompiled code, with what the compiler recorded about it (text it wrote; absent for code
/// cached by an older cairnd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub code: Vec<u8>,
    pub facts: Option<String>,
}

impl Store {
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
                Ok(Some(Compiled { code: data, facts }))
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
        self.check_room(data.len() as u64)?;
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
}

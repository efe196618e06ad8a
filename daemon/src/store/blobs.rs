//! Component bytes, content-addressed by digest and checked on every read, and their names
//! (`name:tag`).

use super::{now_unix, Store, StoreError};
use crate::digest::Digest;
use rusqlite::{params, OptionalExtension};

/// Names a digest `name:tag`, moving the tag if it named another digest.
const TAG_COMPONENT: &str =
    "INSERT INTO components (name, tag, digest, source, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (name, tag) DO UPDATE SET digest = excluded.digest, source = excluded.source,
     created_unix = excluded.created_unix";

#[derive(Debug, Clone)]
pub struct ComponentRecord {
    pub digest: Digest,
    pub size: u64,
    pub name: String,
    pub tag: String,
    pub source: String,
    pub created_unix: i64,
}

impl Store {
    /// Stores a component's `bytes` under `digest` and, with `tag` (name, tag, source), names
    /// it, in one transaction. `digest` must be of these very bytes: only `admission` calls
    /// this, having hashed them as they arrived. Returns false if the bytes were present.
    pub fn put_component(
        &self,
        digest: &Digest,
        bytes: &[u8],
        tag: Option<(&str, &str, &str)>,
    ) -> Result<bool, StoreError> {
        // Present already: no room needed, and its grace period starts again (a push before a
        // deploy of a component that nothing used any more).
        if !self.touch_blob(digest)? {
            self.check_room(bytes.len() as u64)?;
        }
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let inserted = transaction
            .execute(
                "INSERT OR IGNORE INTO blobs (digest, size, data, created_unix) VALUES (?1, ?2, ?3, ?4)",
                params![digest.to_string(), bytes.len() as i64, bytes, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        if let Some((name, tag, source)) = tag {
            transaction
                .execute(
                    TAG_COMPONENT,
                    params![name, tag, digest.to_string(), source, now_unix()],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(inserted == 1)
    }

    /// Whether `digest` is stored; if so, its grace period (`Policy::grace_secs`) starts again,
    /// so that collection leaves it to the deploy or fleet document about to use it.
    pub fn touch_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let connection = self.lock();
        connection
            .execute(
                "UPDATE blobs SET touched_unix = ?2 WHERE digest = ?1",
                params![digest.to_string(), now_unix()],
            )
            .map(|changed| changed == 1)
            .map_err(|e| self.error(e))
    }

    pub fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT 1 FROM blobs WHERE digest = ?1",
                [digest.to_string()],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(|e| self.error(e))
    }

    /// The bytes stored under `digest`, checked against it.
    pub fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let bytes: Option<Vec<u8>> = {
            let connection = self.lock();
            connection
                .query_row(
                    "SELECT data FROM blobs WHERE digest = ?1",
                    [digest.to_string()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| self.error(e))?
        };
        match bytes {
            Some(bytes) if !digest.verify(&bytes) => Err(StoreError::Corrupt {
                what: format!("component {digest}"),
                detail: format!(
                    "its {} stored bytes hash to {}",
                    bytes.len(),
                    Digest::of(&bytes)
                ),
            }),
            other => Ok(other),
        }
    }

    /// Deletes a blob (and its precompiled code) that no name and no generation refers to.
    pub fn drop_blob_if_unused(&self, digest: &Digest) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let deleted = transaction
            .execute(
                "DELETE FROM blobs WHERE digest = ?1
                   AND NOT EXISTS (SELECT 1 FROM components WHERE digest = ?1)
                   AND NOT EXISTS (SELECT 1 FROM generations WHERE digest = ?1)",
                [digest.to_string()],
            )
            .map_err(|e| self.error(e))?;
        if deleted == 1 {
            transaction
                .execute(
                    "DELETE FROM compiled WHERE digest = ?1",
                    [digest.to_string()],
                )
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(deleted == 1)
    }

    /// Names `digest` as `name:tag` (moving the tag if it named another digest).
    pub fn tag_component(
        &self,
        name: &str,
        tag: &str,
        digest: &Digest,
        source: &str,
    ) -> Result<(), StoreError> {
        let connection = self.lock();
        connection
            .execute(
                TAG_COMPONENT,
                params![name, tag, digest.to_string(), source, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Every stored blob with the names that point at it (one row per name, or one unnamed row).
    pub fn components(&self) -> Result<Vec<ComponentRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT b.digest, b.size, COALESCE(c.name, ''), COALESCE(c.tag, ''), COALESCE(c.source, ''),
                        COALESCE(c.created_unix, b.created_unix)
                 FROM blobs b LEFT JOIN components c ON c.digest = b.digest
                 ORDER BY b.created_unix, c.name, c.tag",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (digest, size, name, tag, source, created_unix) = row.map_err(|e| self.error(e))?;
            records.push(ComponentRecord {
                digest: digest
                    .parse()
                    .map_err(|e: crate::digest::DigestParseError| StoreError::Corrupt {
                        what: "the components table".into(),
                        detail: e.to_string(),
                    })?,
                size: size as u64,
                name,
                tag,
                source,
                created_unix,
            });
        }
        Ok(records)
    }
}

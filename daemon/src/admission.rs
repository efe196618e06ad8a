//! The one way in for components. `cairnctl push`, the import folder and fleet fetch each feed
//! the bytes they receive into an `Intake` as they arrive (bounded by bytes, hashed as they
//! come: no length from a header, metadata or peer is trusted), then `admit` checks the digest
//! against what was announced, validates the component on the blocking pool (the only place a
//! component is validated), and stores and tags it in one transaction.

use crate::digest::Digest;
use crate::engine::{self, RuntimeError};
use crate::regular_file::{self, FileError};
use crate::store::{Store, StoreError};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Memory reserved up front for an announced size; the rest grows as bytes arrive, so a peer
/// announcing a large size it never sends costs nothing.
const RESERVE_AT_MOST: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "the component is over this device's limit of {limit} bytes ({setting} in the config)"
    )]
    TooLarge { limit: u64, setting: &'static str },
    #[error("{0}")]
    File(#[from] FileError),
    #[error("the bytes hash to {actual}, not the {expected} announced; they were damaged on the way and were not stored")]
    Mismatch { actual: Digest, expected: Digest },
    #[error(transparent)]
    Invalid(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: admitting the component failed: {0}")]
    Internal(String),
}

/// The most bytes a component may have on the way in, and the config key that sets it (for
/// the message that refuses more).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub bytes: u64,
    pub setting: &'static str,
}

/// A name for an admitted component (`name:tag`, and who gave it).
pub struct Tag {
    pub name: String,
    pub tag: String,
    pub source: &'static str,
}

/// A component in the store.
#[derive(Debug)]
pub struct Admitted {
    pub digest: Digest,
    pub size: u64,
    /// False when the store already had it.
    pub inserted: bool,
}

/// A component's bytes as they arrive.
pub struct Intake {
    bytes: Vec<u8>,
    hasher: Sha256,
    limit: Limit,
}

impl Intake {
    /// `announced`: what the sender says the size is, only to reserve memory (up to a bound).
    pub fn new(limit: Limit, announced: Option<u64>) -> Intake {
        let reserve = announced.unwrap_or(0).min(limit.bytes).min(RESERVE_AT_MOST);
        Intake {
            bytes: Vec::with_capacity(reserve as usize),
            hasher: Sha256::new(),
            limit,
        }
    }

    /// A regular file's bytes (blocking: call it on the blocking pool).
    pub fn from_file(path: &Path, limit: Limit) -> Result<Intake, AdmitError> {
        let mut intake = Intake::new(limit, None);
        match regular_file::read_chunks(path, limit.bytes, |chunk| intake.take(chunk)) {
            Ok(_) => Ok(intake),
            Err(FileError::TooLarge { .. }) => Err(intake.too_large()),
            Err(error) => Err(error.into()),
        }
    }

    /// Adds `chunk`; refused (and nothing more kept) once the total passes the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), AdmitError> {
        if self.len() + chunk.len() as u64 > self.limit.bytes {
            self.bytes = Vec::new();
            return Err(self.too_large());
        }
        self.take(chunk);
        Ok(())
    }

    fn take(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.bytes.extend_from_slice(chunk);
    }

    fn too_large(&self) -> AdmitError {
        AdmitError::TooLarge {
            limit: self.limit.bytes,
            setting: self.limit.setting,
        }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The digest of what arrived so far.
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }
}

/// Admits what `intake` holds: it must hash to `expected` when one was announced, and be a
/// valid component; then it is stored (and tagged, with `tag`) in one transaction.
pub async fn admit(
    store: &Arc<Store>,
    intake: Intake,
    expected: Option<&Digest>,
    tag: Option<Tag>,
) -> Result<Admitted, AdmitError> {
    let digest = intake.digest();
    if let Some(expected) = expected {
        if *expected != digest {
            return Err(AdmitError::Mismatch {
                actual: digest,
                expected: expected.clone(),
            });
        }
    }
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let bytes = intake.bytes;
        engine::check_component(&bytes)?;
        let tag = tag
            .as_ref()
            .map(|t| (t.name.as_str(), t.tag.as_str(), t.source));
        let inserted = store.put_component(&digest, &bytes, tag)?;
        Ok(Admitted {
            digest,
            size: bytes.len() as u64,
            inserted,
        })
    })
    .await
    .map_err(|e| AdmitError::Internal(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        bytes: 16,
        setting: "max_component_size",
    };

    #[test]
    fn an_intake_hashes_what_arrived_and_stops_at_its_limit() {
        let mut intake = Intake::new(LIMIT, Some(u64::MAX));
        intake.push(b"0123456789").unwrap();
        assert_eq!(intake.digest(), Digest::of(b"0123456789"));
        intake.push(b"abcdef").unwrap();
        assert_eq!(intake.len(), 16);
        let refused = intake.push(b"x").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("limit of 16 bytes (max_component_size"),
            "{refused}"
        );
        assert_eq!(intake.len(), 0, "nothing more is kept once refused");
    }

    #[test]
    fn a_device_file_is_refused_before_it_is_read() {
        let refused = Intake::from_file(Path::new("/dev/zero"), LIMIT)
            .err()
            .unwrap();
        assert!(
            refused.to_string().contains("is a character device"),
            "{refused}"
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.wasm");
        std::fs::write(&big, [0u8; 17]).unwrap();
        assert!(matches!(
            Intake::from_file(&big, LIMIT),
            Err(AdmitError::TooLarge { limit: 16, .. })
        ));
    }

    #[tokio::test]
    async fn only_a_valid_component_with_the_announced_digest_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("cairn.db")).unwrap());
        let limit = Limit {
            bytes: 1 << 20,
            setting: "max_component_size",
        };
        let intake = |bytes: &[u8]| {
            let mut intake = Intake::new(limit, None);
            intake.push(bytes).unwrap();
            intake
        };
        // The smallest component: the header alone.
        let component = b"\0asm\x0d\0\x01\0";
        let wrong = Digest::of(b"something else");
        let refused = admit(&store, intake(component), Some(&wrong), None)
            .await
            .unwrap_err();
        assert!(matches!(refused, AdmitError::Mismatch { .. }), "{refused}");
        let refused = admit(&store, intake(b"\0asm\x01\0\0\0"), None, None)
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            AdmitError::Invalid(RuntimeError::CoreModule)
        ));
        assert!(!store.has_blob(&Digest::of(b"\0asm\x01\0\0\0")).unwrap());

        let tag = Tag {
            name: "tiny".into(),
            tag: "v1".into(),
            source: "local",
        };
        let digest = Digest::of(component);
        let admitted = admit(&store, intake(component), Some(&digest), Some(tag))
            .await
            .unwrap();
        assert!(admitted.inserted);
        assert_eq!(
            (admitted.digest.clone(), admitted.size),
            (digest.clone(), 8)
        );
        assert!(store.has_blob(&digest).unwrap());
        assert!(store
            .components()
            .unwrap()
            .iter()
            .any(|c| c.name == "tiny" && c.tag == "v1" && c.digest == digest));
        let again = admit(&store, intake(component), None, None).await.unwrap();
        assert!(!again.inserted);
    }
}

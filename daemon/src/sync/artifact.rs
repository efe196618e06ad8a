//! Fetching one artifact (a component, by digest) from the upstream object store into the
//! component store. The chunks are streamed to a file beside the store
//! (`downloads/HEX.part`) as they arrive, never held whole in memory; every MiB the file is
//! synced and a checkpoint (`downloads/HEX.json`: the object's id, the next chunk's stream
//! sequence, the bytes kept) written, so a download cut by the link, a stall or a restart
//! resumes from the chunks already kept instead of from zero. The whole is hashed and checked
//! against the digest before it is admitted; a mismatch discards it all.

use super::{upstream_error, Sync, SyncError};
use crate::admission;
use crate::digest::Digest;
use async_nats::jetstream::{self, consumer};
use cairn_core::fleet;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A download with no progress for this long is abandoned (and retried with its document).
const DOWNLOAD_STALL: Duration = Duration::from_secs(15);
/// About how many bytes of an artifact are asked for ahead of what has arrived (the pull
/// window; between a half and one and a half of it is in flight). Enough to keep a slow link
/// busy, and little enough that the server never holds for this device more than a few
/// seconds of a 1 Mbit/s link: nats-server drops a client as a slow consumer when one write
/// to it waits past its write deadline (10 s by default), which a push consumer's window did
/// to a device on 1 Mbit/s about every 15 s (seen in `just bench`'s poor link).
const PULL_WINDOW: u64 = 256 << 10;
/// How much may arrive between two checkpoints (what a crash can cost a resumed download).
const CHECKPOINT_EVERY: u64 = 1 << 20;
/// At most one progress line in the log this often while a download goes on.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Partial downloads not touched for this long are removed at start.
const ABANDONED_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    /// The object's chunks are published under this id; another id is another upload.
    nuid: String,
    /// The stream sequence of the next chunk to ask for.
    next_sequence: u64,
    /// Bytes of the part file that are synced and belong to the chunks before it.
    bytes: u64,
}

/// Where a download of `digest` is kept while it is under way.
struct Partial {
    part: PathBuf,
    checkpoint: PathBuf,
}

impl Partial {
    fn new(dir: &Path, digest: &Digest) -> Partial {
        let name = digest.to_string().replace(':', "-");
        Partial {
            part: dir.join(format!("{name}.part")),
            checkpoint: dir.join(format!("{name}.json")),
        }
    }

    /// The checkpoint, if it is for object `nuid` and its bytes are in the part file.
    fn resume_point(&self, nuid: &str) -> Option<Checkpoint> {
        let text = std::fs::read(&self.checkpoint).ok()?;
        let checkpoint: Checkpoint = serde_json::from_slice(&text).ok()?;
        let on_disk = std::fs::metadata(&self.part).ok()?.len();
        (checkpoint.nuid == nuid && checkpoint.bytes <= on_disk).then_some(checkpoint)
    }

    /// Writes the checkpoint after the part file's data is synced, by rename, so a crash
    /// leaves the old checkpoint or the new one, each true of the file.
    async fn save(&self, file: &tokio::fs::File, checkpoint: &Checkpoint) -> std::io::Result<()> {
        file.sync_data().await?;
        let temporary = self.checkpoint.with_extension("json.new");
        tokio::fs::write(&temporary, serde_json::to_vec(checkpoint)?).await?;
        tokio::fs::rename(&temporary, &self.checkpoint).await
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.part);
        let _ = std::fs::remove_file(&self.checkpoint);
    }
}

/// Opens the part file at `keep` bytes (truncating what came after them) and hashes what it
/// keeps, or starts it empty (blocking: call it on the blocking pool).
fn reopen(partial: &Partial, keep: Option<u64>) -> std::io::Result<(std::fs::File, Sha256)> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial.part)?;
    file.set_len(keep.unwrap_or(0))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 << 10];
    let mut reader = std::io::BufReader::new(&file);
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    drop(reader);
    use std::io::Seek;
    file.seek(std::io::SeekFrom::End(0))?;
    Ok((file, hasher))
}

/// Removes the partial downloads of other artifacts that nothing touched for 10 minutes, so
/// downloads abandoned for another document do not pile up beside the store.
fn remove_others(dir: &Path, digest: &Digest) {
    let mine = digest.to_string().replace(':', "-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if idle && !name.starts_with(&mine) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes partial downloads nobody touched for a week (their documents changed since).
pub(super) fn remove_abandoned(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > ABANDONED_AFTER);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Sync {
    pub(super) fn downloads(&self) -> PathBuf {
        self.store.dir().join("downloads")
    }

    /// Makes sure the store holds `digest`: downloaded (resuming a cut download), bounded by
    /// max_artifact_size, hashed and verified before it enters the store, so an interrupted
    /// download never leaves a partial component in the store.
    pub(super) async fn fetch_artifact(
        &self,
        context: &jetstream::Context,
        digest: &Digest,
    ) -> Result<(), SyncError> {
        let wanted = digest.clone();
        if self
            .store
            .call(move |store| store.touch_blob(&wanted))
            .await?
        {
            return Ok(());
        }
        let max = self
            .config
            .as_ref()
            .map(|c| c.max_artifact_size.0)
            .unwrap_or(256 << 20);
        let bucket = context
            .get_object_store(fleet::ARTIFACT_BUCKET)
            .await
            .map_err(|e| SyncError::Upstream(format!("no artifact store upstream: {e}")))?;
        let info = bucket.info(digest.to_string()).await.map_err(|e| {
            SyncError::Upstream(format!(
                "artifact {digest} is not in the upstream store: {e}"
            ))
        })?;
        let size = info.size as u64;
        if size > max {
            return Err(SyncError::Upstream(format!(
                "artifact {digest} is {size} bytes, over this device's max_artifact_size of {max}"
            )));
        }
        if info.deleted {
            return Err(SyncError::Upstream(format!(
                "artifact {digest} was deleted from the upstream store"
            )));
        }
        let dir = self.downloads();
        std::fs::create_dir_all(&dir)
            .map_err(|e| SyncError::Upstream(format!("cannot make {}: {e}", dir.display())))?;
        remove_others(&dir, digest);
        let partial = Partial::new(&dir, digest);
        let checkpoint = partial.resume_point(&info.nuid);
        // Room for the rest of the part file and for the component in the store after it.
        let room = (2 * size).saturating_sub(checkpoint.as_ref().map_or(0, |c| c.bytes));
        self.store.call(move |store| store.check_room(room)).await?;
        let local = |e: std::io::Error| {
            SyncError::Upstream(format!(
                "downloading {digest}: {}: {e}",
                partial.part.display()
            ))
        };
        let (file, mut hasher) = {
            let (part, checkpoint) = (
                Partial::new(&dir, digest),
                checkpoint.as_ref().map(|c| c.bytes),
            );
            tokio::task::spawn_blocking(move || reopen(&part, checkpoint))
                .await
                .map_err(|e| SyncError::Upstream(format!("downloading {digest}: {e}")))?
                .map_err(local)?
        };
        let mut file = tokio::fs::File::from_std(file);
        let mut kept = checkpoint.as_ref().map_or(0, |c| c.bytes);
        let started = std::time::Instant::now();
        match kept {
            0 => tracing::info!(%digest, size, "downloading an artifact"),
            _ => tracing::info!(%digest, kept, size, "resuming a download"),
        }
        if kept < size {
            let from = checkpoint.as_ref().map(|c| c.next_sequence);
            let chunk_size = size.div_ceil(info.chunks.max(1) as u64).max(1);
            self.download(
                context,
                &info.nuid,
                from,
                chunk_size,
                digest,
                size,
                &partial,
                &mut file,
                &mut hasher,
                &mut kept,
            )
            .await?;
        }
        drop(file);
        let actual = Digest::from_sha256(hasher.finalize().into());
        if kept != size {
            partial.remove();
            return Err(SyncError::Upstream(format!(
                "artifact {digest} arrived as {kept} bytes, not the {size} bytes announced; discarded, it is fetched again from the start"
            )));
        }
        if actual != *digest {
            partial.remove();
            return Err(SyncError::Upstream(format!(
                "artifact {digest} arrived hashing to {actual}: damaged, or not what it is named; discarded, it is fetched again from the start"
            )));
        }
        let limit = admission::Limit {
            bytes: max,
            setting: "max_artifact_size",
        };
        tracing::info!(%digest, size, took = ?started.elapsed(), "artifact downloaded and verified");
        let path = partial.part.clone();
        let intake =
            tokio::task::spawn_blocking(move || admission::Intake::from_file(&path, limit))
                .await
                .map_err(|e| SyncError::Upstream(format!("artifact {digest}: {e}")))?
                .map_err(|e| SyncError::Upstream(format!("artifact {digest}: {e}")))?;
        let tag = admission::Tag {
            name: "fleet".into(),
            tag: digest.to_string(),
            source: "fleet",
        };
        let admitted = admission::admit(&self.store, intake, Some(digest), Some(tag)).await;
        partial.remove();
        admitted.map_err(|e| match e {
            admission::AdmitError::Store(error) => SyncError::Store(error),
            other => SyncError::Upstream(format!("artifact {digest}: {other}")),
        })?;
        tracing::info!(%digest, took = ?started.elapsed(), "artifact admitted to the store");
        Ok(())
    }

    /// Reads the object's chunks (of `chunk_size` bytes) from stream sequence `from` (the start
    /// when `None`) into `file`, checkpointing as it goes, until `size` bytes are kept, asking
    /// for `PULL_WINDOW` at a time. Watches the link: when it drops, or nothing arrives for
    /// DOWNLOAD_STALL, it stops with what was kept saved.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        context: &jetstream::Context,
        nuid: &str,
        from: Option<u64>,
        chunk_size: u64,
        digest: &Digest,
        size: u64,
        partial: &Partial,
        file: &mut tokio::fs::File,
        hasher: &mut Sha256,
        kept: &mut u64,
    ) -> Result<(), SyncError> {
        let stream = context
            .get_stream(format!("OBJ_{}", fleet::ARTIFACT_BUCKET))
            .await
            .map_err(upstream_error)?;
        let deliver_policy = match from {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("$O.{}.C.{nuid}", fleet::ARTIFACT_BUCKET),
                deliver_policy,
                // The ordered pull asks for `max_batch` chunks at a time, and again when half
                // of them are in.
                max_batch: (PULL_WINDOW / chunk_size).max(1) as i64,
                ..Default::default()
            })
            .await
            .map_err(|e| SyncError::Upstream(format!("cannot read artifact {digest}: {e}")))?;
        let mut chunks = consumer.messages().await.map_err(upstream_error)?;
        let mut last_progress = std::time::Instant::now();
        let client = context.client();
        let mut since_checkpoint = 0u64;
        let mut next_sequence = from.unwrap_or(0);
        let kept_at_start = *kept;
        let interrupted = |why: &str, kept: u64| {
            SyncError::Upstream(format!(
                "downloading {digest} {why} after {kept} of {size} bytes; what arrived is kept and the download resumes from there (`cairnctl sync now` tries at once)"
            ))
        };
        let result = loop {
            if *kept >= size {
                break Ok(());
            }
            if client.connection_state() != async_nats::connection::State::Connected {
                break Err(interrupted("was interrupted: the link dropped", *kept));
            }
            let chunk = match tokio::time::timeout(DOWNLOAD_STALL, chunks.next()).await {
                // Nothing at all: the server may be refusing the pull requests themselves.
                Err(_) if *kept == kept_at_start => break Err(interrupted(
                    "received nothing for 15 s (a device whose NATS user is confined needs `$JS.API.CONSUMER.MSG.NEXT.OBJ_cairn-artifacts.*`: see the README's least privilege)",
                    *kept,
                )),
                Err(_) => break Err(interrupted("stalled", *kept)),
                Ok(None) => break Err(interrupted("was interrupted", *kept)),
                Ok(Some(Err(error))) => {
                    break Err(interrupted(&format!("was interrupted ({error})"), *kept))
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let sequence = chunk
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| SyncError::Upstream(format!("artifact {digest}: {e}")))?;
            // A consumer recreated after a quick reconnect may start over from the object's
            // first chunk: what is kept already is skipped, not appended again.
            if sequence < next_sequence {
                continue;
            }
            let payload = &chunk.message.payload;
            if *kept + payload.len() as u64 > size {
                partial.remove();
                return Err(SyncError::Upstream(format!(
                    "artifact {digest} is larger than the {size} bytes announced; discarded"
                )));
            }
            file.write_all(payload)
                .await
                .map_err(|e| SyncError::Upstream(format!("downloading {digest}: {e}")))?;
            hasher.update(payload);
            *kept += payload.len() as u64;
            since_checkpoint += payload.len() as u64;
            next_sequence = sequence + 1;
            if since_checkpoint >= CHECKPOINT_EVERY {
                self.checkpoint(partial, file, nuid, next_sequence, *kept)
                    .await?;
                since_checkpoint = 0;
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    tracing::info!(%digest, kept = *kept, size, "download progress");
                    last_progress = std::time::Instant::now();
                }
            }
        };
        if result.is_err() && since_checkpoint > 0 {
            self.checkpoint(partial, file, nuid, next_sequence, *kept)
                .await?;
        }
        file.flush()
            .await
            .map_err(|e| SyncError::Upstream(format!("downloading {digest}: {e}")))?;
        result
    }

    async fn checkpoint(
        &self,
        partial: &Partial,
        file: &tokio::fs::File,
        nuid: &str,
        next_sequence: u64,
        bytes: u64,
    ) -> Result<(), SyncError> {
        let checkpoint = Checkpoint {
            nuid: nuid.to_string(),
            next_sequence,
            bytes,
        };
        partial.save(file, &checkpoint).await.map_err(|e| {
            SyncError::Upstream(format!(
                "cannot keep the download in {}: {e}",
                partial.part.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_checkpoint_resumes_only_its_own_object_and_only_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"whole");
        let partial = Partial::new(dir.path(), &digest);
        let (file, _) = reopen(&partial, None).unwrap();
        let mut file = tokio::fs::File::from_std(file);
        file.write_all(b"first-second").await.unwrap();
        let checkpoint = Checkpoint {
            nuid: "N1".into(),
            next_sequence: 7,
            bytes: 5,
        };
        partial.save(&file, &checkpoint).await.unwrap();
        drop(file);
        assert_eq!(partial.resume_point("N1"), Some(checkpoint));
        assert_eq!(
            partial.resume_point("N2"),
            None,
            "another upload of the digest"
        );
        // Resuming cuts what came after the checkpoint and hashes what is kept.
        let point = partial.resume_point("N1").unwrap();
        let (file, hasher) = reopen(&partial, Some(point.bytes)).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 5);
        assert_eq!(
            hasher.finalize().as_slice(),
            Sha256::digest(b"first").as_slice()
        );
        // A part file shorter than its checkpoint says (damage) is not resumed.
        std::fs::write(&partial.part, b"fir").unwrap();
        assert_eq!(partial.resume_point("N1"), None);
        partial.remove();
        assert!(!partial.part.exists() && !partial.checkpoint.exists());
    }
}

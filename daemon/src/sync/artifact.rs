//! Fetching one artifact (a component, by digest) from the upstream object store into the
//! component store.

use super::{upstream_error, Sync, SyncError};
use crate::admission;
use crate::digest::Digest;
use async_nats::jetstream;
use cairn_core::fleet;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// A download with no progress for this long is abandoned (and retried with its document).
const DOWNLOAD_STALL: Duration = Duration::from_secs(15);

impl Sync {
    /// Makes sure the store holds `digest`: downloaded whole, size-bounded and verified before
    /// it enters the store, so an interrupted download leaves nothing behind.
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
        if info.size as u64 > max {
            return Err(SyncError::Upstream(format!(
                "artifact {digest} is {} bytes, over this device's max_artifact_size of {max}",
                info.size
            )));
        }
        let mut object = bucket
            .get(digest.to_string())
            .await
            .map_err(upstream_error)?;
        // Read in chunks, watching the link: when it drops the object reader would wait for
        // a reconnection that may never come, so give up at once (or when nothing arrives for
        // DOWNLOAD_STALL) and start over on the next connection.
        let client = context.client();
        let limit = admission::Limit {
            bytes: max,
            setting: "max_artifact_size",
        };
        let mut intake = admission::Intake::new(limit, Some(info.size as u64));
        let mut chunk = vec![0u8; 256 << 10];
        let mut last_progress = tokio::time::Instant::now();
        loop {
            if client.connection_state() != async_nats::connection::State::Connected {
                return Err(SyncError::Upstream(format!(
                    "downloading {digest} was interrupted after {} of {} bytes: the link dropped; nothing was stored and the download starts over on the next connection",
                    intake.len(),
                    info.size
                )));
            }
            if last_progress.elapsed() > DOWNLOAD_STALL {
                return Err(SyncError::Upstream(format!(
                    "downloading {digest} stalled after {} of {} bytes; nothing was stored and the download starts over on the next connection (`cairnctl sync now` tries at once)",
                    intake.len(),
                    info.size
                )));
            }
            let read =
                match tokio::time::timeout(Duration::from_millis(500), object.read(&mut chunk))
                    .await
                {
                    Err(_) => continue,
                    Ok(read) => read.map_err(|e| {
                        SyncError::Upstream(format!("downloading {digest} was interrupted: {e}"))
                    })?,
                };
            if read == 0 {
                break;
            }
            intake.push(&chunk[..read]).map_err(|e| {
                SyncError::Upstream(format!("artifact {digest} is larger than announced: {e}"))
            })?;
            last_progress = tokio::time::Instant::now();
        }
        let tag = admission::Tag {
            name: "fleet".into(),
            tag: digest.to_string(),
            source: "fleet",
        };
        admission::admit(&self.store, intake, Some(digest), Some(tag))
            .await
            .map_err(|e| match e {
                admission::AdmitError::Store(error) => SyncError::Store(error),
                other => SyncError::Upstream(format!("artifact {digest}: {other}")),
            })?;
        Ok(())
    }
}

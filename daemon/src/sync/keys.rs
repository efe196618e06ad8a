//! Watching the device's keys in the desired-state bucket: one ordered push consumer per key,
//! each named and filtered to that key's subject. The JetStream API subject then names the
//! key (`$JS.API.CONSUMER.CREATE.KV_cairn-desired.NAME.$KV.cairn-desired.KEY`), so a
//! device's NATS user can be allowed to watch its own keys and no other's; one consumer with
//! several filters could not be told apart from one that reads everything.

use super::{upstream_error, SyncError};
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use cairn_core::fleet;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;

/// A change of one key: its new value, or `None` when it was deleted or purged.
pub(super) type Change = Result<(String, Option<Bytes>), SyncError>;

pub(super) type Changes = SelectAll<BoxStream<'static, Change>>;

/// Watches `keys`: each key's current value, then every new one.
pub(super) async fn watch(
    context: &jetstream::Context,
    device: &str,
    keys: &[String],
) -> Result<Changes, SyncError> {
    let stream = context
        .get_stream(format!("KV_{}", fleet::DESIRED_BUCKET))
        .await
        .map_err(upstream_error)?;
    let session = random_suffix();
    let mut changes = SelectAll::new();
    for (index, key) in keys.iter().enumerate() {
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                name: Some(format!("cairn_{device}_{session}_{index}")),
                deliver_subject: context.client().new_inbox(),
                description: Some(format!("cairnd {device} watching {key}")),
                filter_subject: format!("$KV.{}.{key}", fleet::DESIRED_BUCKET),
                // The key's current value first, then each new one. (Not `New`: an ordered
                // consumer recreated after a quick reconnect, having delivered nothing, starts
                // over from the first message and would replay the key's history.)
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| SyncError::Upstream(format!("cannot watch {key}: {e}")))?;
        let messages = consumer.messages().await.map_err(upstream_error)?;
        let key = key.clone();
        changes.push(
            messages
                .map(move |message| {
                    let message = message.map_err(upstream_error)?;
                    let removed = message
                        .message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation"))
                        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                    let value = (!removed).then(|| message.message.payload.clone());
                    Ok((key.clone(), value))
                })
                .boxed(),
        );
    }
    Ok(changes)
}

/// Eight hex digits, so a session's consumer names never meet a previous session's.
fn random_suffix() -> String {
    hex::encode(cairn_core::fleet::loose_random::<4>())
}
